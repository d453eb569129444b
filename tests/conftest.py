"""Shared fixtures and the ``slow`` marker. Tiny models are built once per session; tests
deep-copy them. Each structure is exported once per worker process (muxc's process-wide
trace-template store); a test that counts exports asks for ``fresh_templates``.

``quiet`` marks a test that measures time: it runs while no other test runs in any other
pytest-xdist worker of the run (the other worker waits between tests), so what it measures is
not stretched by a compile beside it on the shared cores.

``slow`` means the same everywhere: a test whose coverage the default run already has (the
full kernel matrix under the Triton interpreter, the rest of a parametrized matrix whose
diagonal runs). Slow tests are skipped unless a ``-m`` expression is given (``-m slow`` runs
only them, ``-m "slow or not slow"`` everything); on a CUDA machine they all run.
"""

import contextlib
import fcntl
import os
import shutil
import tempfile
from pathlib import Path

import torch

if not torch.cuda.is_available():  # before any triton kernel is defined: use the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest-xdist workers share the cores: one core's worth of torch threads each (two threads per
# worker on a 2-core machine oversubscribe it; index_add_ on tiny tensors then takes ~100 ms)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from models import CORE_FAMILIES, build_base  # noqa: E402

from muxc.frontends.cache import set_shared_templates_size  # noqa: E402

# A worker runs ~25 files that compile ~100 distinct tiny structures, many of them again in
# later files: keep them all (0.4-0.6 MiB each) rather than the library's default 8 most recent.
set_shared_templates_size(256)

# Fuzz tests (tests/test_fuzz.py): "default" keeps the suite fast with a fixed (derandomized)
# number of examples per test; HYPOTHESIS_PROFILE=long is the nightly-style run.
_FUZZ = dict(deadline=None, derandomize=True, print_blob=True,
             suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("default", max_examples=25, **_FUZZ)
settings.register_profile("long", max_examples=2000, **_FUZZ)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() or config.getoption("-m"):
        return
    skip = pytest.mark.skip(reason="slow (its coverage runs by default): runs on GPU, or with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@contextlib.contextmanager
def _room(base: Path, exclusive: bool):
    """Every test of an xdist run holds a shared lock on one file; a quiet test holds it alone.
    The turnstile, taken first by everyone and held by a quiet test until it is done, keeps the
    other worker from starting tests while the quiet one waits for the running test to end."""
    with open(base / "turnstile", "a") as gate, open(base / "room", "a") as room:
        fcntl.flock(gate, fcntl.LOCK_EX)
        fcntl.flock(room, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        if not exclusive:
            fcntl.flock(gate, fcntl.LOCK_UN)
        yield  # closing the files releases both locks


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """xdist controller: the run's lock directory, made once, handed to every worker."""
    config = node.config
    if not hasattr(config, "_muxc_rooms"):
        config._muxc_rooms = tempfile.mkdtemp(prefix="muxc-pytest-")
    node.workerinput["muxc_rooms"] = config._muxc_rooms


def pytest_unconfigure(config):
    if hasattr(config, "_muxc_rooms"):  # the controller, after its workers are gone
        shutil.rmtree(config._muxc_rooms, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Setup (module fixtures too), call and teardown of each test inside the run's room."""
    rooms = getattr(item.config, "workerinput", {}).get("muxc_rooms")
    if rooms is None:  # not under xdist: nothing else runs
        yield
        return
    with _room(Path(rooms), exclusive=item.get_closest_marker("quiet") is not None):
        yield


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


@pytest.fixture
def fresh_templates():
    """The process-wide trace-template store (`muxc.frontends.cache.shared_templates`), emptied:
    for a test that counts exports or reads a compile's "N exported" summary. Every other test
    runs with the store as earlier tests left it, which is what keeps the suite fast: a worker
    exports each structure once, later files re-bind it."""
    from muxc.frontends.cache import clear_shared_templates, shared_templates

    clear_shared_templates()
    return shared_templates()


def pytest_report_header(config):
    return [f"torch {torch.__version__}, cuda={torch.cuda.is_available()}, "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}", f"core families: {CORE_FAMILIES}"]


def pytest_terminal_summary(terminalreporter):
    """How many examples each fuzz test ran, and what muxc answered per bad-input kind."""
    lines = []
    for report in terminalreporter.stats.get("passed", []) + terminalreporter.stats.get("failed", []):
        props = dict(getattr(report, "user_properties", ()))
        if report.when == "call" and "fuzz_examples" in props:
            lines.append(f"{report.nodeid}: {props['fuzz_examples']} examples")
            for kind, outcomes in props.get("fuzz_outcomes", {}).items():
                lines.append(f"    {kind}: {outcomes}")
    if lines:
        terminalreporter.write_sep("-", "fuzz examples (hypothesis profile "
                                   f"{settings._current_profile})")
        for line in lines:
            terminalreporter.write_line(line)
