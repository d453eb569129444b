"""`muxc train CONFIG.toml`: config errors are typed and name file/table/key; an end-to-end run
on tiny files (two causal-LM tasks, one labelled task joining later) writes metrics, a PNG and
adapters; `--resume` after a crash ends with the same adapters and losses, bit for bit."""

from __future__ import annotations

import contextlib
import io
import json
import random
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from muxc import cli
from muxc.errors import ConfigError
from muxc.train import load_config, train
from muxc.train.config import DataConfig, Schedule
from muxc.train.data import IGNORE, TaskData, load_task_data, tokenize
from muxc.train.loop import build_base, lr_factor
from muxc.train.tokenizer import ByteTokenizer

WORDS = "the cat sat on a mat while dog ran far away from home".split()

CONFIG = """\
seed = 3
checkpoint_every = 2

[base]
builtin = "tiny-llama"
hidden = 32
layers = 1

[options]
fusion = "auto"

[[task]]
name = "prose"
steps = 5
batch_size = 4
max_length = 40
lr = 3e-2
schedule = "linear"
warmup_steps = 1
peft = {type = "lora", r = 4, lora_alpha = 8, target_modules = ["q_proj", "v_proj"]}
data = {files = ["prose.txt"]}

[[task]]
name = "notes"
steps = 3
batch_size = 2
max_length = 24
lr = 3e-2
grad_accumulation = 2
max_grad_norm = 1.0
peft = {type = "lora", r = 2, target_modules = ["up_proj", "down_proj"]}
data = {files = ["notes.jsonl"], text_field = "body"}

[[task]]
name = "sums"
start_step = 2
steps = 3
batch_size = 4
lr = 0.3
schedule = "cosine"
peft = {type = "ia3", target_modules = ["k_proj", "down_proj"], feedforward_modules = ["down_proj"]}
data = {files = ["sums.csv"], template = "{a} plus {b} is ", label = "total"}
eval = {split = 0.25, every = 2}
"""


def _write_data(d: Path) -> Path:
    r = random.Random(0)
    (d / "prose.txt").write_text(
        "".join(" ".join(r.choice(WORDS) for _ in range(10)) + "\n" for _ in range(24)))
    (d / "notes.jsonl").write_text("".join(
        json.dumps({"id": i, "body": f"note {i}: " + " ".join(r.choice(WORDS) for _ in range(4))}) + "\n"
        for i in range(16)))
    rows = [(r.randint(0, 9), r.randint(0, 9)) for _ in range(32)]
    (d / "sums.csv").write_text("a,b,total\n" + "".join(f"{a},{b},{a + b}\n" for a, b in rows))
    cfg = d / "run.toml"
    cfg.write_text(CONFIG)
    return cfg


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("train")
    _write_data(d)
    return d


