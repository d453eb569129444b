"""A `muxc train` run from a TOML file: typed frozen dataclasses, every key checked.

Unknown keys, wrong types and missing files raise `ConfigError` naming the file, the table,
the key and a remedy. Paths in the file are relative to the file's directory.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> _ = (d / "a.txt").write_text("some text\\n")
>>> _ = (d / "run.toml").write_text('''
... [base]
... builtin = "tiny-llama"
... [[task]]
... name = "a"
... steps = 3
... peft = {type = "lora", r = 4, target_modules = ["q_proj"]}
... data = {files = ["a.txt"]}
... ''')
>>> cfg = load_config(d / "run.toml")
>>> cfg.tasks[0].name, cfg.tasks[0].data.format, cfg.tasks[0].schedule.value
('a', 'text', 'constant')
>>> _ = (d / "bad.toml").write_text('[base]\\nbuiltin = "tiny-llama"\\nlayer = 2\\n')
>>> load_config(d / "bad.toml")  # doctest: +ELLIPSIS
Traceback (most recent call last):
muxc.errors.ConfigError: ...bad.toml: [base] unknown key 'layer'; known keys: [...'layers'...]
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from types import MappingProxyType
from typing import Any

from muxc.errors import ConfigError, OptionsError, TaskSpecError
from muxc.names import check_name
from muxc.options import Options

__all__ = [
    "ConfigError", "Schedule", "BaseConfig", "PeftSpec", "DataConfig", "EvalConfig",
    "TaskConfig", "RunConfig", "load_config", "parse_config", "BUILTIN_BASES", "BUILTIN_DATA",
    "METHODS",
]

BUILTIN_BASES = ("tiny-llama",)
BUILTIN_DATA = ("stdlib-docstrings",)
TASK_TYPES = ("causal_lm", "seq_cls")
FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text",
           ".text": "text"}
# fields of a PEFT config the run sets itself (or PEFT bookkeeping), never from the file
_PEFT_INTERNAL = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
                  "revision", "inference_mode"}


class Schedule(str, Enum):
    """How a task's learning rate moves over its optimizer steps (after linear warmup)."""

    CONSTANT = "constant"
    LINEAR = "linear"  # linear decay to 0 at the task's last step
    COSINE = "cosine"  # half a cosine down to 0 at the task's last step


@dataclass(kw_only=True, frozen=True)
class BaseConfig:
    """The frozen base model: a local HF directory (``path``) or a built-in tiny config."""

    path: Path | None = None
    builtin: str | None = None
    hidden: int = 64  # built-in only: hidden size
    layers: int = 2  # built-in only: decoder layers
    attn_implementation: str = "sdpa"  # "sdpa" or "eager"; both work with alignment="chunk"


@dataclass(frozen=True)
class PeftSpec:
    """A PEFT method (``type``, e.g. "lora", "ia3") and its config fields."""

    type: str
    fields: Mapping[str, Any]

    def build(self, task_type: str = "CAUSAL_LM"):
        """A fresh PEFT config object (``task_type`` "CAUSAL_LM" or "SEQ_CLS": PEFT then trains
        the classification head too, as ``modules_to_save``)."""
        cls = _peft_class(self.type)
        return cls(task_type=task_type, **{k: _thaw(v) for k, v in self.fields.items()})


@dataclass(kw_only=True, frozen=True)
class DataConfig:
    """Where a task's samples come from and how a sample becomes a token sequence.

    files + format: local files read with HF ``datasets`` (format from the suffix unless given:
      json for .jsonl/.json, csv, parquet, text for .txt). builtin: "stdlib-docstrings" (text
      of the docstrings of the Python standard library ``modules``, gathered at run time).
    text_field: the field trained as plain text (causal LM) when there is no ``template``.
    template: ``str.format`` over a sample's fields, e.g. "Q: {question}\\nA: ".
    label: a field whose value is the target after the template; only its tokens (and the end
      token) are trained (the template's are -100). Without ``label`` every token is trained.
      For a ``task_type = "seq_cls"`` task the label is a class instead: ``classes`` lists the
      class names (``str`` of the field's value) in class-id order, and the sample is the
      template's (or ``text_field``'s) tokens alone.
    """

    files: tuple[Path, ...] = ()
    format: str | None = None
    builtin: str | None = None
    modules: tuple[str, ...] = ()
    text_field: str = "text"
    template: str | None = None
    label: str | None = None
    classes: tuple[str, ...] = ()  # seq_cls tasks: class names, in class-id order


