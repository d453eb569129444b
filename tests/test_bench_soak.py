"""`python -m bench.soak --quick`: a tenant joins and one leaves, bad input is refused, RSS is flat
and every tenant's adapter equals its isolated HF PEFT replay (CI-sized; the full 2,000-step
run's result is in bench/results/soak-cpu.md)."""

from __future__ import annotations

import csv

from bench import soak


def test_quick_soak_passes_its_checks(tmp_path, capsys):
    # shorter than --quick (200 steps) to keep make test fast: still one join/leave at step 100
    # and each of the 8 bad kinds once
    assert soak.main(["--quick", "--steps", "120", "--warmup", "105", "--bad-every", "15",
                      "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS: ") == 4 and "FAIL" not in out
    md = (tmp_path / "soak-cpu-quick.md").read_text()
    for kind, (_, answer) in soak.BAD_KINDS.items():  # each kind tried once, answered as expected
        assert f"| {kind} | 1 | {answer} | {answer} |" in md
    rows = list(csv.DictReader((tmp_path / "soak-cpu-quick.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(10, 121, 10))
    assert int(rows[-1]["refused"]) == len(soak.BAD_KINDS)  # each answered as expected
    assert (tmp_path / "soak-cpu-quick-rss.png").stat().st_size > 0
