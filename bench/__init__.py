"""muxc benchmarks: a package of the source checkout, not of the installed library.

Run from the repository root (``-m`` puts it on ``sys.path``)::

    python -m bench.kernels --quick   # multi-adapter kernels vs a per-task loop and padded bmm
    python -m bench.plan --quick      # what the planner buys: padding, predictions, bubbles
    python -m bench.e2e --quick       # muxc end to end vs the systems users would pick instead
    python -m bench.fusion_plans --cost-model COPY.json  # the fusion plan vs forced groupings

``muxc bench kernels|plan|e2e`` is the same, through the ``muxc`` command. Modules:
`harness` (timing, machine facts, rooflines, tidy CSV and markdown, shared by all),
`kernels`, `plan`, `e2e` (the drivers), `e2e_systems` and `e2e_report` (what `e2e` measures
and how it reports). Results go to ``bench/results/``.
"""
