"""Exact checkpoints of a `Program`: adapters (PEFT format), optimizer and LR-scheduler state,
step counters, RNG state, options and a manifest with every file's hash; written atomically,
read without pickle, checked against the program before anything changes."""

from muxc.checkpoint.store import FORMAT, VERSION, load_checkpoint, save_checkpoint

__all__ = ["save_checkpoint", "load_checkpoint", "FORMAT", "VERSION"]
