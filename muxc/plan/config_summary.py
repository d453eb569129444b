"""`summarize_config`: a `ModelSummary` of a Llama-family decoder from its HF config alone.

The planner evaluates many candidate task groups; it needs step costs without tracing (and
for models too large to trace here). This builds the same op list `summarize_graph` reads off a
traced Llama (RMSNorm, q/k/v/o and gate/up/down projections, rotary embedding, masked SDPA
on grouped K/V heads, unrepeated or repeated to all heads, the fused silu(gate) * up,
residual adds, lm_head, per-task loss), with the same work, backward and saved-activation
rules. Tests check it against the traced graph.

>>> import transformers as T
>>> cfg = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
...                     num_attention_heads=4, vocab_size=100)
>>> s = summarize_config(cfg, {"a": AdapterSpec(rank=8, targets=("q_proj", "v_proj"))})
>>> s.layers, s.adapter_numel["a"], s.frozen_bytes // 4
(2, 4096, 95040)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from muxc.ir import AdapterKind
from muxc.kinds import spec_of
from muxc.plan.ops import MATH, CostModelError, OpKey, OpKind, Poly
from muxc.plan.summary import KV, ModelSummary, OpCost, Work, per_call_work

__all__ = ["AdapterSpec", "summarize_config", "LINEAR_TARGETS"]

LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_IA3_PRE = ("down_proj",)  # IA3 scales these modules' input (PEFT's feedforward_modules)
_GATED = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "mixtral", "olmo", "granite",
          "cohere", "phi3", "stablelm", "starcoder2"}


@dataclass(frozen=True)
class AdapterSpec:
    """One task's adapter: PEFT kind, rank (LoRA) and target module names in every layer.

    >>> AdapterSpec(targets="all-linear").targets[-1]
    'down_proj'
    """

    kind: AdapterKind = AdapterKind.LORA
    rank: int = 8
    targets: tuple[str, ...] | str = ("q_proj", "v_proj")
    dtype: str = "float32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", AdapterKind(self.kind))
        targets = LINEAR_TARGETS if self.targets == "all-linear" else tuple(self.targets)
        bad = sorted(set(targets) - set(LINEAR_TARGETS))
        if bad or not targets:
            raise CostModelError(f"adapter targets {bad or targets} are not Llama linear modules; "
                                 f"choose from {list(LINEAR_TARGETS)} or 'all-linear'")
        if spec_of(self.kind).adds_to_output and self.rank < 1:
            raise CostModelError(f"LoRA rank must be >= 1, got {self.rank}")
        object.__setattr__(self, "targets", targets)


def _get(cfg, *names, default=None):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    if default is None:
        raise CostModelError(f"config {type(cfg).__name__} has none of {list(names)}; "
                             "summarize_config reads Llama-family configs (use summarize_graph)")
    return default


class _Build:
    def __init__(self, e: int, tasks: tuple[str, ...]):
        self.e = e
        self.ops: list[OpCost] = []
        self.saved = Poly()
        self.ew = OpKey(OpKind.ELEMENTWISE)
        self.math = OpKey(OpKind.ELEMENTWISE, variant=MATH)
        self.view = OpKey(OpKind.VIEW)
        self.tasks = tasks

    def op(self, name, layer, fwd: Work | None, bwd: Work | None, task=None, kv=KV.NONE,
           site: str | None = None) -> None:
        self.ops.append(OpCost(name, fwd, bwd, task, layer, kv, site))

    def views(self, name, layer, n, grad) -> None:
        w = Work(self.view, Poly.const(1))
        for i in range(n):
            self.op(f"{name}{i}", layer, w, w if grad else None)

    def pw(self, name, layer, fwd_per_token, bwd_per_token, grad, saved_per_token=0.0,
           math: bool = False) -> None:
        """A memory-bound op: bytes per token forward/backward; bwd 0 = pass-through (view);
        ``math``: a transcendental op (ELEMENTWISE/math)."""
        key = self.math if math else self.ew
        bwd = None
        if grad:
            bwd = (Work(key, Poly.tokens(bwd_per_token)) if bwd_per_token
                   else Work(self.view, Poly.const(1)))
            self.saved = self.saved + Poly.tokens(saved_per_token)
        self.op(name, layer, Work(key, Poly.tokens(fwd_per_token)), bwd)

    def replay(self, name, layer, work, active, kept) -> None:
        """`muxc.passes.replay_adapter_inputs`: an identity before adapters; when ``active``
        their backwards replay it once, ``work`` bytes per token, else they keep ``kept`` bytes
        per token."""
        view = Work(self.view, Poly.const(1))
        if active:
            self.op(f"{name}.replay", layer, view, Work(self.ew, Poly.tokens(work)))
            return
        self.op(f"{name}.replay", layer, view, None)
        self.saved = self.saved + Poly.tokens(kept)

    def acc(self, name, layer, uses, width, grad) -> None:
        """Gradient accumulation of a tensor of ``width`` features used ``uses`` times."""
        if grad:
            for i in range(uses - 1):
                acc = Work(self.ew, Poly.tokens(3 * width * self.e))
                self.op(f"{name}.acc{i}", layer, None, acc)

    def norm(self, name, layer, h, grad) -> None:
        """RMSNorm as HF writes it: pow, mean, add eps, rsqrt, x * r, weight * y."""
        e = self.e
        self.views(f"{name}.to", layer, 2, grad)
        self.pw(f"{name}.pow", layer, 2 * h * e, 3 * h * e, grad, h * e, math=True)
        self.pw(f"{name}.mean", layer, h * e + e, 2 * h * e, grad)
        self.pw(f"{name}.add", layer, 2 * e, 0, grad)
        self.pw(f"{name}.rsqrt", layer, 2 * e, 3 * e, grad, e, math=True)
        self.pw(f"{name}.mul", layer, 2 * h * e + e, 6 * h * e, grad)
        self.pw(f"{name}.scale", layer, 2 * h * e, 3 * h * e, grad)

    def gemm(self, name, layer, k, n, dtype, grad_in) -> None:
        w = Work(OpKey(OpKind.GEMM, (k, n), dtype), Poly.tokens())
        self.op(name, layer, w, w if grad_in else None)

    def adapters(self, name, layer, k, n, specs, dtype) -> bool:
        """Each task's adapter on module ``name``; True when any runs there."""
        any_lora = False
        hit = False
        for task, spec in specs.items():
            if name.rsplit(".", 1)[-1] not in spec.targets:
                continue
            hit = True
            kind = spec_of(spec.kind)
            dims = kind.cost_dims(k, n, spec.rank, name.endswith(_IA3_PRE))
            key = OpKey(OpKind(kind.cost_op), dims, spec.dtype)
            any_lora = any_lora or kind.adds_to_output
            w = Work(key, Poly.tokens())
            self.op(f"{name}[{task}]", layer, w, w, task, site=name)
            for suffix, fwd in per_call_work(kind, k, n, spec.rank, name.endswith(_IA3_PRE), spec.dtype):
                self.op(f"{name}[{task}:{suffix}]", layer, fwd, None, task, site=name)
        if any_lora:
            self.op(f"{name}[add]", layer, Work(self.ew, Poly.tokens(3 * n * self.e)),
                    Work(self.view, Poly.const(1)))
        return hit

    def rotary(self, name, layer, width, grad) -> None:
        e = self.e
        self.views(f"{name}.rot", layer, 2, False)  # cos/sin unsqueezes
        self.pw(f"{name}.mul_cos", layer, 2 * width * e, 3 * width * e, grad)
        self.views(f"{name}.half", layer, 2, grad)
        self.pw(f"{name}.neg", layer, width * e, 1.5 * width * e, grad)
        self.pw(f"{name}.cat", layer, 2 * width * e, 0, grad)
        self.pw(f"{name}.mul_sin", layer, 2 * width * e, 3 * width * e, grad)
        self.pw(f"{name}.add", layer, 3 * width * e, 0, grad)
        self.acc(name, layer, 3, width, grad)