@dataclass(kw_only=True, frozen=True)
class EvalConfig:
    """Held-out loss: ``files`` (same format and template as the training data) or the last
    ``split`` fraction of the shuffled training samples; measured every ``every`` optimizer
    steps of the task (0: only after its last step), over at most ``max_batches`` batches."""

    files: tuple[Path, ...] = ()
    format: str | None = None  # of ``files``; from their suffix unless given
    split: float = 0.0
    every: int = 0
    max_batches: int | None = None


@dataclass(kw_only=True, frozen=True)
class TaskConfig:
    """One tenant's fine-tuning job (`TaskConfig` fields are the ``[[task]]`` keys)."""

    name: str
    peft: PeftSpec
    data: DataConfig
    eval: EvalConfig | None = None
    # "causal_lm" (next-token loss on the trained tokens) or "seq_cls" (sequence classification
    # of the last token: a task head over the shared backbone, HF's pooling and loss; eval also
    # reports accuracy)
    task_type: str = "causal_lm"
    start_step: int = 0  # the run step at which the task joins
    steps: int | None = None  # optimizer steps; or ``epochs`` over the training samples
    epochs: float | None = None
    batch_size: int = 8  # samples per micro-batch
    max_length: int = 128  # tokens per sample (longer texts are cut into windows)
    lr: float = 1e-3
    schedule: Schedule = Schedule.CONSTANT
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_accumulation: int = 1  # micro-batches per optimizer step
    max_grad_norm: float | None = None
    seed: int = 0  # adapter init and data order (with the run's seed)


@dataclass(kw_only=True, frozen=True)
class RunConfig:
    """A whole ``muxc train`` config file."""

    path: Path
    base: BaseConfig
    tasks: tuple[TaskConfig, ...]
    options: Options = field(default_factory=Options)
    seed: int = 0
    checkpoint_every: int = 0  # run steps between checkpoints (0: none)
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False)  # the parsed TOML


def load_config(path: str | Path) -> RunConfig:
    """Read and check the TOML file at ``path``."""
    import tomllib

    path = Path(path)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{str(path)!r}: no such config file; give the path of a TOML file "
                          "(e.g. examples/train-demo.toml)") from None
    except OSError as e:
        raise ConfigError(f"{str(path)!r}: cannot read it ({e})") from None
    try:
        raw = tomllib.loads(text.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{str(path)!r} is not valid TOML: {e}; fix the syntax there") from None
    return parse_config(raw, path)


# ---------------------------------------------------------------------------------- parsing


class _Table:
    """One TOML table being read: typed getters that name the file/table/key on error, and a
    check that no unknown key is left."""

    def __init__(self, data: Any, file: Path, where: str):
        if not isinstance(data, dict):
            raise ConfigError(f"{file}: [{where}] must be a table, got {_kind(data)}; write it as "
                              f"[{where}] with key = value lines")
        self.data, self.file, self.where = data, file, where
        self.seen: set[str] = set()

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.file}: [{self.where}] {key}: {problem}")

    def get(self, key: str, default: Any, check: Callable[[Any], Any], want: str) -> Any:
        self.seen.add(key)
        if key not in self.data:
            return default
        value = self.data[key]
        try:
            return check(value)
        except (TypeError, ValueError):
            raise self.fail(key, f"expected {want}, got {value!r} ({_kind(value)})") from None

    def require(self, key: str, check: Callable[[Any], Any], want: str) -> Any:
        if key not in self.data:
            raise self.fail(key, f"missing; add {key} = <{want}>")
        return self.get(key, None, check, want)

    def done(self, known: list[str]) -> None:
        unknown = sorted(set(self.data) - set(known))
        if unknown:
            raise ConfigError(f"{self.file}: [{self.where}] unknown key {unknown[0]!r}; known "
                              f"keys: {sorted(known)}")


def _kind(value: Any) -> str:
    return {dict: "a table", list: "an array", str: "a string", bool: "a boolean", int: "an integer",
            float: "a float"}.get(type(value), type(value).__name__)