@pytest.fixture(scope="module")
def full_run(workdir):
    """The uninterrupted run, through the CLI: (exit code, output directory, what it printed)."""
    out = workdir / "full"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cli.main(["train", str(workdir / "run.toml"), "--out", str(out)])
    return code, out, printed.getvalue()


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _adapters(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {d.name: load_file(d / "adapter_model.safetensors")
            for d in sorted((out / "adapters").iterdir())}


# --------------------------------------------------------------------------- config errors


def _config(tmp_path: Path, text: str) -> Path:
    _write_data(tmp_path)
    p = tmp_path / "bad.toml"
    p.write_text(textwrap.dedent(text))
    return p


@pytest.mark.parametrize("change, match", [
    (("steps = 5\n", "steps = 5\nstep_size = 2\n"),
     r"bad.toml: \[task 'prose'\] unknown key 'step_size'; known keys: \[.*'start_step'.*\]"),
    (('lora_alpha = 8,', 'lora_alhpa = 8,'),
     r"\[task 'prose'.peft\] unknown key 'lora_alhpa' for type 'lora'; known keys: \[.*'lora_alpha'"),
    (("seed = 3\n", "seed = 3\nsead = 1\n"), r"\[top level\] unknown key 'sead'; known keys"),
    (('fusion = "auto"', 'fusoin = "auto"'), r"\[options\] unknown option\(s\) \['fusoin'\]"),
    (('files = ["prose.txt"]', 'files = ["missing.txt"]'),
     r"\[task 'prose'.data\] files: no such file '.*missing.txt'"),
    (("batch_size = 4\nmax_length = 40", 'batch_size = "four"\nmax_length = 40'),
     r"\[task 'prose'\] batch_size: expected an integer >= 1, got 'four' \(a string\)"),
    (("lr = 3e-2\nschedule = \"linear\"", "lr = -1\nschedule = \"linear\""),
     r"\[task 'prose'\] lr: expected a number > 0, got -1"),
    (('schedule = "linear"', 'schedule = "exp"'), r"schedule: expected one of \['constant', 'linear', 'cosine'\]"),
    (("steps = 5\n", ""), r"\[task 'prose'\] steps/epochs: give exactly one"),
    (('type = "lora", r = 4', 'type = "lorra", r = 4'),
     r"type: 'lorra' is not a PEFT method peft knows; muxc trains \"lora\", \"ia3\", "
     r"\"prompt_tuning\", \"p_tuning\", \"prefix_tuning\""),
    (('type = "lora", r = 4', 'type = "loha", r = 4'),
     r"type: peft's 'loha' is not one muxc compiles; muxc trains \"lora\""),
    (('template = "{a} plus {b} is "', 'template = 3'), r"template: expected a str.format template, got 3"),
])
def test_config_errors_name_file_table_key(tmp_path, change, match):
    old, new = change
    assert old in CONFIG
    path = _config(tmp_path, CONFIG.replace(old, new, 1))
    with pytest.raises(ConfigError, match=match):
        load_config(path)


def test_config_file_problems_are_typed(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "syntax.toml"
    bad.write_text("[base\nbuiltin = 1\n")
    with pytest.raises(ConfigError, match=r"syntax.toml' is not valid TOML: .*line 1"):
        load_config(bad)
    no_base = _config(tmp_path, CONFIG.replace('[base]\nbuiltin = "tiny-llama"\nhidden = 32\nlayers = 1\n', ""))
    with pytest.raises(ConfigError, match=r"\[top level\] base: missing"):
        load_config(no_base)


def test_template_naming_an_absent_field_fails_when_data_loads(tmp_path):
    path = _config(tmp_path, CONFIG.replace("{a} plus {b}", "{a} plus {c}"))
    cfg = load_config(path)
    with pytest.raises(ConfigError, match=r"task 'sums' data: template .* names the field 'c'.*\['a', 'b', 'total'\]"):
        load_task_data(cfg.tasks[2], ByteTokenizer(), tmp_path / "cache", 0)


# ----------------------------------------------------------------------------- data path


def test_labelled_samples_train_only_the_label(workdir):
    cfg = load_config(workdir / "run.toml")
    sums = cfg.tasks[2]
    data = load_task_data(sums, ByteTokenizer(), workdir / "cache", cfg.seed)
    assert len(data.train) == 24 and len(data.eval) == 8  # split = 0.25 of 32 rows
    tok = ByteTokenizer()
    for s in data.train:
        text = tok.decode(list(s.ids))
        prompt, label = text.split(" is ")
        a, b = map(int, prompt.split(" plus "))
        trained = [i for i, lab in zip(s.ids, s.labels) if lab != IGNORE]
        assert trained == tok.encode(str(a + b)) + [tok.eos_id]  # the label and the end token
        assert s.ids[0] == tok.bos_id and s.labels[0] == IGNORE


def test_long_texts_are_cut_into_windows_and_the_stream_is_deterministic():
    cfg = DataConfig()
    samples, dropped, windows = tokenize([{"text": "x" * 25}, {"text": ""}], cfg, ByteTokenizer(), 10)
    assert [len(s.ids) for s in samples] == [10, 10, 7, 2] and windows == 2 and dropped == 0
    assert all(s.ids == s.labels for s in samples)
    data = TaskData(tuple(samples), (), 0, seed=5)
    again = TaskData(tuple(samples), (), 0, seed=5)
    # 4 samples, batches of 3: batch 1 spans the end of epoch 0 and the start of epoch 1
    for i in range(4):
        a, b = data.batch(i, 3), again.batch(i, 3)
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert a["input_ids"].shape[0] == 3
        assert torch.equal(a["labels"] == IGNORE, a["attention_mask"] == 0)
    epoch0 = [tuple(r[r != 0].tolist()) for i in range(4) for r in data.batch(i, 1)["input_ids"]]
    assert sorted(epoch0) == sorted(s.ids for s in samples)  # each sample once per epoch


def test_lr_schedules_warm_up_and_decay():
    cos = lr_factor(Schedule.COSINE, 2, 6)
    assert [round(cos(i), 4) for i in range(6)] == [0.3333, 0.6667, 1.0, 0.8536, 0.5, 0.1464]
    assert [lr_factor(Schedule.CONSTANT, 0, 3)(i) for i in range(3)] == [1.0, 1.0, 1.0]


# -------------------------------------------------------------------------------- the run


def test_train_end_to_end_writes_metrics_png_and_adapters(full_run):
    code, out, printed = full_run
    assert code == 0
    rows = _rows(out)
    csv_lines = (out / "metrics.csv").read_text().splitlines()
    assert csv_lines[0] == "step,task,split,task_step,loss,lr,tokens,seconds,accuracy"
    assert len(csv_lines) == len(rows) + 1
    train_rows = {n: [r for r in rows if r["task"] == n and r["split"] == "train"]
                  for n in ("prose", "notes", "sums")}
    assert [r["step"] for r in train_rows["prose"]] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in train_rows["notes"]] == [1, 2, 3]
    assert [r["step"] for r in train_rows["sums"]] == [3, 4, 5]  # joined after run step 2
    assert [r["task_step"] for r in train_rows["sums"]] == [1, 2, 3]
    # prose: warmup 1 then linear decay over 5 steps
    assert [r["lr"] for r in train_rows["prose"]] == pytest.approx([0.015, 0.03, 0.0225, 0.015, 0.0075])
    for n, rs in train_rows.items():
        assert rs[-1]["loss"] < rs[0]["loss"], (n, [r["loss"] for r in rs])
        assert all(r["tokens"] > 0 for r in rs)
    evals = [r for r in rows if r["split"] == "eval"]
    assert [(r["task"], r["task_step"]) for r in evals] == [("sums", 2), ("sums", 3)]
    png = out / "loss_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    adapters = _adapters(out)
    assert sorted(adapters) == ["notes", "prose", "sums"]
    assert any("lora_A" in k for k in adapters["prose"]) and any("ia3_l" in k for k in adapters["sums"])
    assert "muxc train: 3 tasks, 5 run steps" in printed and "sums   ia3" in printed


def test_saved_adapters_load_into_peft_as_trained(full_run, workdir):
    from peft import PeftModel

    cfg = load_config(workdir / "run.toml")
    _, out, _ = full_run
    base = build_base(cfg.base, ByteTokenizer(), cfg.seed)
    model = PeftModel.from_pretrained(base, str(out / "adapters" / "prose"))
    saved = load_file(out / "adapters" / "prose" / "adapter_model.safetensors")
    state = {k: v for k, v in model.named_parameters() if "lora_" in k}
    assert len(state) == len(saved) > 0
    for k, v in saved.items():
        match = [p for name, p in state.items() if name.replace(".default", "").endswith(k.removeprefix("base_model"))]
        assert len(match) == 1 and torch.equal(match[0], v), k


# ----------------------------------------------------------- sequence classification tasks

CLS_CONFIG = """\
seed = 1

[base]
builtin = "tiny-llama"
hidden = 32
layers = 1

[options]  # the demo test runs a classifier with pad alignment; this one packs into chunks
alignment = "chunk"

[[task]]
name = "mood"
task_type = "seq_cls"
steps = 4
batch_size = 4
max_length = 24
lr = 2e-2
peft = {type = "lora", r = 2, target_modules = ["q_proj", "up_proj"]}
data = {files = ["mood.csv"], template = "{text}", label = "label", classes = ["sad", "glad"]}
eval = {split = 0.25, every = 2}

[[task]]
name = "prose"
start_step = 1
steps = 2
batch_size = 2
max_length = 24
peft = {type = "ia3", target_modules = ["k_proj", "down_proj"], feedforward_modules = ["down_proj"]}
data = {files = ["prose.txt"]}
"""


def _cls_workdir(d: Path, text: str = CLS_CONFIG) -> Path:
    _write_data(d)
    r = random.Random(1)
    rows = [(" ".join(r.choice(WORDS) for _ in range(r.randint(2, 6))), r.choice(["sad", "glad"]))
            for _ in range(24)]
    (d / "mood.csv").write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in rows))
    (d / "cls.toml").write_text(text)
    return d / "cls.toml"