def summarize_config(
    config,
    adapters: Mapping[str, AdapterSpec],
    *,
    dtype: str = "float32",
    native_gqa: bool = True,
) -> ModelSummary:
    """A `ModelSummary` of a Llama-family causal LM described by ``config`` (see module doc).

    ``adapters``: task -> its `AdapterSpec`. ``dtype``: the backbone's compute dtype.
    ``native_gqa``: grouped K/V heads are read unrepeated (what pass `native_gqa` makes of a
    CPU program); False: repeated to all heads first, as exported (a CUDA program).
    """
    model_type = getattr(config, "model_type", "")
    if model_type not in _GATED:
        raise CostModelError(
            f"summarize_config knows Llama-family decoders {sorted(_GATED)}, not "
            f"{model_type!r}; trace the program and use summarize_graph(program.mux)"
        )
    if not adapters:
        raise CostModelError("summarize_config needs at least one task's AdapterSpec")
    h = int(_get(config, "hidden_size"))
    inter = int(_get(config, "intermediate_size"))
    layers = int(_get(config, "num_hidden_layers"))
    heads = int(_get(config, "num_attention_heads"))
    kv_heads = int(_get(config, "num_key_value_heads", default=heads))
    d = int(getattr(config, "head_dim", None) or h // heads)
    vocab = int(_get(config, "vocab_size"))
    q, kv = heads * d, kv_heads * d
    fused_act = _get(config, "hidden_act", default="silu") in ("silu", "swish")
    e = OpKey(OpKind.ELEMENTWISE, dtype=dtype).itemsize
    tasks = tuple(adapters)
    b = _Build(e, tasks)
    b.pw("embedding", None, 2 * h * e, 0, False)
    mask_ops = (Poly(((0, 2, 1.0),)), Poly(((0, 2, 1.0),)), Poly(((1, 2, 1.0), (0, 2, 1.0))))
    for i, p in enumerate(mask_ops):  # causal & padding mask built once: O(s^2) bools
        b.op(f"mask{i}", None, Work(b.ew, p), None)
    b.views("mask.view", None, 24, False)
    b.op("rotary", None, Work(b.ew, Poly(((0, 1, 4.0 * d * e),))), None)
    b.views("rotary.inner", None, 10, False)
    attn = Poly(((1, 2, float(heads)),))
    grad = False  # does the residual stream need a gradient yet?
    for layer in range(layers):
        pre = f"layers.{layer}"

        def adapted(mod):
            return any(mod in s.targets for s in adapters.values())

        b.norm(f"{pre}.input_layernorm", layer, h, grad)
        b.acc(f"{pre}.residual", layer, 3, h, grad)
        g = {m: grad or adapted(m) for m in ("q_proj", "k_proj", "v_proj")}
        x_uses = 3
        for mod, n in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            b.gemm(f"{pre}.self_attn.{mod}", layer, h, n, dtype, grad)
            x_uses += b.adapters(f"{pre}.self_attn.{mod}", layer, h, n, adapters, dtype)
        b.acc(f"{pre}.ln1_out", layer, x_uses, h, grad or any(g.values()))
        if x_uses > 3:  # the adapters keep the norm's output, or replay it with a gradient
            b.replay(f"{pre}.ln1_out", layer, 7 * h * e, grad, h * e)
        b.views(f"{pre}.qkv", layer, 6, any(g.values()))
        b.rotary(f"{pre}.rope_q", layer, q, g["q_proj"])
        b.rotary(f"{pre}.rope_k", layer, kv, g["k_proj"])
        if kv < q and not native_gqa:  # repeat K/V heads: expand + copying reshape
            for t in ("k", "v"):
                gt = g[f"{t}_proj"]
                b.views(f"{pre}.repeat_{t}", layer, 3, gt)
                b.pw(f"{pre}.repeat_{t}.copy", layer, (q + kv) * e, 3 * q * e, gt)
        g_attn = any(g.values())
        w = Work(OpKey(OpKind.ATTENTION, (heads, d), dtype, "mask"), attn)
        b.op(f"{pre}.self_attn.sdpa", layer, w, w if g_attn else None, kv=KV.TOTAL)
        if g_attn:  # q, k, v, out, log-sum-exp; the mask as an additive mask per call
            k_width = kv if native_gqa else q
            b.saved = (b.saved + Poly.tokens((2 * q + 2 * k_width) * e + 4 * heads)
                       + Poly(((1, 2, float(e)),)))
        b.views(f"{pre}.attn_out", layer, 3, g_attn)
        b.gemm(f"{pre}.self_attn.o_proj", layer, q, h, dtype, g_attn)
        o_ad = b.adapters(f"{pre}.self_attn.o_proj", layer, q, h, adapters, dtype)
        b.acc(f"{pre}.attn_out", layer, 1 + o_ad, q, g_attn)
        grad = grad or g_attn or o_ad
        b.pw(f"{pre}.residual1", layer, 3 * h * e, 0, grad)
        b.norm(f"{pre}.post_attention_layernorm", layer, h, grad)
        b.acc(f"{pre}.residual1", layer, 3, h, grad)
        g_gate, g_up = grad or adapted("gate_proj"), grad or adapted("up_proj")
        x_uses = 2
        for mod in ("gate_proj", "up_proj"):
            b.gemm(f"{pre}.mlp.{mod}", layer, h, inter, dtype, grad)
            x_uses += b.adapters(f"{pre}.mlp.{mod}", layer, h, inter, adapters, dtype)
        b.acc(f"{pre}.ln2_out", layer, x_uses, h, grad)
        if x_uses > 2:
            b.replay(f"{pre}.ln2_out", layer, 7 * h * e, grad, h * e)
        g_mlp = g_gate or g_up
        if fused_act:  # `fuse_swiglu`: one op keeping gate (and up when gate needs a gradient)
            b.pw(f"{pre}.mlp.swiglu", layer, 5 * inter * e, (2 + 3 * g_up + 6 * g_gate) * inter * e,
                 g_mlp, (1 + g_gate) * inter * e, math=True)
        else:
            b.pw(f"{pre}.mlp.act", layer, 2 * inter * e, 3 * inter * e, g_gate, inter * e, math=True)
            b.pw(f"{pre}.mlp.mul", layer, 3 * inter * e, 6 * inter * e, g_mlp, 2 * inter * e)
        b.gemm(f"{pre}.mlp.down_proj", layer, inter, h, dtype, g_mlp)
        down_ad = b.adapters(f"{pre}.mlp.down_proj", layer, inter, h, adapters, dtype)
        if down_ad and fused_act:  # the adapter replays its input from gate and up
            b.replay(f"{pre}.mlp.act_out", layer, 5 * inter * e, g_gate and g_up, inter * e)
        elif down_ad:  # the adapter keeps its input
            b.saved = b.saved + Poly.tokens(inter * e)
        b.acc(f"{pre}.mlp.mul", layer, 1 + down_ad, inter, g_mlp)
        grad = grad or g_mlp or down_ad
        b.pw(f"{pre}.residual2", layer, 3 * h * e, 0, grad)
    b.norm("norm", None, h, grad)
    b.acc("norm.in", None, 2, h, grad)
    b.views("lm_head.slice", None, 1, grad)
    b.gemm("lm_head", None, h, vocab, dtype, grad)
    for task in tasks:
        w = Work(OpKey(OpKind.LOSS, (vocab,), dtype), Poly.tokens())
        b.op(f"loss[{task}]", None, w, w, task)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * inter + 2 * h
    frozen = vocab * h + layers * per_layer + h + (0 if tied else vocab * h)
    numel = {t: _adapter_numel(s, layers, h, q, kv, inter) for t, s in adapters.items()}
    return ModelSummary(
        ops=tuple(b.ops),
        tasks=tasks,
        layers=layers,
        frozen_bytes=frozen * e,
        adapter_numel=numel,
        adapter_bytes={t: n * OpKey(OpKind.LORA, dtype=adapters[t].dtype).itemsize
                       for t, n in numel.items()},
        saved=b.saved,
        # the frozen head is fused with each loss (`fuse_lm_head_loss`): it keeps the gradient
        # w.r.t. the task's hidden rows, not its logits
        saved_per_task={t: Poly.tokens(float(e * h)) for t in tasks},
        source="config",
    )


def _adapter_numel(spec: AdapterSpec, layers, h, q, kv, inter) -> int:
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    total = 0
    for t in spec.targets:
        k, n = shapes[t]
        total += spec_of(spec.kind).numel(k, n, spec.rank, t in _IA3_PRE)
    return layers * total
