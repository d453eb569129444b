"""Iteration time of a pipelined step (the paper's formula) and its bubble fraction.

With ``S`` stages running micro-batches 1F1B-style, interleaving the micro-batches of every
hTask, one iteration takes about ``(Σ micro-batches + S − 1) · slowest stage``: each slot
lasts as long as the slowest stage, the pipeline needs ``S − 1`` slots to fill and drain.
Communication a stage cannot overlap lengthens every slot; communication hidden behind another
hTask's compute is subtracted.

>>> pipeline_iteration_time([1.0, 2.0, 1.5], micro_batches=[4, 2])
16.0
>>> pipeline_iteration_time([1.0, 2.0], micro_batches=4, comm_time=0.5, hidden_comm=1.0)
11.5
>>> round(bubble_fraction(stages=4, micro_batches=8), 4)
0.2727
"""

from __future__ import annotations

from collections.abc import Sequence

from muxc.plan.ops import CostModelError

__all__ = ["pipeline_iteration_time", "bubble_fraction"]


def _total(micro_batches: int | Sequence[int]) -> int:
    total = micro_batches if isinstance(micro_batches, int) else sum(micro_batches)
    counts = [micro_batches] if isinstance(micro_batches, int) else list(micro_batches)
    if total < 1 or any(m < 0 for m in counts):
        raise CostModelError(
            f"need at least one micro-batch and none negative, got {micro_batches}"
        )
    return total


def pipeline_iteration_time(
    stage_times: Sequence[float],
    micro_batches: int | Sequence[int],
    comm_time: float = 0.0,
    hidden_comm: float = 0.0,
) -> float:
    """``(Σ micro_batches + stages − 1) · (slowest stage + comm_time) − hidden_comm``.

    ``stage_times``: forward+backward seconds of one micro-batch on each stage.
    ``micro_batches``: the count, or one count per hTask (they are summed).
    ``comm_time``: per-slot communication not overlapped with compute (e.g. stage-to-stage
    send/recv of activations and gradients). ``hidden_comm``: total communication overlapped
    by interleaving hTasks, subtracted. Never less than the slowest stage's own busy time.
    """
    if not stage_times or any(t < 0 for t in stage_times):
        raise CostModelError(f"need one non-negative time per stage, got {list(stage_times)}")
    if comm_time < 0 or hidden_comm < 0:
        raise CostModelError(
            f"comm_time and hidden_comm must be >= 0, got {comm_time}, {hidden_comm}"
        )
    m = _total(micro_batches)
    slowest = max(stage_times)
    t = (m + len(stage_times) - 1) * (slowest + comm_time) - hidden_comm
    return max(t, m * slowest)


def bubble_fraction(stages: int, micro_batches: int | Sequence[int]) -> float:
    """Idle fraction of a balanced pipeline: ``(S − 1) / (Σ m + S − 1)``."""
    if stages < 1:
        raise CostModelError(f"need at least one stage, got {stages}")
    m = _total(micro_batches)
    return (stages - 1) / (m + stages - 1)