def test_seq_cls_task_trains_next_to_a_causal_one_and_reports_accuracy(tmp_path):
    """A classification tenant and a causal one joining later (`Program.add_task` next to a
    head), chunk alignment: the final eval loss and accuracy are what HF computes with the saved adapter."""
    from peft import PeftModel

    from muxc.train.loop import accuracy_of, classifier_over

    cfg = load_config(_cls_workdir(tmp_path))
    assert [t.task_type for t in cfg.tasks] == ["seq_cls", "causal_lm"]
    res = train(cfg, tmp_path / "out")
    mood = res.tasks["mood"]
    assert (mood.status, mood.steps, res.tasks["prose"].status) == ("done", 4, "done")
    rows = _rows(tmp_path / "out")
    evals = [r for r in rows if r["task"] == "mood" and r["split"] == "eval"]
    assert [r["task_step"] for r in evals] == [2, 4]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in evals)
    assert all(r.get("accuracy") is None for r in rows if r["split"] == "train")
    # the saved adapter (LoRA + the score head) reproduces the last eval loss and accuracy
    tok = ByteTokenizer()
    base = build_base(cfg.base, tok, cfg.seed)
    data = load_task_data(cfg.tasks[0], tok, tmp_path / "cache", cfg.seed)
    frozen = {id(x): x for x in [*base.parameters(), *base.buffers()]}
    model = PeftModel.from_pretrained(classifier_over(base, 2, tok.pad_id, frozen),
                                      str(tmp_path / "out" / "adapters" / "mood"))
    batches = data.eval_batches(4, None)
    assert all(b["labels"].shape == (b["input_ids"].shape[0],) for b in batches)
    with torch.no_grad():
        losses = [(float(model(**b).loss), len(b["labels"])) for b in batches]
    want = sum(v * k for v, k in losses) / sum(k for _, k in losses)
    assert mood.eval_loss == pytest.approx(want, rel=1e-5)
    assert mood.eval_accuracy == accuracy_of(model, batches) == evals[-1]["accuracy"]
    assert evals[-1]["tokens"] == len(data.eval) == 6


