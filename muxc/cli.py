"""The ``muxc`` command: ``demo``, ``train CONFIG.toml`` (`muxc.train`), and ``bench`` (a thin
entry to the source checkout's `bench` package: ``muxc bench e2e`` = ``python -m bench.e2e``).
The only module that prints."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

__all__ = ["main"]


def _demo(args) -> int:
    from tqdm import tqdm

    from muxc.demo import run_demo
    from muxc.ir import table
    from muxc.options import Options

    bar = tqdm(total=args.steps, desc="training 4 tasks", unit="step", file=sys.stderr)

    def on_step(step, losses):
        bar.update(1)
        bar.set_postfix({k[:6]: f"{v:.2f}" for k, v in losses.items()})

    def on_progress(stage, done, total, item):
        if item:
            print(f"  {stage} {done + 1}/{total}: {item}", file=sys.stderr)

    res = run_demo(steps=args.steps, rows=args.rows, out_dir=args.out,
                   options=Options(fusion=args.fusion, alignment=args.alignment, chunk_size=args.chunk_size,
                                   stages=args.stages, kernel_impl=args.kernel_impl),
                   on_step=on_step, on_progress=on_progress)
    bar.close()
    rows = [[n, res.specs[n], f"{v[0]:.3f}", f"{v[-1]:.3f}", f"{v[0] - v[-1]:+.3f}"] for n, v in res.losses.items()]
    print(f"\nmuxc demo: {len(rows)} tasks, one tiny Llama backbone, {res.steps} steps "
          f"(compile {res.compile_seconds:.1f}s, train {res.train_seconds:.1f}s)\n")
    print(table(["task", "adapter", "first loss", "last loss", "drop"], rows))
    print()
    print(res.explanation)
    print(f"\ndumps: {res.dump_paths[0].parent}/  adapters: {res.adapter_paths[0].parent}/")
    return 0


def _train(args) -> int:
    from tqdm import tqdm

    from muxc.errors import MuxcError
    from muxc.ir import table
    from muxc.train import load_config, train

    try:
        import datasets

        datasets.disable_progress_bars()  # the run's own bar is enough
    except ImportError:
        pass
    bar = None

    def on_progress(stage, done, total, item):
        if item:
            print(f"  {stage} {done + 1}/{total}: {item}", file=sys.stderr)

    def on_step(report):
        nonlocal bar
        if bar is None:
            bar = tqdm(total=report.total, initial=report.step - 1, desc="muxc train",
                       unit="step", file=sys.stderr)
        bar.total = report.total
        bar.update(1)
        for name in report.joined:
            bar.write(f"step {report.step}: task {name!r} joined", file=sys.stderr)
        for name in report.left:
            bar.write(f"step {report.step}: task {name!r} left (adapter saved)", file=sys.stderr)
        if report.checkpoint is not None:
            bar.write(f"step {report.step}: checkpoint {report.checkpoint}", file=sys.stderr)
        bar.set_postfix({k[:10]: f"{v:.3f}" for k, v in report.train.items()})

    try:
        config = load_config(args.config)
        out = Path(args.out) if args.out else Path("out") / Path(args.config).stem
        print(f"muxc train {args.config}: {len(config.tasks)} tasks, output in {out}/"
              + (" (resuming)" if args.resume else ""), file=sys.stderr)
        res = train(config, out, resume=args.resume, on_step=on_step, on_progress=on_progress)
    except MuxcError as e:
        if bar is not None:
            bar.close()
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    if bar is not None:
        bar.close()

    def fmt(v):
        return "-" if v is None else f"{v:.3f}"

    rows = [[t.name, t.peft, t.status, str(t.steps), fmt(t.first_loss), fmt(t.last_loss),
             fmt(t.eval_loss), fmt(t.eval_accuracy), str(t.samples)] for t in res.tasks.values()]
    resumed = f", resumed after step {res.resumed_from}" if res.resumed_from is not None else ""
    print(f"\nmuxc train: {len(rows)} tasks, {res.steps} run steps in {res.seconds:.1f}s "
          f"(compile/add/remove {res.compile_seconds:.1f}s{resumed})\n")
    print(table(["task", "adapter", "status", "steps", "first loss", "last loss", "eval loss",
                 "eval acc", "samples"], rows))
    print(f"\nadapters: {res.out_dir / 'adapters'}/  metrics: {res.metrics_csv}, {res.metrics_jsonl}")
    if res.loss_png is not None:
        print(f"loss curves: {res.loss_png}")
    if res.tensorboard is not None:
        print(f"tensorboard: {res.tensorboard}")
    if res.checkpoint is not None:
        print(f"last checkpoint: {res.checkpoint}")
    for note in res.notes:
        print(f"note: {note}")
    return 0


NO_CHECKOUT = (
    "error: `muxc bench {what}` needs the `bench` package of a muxc source checkout, and none "
    "is importable here. Benchmarks are not installed with muxc: from the root of a checkout run "
    "`python -m bench.{what}` (or `muxc bench {what}` from that directory)."
)


def _bench(what: str, rest: list[str]) -> int:
    """Run ``bench.<what>.main(rest)``: the benchmarks live in the checkout's `bench` package.

    ``python -m bench.e2e`` run from the repository root finds `bench` because ``-m`` puts the
    working directory on ``sys.path``; the ``muxc`` console script does not, so when the
    working directory holds ``bench/__init__.py`` it is put first on ``sys.path`` here (and
    only then). Without a checkout this prints `NO_CHECKOUT` and returns 2.
    """
    cwd = Path.cwd()
    if (cwd / "bench" / "__init__.py").is_file() and str(cwd) not in sys.path:
        sys.path.insert(0, str(cwd))
    try:
        module = importlib.import_module(f"bench.{what}")
    except ModuleNotFoundError as exc:
        if exc.name not in ("bench", f"bench.{what}"):
            raise  # a dependency of the benchmark is missing: its own message says which
        print(NO_CHECKOUT.format(what=what), file=sys.stderr)
        return 2
    return module.main(rest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="muxc", description="multi-task PEFT compiler")
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="train 4 PEFT tasks on one tiny Llama (no downloads)")
    d.add_argument("--steps", type=int, default=30)
    d.add_argument("--rows", type=int, default=4, help="samples per task per step")
    d.add_argument("--fusion", default="auto", choices=["auto", "spatial", "temporal"])
    d.add_argument("--alignment", default="chunk", choices=["pad", "chunk"])
    d.add_argument("--chunk-size", type=int, default=None)
    d.add_argument("--stages", type=int, default=1)
    d.add_argument("--kernel-impl", default=None, choices=["torch", "grouped", "triton"])
    d.add_argument("--out", default="out/demo", help="where dumps and adapters go")
    tr = sub.add_parser("train", help="train the tasks of a TOML config (examples/train-demo.toml)")
    tr.add_argument("config", help="the run's TOML file (see README, Training service)")
    tr.add_argument("--resume", action="store_true",
                    help="continue from the newest checkpoint in the output directory")
    tr.add_argument("--out", default=None, help="output directory (default: out/<config name>)")
    b = sub.add_parser("bench", add_help=False,
                       help="benchmarks, from a source checkout; `muxc bench kernels --help`")
    b.add_argument("what", choices=["kernels", "plan", "e2e", "pipeline", "memory", "soak", "compile"])
    args, rest = parser.parse_known_args(argv)
    if args.cmd == "demo":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return _demo(args)
    if args.cmd == "train":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return _train(args)
    return _bench(args.what, rest)


if __name__ == "__main__":
    sys.exit(main())
