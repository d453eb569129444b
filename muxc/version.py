"""The muxc version (one place; checkpoints record it)."""

__version__ = "0.1.0"
