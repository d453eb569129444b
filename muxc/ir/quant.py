"""Frozen quantized linear ops (bitsandbytes 4-bit and 8-bit bases, QLoRA) a graph may contain.

A base model loaded with ``BitsAndBytesConfig(load_in_4bit=True)`` (or ``load_in_8bit``) has
bitsandbytes ``Linear4bit``/``Linear8bitLt`` layers whose weight is packed integers plus a
quantization state (per-block scales, and for double quantization the scales' own scales). muxc
traces each such layer as ONE opaque op whose arguments are the activation, the packed weight,
the bias and the state's tensors, its non-tensor state (shape, block size, quant type) as plain
arguments, so the weight and state are ordinary frozen placeholders: they are shared across
tasks, compared and priced like fp weights.

- ``muxc::linear_4bit(x, weight, bias, absmax, nested_absmax, nested_code, offset, shape,
  blocksize, quant_type, nested_blocksize, dtype, compute_dtype)``: ``x @ W.T + bias`` with
  ``W`` the NF4/FP4 weight of shape ``shape`` (out, in), computed in ``compute_dtype`` by
  bitsandbytes' own ``matmul_4bit`` (its CPU or CUDA kernel), exactly as
  ``Linear4bit.forward`` does in training (casts included, so the op is the layer's one node);
- ``muxc::linear_8bit(x, weight, bias, scb, threshold)``: bitsandbytes' ``matmul`` with the
  LLM.int8 state of ``Linear8bitLt`` (``weight`` int8 rows, ``scb`` their scales).

Both are frozen: their backward gives the input's gradient only (``dX = dY @ dequant(W)``, as
bitsandbytes computes it), itself an opaque op (``muxc::linear_4bit_grad_input``,
``muxc::linear_8bit_grad_input``) so a traced backward keeps it whole. Nothing is saved for
backward but the frozen weight and state.

The state tensors are lifted under the layer's path with a fixed attribute name
(`STATE_ATTRS`): ``model.layers.0.mlp.down_proj.quant_absmax``; `is_quant_state` tells them
apart from other frozen tensors.

>>> is_quant_state("model.layers.0.self_attn.q_proj.quant_absmax")
True
>>> QUANT_LINEARS == frozenset({torch.ops.muxc.linear_4bit, torch.ops.muxc.linear_8bit})
True
"""

from __future__ import annotations

import torch

__all__ = [
    "QUANT_LINEARS",
    "STATE_ATTRS",
    "is_quant_state",
    "linear_4bit",
    "linear_8bit",
    "linear_4bit_grad_input",
    "linear_8bit_grad_input",
]

# attribute names the quantization state tensors are lifted under (one per tensor argument)
STATE_ATTRS = ("quant_absmax", "quant_nested_absmax", "quant_nested_code", "quant_offset",
               "quant_scb")


def is_quant_state(fqn: str) -> bool:
    """Does ``fqn`` name a quantization-state tensor of a quantized layer (`STATE_ATTRS`)?"""
    return fqn.rpartition(".")[2] in STATE_ATTRS