def _int(lo: int) -> Callable[[Any], int]:
    def check(v):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError
        return v
    return check


def _float(lo: float, inclusive: bool = False, hi: float | None = None) -> Callable[[Any], float]:
    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError
        if v < lo or (v == lo and not inclusive) or (hi is not None and v >= hi):
            raise ValueError
        return float(v)
    return check


def _str(v) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError
    return v


def _strs(v) -> tuple[str, ...]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
        raise ValueError
    return tuple(v)


def _choice(choices) -> Callable[[Any], str]:
    def check(v):
        if v not in choices:
            raise ValueError
        return v
    return check


def _files(table: _Table, key: str, root: Path) -> tuple[Path, ...]:
    names = table.get(key, (), _strs, "a file name or an array of file names")
    paths = tuple((root / n) for n in names)
    for n, p in zip(names, paths):
        if not p.is_file():
            raise table.fail(key, f"no such file {str(p)!r} (from {n!r}, relative to the config "
                                  "file's directory); fix the path or create the file")
    return paths


def parse_config(raw: Mapping[str, Any], path: Path) -> RunConfig:
    """`RunConfig` from the parsed TOML ``raw`` of file ``path``."""
    root = path.parent
    top = _Table(dict(raw), path, "top level")
    seed = top.get("seed", 0, _int(0), "an integer >= 0")
    every = top.get("checkpoint_every", 0, _int(0), "an integer >= 0 (run steps; 0: never)")
    base = _base(_Table(top.data.get("base", {}), path, "base"), root) if "base" in top.data else None
    if base is None:
        raise top.fail("base", 'missing; add a [base] table with builtin = "tiny-llama" or '
                               'path = "<local HF model directory>"')
    options_raw = top.data.get("options", {})
    _Table(options_raw, path, "options")  # a table
    try:
        options = Options.from_dict(dict(options_raw))
    except (OptionsError, TypeError) as e:
        raise ConfigError(f"{path}: [options] {e}") from None
    tasks_raw = top.data.get("task")
    if not isinstance(tasks_raw, list) or not tasks_raw:
        raise top.fail("task", "no [[task]] tables; add at least one [[task]] with name, peft, "
                               "data and steps (or epochs)")
    tasks = tuple(_task(_Table(t, path, f"task {i}"), root) for i, t in enumerate(tasks_raw))
    names = [t.name for t in tasks]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{path}: task name(s) {dup} appear more than once; every [[task]] "
                          "needs its own name")
    top.seen |= {"base", "options", "task"}
    top.done(["seed", "checkpoint_every", "base", "options", "task"])
    return RunConfig(path=path, base=base, tasks=tasks, options=options, seed=seed,
                     checkpoint_every=every, raw=MappingProxyType(dict(raw)))


def _base(t: _Table, root: Path) -> BaseConfig:
    path = t.get("path", None, _str, "a directory path")
    builtin = t.get("builtin", None, _choice(BUILTIN_BASES), f"one of {list(BUILTIN_BASES)}")
    hidden = t.get("hidden", 64, _int(8), "an integer >= 8")
    layers = t.get("layers", 2, _int(1), "an integer >= 1")
    attn = t.get("attn_implementation", "sdpa", _choice(("sdpa", "eager")), '"sdpa" or "eager"')
    t.done(["path", "builtin", "hidden", "layers", "attn_implementation"])
    if (path is None) == (builtin is None):
        raise t.fail("path/builtin", "give exactly one: path = \"<local HF model directory>\" or "
                                     f"builtin = one of {list(BUILTIN_BASES)}")
    if path is not None:
        where = root / path
        if not (where / "config.json").is_file():
            raise t.fail("path", f"{str(where)!r} is not a local HF model directory (no config.json "
                                 "there); save one with model.save_pretrained(dir) or use builtin")
        return BaseConfig(path=where, attn_implementation=attn)
    return BaseConfig(builtin=builtin, hidden=hidden, layers=layers, attn_implementation=attn)


