"""`muxc train CONFIG.toml`: a multi-tenant training run from a config file.

config.py (the TOML schema, `load_config`), tokenizer.py (the base's tokenizer or a byte-level
one), data.py (local files through HF ``datasets`` or the standard library's docstrings ->
tokenized samples -> a deterministic micro-batch stream), loop.py (`train`: tasks join, step,
evaluate, checkpoint and leave), report.py (metrics CSV/JSONL, TensorBoard, loss-curve PNG).
"""

from muxc.train.config import RunConfig, TaskConfig, load_config
from muxc.train.loop import StepReport, TaskSummary, TrainResult, train

__all__ = ["load_config", "train", "RunConfig", "TaskConfig", "StepReport", "TaskSummary", "TrainResult"]
