"""`muxc bench` is a thin entry to the checkout's `bench` package; a clear error without one."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from muxc import cli

ROOT = Path(__file__).resolve().parents[1]


def _without_bench(monkeypatch) -> None:
    """Make `bench` unimportable from sys.path and forget any imported `bench` module."""
    path = [p for p in sys.path
            if not (Path(p or ".").resolve() / "bench" / "__init__.py").is_file()]
    monkeypatch.setattr(sys, "path", path)
    for name in [n for n in sys.modules if n == "bench" or n.startswith("bench.")]:
        monkeypatch.delitem(sys.modules, name)


@pytest.mark.parametrize("what", ["e2e", "kernels", "plan"])
def test_bench_outside_a_checkout_says_to_run_from_one(what, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _without_bench(monkeypatch)
    assert cli.main(["bench", what, "--quick"]) == 2
    err = capsys.readouterr().err
    assert f"`muxc bench {what}` needs the `bench` package of a muxc source checkout" in err
    assert f"python -m bench.{what}" in err
    assert "bench" not in sys.modules


def test_bench_from_the_checkout_root_imports_bench_and_runs_its_main(monkeypatch, capsys):
    # as the console script starts: `bench` not on sys.path, the working directory a checkout
    monkeypatch.chdir(ROOT)
    _without_bench(monkeypatch)
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "plan", "--help"])
    assert exc.value.code == 0
    assert "usage: muxc bench plan" in capsys.readouterr().out
    assert Path(sys.modules["bench.plan"].__file__).resolve() == ROOT / "bench" / "plan.py"
    assert sys.path[0] == str(ROOT)


def test_a_missing_dependency_of_a_benchmark_is_not_reported_as_a_missing_checkout(
        monkeypatch):
    monkeypatch.chdir(ROOT)
    _without_bench(monkeypatch)
    monkeypatch.setitem(sys.modules, "bench.harness", None)  # importing it raises
    with pytest.raises(ModuleNotFoundError, match="bench.harness"):
        cli.main(["bench", "plan", "--help"])
