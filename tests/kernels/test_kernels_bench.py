"""`bench.kernels` smoke test: one tiny point end to end, files written."""

import csv

import torch

from bench import kernels as bench_kernels
from bench.kernels import Point


def test_one_point_writes_csv_markdown_and_plot(tmp_path, device, capsys):
    threads = torch.get_num_threads()
    rc = bench_kernels.main(["--quick", "--max-points", "1", "--reps", "1", "--out",
                             str(tmp_path), "--device", device.type])
    assert rc == 0
    assert torch.get_num_threads() == threads  # --threads 1 applies to the run only
    slug = "cpu" if device.type == "cpu" else None
    csv_path = next(tmp_path.glob("kernels-*.csv"))
    if slug:
        assert csv_path.name == "kernels-cpu.csv"
    rows = list(csv.DictReader(csv_path.open()))
    impls = {r["impl"] for r in rows}
    assert impls == {"muxc-triton", "muxc-triton+meta", "torch-loop", "padded-bmm"}
    assert {r["pass"] for r in rows} == {"fwd", "fwd+bwd"}
    assert all(float(r["ms"]) > 0 and float(r["GB/s"]) > 0 for r in rows)
    md = csv_path.with_suffix(".md").read_text()
    assert "| tasks |" in md and "torch-loop ms" in md
    assert csv_path.with_suffix(".png").exists()
    assert "wrote" in capsys.readouterr().out


def test_useful_work_model():
    p = Point("lora", 2, 10, 8, "mixed", (1, 3))
    nbytes, flops = bench_kernels._work(p, backward=False, elem=2)
    assert flops == 2 * 10 * (1 + 3) * (8 + 8)
    assert nbytes == 2 * (20 * 8 * 2 + 4 * 16)
    assert bench_kernels._work(p, backward=True, elem=2)[1] == 3 * flops