def _task(t: _Table, root: Path) -> TaskConfig:
    name = t.require("name", _str, "a string")
    try:
        check_name(name)
    except TaskSpecError as e:
        raise t.fail("name", str(e)) from None
    t.where = f"task {name!r}"
    steps = t.get("steps", None, _int(1), "an integer >= 1 (optimizer steps)")
    epochs = t.get("epochs", None, _float(0.0), "a number > 0")
    if (steps is None) == (epochs is None):
        raise t.fail("steps/epochs", "give exactly one: steps = <optimizer steps> or "
                                     "epochs = <passes over the training samples>")
    kw = dict(
        name=name, steps=steps, epochs=epochs,
        task_type=t.get("task_type", "causal_lm", _choice(TASK_TYPES), f"one of {list(TASK_TYPES)}"),
        start_step=t.get("start_step", 0, _int(0), "an integer >= 0 (run step)"),
        batch_size=t.get("batch_size", 8, _int(1), "an integer >= 1"),
        max_length=t.get("max_length", 128, _int(4), "an integer >= 4 (tokens)"),
        lr=t.get("lr", 1e-3, _float(0.0), "a number > 0"),
        schedule=Schedule(t.get("schedule", "constant", _choice([s.value for s in Schedule]),
                                f"one of {[s.value for s in Schedule]}")),
        warmup_steps=t.get("warmup_steps", 0, _int(0), "an integer >= 0"),
        weight_decay=t.get("weight_decay", 0.0, _float(0.0, inclusive=True), "a number >= 0"),
        grad_accumulation=t.get("grad_accumulation", 1, _int(1), "an integer >= 1"),
        max_grad_norm=t.get("max_grad_norm", None, _float(0.0), "a number > 0"),
        seed=t.get("seed", 0, _int(0), "an integer >= 0"),
    )
    where = t.where
    if "peft" not in t.data:
        raise t.fail("peft", 'missing; add peft = {type = "lora", r = 8, target_modules = [...]}')
    kw["peft"] = _peft(_Table(t.data["peft"], t.file, f"{where}.peft"))
    if "data" not in t.data:
        raise t.fail("data", 'missing; add data = {files = ["train.jsonl"], ...}')
    kw["data"] = _data(_Table(t.data["data"], t.file, f"{where}.data"), root)
    _check_task_type(t, kw["task_type"], kw["data"])
    if "eval" in t.data:
        kw["eval"] = _eval(_Table(t.data["eval"], t.file, f"{where}.eval"), root)
    t.seen |= {"peft", "data", "eval"}
    t.done([f.name for f in dataclasses.fields(TaskConfig)])
    return TaskConfig(**kw)


METHODS = ("lora", "ia3", "prompt_tuning", "p_tuning", "prefix_tuning")
"""The PEFT ``type`` names a task may use (DoRA is ``lora`` with ``use_dora = true``); what
each supports is `muxc.kinds.SUPPORTED`."""
_METHODS_TEXT = ", ".join(f'"{m}"' for m in METHODS) + ' (DoRA: "lora" with use_dora = true)'


def _peft_class(kind: str):
    from peft import PeftType
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    try:
        return PEFT_TYPE_TO_CONFIG_MAPPING[PeftType(kind.upper())]
    except (ValueError, KeyError):
        raise ValueError(kind) from None


def _peft(t: _Table) -> PeftSpec:
    kind = t.require("type", _str, 'a PEFT method name, e.g. "lora" or "ia3"')
    try:
        cls = _peft_class(kind)
    except ValueError:
        raise t.fail("type", f"{kind!r} is not a PEFT method peft knows; muxc trains "
                             f"{_METHODS_TEXT}") from None
    if kind.lower() not in METHODS:
        raise t.fail("type", f"peft's {kind!r} is not one muxc compiles; muxc trains "
                             f"{_METHODS_TEXT}")
    known = sorted(f.name for f in dataclasses.fields(cls) if f.name not in _PEFT_INTERNAL)
    fields = {k: v for k, v in t.data.items() if k != "type"}
    t.seen |= set(fields)
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise ConfigError(f"{t.file}: [{t.where}] unknown key {unknown[0]!r} for type {kind!r}; "
                          f"known keys: {known}")
    spec = PeftSpec(kind.lower(), MappingProxyType({k: _freeze(v) for k, v in fields.items()}))
    try:
        spec.build()
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{t.file}: [{t.where}] {type(e).__name__} from peft's "
                          f"{cls.__name__}: {e}") from None
    return spec


def _freeze(v):
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        return MappingProxyType({k: _freeze(x) for k, x in v.items()})
    return v


