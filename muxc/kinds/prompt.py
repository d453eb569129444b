"""Prompt tuning and P-tuning: a task's learned virtual tokens in front of every row.

PEFT (``PeftModelForCausalLM.forward``) embeds ``input_ids`` with the base model's word
embedding, prepends ``n`` virtual-token embeddings computed by the task's prompt encoder (prompt
tuning: an ``Embedding(n, hidden)``; P-tuning: that embedding followed by an MLP, or by a
bidirectional LSTM and an MLP), prefixes the attention mask with ``n`` ones and the labels with
``n`` times -100, and runs the base model on ``inputs_embeds`` (positions then run
``0 .. n + S - 1``).

muxc does the same without leaving its shared backbone:

- the task's batch gets ``n`` placeholder tokens (id 0, mask 1, label -100) in front of each row
  before muxc lays batches out (`muxc.runtime.batch.with_virtual_tokens`; the kind's
  ``prepends``), so padding, chunking, positions and loss see the task's real lengths;
- the word embedding is an adapter site: after it, each task's tokens whose position within
  their sample is below ``n`` are replaced by its prompt encoder's output at that position
  (computed once per site call from the task's own parameters; gradients reach them through
  the replacement). Replacing the embedding *module's* output matches PEFT, which passes
  ``inputs_embeds`` that the model then scales, adds positions to, and so on.

Within-sample positions are the column in pad alignment (virtual tokens come first in every
row) and ``ChunkStep.positions`` in chunk alignment (positions restart at each packed sample).

Cost: a ``where`` over the task's tokens at the embedding (priced as a pointwise op over the
hidden width), plus, per site call, the encoder (prompt tuning: nothing worth pricing; P-tuning:
priced as three hidden-width GEMMs over the ``n`` virtual rows, forward and backward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from muxc.ir import AdapterKind, AdapterRecord, Aggregate, Dispatch
from muxc.kinds.spec import AdapterKindSpec

__all__ = ["PROMPT", "P_TUNING", "prompt_replace", "ptuning_replace", "encode", "replace_virtual"]

_MLP_PARAMS = 7  # embedding.weight, then three Linear layers' weight and bias
_LSTM_EXTRA = 5  # embedding.weight and two Linear layers' weight and bias around the LSTM


def encode(params: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The ``(n, hidden)`` virtual-token embeddings of a prompt encoder from its parameters in
    ``named_parameters`` order: one tensor (prompt tuning: the embedding itself), seven (P-tuning
    MLP: Linear-ReLU-Linear-ReLU-Linear) or ``5 + 8 * layers`` (P-tuning LSTM: a bidirectional
    LSTM of ``layers`` layers, then Linear-ReLU-Linear), as PEFT's encoders compute them."""
    emb = params[0]
    if len(params) == 1:
        return emb
    if len(params) == _MLP_PARAMS:
        x = emb
        for i in range(3):
            x = F.linear(x, params[1 + 2 * i], params[2 + 2 * i])
            if i < 2:
                x = F.relu(x)
        return x
    layers = (len(params) - _LSTM_EXTRA) // 8
    flat = list(params[1 : 1 + 8 * layers])
    hidden = flat[1].shape[1]  # weight_hh_l0: (4 * hidden, hidden)
    zeros = emb.new_zeros(2 * layers, 1, hidden)
    out = torch.lstm(emb.unsqueeze(0), (zeros, zeros), flat, True, layers, 0.0, True, True, True)[0]
    w0, b0, w1, b1 = params[1 + 8 * layers :]
    return F.linear(F.relu(F.linear(out[0], w0, b0)), w1, b1)