@pytest.mark.parametrize("change, match", [
    (('classes = ["sad", "glad"]', 'classes = ["sad"]'), r"task_type = \"seq_cls\" needs label"),
    (('task_type = "seq_cls"\n', ""), r"classes are for task_type = \"seq_cls\""),
    (('task_type = "seq_cls"', 'task_type = "seq2seq"'), r"task_type: expected one of \['causal_lm', 'seq_cls'\]"),
    (('"sad", "glad"]', '"sad", "sad"]'), r"names a class twice"),
])
def test_seq_cls_config_errors(tmp_path, change, match):
    old, new = change
    assert old in CLS_CONFIG
    with pytest.raises(ConfigError, match=match):
        load_config(_cls_workdir(tmp_path, CLS_CONFIG.replace(old, new, 1)))


def test_seq_cls_label_outside_the_classes_is_named(tmp_path):
    cfg = load_config(_cls_workdir(tmp_path, CLS_CONFIG.replace('"sad", "glad"', '"sad", "happy"')))
    with pytest.raises(ConfigError, match=r"task 'mood' data: label 'glad' \(field 'label'\) is not one "
                       r"of the classes \['sad', 'happy'\]"):
        load_task_data(cfg.tasks[0], ByteTokenizer(), tmp_path / "cache", 0)


