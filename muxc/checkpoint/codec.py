"""State dicts as data only: a JSON-able tree plus a flat dict of tensors (for safetensors).

Optimizer and LR-scheduler ``state_dict()`` trees hold tensors, ints (as dict keys too),
floats (also ``nan``/``inf``), tuples, lists, None and strings. `encode` moves every tensor
into ``tensors`` under ``<prefix><n>`` and leaves a ``{"__tensor__": name}`` marker in the
tree; tuples, non-string dict keys and non-finite floats get markers too, so `decode` gives
back the same tree (same types, bit-identical tensors). Nothing is pickled, nothing in a
checkpoint can run code when read.

>>> import torch
>>> tensors = {}
>>> tree = encode({"state": {0: {"step": torch.tensor(2.0)}}, "betas": (0.9, 0.999)}, "o/", tensors)
>>> tree
{'state': {'__items__': [[0, {'step': {'__tensor__': 'o/0'}}]]}, 'betas': {'__tuple__': [0.9, 0.999]}}
>>> decode(tree, tensors)
{'state': {0: {'step': tensor(2.)}}, 'betas': (0.9, 0.999)}
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from muxc.errors import CheckpointError

__all__ = ["encode", "decode"]

_TAGS = ("__tensor__", "__tuple__", "__items__", "__float__")


def encode(value, prefix: str, tensors: dict[str, torch.Tensor], where: str = "state") -> object:
    """``value`` as a JSON-able tree; its tensors (detached CPU copies) are added to ``tensors``.

    Raises `CheckpointError` naming ``where`` and the path inside ``value`` for a value that is
    not data (a function, a module, any other object): it could only be saved by pickling.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, torch.Tensor):
        name = f"{prefix}{len(tensors)}"
        tensors[name] = value.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": name}
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v, prefix, tensors, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode(v, prefix, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        plain = all(isinstance(k, str) for k in value) and not (len(value) == 1 and next(iter(value)) in _TAGS)
        items = [(k, encode(v, prefix, tensors, f"{where}[{k!r}]")) for k, v in value.items()]
        if plain:
            return dict(items)
        for k, _ in items:
            if k is not None and not isinstance(k, (bool, int, float, str)):
                raise CheckpointError(f"{where}: dict key {k!r} ({type(k).__name__}) is not data")
        return {"__items__": [[k, v] for k, v in items]}
    raise CheckpointError(
        f"{where} holds a {type(value).__name__} ({value!r:.60}), which is not data (tensors, "
        "numbers, strings, lists, dicts); muxc checkpoints never pickle: give the optimizer or "
        "LR scheduler a state_dict() made of data"
    )


def decode(tree, tensors: Mapping[str, torch.Tensor], where: str = "state") -> object:
    """The value `encode` turned into ``tree``; `CheckpointError` naming ``where`` for a tree
    that `encode` cannot have written (a missing tensor, an unknown marker)."""
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    if isinstance(tree, list):
        return [decode(v, tensors, f"{where}[{i}]") for i, v in enumerate(tree)]
    if not isinstance(tree, dict):
        raise CheckpointError(f"{where}: unexpected {type(tree).__name__} in the checkpoint")
    if len(tree) == 1 and next(iter(tree)) in _TAGS:
        tag, body = next(iter(tree.items()))
        if tag == "__tensor__":
            if not isinstance(body, str) or body not in tensors:
                raise CheckpointError(f"{where}: tensor {body!r} is not in the checkpoint's tensor file")
            return tensors[body]
        if tag == "__float__":
            if body not in ("nan", "inf", "-inf"):
                raise CheckpointError(f"{where}: {body!r} is not a float")
            return float(body)
        if not isinstance(body, list):
            raise CheckpointError(f"{where}: {tag} must hold a list, got {type(body).__name__}")
        if tag == "__tuple__":
            return tuple(decode(v, tensors, f"{where}[{i}]") for i, v in enumerate(body))
        out = {}
        for item in body:
            if not (isinstance(item, list) and len(item) == 2):
                raise CheckpointError(f"{where}: {tag} entries must be [key, value] pairs")
            out[item[0]] = decode(item[1], tensors, f"{where}[{item[0]!r}]")
        return out
    return {k: decode(v, tensors, f"{where}[{k!r}]") for k, v in tree.items()}
