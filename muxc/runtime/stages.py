"""Running a partitioned graph's stage modules in this process."""

from __future__ import annotations

from typing import Any

from muxc.ir import PartitionedGraph

__all__ = ["run_stages"]


def run_stages(pg: PartitionedGraph, *args: Any) -> Any:
    """Run ``pg``'s stages in sequence; same arguments and result as ``pg.mux.gm(*args)``.

    >>> run_stages(pg, *bound, input_ids, attention_mask, batch)   # doctest: +SKIP
    (tensor(4.5393, grad_fn=<NllLossBackward0>), tensor(4.5941, grad_fn=<NllLossBackward0>))
    """
    env = pg.bind(*args)
    for stage in pg.stages:
        stage.run(env)
    return pg.result(env)
