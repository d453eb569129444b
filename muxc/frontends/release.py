"""`release_export_state`: drop what torch.export keeps after an export, so it can be freed.

A non-strict ``torch.export.export`` leaves, besides the graph it returns, state that nothing
uses once it has returned, and some of it in reference cycles that Python's gc cannot collect
because one edge of each cycle is held in C++:

- its fake tensors' symbolic sizes are C++ ``SymInt``\\ s owning Python ``SymNode``\\ s, each of
  which holds the export's ``ShapeEnv``; the ``ShapeEnv`` in turn holds fake tensors and
  ``SymNode``\\ s (``tracked_fakes``: the inputs it fakified; ``fake_tensor_cache``: the fake
  dispatch cache of every op run on symbolic shapes, ~1.5 MiB for a 12-layer Llama). gc sees
  the ``SymNode``\\ s referenced from outside (C++), so the whole cycle, the ``ShapeEnv``, its
  ``FakeTensorMode`` and every fake tensor reachable from them, stays alive for good, even
  after the exported graph is dropped;
- ``ShapeEnv``'s method caches (``functools.lru_cache`` on the class, unbounded) hold every
  ``ShapeEnv`` they were called on;
- ``torch.fx.experimental.proxy_tensor._FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT`` (export's
  fake-tensor leak detection) holds the nodes of the last export's pre-dispatch graph, a whole
  second graph with its fake tensors (~6 MiB for a 12-layer Llama), until the next export.

Two more things an export leaves that muxc never reads (`drop_unread_meta`,
`forget_source_lines`): per node metadata (``stack_trace``, ``tensor_meta``, ``torch_fn``...:
strings and records on every node, copied into every template and merged graph, and the
stack traces also end up as comments in every GraphModule's generated code, which torch keeps
for good), and the source lines of every file on those stack traces, which formatting them
reads into ``linecache`` (~4.7 MiB for a 2-layer Llama).

A compile also makes many graph modules (torch.export makes ~35 per export; muxc's passes
copy, merge and split graphs) and torch.fx keeps the generated Python source of every one of
them for good (``torch.fx.graph_module._loader.eval_cache`` and ``linecache``, for tracebacks):
~7 MiB after compiling a 12-layer Llama with 8 tasks, ~2.4 MiB more per `Program.add_task` or
``remove_task``. `forget_generated_code` drops the source of those a compile made and does not
keep (a module still alive only loses its source lines in tracebacks).

`release_export_state` empties these (caches and bookkeeping only: what an exported graph means
and what its fake tensors and shape environment answer is unchanged; a cache refills on
demand). The graphs muxc keeps still hold their fake tensors (``meta["val"]``), their
``FakeTensorMode`` and ``ShapeEnv``; once those graphs are dropped, all of it is freed (tested:
tests/test_release.py). Measured in the README (Memory on the weights-dominant model).

>>> ep = torch.export.export(model, args, dynamic_shapes=dims, strict=False)  # doctest: +SKIP
>>> release_export_state(ep.graph_module)                                    # doctest: +SKIP
1
"""

from __future__ import annotations

import contextlib
import linecache
import sys
from collections.abc import Iterable, Iterator

import torch.fx as fx

__all__ = ["release_export_state", "fake_modes", "drop_unread_meta", "UNREAD_META",
           "share_module_stacks", "forget_source_lines", "generated_code_keys",
           "forget_generated_code"]

# node metadata torch.export records that nothing in muxc reads (muxc reads ``val``,
# ``nn_module_stack`` and its own ``muxc``; unknown keys are kept)
UNREAD_META = ("stack_trace", "tensor_meta", "torch_fn", "source_fn_stack", "from_node",
               "eager_input_vals")


def release_export_state(graphs: fx.GraphModule | Iterable[fx.GraphModule] = ()) -> int:
    """Empty what torch.export left behind (module doc) for the fake modes of ``graphs`` (their
    nodes' ``meta["val"]``, sub-modules included) and torch's process-wide export state; returns
    how many shape environments were emptied. Does not change what any graph computes."""
    if isinstance(graphs, fx.GraphModule):
        graphs = (graphs,)
    _clear_export_leak_map()
    envs = 0
    for mode in fake_modes(graphs):
        env = mode.shape_env
        if env is None:
            continue
        envs += 1
        cache = getattr(env, "fake_tensor_cache", None)
        if isinstance(cache, dict):
            cache.clear()
        tracked = getattr(env, "tracked_fakes", None)
        if isinstance(tracked, list):
            tracked.clear()
    _clear_shape_env_method_caches()
    return envs


