"""Every PEFT kind muxc runs, in ONE program and one step on one Llama backbone.

Nine tasks: LoRA, DoRA (trained magnitudes), IA3, prompt tuning, P-tuning (MLP encoder),
prefix tuning (with its projection MLP), a SEQ_CLS task (DoRA + its ``score`` head), a causal
task training its own ``lm_head`` copy, and a LoRA task with a BitFit-style copy of a backbone
Linear (``modules_to_save``). Each alignment is compiled once; every task must match isolated HF
PEFT (loss and every trainable parameter's gradient, `helpers.REL_TOL`) under spatial and
temporal fusion with pad alignment and auto fusion with chunk alignment (the issue's matrix).
The per-kind files (tests/test_kinds_*.py) test each kind on GPT-2/Llama/OPT in depth.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from helpers import Case, cached, separate
from models import make_batch, make_peft
from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

from muxc.ir import AdapterKind

_QV = ["q_proj", "v_proj"]


def _nudge(model, seed: int, marker: str) -> None:
    """Move trained tensors named ``marker`` off their inits (DoRA magnitudes, module copies), as
    training would, so that no term is trivially 1 or equal to the frozen original."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if marker in n:
                p.add_(0.1 * torch.randn(p.shape, generator=g) * p.abs().mean().clamp(min=1e-3))


def _seq_cls(base, seed: int):
    cfg = copy.deepcopy(base.config)
    cfg.num_labels = 2
    torch.manual_seed(seed)
    model = transformers.LlamaForSequenceClassification(cfg)
    model.model.load_state_dict(base.model.state_dict())
    pm = make_peft(model.eval(), LoraConfig(task_type="SEQ_CLS", r=4, target_modules=_QV,
                                            lora_dropout=0.0, use_dora=True), seed, copy_base=False)
    _nudge(pm, seed, "lora_magnitude_vector")
    return pm


def all_kinds(base, alignment: str) -> Case:
    dora = make_peft(base, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0, use_dora=True), 2)
    _nudge(dora, 102, "lora_magnitude_vector")
    copied = make_peft(base, LoraConfig(r=2, target_modules=_QV, lora_dropout=0.0,
                                        modules_to_save=["model.layers.0.mlp.up_proj"]), 9)
    _nudge(copied, 109, ".modules_to_save.")
    spec = [
        ("lora", make_peft(base, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0), 1)),
        ("dora", dora),
        ("ia3", make_peft(base, IA3Config(), 3)),
        ("prompt", make_peft(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), 4)),
        ("ptuning", make_peft(base, PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=2,
                                                        encoder_hidden_size=16), 5)),
        ("prefix", make_peft(base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                      prefix_projection=True, encoder_hidden_size=24), 6)),
        ("sst2", _seq_cls(base, 7)),
        ("lm_head", make_peft(base, LoraConfig(r=2, target_modules=_QV, lora_dropout=0.0,
                                               modules_to_save=["lm_head"]), 8)),
        ("copy", copied),
    ]
    cls = make_batch(3, 7, 7, pad_rows=2)
    del cls["labels"]
    batches = {
        "lora": make_batch(2, 7, 1), "dora": make_batch(2, 5, 2, pad_rows=1), "ia3": make_batch(1, 6, 3),
        "prompt": make_batch(2, 6, 4, pad_rows=1), "ptuning": make_batch(2, 5, 5),
        "prefix": make_batch(3, 8, 6, pad_rows=2), "sst2": {**cls, "labels": torch.tensor([0, 1, 1])},
        "lm_head": make_batch(2, 6, 8), "copy": make_batch(2, 7, 9),
    }
    return separate(spec, batches, alignment=alignment)


@pytest.fixture(scope="module")
def case(bases):
    return cached(lambda alignment: all_kinds(bases("llama"), alignment))


def test_all_kinds_in_one_program_pad(case):
    c = case("pad")
    kinds = {r.kind for recs in c.program.mux.adapters.values() for r in recs}
    assert kinds >= {AdapterKind.LORA, AdapterKind.DORA, AdapterKind.IA3, AdapterKind.PROMPT,
                     AdapterKind.P_TUNING, AdapterKind.PREFIX, AdapterKind.HEAD, AdapterKind.COPY}
    for fusion in ("spatial", "temporal"):
        c.check(fusion=fusion)


def test_all_kinds_in_one_program_chunk(case):
    c = case("chunk")
    c.check(fusion="auto", chunk_size=4)  # a 7-token sample (10 with its virtual tokens) spans chunks
