"""Shared case generation and tolerances for the kernel tests (fp64 references)."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import pytest
import torch

TOKENS = (1, 7, 130, 600)
WIDTHS = (32, 96, 257)
RANKS = (1, 4, 8, 16, 64)
SEGMENTS = (1, 3, 16)

TOLERANCE = {
    # fp32: IEEE fp32 dots (no TF32) over <= 600 terms; the worst relative error is a few
    # K*eps ~ 1e-5, observed ~1e-6.
    torch.float32: 2e-5,
    # fp16: the output is rounded once to fp16 (2^-11 = 4.9e-4 relative) and the rank
    # intermediate is rounded to fp16 before the second GEMM (as PEFT computes it), ~2 ulps.
    torch.float16: 2e-3,
    # bf16: same two roundings with 8 mantissa bits (2^-8 = 3.9e-3 relative each).
    torch.bfloat16: 1.6e-2,
}


@dataclass(frozen=True)
class Case:
    tokens: int
    k: int
    n: int
    segments: int
    seed: int

    @property
    def id(self) -> str:
        return f"T{self.tokens}-K{self.k}-N{self.n}-S{self.segments}"

    def layout(self) -> tuple[list[int], list[int]]:
        """Segment lengths summing to ``tokens`` (some empty when there are several segments)
        and a rank per segment mixed from `RANKS` (plus rank 0, used for tasks that have no
        adapter at a layer, when there are several segments)."""
        rng = random.Random(self.seed)
        s = self.segments
        cuts = sorted(rng.randint(0, self.tokens) for _ in range(s - 1))
        lens = [b - a for a, b in zip([0, *cuts], [*cuts, self.tokens])]
        if s >= 3:  # force an empty segment and a rank-0 one somewhere
            j = rng.randrange(s)
            lens[(j + 1) % s] += lens[j]
            lens[j] = 0
        ranks = [rng.choice(RANKS) for _ in range(s)]
        if s >= 3:
            ranks[rng.randrange(s)] = 0
        if max(ranks) == 0:
            ranks[0] = 4
        return lens, ranks


def all_cases() -> list[Case]:
    return [
        Case(t, k, n, s, seed=hash((t, k, n, s)) % 1000)
        for t, k, n, s in itertools.product(TOKENS, WIDTHS, WIDTHS, SEGMENTS)
    ]


# What the interpreter runs in the normal suite: every token count, width, segment count
# and rank appears at least once, odd widths (257) included; the rest is marked slow.
QUICK = {
    (1, 32, 32, 1), (7, 96, 257, 3), (130, 257, 96, 16), (600, 32, 257, 3),
    (130, 96, 32, 1), (7, 257, 257, 16), (600, 257, 32, 16), (1, 96, 96, 3),
    (7, 32, 96, 1), (130, 32, 257, 3), (600, 96, 96, 1), (1, 257, 32, 16),
}


def params(dtypes) -> list:
    out = []
    for case, dtype in itertools.product(all_cases(), dtypes):
        quick = (case.tokens, case.k, case.n, case.segments) in QUICK
        if dtype == torch.float16 and case.segments == max(SEGMENTS):
            # the interpreter's fp16 many-segment cases took ~35 s of the suite; fp16 rounding
            # is covered by the quick 1- and 3-segment cases, many segments by fp32's
            quick = False
        marks = [] if quick else [pytest.mark.slow]
        if dtype == torch.bfloat16:
            marks.append(pytest.mark.gpu)
        out.append(pytest.param(case, dtype, marks=marks, id=f"{case.id}-{str(dtype)[6:]}"))
    return out


def assert_close(name: str, got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """``max|got - ref| <= tol * max(1, max|ref|)`` with the dtype's tolerance."""
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    if ref.numel() == 0:
        return
    err = (got.double() - ref).abs().max().item()
    scale = max(1.0, ref.abs().max().item())
    tol = TOLERANCE[dtype] * scale
    assert err <= tol, f"{name}: max abs error {err:.3g} > {tol:.3g} ({dtype}, scale {scale:.3g})"
