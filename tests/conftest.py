"""Shared fixtures. Tiny models are built once per session; tests deep-copy them."""

import os

import torch

if not torch.cuda.is_available():  # before any triton kernel is defined: use the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from models import CORE_FAMILIES, build_base  # noqa: E402


@pytest.fixture(scope="session")
def bases():
    """family -> a tiny frozen base model (never mutated by tests: they copy it)."""
    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = build_base(family)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def llama(bases):
    return bases("llama")


def pytest_report_header(config):
    return [f"torch {torch.__version__}, cuda={torch.cuda.is_available()}, "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}", f"core families: {CORE_FAMILIES}"]