def replace_virtual(rows: torch.Tensor, pos: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """``rows`` (..., hidden) with every token whose within-sample position ``pos`` is below
    ``n = len(prompt)`` replaced by ``prompt[pos]`` (cast to the rows' dtype)."""
    n = prompt.shape[0]
    picked = prompt.to(rows.dtype)[pos.clamp(max=n - 1)]
    return torch.where((pos < n).unsqueeze(-1), picked, rows)


def _columns(h: torch.Tensor) -> torch.Tensor:
    return torch.arange(h.shape[-2], device=h.device).expand(h.shape[:-1])


def _define(name: str):
    """The single-task trace op ``name``: ``h`` (batch, seq, hidden) with its first ``n``
    columns replaced by the encoder's output (PEFT's layout for one task alone)."""

    @torch.library.custom_op(f"muxc::{name}", mutates_args=())
    def op(h: torch.Tensor, params: list[torch.Tensor], site: str) -> torch.Tensor:
        return replace_virtual(h, _columns(h), encode(params))

    @op.register_fake
    def _(h, params, site):
        return torch.empty_like(h)

    def setup(ctx, inputs, output):
        h, params, site = inputs
        ctx.save_for_backward(h, *params)

    def backward(ctx, dy):
        h, *params = ctx.saved_tensors
        with torch.enable_grad():
            hs = h.detach().requires_grad_(True)
            ps = [p.detach().requires_grad_(True) for p in params]
            out = replace_virtual(hs, _columns(hs), encode(ps))
            grads = torch.autograd.grad(out, [hs, *ps], dy, allow_unused=True)
        return grads[0], list(grads[1:]), None

    op.register_autograd(backward, setup_context=setup)
    return op


prompt_replace = _define("prompt_replace")
ptuning_replace = _define("ptuning_replace")


def _records_of(kind: AdapterKind):
    def records(task: str, path: str, encoder: torch.nn.Module, adapter: str) -> AdapterRecord:
        named = dict(encoder.named_parameters())
        return AdapterRecord(
            task=task,
            site=path,
            kind=kind,
            dispatch=Dispatch.OUTPUT,
            aggregate=Aggregate.VIRTUAL_TOKENS,
            params=named,
            param_names={k: f"prompt_encoder.{adapter}.{k}" for k in named},
            rank=int(encoder.embedding.weight.shape[0]),  # virtual tokens per row
        )

    return records


def _traced_forward_of(op):
    def traced_forward(site: str, adapter: str):
        """A forward for the word-embedding module: its own output, then ``op`` (bind it with
        ``encoder=``, the task's prompt encoder)."""

        def forward(self, ids, *args, encoder, **kwargs):
            h = type(self).forward(self, ids, *args, **kwargs)
            return op(h, list(encoder.parameters()), site)

        return forward

    return traced_forward


def _apply(site, x: torch.Tensor, t: torch.Tensor, mux, params, recs, frozen=None) -> torch.Tensor:
    """Each prompt task's virtual positions of the embedding output replaced by its encoder's
    output; other tasks' rows unchanged."""
    rows = t.reshape(sum(mux.rows), mux.seq_len, t.shape[-1])
    parts = []
    for task, (start, end) in ((task, mux.row_range(task)) for task in mux.tasks):
        part = rows[start:end]
        if task in recs:
            if mux.chunk is not None:
                pos = mux.chunk.positions[start:end].to(part.device)
            else:
                pos = _columns(part)
            part = replace_virtual(part, pos, encode(list(params[task].values())))
        parts.append(part)
    return torch.cat(parts).view(t.shape)


def _problems(cfg) -> list[str]:
    out = []
    task_type = getattr(cfg.task_type, "value", cfg.task_type)
    if task_type not in (None, "CAUSAL_LM"):
        out.append(f"task_type={task_type!r} (muxc runs virtual tokens for CAUSAL_LM only)")
    if (cfg.num_transformer_submodules or 1) != 1:
        out.append(f"num_transformer_submodules={cfg.num_transformer_submodules}")
    ptype = getattr(cfg.peft_type, "value", str(cfg.peft_type))
    if ptype == "P_TUNING":
        enc = getattr(cfg.encoder_reparameterization_type, "value", cfg.encoder_reparameterization_type)
        if enc == "LSTM" and cfg.encoder_dropout and cfg.encoder_num_layers > 1:
            out.append(f"encoder_dropout={cfg.encoder_dropout} between LSTM layers (its random mask "
                       "cannot be reproduced; set encoder_dropout=0.0)")
        if cfg.inference_mode:
            out.append("inference_mode=True (the encoder has no trainable MLP)")
    return out


# per-call encoder work of P-tuning: three hidden-width GEMMs over the n virtual rows, each run
# forward and twice backward (dX and dW): one GEMM shape over 9 n rows
def _ptuning_gemm(k: int, n: int, r: int, pre: bool):
    return (n, n), 9 * r


def _encoder_gemms(rec: AdapterRecord) -> list[tuple[tuple[int, int], int]]:
    """A P-tuning encoder's GEMMs at its own widths: every weight matrix after the embedding
    (the MLP's Linear layers, the LSTM's input and recurrent weights) over the ``n`` virtual
    rows, forward, dX and dW (three times the rows)."""
    mats = [p for p in list(rec.params.values())[1:] if p.dim() == 2]
    return [((int(w.shape[1]), int(w.shape[0])), 3 * rec.rank) for w in mats]


def _spec(
    kind: AdapterKind, peft_type: str, op, op_name: str, per_call_gemm, flops_per_call, numel
) -> AdapterKindSpec:
    return AdapterKindSpec(
        kind=kind,
        peft_type=peft_type,
        peft_layers=(),  # not a PEFT layer: the PeftModel's prompt encoder (frontends.peft)
        config_problems=_problems,
        holds=lambda mod, adapter: False,
        records=_records_of(kind),
        traced_forward=_traced_forward_of(op),
        trace_op=getattr(torch.ops.muxc, op_name).default,
        adapted_arg=0,
        input_arg=None,
        param_args=(1, 2),  # one list argument holding every encoder parameter
        kernel_op="",
        apply=_apply,
        cost_op="ia3",  # a pointwise select over the hidden width, per token
        cost_dims=lambda k, n, r, pre: (n,),
        flops_per_token=lambda k, n, r, pre: float(n),
        numel=numel,
        adds_to_output=False,
        per_call_gemm=per_call_gemm or (lambda k, n, r, pre: None),
        flops_per_call=flops_per_call,
        call_gemms=_encoder_gemms if per_call_gemm is not None else None,
        prepends=lambda rec: rec.rank,
    )


PROMPT = _spec(AdapterKind.PROMPT, "PROMPT_TUNING", prompt_replace, "prompt_replace",
               per_call_gemm=None,
               flops_per_call=lambda k, n, r, pre: 0.0,
               numel=lambda k, n, r, pre: r * n)
P_TUNING = _spec(AdapterKind.P_TUNING, "P_TUNING", ptuning_replace, "ptuning_replace",
                 per_call_gemm=_ptuning_gemm,
                 flops_per_call=lambda k, n, r, pre: 2.0 * 9 * r * n * n,
                 # the embedding plus an MLP of about the hidden width (three n x n layers)
                 numel=lambda k, n, r, pre: r * n + 3 * (n * n + n))