def _thaw(v):
    if isinstance(v, tuple):
        return [_thaw(x) for x in v]
    if isinstance(v, Mapping):
        return {k: _thaw(x) for k, x in v.items()}
    return v


def _data(t: _Table, root: Path) -> DataConfig:
    files = _files(t, "files", root)
    fmt = t.get("format", None, _choice(sorted(set(FORMATS.values()))),
                f"one of {sorted(set(FORMATS.values()))}")
    builtin = t.get("builtin", None, _choice(BUILTIN_DATA), f"one of {list(BUILTIN_DATA)}")
    modules = t.get("modules", (), _strs, "an array of standard-library module names")
    kw = dict(
        text_field=t.get("text_field", "text", _str, "a field name"),
        template=t.get("template", None, _str, "a str.format template"),
        label=t.get("label", None, _str, "a field name"),
        classes=t.get("classes", (), _strs, "an array of class names"),
    )
    t.done(["files", "format", "builtin", "modules", "text_field", "template", "label", "classes"])
    if bool(files) == (builtin is not None):
        raise t.fail("files/builtin", "give exactly one: files = [...] (local jsonl/csv/parquet/"
                                      f"text files) or builtin = one of {list(BUILTIN_DATA)}")
    if builtin is not None and not modules:
        raise t.fail("modules", 'builtin = "stdlib-docstrings" needs modules = ["json", ...]')
    if builtin is not None:
        odd = [m for m in modules if m.split(".")[0] not in sys.stdlib_module_names]
        if odd:
            raise t.fail("modules", f"{odd} are not standard-library modules of this Python; "
                                    "name modules such as \"json\" or \"collections\"")
    if files and fmt is None:
        fmt = _format_of(t, files)
    if kw["classes"] and len(set(kw["classes"])) != len(kw["classes"]):
        raise t.fail("classes", f"{list(kw['classes'])} names a class twice; list each once")
    if kw["label"] is not None and kw["template"] is None and not kw["classes"]:
        raise t.fail("template", f"label = {kw['label']!r} needs a template for the prompt, e.g. "
                                 'template = "{question} = "')
    return DataConfig(files=files, format=fmt, builtin=builtin, modules=modules, **kw)


def _check_task_type(t: _Table, task_type: str, data: DataConfig) -> None:
    """A seq_cls task names its label field and at least two classes; a causal one no classes."""
    where = f"{t.where}.data"
    if task_type == "seq_cls":
        if data.label is None or len(data.classes) < 2:
            raise ConfigError(f"{t.file}: [{where}] task_type = \"seq_cls\" needs label = <field> "
                              "and classes = [<name of class 0>, <name of class 1>, ...]")
        if data.builtin is not None:
            raise ConfigError(f"{t.file}: [{where}] builtin text has no labels; a seq_cls task "
                              "reads labelled files")
    elif data.classes:
        raise ConfigError(f"{t.file}: [{where}] classes are for task_type = \"seq_cls\"; add it "
                          "to the task or drop classes")


def _format_of(t: _Table, files: tuple[Path, ...]) -> str:
    found = {FORMATS.get(p.suffix.lower()) for p in files}
    if None in found or len(found) > 1:
        raise t.fail("format", f"cannot tell one format for {[p.name for p in files]} from "
                               f"their suffixes; add format = one of {sorted(set(FORMATS.values()))}")
    return found.pop()


def _eval(t: _Table, root: Path) -> EvalConfig:
    files = _files(t, "files", root)
    fmt = t.get("format", None, _choice(sorted(set(FORMATS.values()))),
                f"one of {sorted(set(FORMATS.values()))}")
    split = t.get("split", 0.0, _float(0.0, hi=1.0), "a fraction in (0, 1)")
    every = t.get("every", 0, _int(0), "an integer >= 0 (the task's optimizer steps)")
    most = t.get("max_batches", None, _int(1), "an integer >= 1")
    t.done(["files", "format", "split", "every", "max_batches"])
    if bool(files) == (split > 0):
        raise t.fail("files/split", "give exactly one: files = [...] (held-out samples) or "
                                    "split = <fraction of the training samples held out>")
    if files and fmt is None:
        fmt = _format_of(t, files)
    return EvalConfig(files=files, format=fmt, split=split, every=every, max_batches=most)
