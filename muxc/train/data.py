"""A task's samples for `muxc train`: records from local files (HF ``datasets``) or from the
standard library's docstrings, tokenized into (input ids, labels) and served as a
deterministic stream of right-padded micro-batches.

Plain text (no ``label``) is a causal-LM sample: every token is trained, and a text longer than
``max_length`` is cut into consecutive windows. A labelled record is ``template`` (the prompt,
labels -100) followed by the label's text and the end token (trained). With ``classes`` (a
sequence-classification task) the sample is the prompt alone, cut to ``max_length`` from its
start, and its label is the index of ``str(record[label])`` in ``classes``; a batch then has
``labels`` of shape ``(rows,)``, as HF's ``*ForSequenceClassification`` takes them.

>>> from muxc.train.config import DataConfig
>>> from muxc.train.tokenizer import ByteTokenizer
>>> cfg = DataConfig(template="{a}+{b}=", label="sum")
>>> [s] = tokenize([{"a": 1, "b": 2, "sum": 3}], cfg, ByteTokenizer(), max_length=16)[0]
>>> s.ids, s.labels
((1, 52, 46, 53, 64, 54, 2), (-100, -100, -100, -100, -100, 54, 2))
"""

from __future__ import annotations

import importlib
import inspect
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from muxc.errors import ConfigError
from muxc.train.config import DataConfig, TaskConfig
from muxc.train.tokenizer import Tokenizer

__all__ = ["Sample", "TaskData", "load_task_data", "load_records", "stdlib_docstrings", "tokenize",
           "collate", "trained_count", "seed_of"]

IGNORE = -100  # label of a token that is not trained (HF convention)


def seed_of(*parts: object) -> int:
    """A stable 31-bit seed from ``parts`` (Python's ``hash`` of a str changes per process).

    >>> seed_of(0, "docs", "order") == seed_of(0, "docs", "order") != seed_of(1, "docs", "order")
    True
    """
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


@dataclass(frozen=True)
class Sample:
    ids: tuple[int, ...]
    labels: tuple[int, ...]  # IGNORE where a token is not trained (empty for a class sample)
    target: int | None = None  # the class id of a sequence-classification sample


@dataclass(frozen=True)
class TaskData:
    """A task's tokenized training and eval samples; ``dropped`` records gave no sample (the
    label alone does not fit ``max_length``), ``windows`` extra samples came from cutting long
    texts."""

    train: tuple[Sample, ...]
    eval: tuple[Sample, ...]
    pad_id: int
    seed: int
    dropped: int = 0
    windows: int = 0

    def batch(self, index: int, size: int) -> dict[str, torch.Tensor]:
        """Micro-batch ``index`` of the stream: samples ``index*size ..`` of the concatenated
        epochs, each epoch a fresh seeded permutation. A pure function of ``index``, so the data
        position of a run is one integer."""
        n = len(self.train)
        rows = []
        for k in range(index * size, (index + 1) * size):
            epoch, i = divmod(k, n)
            rows.append(self.train[int(self._order(epoch)[i])])
        return collate(rows, self.pad_id)

    def _order(self, epoch: int) -> torch.Tensor:
        cache = self.__dict__.setdefault("_orders", {})
        if epoch not in cache:
            cache.clear()  # the stream only moves forward: keep one epoch
            gen = torch.Generator().manual_seed(seed_of(self.seed, "epoch", epoch))
            cache[epoch] = torch.randperm(len(self.train), generator=gen)
        return cache[epoch]

    def eval_batches(self, size: int, most: int | None) -> list[dict[str, torch.Tensor]]:
        out = [collate(self.eval[i:i + size], self.pad_id) for i in range(0, len(self.eval), size)]
        return out if most is None else out[:most]


