"""`Program.explain()`: what is shared, what is per task, which kernels run and why."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from muxc.ir import Role, SimResult, StepPlan, table
from muxc.options import Fusion

__all__ = ["Explanation", "TaskRow", "explain_program"]


@dataclass(frozen=True)
class TaskRow:
    task: str
    kinds: str
    sites: int
    ranks: str
    trainable_params: int
    adapter_bytes: int
    optimizer: str


@dataclass(frozen=True)
class Explanation:
    """A report; ``str()`` renders it as tables."""

    fusion: str
    alignment: str
    model_type: str
    tasks: list[TaskRow]
    shared_ops: int
    adapter_sites: int
    loss_nodes: int
    frozen_tensors: int
    frozen_bytes: int
    shared_by_value: int
    separate_bytes: int  # N separate model copies: N * frozen + all adapters
    muxc_bytes: int  # one frozen copy + all adapters
    kernels: dict[str, tuple[str, str]]
    htasks: list[list[str]]
    stages: int = 1
    chunk_size: int | None = None
    padding: dict[str, float] = field(default_factory=dict)
    plan: StepPlan | None = field(default=None, repr=False)
    last_plan: StepPlan | None = field(default=None, repr=False)  # what the last step ran
    measured: SimResult | None = field(default=None, repr=False)  # its measured timeline

    @property
    def ineffective_token_fraction(self) -> float | None:
        """Padding tokens / all tokens computed, for the batches given to explain()."""
        return self.plan.ineffective_token_fraction if self.plan else None

    @property
    def bubble_fraction(self) -> float | None:
        """Idle share of the simulated pipeline schedule for those batches."""
        return self.plan.bubble_fraction if self.plan else None

    @property
    def predicted_step_ms(self) -> float | None:
        """Simulated step time (cost model + schedule) for those batches."""
        return self.plan.predicted_step_ms if self.plan else None

    @property
    def memory_ratio(self) -> float:
        """Weight memory of separate per-task models divided by muxc's."""
        return self.separate_bytes / max(self.muxc_bytes, 1)

    def __str__(self) -> str:
        mb = 1 / 2**20
        parts = [
            f"muxc program: {len(self.tasks)} tasks on one {self.model_type} backbone, "
            f"fusion={self.fusion}, alignment={self.alignment}, hTasks={self.htasks}",
            "",
            table(
                ["task", "adapter", "sites", "ranks", "trainable", "adapter MiB", "optimizer"],
                [[r.task, r.kinds, r.sites, r.ranks, r.trainable_params, f"{r.adapter_bytes * mb:.3f}", r.optimizer] for r in self.tasks],
            ),
            "",
            table(
                ["shared", "value"],
                [
                    ["backbone ops (run once for all tasks)", self.shared_ops],
                    ["adapter sites (one multi-task kernel call per kind)", self.adapter_sites],
                    ["per-task loss nodes", self.loss_nodes],
                    ["frozen tensors (one copy)", self.frozen_tensors],
                    ["  of which de-duplicated by value", self.shared_by_value],
                    ["frozen MiB", f"{self.frozen_bytes * mb:.2f}"],
                    ["weights MiB, separate models", f"{self.separate_bytes * mb:.2f}"],
                    ["weights MiB, muxc", f"{self.muxc_bytes * mb:.2f}"],
                    ["memory saved (separate / muxc)", f"{self.memory_ratio:.2f}x"],
                ],
            ),
            "",
            table(["kernel op", "impl", "why"], [[op, i, why] for op, (i, why) in self.kernels.items()], 100),
        ]
        if self.plan:
            p = self.plan
            rows = [
                ["hTasks (spatial groups, interleaved in time)", p.htasks],
                ["stages", p.stages],
                ["chunk_size", p.chunk_size if p.chunk_size else "- (pad)"],
                ["chunk size per hTask", list(p.chunk_sizes)],
                ["micro-batches per hTask", [c.micro_batches for c in p.costs]],
                ["schedule policy", p.schedule.policy],
                ["tokens computed / real", f"{p.tokens_computed} / {p.real_tokens}"],
                ["ineffective_token_fraction", f"{p.ineffective_token_fraction:.4f}"],
                ["bubble_fraction (simulated)", f"{p.bubble_fraction:.4f}"],
                ["predicted_step_ms", f"{p.predicted_step_ms:.3f}"],
            ]
            if p.fusion is not None:
                rows.append(["fusion DP predicted ms", ", ".join(
                    f"{k}={v * 1e3:.3f}{' (past saturation/budget: not allowed)' if k in p.fusion.infeasible else ''}"
                    for k, v in p.fusion.alternatives.items())])
            parts += ["", table(["plan for these batches", "value"], rows, 100)]
        if self.measured is not None and self.last_plan is not None:
            sim, got = self.last_plan.sim, self.measured
            rows = [[s, f"{sim.busy[s] * 1e3:.3f}", f"{got.busy[s] * 1e3:.3f}",
                     f"{sim.utilisation[s]:.3f}", f"{got.utilisation[s]:.3f}"]
                    for s in range(self.last_plan.stages)]
            rows.append(["all", f"makespan {sim.makespan * 1e3:.3f}", f"makespan {got.makespan * 1e3:.3f}",
                         f"bubble {sim.bubble_fraction:.3f}", f"bubble {got.bubble_fraction:.3f}"])
            parts += ["", f"last step ({self.last_plan.schedule.policy}, hTasks {self.last_plan.htasks}):"
                      " simulated vs measured per stage",
                      table(["stage", "busy ms (sim)", "busy ms (measured)", "utilisation (sim)",
                             "utilisation (measured)"], rows, 100)]
        return "\n".join(parts)


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def explain_program(program, batches: Mapping[str, Mapping] | None = None) -> Explanation:
    mux = program.mux
    rows = []
    adapter_bytes = 0
    for name in mux.tasks:
        recs = program.adapters[name]
        params = [p for r in recs for p in r.params.values()]
        nbytes = sum(p.numel() * p.element_size() for p in params)
        adapter_bytes += nbytes
        ranks = sorted({r.rank for r in recs if r.rank})
        opt = program.states[name].optimizer
        rows.append(
            TaskRow(
                task=name,
                kinds="+".join(sorted({r.kind.value for r in recs})),
                sites=len(recs),
                ranks=",".join(map(str, ranks)) or "-",
                trainable_params=sum(p.numel() for p in params),
                adapter_bytes=nbytes,
                optimizer=type(opt).__name__,
            )
        )
    # with stages on several processes a rank keeps only its own stage's frozen tensors
    frozen = [mux.tensors[n.name] for n in mux.nodes_with(Role.FROZEN) if n.name in mux.tensors]
    frozen_bytes = _bytes(frozen)
    n = len(mux.tasks)
    opts = program.options
    plan = program.plan(batches) if batches else None
    if plan:
        htasks = plan.htasks
    elif opts.fusion is Fusion.SPATIAL:
        htasks = [list(mux.tasks)]
    else:  # temporal, or auto before it has seen batches
        htasks = [[t] for t in mux.tasks]
    return Explanation(
        fusion=opts.fusion.value,
        alignment=opts.alignment.value,
        model_type=mux.model_type,
        tasks=rows,
        shared_ops=len(mux.nodes_with(Role.BACKBONE)),
        adapter_sites=len(mux.nodes_with(Role.ADAPTER)),
        loss_nodes=len(mux.nodes_with(Role.LOSS)),
        frozen_tensors=len(frozen),
        frozen_bytes=frozen_bytes,
        shared_by_value=sum(1 for v in program.sharing.values() if v == "value"),
        separate_bytes=n * frozen_bytes + adapter_bytes,
        muxc_bytes=frozen_bytes + adapter_bytes,
        kernels=dict(program.kernel_plan.choices),
        htasks=htasks,
        stages=opts.stages,
        chunk_size=plan.chunk_size if plan else program.options.chunk_size,
        padding=_padding(plan) if plan else {},
        plan=plan,
        last_plan=program.last_plan,
        measured=program.measured,
    )


def _padding(plan: StepPlan) -> dict[str, float]:
    """Tokens computed vs tokens carrying data under this program's layout."""
    return {
        "tokens computed": plan.tokens_computed,
        "real tokens": plan.real_tokens,
        "ineffective_token_fraction": plan.ineffective_token_fraction,
    }
