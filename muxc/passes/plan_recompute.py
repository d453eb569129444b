"""Pass `plan_recompute`: decide what a step keeps for backward and what it recomputes.

``Options(recompute=...)`` decides when given. Left at None, a task whose model has HF gradient
checkpointing enabled makes it ``"layers"`` (over the layers those models checkpoint: the
union), so checkpointing a user asked for is never dropped; otherwise ``"none"``. Does not
mutate the tasks.

>>> plan_recompute(tasks, CompileContext(Options())).value            # doctest: +SKIP
RecomputePlan(layers: every layer)
"""

from __future__ import annotations

from collections.abc import Sequence

from muxc.frontends.checkpointing import checkpointed_layers
from muxc.frontends.peft import hf_model
from muxc.ir.recompute import Recompute, RecomputePlan
from muxc.passes.pass_base import CompileContext, PassResult
from muxc.task import Task

__all__ = ["plan_recompute"]


def plan_recompute(tasks: Sequence[Task], ctx: CompileContext) -> PassResult[RecomputePlan]:
    """The step's `RecomputePlan` from the option and the models' checkpointing; does not mutate."""
    asked = ctx.options.recompute
    found = {t.name: checkpointed_layers(hf_model(t.name, t.model)) for t in tasks}
    on = {name: layers for name, layers in found.items() if layers is None or layers}
    if asked is not None:
        note = ""
        if on and asked is Recompute.NONE:
            note = f"; tasks {sorted(on)} enable gradient checkpointing, overridden by the option"
        return PassResult(RecomputePlan(asked, None, f"recompute={asked.value!r} (option)"),
                          f"recompute={asked.value!r} from Options{note}")
    if not on:
        return PassResult(RecomputePlan(Recompute.NONE, None, "default"), "nothing recomputed")
    layers: frozenset[int] | None = frozenset()
    for got in on.values():
        layers = None if got is None or layers is None else layers | got
    why = f"gradient checkpointing enabled on the models of tasks {sorted(on)}"
    plan = RecomputePlan(Recompute.LAYERS, layers, why)
    return PassResult(plan, f"{plan!r}: {why}")