def _plain(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a plain tensor (bitsandbytes' parameter classes override ``.to``)."""
    return t if type(t) is torch.Tensor else t.as_subclass(torch.Tensor)


def _quant_state(absmax, nested_absmax, nested_code, offset, shape, blocksize, quant_type,
                 nested_blocksize, dtype):
    """A bitsandbytes ``QuantState`` over the op's tensors (no copies)."""
    from bitsandbytes.functional import QuantState

    state2 = None
    if nested_absmax is not None:
        state2 = QuantState(absmax=nested_absmax, code=nested_code, blocksize=nested_blocksize,
                            dtype=torch.float32)
    return QuantState(absmax=absmax, shape=torch.Size(shape), blocksize=blocksize,
                      quant_type=quant_type, dtype=dtype, offset=offset, state2=state2)


# ----------------------------------------------------------------------------------- 4-bit


@torch.library.custom_op("muxc::linear_4bit", mutates_args=())
def linear_4bit(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    shape: list[int],
    blocksize: int,
    quant_type: str,
    nested_blocksize: int,
    dtype: torch.dtype,
    compute_dtype: torch.dtype,
) -> torch.Tensor:
    """``x @ W.T + bias`` for a bitsandbytes 4-bit weight, computed in ``compute_dtype`` and
    returned in ``x``'s dtype (module doc)."""
    import bitsandbytes as bnb

    qs = _quant_state(absmax, nested_absmax, nested_code, offset, shape, blocksize, quant_type,
                      nested_blocksize, dtype)
    if bias is not None:
        bias = bias.to(compute_dtype)
    with torch.no_grad():  # the forward bitsandbytes runs in training (MatMul4Bit.forward)
        out = bnb.matmul_4bit(x.to(compute_dtype), weight, quant_state=qs, bias=bias)
    return out.to(x.dtype)


@linear_4bit.register_fake
def _(x, weight, bias, absmax, nested_absmax, nested_code, offset, shape, blocksize, quant_type,
      nested_blocksize, dtype, compute_dtype):
    return x.new_empty((*x.shape[:-1], shape[0]))


@torch.library.custom_op("muxc::linear_4bit_grad_input", mutates_args=())
def linear_4bit_grad_input(
    grad: torch.Tensor,
    weight: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    shape: list[int],
    blocksize: int,
    quant_type: str,
    nested_blocksize: int,
    dtype: torch.dtype,
    compute_dtype: torch.dtype,
) -> torch.Tensor:
    """``grad @ dequant(W)`` in ``compute_dtype``, in ``grad``'s dtype: the input gradient of
    `linear_4bit` (MatMul4Bit.backward's, through the casts around it)."""
    from bitsandbytes.functional import dequantize_4bit

    qs = _quant_state(absmax, nested_absmax, nested_code, offset, shape, blocksize, quant_type,
                      nested_blocksize, dtype)
    g = grad.to(compute_dtype)
    return torch.matmul(g, dequantize_4bit(weight.view(-1, 1), qs).to(g.dtype)).to(grad.dtype)


@linear_4bit_grad_input.register_fake
def _(grad, weight, absmax, nested_absmax, nested_code, offset, shape, blocksize, quant_type,
      nested_blocksize, dtype, compute_dtype):
    return grad.new_empty((*grad.shape[:-1], shape[1]))


def _setup_4bit(ctx, inputs, output):
    x, weight, bias, absmax, nested_absmax, nested_code, offset, *config = inputs
    ctx.save_for_backward(weight, absmax, nested_absmax, nested_code, offset)
    ctx.config = config


def _backward_4bit(ctx, grad):
    dx = linear_4bit_grad_input(grad.contiguous(), *ctx.saved_tensors, *ctx.config)
    return (dx,) + (None,) * 12


linear_4bit.register_autograd(_backward_4bit, setup_context=_setup_4bit)


# ----------------------------------------------------------------------------------- 8-bit


@torch.library.custom_op("muxc::linear_8bit", mutates_args=())
def linear_8bit(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scb: torch.Tensor,
    threshold: float,
) -> torch.Tensor:
    """``x @ W.T + bias`` for a bitsandbytes LLM.int8 weight (module doc)."""
    if bias is not None:
        bias = bias.to(x.dtype)
    import bitsandbytes as bnb
    from bitsandbytes.autograd._functions import MatmulLtState

    state = MatmulLtState()
    state.CB, state.SCB = _plain(weight), scb
    state.threshold = threshold
    state.has_fp16_weights = False
    state.is_training = True  # Linear8bitLt in train mode: the kernels HF PEFT trains with
    with torch.no_grad():
        return bnb.matmul(x, state.CB, bias=bias, state=state)


@linear_8bit.register_fake
def _(x, weight, bias, scb, threshold):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("muxc::linear_8bit_grad_input", mutates_args=())
def linear_8bit_grad_input(
    grad: torch.Tensor, weight: torch.Tensor, scb: torch.Tensor
) -> torch.Tensor:
    """``grad @ (W * scb / 127)``: the input gradient of `linear_8bit` (bitsandbytes')."""
    w = _plain(weight).to(grad.dtype, copy=True).mul_(scb.unsqueeze(1).mul(1.0 / 127.0))
    return torch.matmul(grad, w)


@linear_8bit_grad_input.register_fake
def _(grad, weight, scb):
    return grad.new_empty((*grad.shape[:-1], weight.shape[1]))


def _setup_8bit(ctx, inputs, output):
    x, weight, bias, scb, threshold = inputs
    ctx.save_for_backward(weight, scb)


def _backward_8bit(ctx, grad):
    weight, scb = ctx.saved_tensors
    return linear_8bit_grad_input(grad.contiguous(), weight, scb), None, None, None, None


linear_8bit.register_autograd(_backward_8bit, setup_context=_setup_8bit)

QUANT_LINEARS = frozenset({torch.ops.muxc.linear_4bit, torch.ops.muxc.linear_8bit})
