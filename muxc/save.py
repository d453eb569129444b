"""Write one task's adapter in PEFT's on-disk format (loadable by ``PeftModel.from_pretrained``)."""

from __future__ import annotations

import copy
from pathlib import Path

from peft import get_peft_model_state_dict
from safetensors.torch import save_file

from muxc.frontends.peft import adapter_name_of
from muxc.names import safe_child
from muxc.task import Task

__all__ = ["save_task_adapter"]


def save_task_adapter(task: Task, directory: Path) -> Path:
    """``adapter_config.json`` + ``adapter_model.safetensors`` of the task's adapter.

    Both files are checked to land inside ``directory`` (no symlink leading out).
    """
    adapter = adapter_name_of(task.name, task.model, task.adapter_name)
    directory.mkdir(parents=True, exist_ok=True)
    weights = safe_child(directory, "adapter_model.safetensors")
    safe_child(directory, "adapter_config.json")  # written by PEFT's save_pretrained below
    state = get_peft_model_state_dict(task.model, adapter_name=adapter)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    save_file(state, str(weights), metadata={"format": "pt"})
    config = copy.deepcopy(task.model.peft_config[adapter])
    config.inference_mode = True
    config.save_pretrained(str(directory))
    return directory
