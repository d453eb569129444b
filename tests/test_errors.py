"""Every user error is a MuxcError subclass that names what is wrong and how to fix it."""

from __future__ import annotations

import copy

import pytest
import torch
from models import build_base, make_batch, make_peft
from peft import LoHaConfig, LoraConfig, get_peft_model

import muxc
from muxc.options import Options


def _lora(base, seed=1, **kw):
    kw.setdefault("target_modules", ["q_proj", "v_proj"] if "llama" in type(base).__name__.lower() else ["c_attn"])
    return make_peft(base, LoraConfig(r=4, lora_dropout=0.0, **kw), seed)


def test_empty_task_list():
    with pytest.raises(muxc.TaskSpecError, match="no tasks given"):
        muxc.compile([])


def test_duplicate_task_names(llama):
    a, b = _lora(llama), _lora(llama)
    with pytest.raises(muxc.TaskSpecError, match=r"duplicate task names \['x'\]"):
        muxc.compile([muxc.Task(name="x", model=a), muxc.Task(name="x", model=b)])


def test_not_a_peft_model(llama):
    with pytest.raises(muxc.TaskSpecError, match="must be a peft.PeftModel"):
        muxc.compile([muxc.Task(name="x", model=copy.deepcopy(llama))])


def test_bad_task_name():
    with pytest.raises(muxc.TaskSpecError, match="non-empty string"):
        muxc.Task(name="", model=None)


def test_different_architectures(llama, bases):
    with pytest.raises(muxc.ArchitectureMismatchError, match=r"'a' \(llama\).*'b' \(gpt2\)"):
        muxc.compile([muxc.Task(name="a", model=_lora(llama)), muxc.Task(name="b", model=_lora(bases("gpt2")))])


def test_same_family_different_config(llama):
    other = copy.deepcopy(llama)
    other.config.rms_norm_eps = 1e-3
    for m in other.modules():
        if hasattr(m, "variance_epsilon"):
            m.variance_epsilon = 1e-3
    with pytest.raises(muxc.ArchitectureMismatchError, match="differ at backbone op"):
        muxc.compile([muxc.Task(name="a", model=_lora(llama)), muxc.Task(name="b", model=_lora(other))])


def test_different_base_weights_name_the_tensor_and_tasks(llama):
    other = build_base("llama", seed=7)
    with pytest.raises(muxc.BaseWeightMismatchError, match=r"'model\.embed_tokens\.weight' differs between tasks 'a' and 'b'"):
        muxc.compile([muxc.Task(name="a", model=_lora(llama)), muxc.Task(name="b", model=_lora(other))])


def test_trainable_base_parameter(llama):
    m = _lora(llama)
    m.get_base_model().model.norm.weight.requires_grad_(True)
    with pytest.raises(muxc.TrainableBaseError, match=r"'a'.*model\.norm\.weight.*freeze them"):
        muxc.compile([muxc.Task(name="a", model=m)])


def test_unsupported_peft_type_lists_supported(llama):
    m = get_peft_model(copy.deepcopy(llama), LoHaConfig(target_modules=["q_proj"]))
    with pytest.raises(muxc.UnsupportedPeftError, match=r"PEFT type LOHA is not supported; supported: LoRA"):
        muxc.compile([muxc.Task(name="a", model=m)])


@pytest.mark.parametrize("option,match", [
    (dict(lora_bias=True), "lora_bias=True"),
])
def test_unsupported_lora_options_are_named(llama, option, match):
    m = get_peft_model(copy.deepcopy(llama), LoraConfig(r=4, target_modules=["q_proj"], **option))
    with pytest.raises(muxc.UnsupportedPeftError, match=match):
        muxc.compile([muxc.Task(name="a", model=m)])


def test_unknown_adapter_name(llama):
    with pytest.raises(muxc.TaskSpecError, match=r"adapter 'nope' not in the model \(has \['default'\]\)"):
        muxc.compile([muxc.Task(name="a", model=_lora(llama), adapter_name="nope")])


@pytest.fixture(scope="module")
def program():
    base = build_base("llama")
    return muxc.compile([muxc.Task(name="a", model=_lora(base))])


def test_batch_without_labels(program):
    b = make_batch(2, 5, 1)
    del b["labels"]
    with pytest.raises(muxc.BatchError, match="task 'a': batch has no 'labels'"):
        program.forward_backward({"a": b})


def test_batch_for_unknown_task(program):
    with pytest.raises(muxc.BatchError, match=r"unknown task\(s\) \['zz'\]; compiled tasks are \['a'\]"):
        program.forward_backward({"zz": make_batch(2, 5, 1)})


def test_batch_shape_mismatch(program):
    b = make_batch(2, 5, 1)
    b["labels"] = b["labels"][:, :3]
    with pytest.raises(muxc.BatchError, match="labels must be a tensor shaped like input_ids"):
        program.forward_backward({"a": b})


def test_unsupported_batch_key(program):
    b = make_batch(2, 5, 1)
    b["position_ids"] = torch.arange(5).expand(2, 5)
    with pytest.raises(muxc.BatchError, match=r"unsupported batch key\(s\) \['position_ids'\]"):
        program.forward_backward({"a": b})


def test_options_are_validated():
    with pytest.raises(muxc.OptionsError, match=r"fusion='sideways' is not one of \['auto', 'spatial', 'temporal'\]"):
        Options(fusion="sideways")
    with pytest.raises(muxc.OptionsError, match=r"unknown option\(s\) \['fuse'\]"):
        Options.from_dict({"fuse": "spatial"})
    with pytest.raises(muxc.OptionsError, match="unknown kernel impl 'cuda'"):
        Options(kernel_impl="cuda")


def test_foreign_optimizer_params(llama):
    a, b = _lora(llama, 1), _lora(llama, 2)
    opt = torch.optim.SGD([p for p in b.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(muxc.TaskSpecError, match="optimizer holds .* not this task's adapter"):
        muxc.compile([muxc.Task(name="a", model=a, optimizer=opt), muxc.Task(name="b", model=b)])