def fake_modes(graphs: Iterable[fx.GraphModule]) -> list:
    """The distinct ``FakeTensorMode``\\ s of the fake tensors in ``graphs``' node metadata."""
    from torch._subclasses.fake_tensor import FakeTensor

    modes: dict[int, object] = {}
    for gm in graphs:
        for node in _nodes(gm):
            val = node.meta.get("val")
            vals = val if isinstance(val, (tuple, list)) else (val,)
            for v in vals:
                if isinstance(v, FakeTensor):
                    modes.setdefault(id(v.fake_mode), v.fake_mode)
    return list(modes.values())


def drop_unread_meta(gm: fx.GraphModule) -> int:
    """Delete the `UNREAD_META` entries of every node of ``gm`` (sub-modules included), in
    place; returns how many were deleted."""
    dropped = 0
    for node in _nodes(gm):
        for key in UNREAD_META:
            if node.meta.pop(key, None) is not None:
                dropped += 1
    return dropped


def share_module_stacks(gm: fx.GraphModule) -> int:
    """Make the nodes of ``gm`` (sub-modules included) whose ``nn_module_stack`` is equal hold
    one dict, its strings interned, in place; returns how many distinct stacks are left.

    torch.export gives every node its own copy (~1.1 KiB per node of a 12-layer Llama, most of a
    template's size) although all the nodes of one module have the same; every template, task
    graph and merged graph shares the values of the exported graph's metadata. muxc only reads
    the stacks (nothing changes a node's ``nn_module_stack`` in place after export)."""
    shared: dict[tuple, dict] = {}
    for node in _nodes(gm):
        stack = node.meta.get("nn_module_stack")
        if not isinstance(stack, dict):
            continue
        key = tuple(stack.items())
        try:
            one = shared.get(key)
        except TypeError:  # an entry that is not hashable: left as it is
            continue
        if one is None:
            one = {_intern(k): tuple(_intern(x) for x in v) if isinstance(v, tuple) else v
                   for k, v in stack.items()}
            shared[key] = one
        node.meta["nn_module_stack"] = one
    return len(shared)


def _intern(v):
    return sys.intern(v) if type(v) is str else v


def _nodes(gm: fx.GraphModule) -> Iterator[fx.Node]:
    """Every node of ``gm`` and of its graph-module sub-modules (higher-order-op bodies)."""
    for sub in gm.modules():
        if isinstance(sub, fx.GraphModule):
            yield from sub.graph.nodes


@contextlib.contextmanager
def forget_source_lines() -> Iterator[None]:
    """On exit, drop the ``linecache`` entries of files read from disk inside the block (they
    are read again when a traceback needs them); entries made otherwise are kept."""
    before = set(linecache.cache)
    try:
        yield
    finally:
        for name in set(linecache.cache) - before:
            entry = linecache.cache.get(name)
            if entry is not None and len(entry) == 4 and entry[1] is not None:  # file on disk
                linecache.cache.pop(name, None)


def generated_code_keys() -> frozenset[str]:
    """The names under which torch.fx holds generated graph-module source now."""
    loader = _fx_source_loader()
    return frozenset(getattr(loader, "eval_cache", ()))


def forget_generated_code(before: frozenset[str], keep: Iterable[fx.GraphModule] = ()) -> int:
    """Drop torch.fx's copy of the source generated since ``before`` (`generated_code_keys`),
    except that of ``keep``'s graph modules (sub-modules included); returns how many sources
    were dropped. A module still alive keeps its compiled code (and runs the same); only a
    traceback through it shows no source lines."""
    loader = _fx_source_loader()
    cache = getattr(loader, "eval_cache", None)
    if not isinstance(cache, dict):
        return 0
    kept = set()
    for gm in keep:
        for sub in gm.modules():
            code = getattr(getattr(type(sub), "forward", None), "__code__", None)
            if code is not None:
                kept.add(code.co_filename)
    dropped = 0
    for key in set(cache) - before - kept:
        cache.pop(key, None)
        linecache.cache.pop(key, None)
        dropped += 1
    return dropped


def _fx_source_loader():
    from torch.fx import graph_module

    return getattr(graph_module, "_loader", None)


def _clear_export_leak_map() -> None:
    from torch.fx.experimental import proxy_tensor

    leak_map = getattr(proxy_tensor, "_FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT", None)
    if isinstance(leak_map, dict):
        leak_map.clear()


def _clear_shape_env_method_caches() -> None:
    """``ShapeEnv``'s ``lru_cache``\\ d methods cache per class, keyed on the instance: clearing
    them drops their hold on every ``ShapeEnv`` (each refills on its next call)."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    for name in dir(ShapeEnv):
        method = getattr(ShapeEnv, name, None)
        clear = getattr(method, "cache_clear", None)
        if callable(clear):
            clear()

