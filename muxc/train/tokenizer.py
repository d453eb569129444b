"""Text -> token ids for `muxc train`: the base directory's own tokenizer, or a byte-level one.

The built-in base has no tokenizer files, so it uses `ByteTokenizer`: every UTF-8 byte is a
token (no training, no files, nothing to download; any text round-trips).

>>> tok = ByteTokenizer()
>>> tok.encode("hé")
[107, 198, 172]
>>> tok.decode(tok.encode("hé")), tok.vocab_size, (tok.pad_id, tok.bos_id, tok.eos_id)
('hé', 259, (0, 1, 2))
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from muxc.errors import ConfigError

__all__ = ["Tokenizer", "ByteTokenizer", "HFTokenizer", "load_tokenizer"]


class Tokenizer(Protocol):
    """What the data path needs of a tokenizer."""

    vocab_size: int
    pad_id: int
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes as tokens 3..258; 0 is padding, 1 begins and 2 ends a sample."""

    vocab_size: int = 259
    pad_id: int = 0
    bos_id: int | None = 1
    eos_id: int | None = 2
    offset: int = 3

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - self.offset for i in ids if i >= self.offset).decode("utf-8", "replace")


class HFTokenizer:
    """A tokenizer saved in a local HF model directory (``AutoTokenizer``, local files only).

    Special tokens are added by the data path (begin/end ids), not by ``encode``.
    """

    def __init__(self, directory: Path):
        from transformers import AutoTokenizer

        try:
            self.hf = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"[base] path: no usable tokenizer in {str(directory)!r} ({e}); save one there "
                "with tokenizer.save_pretrained(dir)"
            ) from None
        self.vocab_size = len(self.hf)
        self.bos_id = self.hf.bos_token_id
        self.eos_id = self.hf.eos_token_id
        pad = self.hf.pad_token_id
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)

    def encode(self, text: str) -> list[int]:
        return list(self.hf(text, add_special_tokens=False)["input_ids"])


def load_tokenizer(directory: Path | None) -> Tokenizer:
    """The tokenizer of the local model ``directory``, or `ByteTokenizer` for the built-in base."""
    return ByteTokenizer() if directory is None else HFTokenizer(directory)
