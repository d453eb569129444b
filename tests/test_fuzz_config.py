"""Fuzzing `muxc train` configs (hypothesis): a tenant's config, however wrong, either parses
into a `RunConfig` or is refused with a `MuxcError` (`ConfigError` naming the key, or the
`TaskSpecError` of a bad task name) — never another exception. Parsing only: no model is built.

Mutations start from the shipped demo config: a value replaced by junk of another type, a key
deleted, an unknown key added, a task duplicated; the example count follows the hypothesis
profile in conftest.py and is printed by the fuzz summary."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path

from hypothesis import given, strategies as st

from muxc.errors import MuxcError
from muxc.train.config import RunConfig, parse_config

DEMO = Path(__file__).resolve().parents[1] / "examples" / "train-demo.toml"
RAW = tomllib.loads(DEMO.read_text())

JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=True),
    st.text(max_size=12), st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
    st.sampled_from(["..", "/etc/passwd", "a/b", "\x00", " ", "lora", "ia3", "cosine", "x" * 300]),
)


def _tables(raw: dict) -> list[dict]:
    """Every table still in the config (top level, [base], [options], each task and its
    sub-tables): earlier mutations may have deleted or replaced some."""
    out = [raw] + [raw[k] for k in ("base", "options") if isinstance(raw.get(k), dict)]
    tasks = raw.get("task")
    for task in tasks if isinstance(tasks, list) else ():
        if isinstance(task, dict):
            out.append(task)
            out += [v for v in task.values() if isinstance(v, dict)]
    return out


@st.composite
def mutated(draw) -> dict:
    raw = copy.deepcopy(RAW)
    for _ in range(draw(st.integers(1, 3))):
        tables = _tables(raw)
        table = tables[draw(st.integers(0, len(tables) - 1))]
        action = draw(st.sampled_from(["replace", "delete", "add", "duplicate"]))
        if action == "duplicate" and isinstance(raw.get("task"), list) and raw["task"]:
            raw["task"].append(copy.deepcopy(raw["task"][0]))
        elif action == "add":
            table[draw(st.text(min_size=1, max_size=8))] = draw(JUNK)
        elif table:
            key = draw(st.sampled_from(sorted(table)))
            if action == "delete":
                del table[key]
            else:
                table[key] = draw(JUNK)
    return raw


def test_shipped_config_parses():
    assert isinstance(parse_config(RAW, DEMO), RunConfig)


def test_fuzz_train_configs(record_property):
    outcomes = {"parsed": 0, "refused": 0}

    @given(mutated())
    def check(raw):
        try:
            parse_config(raw, DEMO)
            outcomes["parsed"] += 1
        except MuxcError:
            outcomes["refused"] += 1

    check()
    assert outcomes["refused"] > 0  # the mutations do reach the checks
    record_property("fuzz_examples", sum(outcomes.values()))
    record_property("fuzz_outcomes", outcomes)
