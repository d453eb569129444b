"""DoRA, bias training and SEQ_CLS heads on the ten other tested families (tests/models.py):
exact vs isolated HF PEFT under pad and chunk alignment, spatial and temporal fusion.

The core families (GPT-2, Llama, OPT) cover these kinds by default (tests/test_kinds_more.py,
tests/test_kinds_bias.py); each other family is one compile per alignment, so all are marked
slow (``-m slow``). Each family's program holds four tasks: DoRA, DoRA with ``bias="all"``,
LoRA with ``bias="lora_only"`` and a SEQ_CLS model (DoRA adapter, its own head) whose backbone
is the causal LM's.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from helpers import Case, isolated
from models import OTHER_FAMILIES, make_batch, make_peft
from peft import LoraConfig
from test_kinds_bias import _assert_matches_zero_aware, _move_biases, _trainable_grads
from test_kinds_more import _cls_batch, _scale_magnitudes

import muxc


def _cls_model(base, seed: int) -> torch.nn.Module:
    """``base``'s family as a two-label sequence classifier with ``base``'s backbone weights."""
    cfg = copy.deepcopy(base.config)
    cfg.num_labels = 2
    name = type(base).__name__.replace("ForCausalLM", "ForSequenceClassification")
    name = name.replace("LMHeadModel", "ForSequenceClassification")
    torch.manual_seed(seed)
    model = getattr(transformers, name)(cfg)
    trunk = base.base_model_prefix
    getattr(model, trunk).load_state_dict(getattr(base, trunk).state_dict())
    pm = make_peft(model.eval(), LoraConfig(task_type="SEQ_CLS", r=4, target_modules="all-linear",
                                            lora_dropout=0.0, use_dora=True), seed, copy_base=False)
    _scale_magnitudes(pm, seed)
    return pm


def _task(base, seed: int, **config):
    model = make_peft(base, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0, **config), seed)
    _scale_magnitudes(model, seed)
    if config.get("bias", "none") != "none":
        _move_biases(model, seed + 100)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_dora_bias_and_seq_cls_on_other_families(bases, family):
    base = bases(family)
    spec = [("dora", _task(base, 1, use_dora=True)),
            ("dora_bias", _task(base, 2, use_dora=True, bias="all")),
            ("bias", _task(base, 3, bias="lora_only")),
            ("cls", _cls_model(base, 4))]
    batches = {"dora": make_batch(2, 7, 1), "dora_bias": make_batch(3, 5, 2, pad_rows=2),
               "bias": make_batch(2, 6, 3), "cls": _cls_batch(3, 7, 4, torch.tensor([0, 1, 1]))}
    refs = {n: isolated(m, batches[n]) for n, m in spec}
    assert any("lora_magnitude_vector" in n for n in refs["cls"][1])
    assert any(".modules_to_save." in n for n in refs["cls"][1])  # the head is trained and compared
    models = dict(spec)
    for alignment in ("pad", "chunk"):
        program = muxc.compile([muxc.Task(name=n, model=m) for n, m in spec],
                               muxc.Options(verify=True, alignment=alignment))
        case = Case(program, batches, refs, lambda n: _trainable_grads(models[n]), list(models.values()))
        for fusion in ("spatial", "temporal"):
            run = program.with_options(fusion=fusion, **({"chunk_size": 4} if alignment == "chunk" else {}))
            case.zero_grad()
            _assert_matches_zero_aware(run.forward_backward(batches), case.grads, refs)
        case.zero_grad()