def collate(samples: Sequence[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded HF batch: ``input_ids``, ``attention_mask``, ``labels`` (IGNORE on padding;
    class ids shaped ``(rows,)`` for class samples)."""
    seq = max(len(s.ids) for s in samples)
    ids = torch.full((len(samples), seq), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), seq), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(samples), seq), dtype=torch.long)
    for r, s in enumerate(samples):
        ids[r, :len(s.ids)] = torch.tensor(s.ids)
        if s.target is None:
            labels[r, :len(s.ids)] = torch.tensor(s.labels)
        mask[r, :len(s.ids)] = 1
    if samples[0].target is not None:
        labels = torch.tensor([s.target for s in samples], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def trained_count(batch: Mapping[str, torch.Tensor]) -> int:
    """Label tokens a causal batch trains (after HF's shift), or labelled rows of a class batch."""
    labels = batch["labels"]
    return int((labels != IGNORE).sum() if labels.dim() == 1 else (labels[:, 1:] != IGNORE).sum())


def load_records(files: Sequence[Path], fmt: str, cache_dir: Path) -> list[dict]:
    """The rows of local ``files`` (format "json" | "csv" | "parquet" | "text") through HF
    ``datasets`` (``text`` gives one row per line, field "text"); nothing is downloaded."""
    import datasets

    try:
        ds = datasets.load_dataset(fmt, data_files=[str(p) for p in files], split="train",
                                   cache_dir=str(cache_dir))
    except Exception as e:  # datasets raises its own errors for unreadable files
        raise ConfigError(f"cannot read {[str(p) for p in files]} as {fmt} ({type(e).__name__}: "
                          f"{e}); check the files or set format = ... in the task's data") from None
    return [dict(r) for r in ds]


def stdlib_docstrings(modules: Sequence[str]) -> list[dict]:
    """One record ``{"text": "<name>: <docstring>"}`` per documented public module, class,
    function and method of the standard-library ``modules``, in a fixed order (module order,
    then names sorted); repeated docstrings are kept once. Gathered from the running Python:
    the text is whatever its documentation says."""
    out, seen = [], set()

    def add(name: str, obj: object) -> None:
        doc = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else None
        if doc is None:
            return
        doc = inspect.cleandoc(doc)
        if len(doc) >= 20 and doc not in seen:
            seen.add(doc)
            out.append({"text": f"{name}: {doc}"})

    for mod_name in modules:
        module = importlib.import_module(mod_name)
        add(mod_name, module)
        for attr in sorted(vars(module)):
            obj = vars(module)[attr]
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if not (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                continue
            add(f"{mod_name}.{attr}", obj)
            if inspect.isclass(obj):
                for meth in sorted(vars(obj)):
                    member = vars(obj)[meth]
                    if not meth.startswith("_") and callable(member):
                        add(f"{mod_name}.{attr}.{meth}", member)
    return out


def tokenize(records: Sequence[Mapping], cfg: DataConfig, tok: Tokenizer,
             max_length: int) -> tuple[list[Sample], int, int]:
    """``(samples, dropped records, extra windows)`` (module doc for the layout)."""
    begin = [] if tok.bos_id is None else [tok.bos_id]
    end = [] if tok.eos_id is None else [tok.eos_id]
    samples, dropped, windows = [], 0, 0
    for row in records:
        if cfg.label is None:
            ids = begin + tok.encode(_render(cfg, row)) + end
            pieces = [ids[i:i + max_length] for i in range(0, len(ids), max_length)]
            pieces = [p for p in pieces if len(p) >= 2]  # one token predicts nothing
            windows += max(len(pieces) - 1, 0)
            dropped += not pieces
            samples += [Sample(tuple(p), tuple(p)) for p in pieces]
            continue
        if cfg.label not in row:
            raise ConfigError(f"data: label field {cfg.label!r} is not in the records; their "
                              f"fields are {sorted(row)}")
        if cfg.classes:
            value = str(row[cfg.label])
            if value not in cfg.classes:
                raise ConfigError(f"data: label {value!r} (field {cfg.label!r}) is not one of the "
                                  f"classes {list(cfg.classes)}; add it to classes or fix the data")
            ids = (begin + tok.encode(_render(cfg, row)))[:max_length]
            samples.append(Sample(tuple(ids), (), cfg.classes.index(value)))
            continue
        target = tok.encode(str(row[cfg.label])) + end
        room = max_length - len(target)
        if room < 1:
            dropped += 1
            continue
        prompt = (begin + tok.encode(_render(cfg, row)))[-room:]  # keep the prompt's end
        samples.append(Sample(tuple(prompt + target), tuple([IGNORE] * len(prompt) + target)))
    return samples, dropped, windows


def _render(cfg: DataConfig, row: Mapping) -> str:
    if cfg.template is None:
        if cfg.text_field not in row:
            raise ConfigError(f"data: text_field {cfg.text_field!r} is not in the records; their "
                              f"fields are {sorted(row)}; set text_field or a template")
        return str(row[cfg.text_field])
    try:
        return cfg.template.format(**row)
    except KeyError as e:
        raise ConfigError(f"data: template {cfg.template!r} names the field {e.args[0]!r}, which "
                          f"the records do not have; their fields are {sorted(row)}") from None
    except (IndexError, ValueError) as e:
        raise ConfigError(f"data: template {cfg.template!r} is not a valid str.format template "
                          f"({e}); name fields as {{field}} and write braces as {{{{ }}}}") from None


def _records(cfg: DataConfig, files: Sequence[Path], cache_dir: Path) -> list[dict]:
    if cfg.builtin == "stdlib-docstrings":
        return stdlib_docstrings(cfg.modules)
    return load_records(files, cfg.format, cache_dir)


def load_task_data(task: TaskConfig, tok: Tokenizer, cache_dir: Path, run_seed: int) -> TaskData:
    """Read, split (eval ``split``: a seeded shuffle's last fraction of the records) and
    tokenize ``task``'s data."""
    where = f"task {task.name!r}"
    try:
        records = _records(task.data, task.data.files, cache_dir)
        held_out: list[dict] = []
        if task.eval is not None and task.eval.files:
            held_out = load_records(task.eval.files, task.eval.format, cache_dir)
        elif task.eval is not None:
            gen = torch.Generator().manual_seed(seed_of(run_seed, task.seed, task.name, "split"))
            order = torch.randperm(len(records), generator=gen).tolist()
            cut = len(records) - max(1, math.ceil(task.eval.split * len(records)))
            held_out = [records[i] for i in order[cut:]]
            records = [records[i] for i in sorted(order[:cut])]
        train, dropped, windows = tokenize(records, task.data, tok, task.max_length)
        evals, _, _ = tokenize(held_out, task.data, tok, task.max_length)
    except ConfigError as e:
        raise ConfigError(f"{where} {e}") from None
    if not train:
        raise ConfigError(f"{where}: no training samples ({len(records)} records, {dropped} too long "
                          "for max_length); add data or raise max_length")
    if task.eval is not None and not evals:
        raise ConfigError(f"{where}: the eval set is empty; add eval files or raise eval.split")
    too_big = max(max(s.ids) for s in train + evals)
    if too_big >= tok.vocab_size:
        raise ConfigError(f"{where}: token id {too_big} is outside the tokenizer's vocabulary "
                          f"({tok.vocab_size})")
    return TaskData(tuple(train), tuple(evals), tok.pad_id,
                    seed_of(run_seed, task.seed, task.name, "order"), dropped, windows)