class _Crash(Exception):
    pass


def test_resume_after_crashes_is_bit_identical(full_run, workdir, tmp_path):
    """Crash after run step 3 (newest checkpoint: step 2, before the labelled task joined),
    resume and crash again after step 5 (the checkpoint at 4 holds the task that joined
    later), then resume through the CLI: adapters and every metrics row equal the
    uninterrupted run's."""
    _, full, _ = full_run
    out = tmp_path / "out"
    cfg = load_config(workdir / "run.toml")

    def crash_after(step):
        def on_step(report):
            if report.step == step:
                raise _Crash
        return on_step

    with pytest.raises(_Crash):
        train(cfg, out, on_step=crash_after(3))
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000002"
    assert max(r["step"] for r in _rows(out)) == 3  # a row past the checkpoint, dropped on resume
    with pytest.raises(_Crash):
        train(cfg, out, resume=True, on_step=crash_after(5))
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000004"
    saved = json.loads((out / "checkpoints" / "step-000004" / "trainer.json").read_text())
    assert saved["running"] == ["prose", "sums"] and saved["tenants"]["notes"]["status"] == "done"
    assert cli.main(["train", str(workdir / "run.toml"), "--out", str(out), "--resume"]) == 0
    want, got = _adapters(full), _adapters(out)
    assert sorted(got) == sorted(want) == ["notes", "prose", "sums"]
    for task in want:
        assert want[task].keys() == got[task].keys()
        for k in want[task]:
            assert torch.equal(got[task][k], want[task][k]), (task, k)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in _rows(full)]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in _rows(out)] == strip


def test_resume_and_output_directory_refusals(workdir, tmp_path, capsys):
    args = ["train", str(workdir / "run.toml"), "--out", str(tmp_path / "none")]
    assert cli.main(args + ["--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    (tmp_path / "none" / "checkpoints").mkdir(parents=True)
    assert cli.main(args) == 2
    assert "holds a previous run" in capsys.readouterr().err


def test_train_leaves_the_global_rng_alone(workdir, tmp_path):
    cfg = load_config(workdir / "run.toml")
    one = cfg.tasks[0]
    small = type(cfg)(path=cfg.path, base=cfg.base, tasks=(type(one)(**{**one.__dict__, "steps": 1}),),
                      options=cfg.options, seed=cfg.seed, raw=cfg.raw)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    res = train(small, tmp_path / "out")
    assert torch.equal(torch.get_rng_state(), before)
    assert res.tasks["prose"].status == "done" and res.tasks["prose"].steps == 1


# ------------------------------------------------------------------------- the shipped demo

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_shipped_demo_config_parses_and_its_data_loads(tmp_path):
    cfg = load_config(EXAMPLES / "train-demo.toml")
    kinds = {t.peft.type for t in cfg.tasks}
    assert len(cfg.tasks) >= 3 and kinds == {"lora", "ia3"}
    assert {t.task_type for t in cfg.tasks} == {"causal_lm", "seq_cls"}  # a classification tenant
    assert any(t.start_step > 0 for t in cfg.tasks)  # a task joins later
    tok = ByteTokenizer()
    for t in cfg.tasks:
        data = load_task_data(t, tok, tmp_path / "cache", cfg.seed)
        assert len(data.train) >= 100, t.name
        if t.task_type == "seq_cls":
            assert all(s.target in (0, 1) and not s.labels for s in data.train), t.name
            continue
        labelled = t.data.label is not None
        assert all((IGNORE in s.labels) == labelled for s in data.train[:50]), t.name


def test_committed_demo_data_is_what_make_data_writes(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_data", EXAMPLES / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "HERE", tmp_path)
    module.main()
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(p.name for p in (EXAMPLES / "data").iterdir())
    for name in written:
        assert (tmp_path / name).read_bytes() == (EXAMPLES / "data" / name).read_bytes(), name
