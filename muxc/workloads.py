"""Synthetic multi-task workloads: tiny base configs and learnable token tasks (no downloads).

Each synthetic task is a rule over token ids that a small adapter can learn, with its own
length distribution (SST-2-like short, OpenBookQA-like medium, RTE-like long samples).
Everything is seeded; nothing is read from disk or the network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["LENGTHS", "Rule", "SyntheticTask", "tiny_llama_config", "tiny_gpt2_config", "sample_batch"]

# (min, max) sample lengths in tokens, shaped like the datasets the paper fine-tunes on
LENGTHS = {"sst2": (10, 60), "obqa": (30, 120), "rte": (50, 250), "uniform": (40, 80)}


@dataclass(frozen=True)
class Rule:
    """Next-token rule: ``t[i+1] = (t[i] * mul + add) mod span + offset`` after a random start."""

    mul: int = 1
    add: int = 1
    offset: int = 3

    def sequence(self, start: int, length: int, span: int) -> list[int]:
        out = [start]
        for _ in range(length - 1):
            out.append((out[-1] - self.offset) * self.mul % span + self.offset)
            out[-1] = (out[-1] - self.offset + self.add) % span + self.offset
        return out


@dataclass(frozen=True)
class SyntheticTask:
    """A task's data: a rule and a length distribution."""

    name: str
    rule: Rule
    lengths: tuple[int, int]


def sample_batch(task: SyntheticTask, rows: int, vocab: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One right-padded HF batch (padding collator: pad to the batch's longest sample)."""
    lo, hi = task.lengths
    lens = torch.randint(lo, hi + 1, (rows,), generator=generator).tolist()
    seq = max(lens)
    span = vocab - task.rule.offset
    ids = torch.zeros(rows, seq, dtype=torch.long)
    mask = torch.zeros(rows, seq, dtype=torch.long)
    for r, n in enumerate(lens):
        start = int(torch.randint(0, span, (1,), generator=generator)) + task.rule.offset
        ids[r, :n] = torch.tensor(task.rule.sequence(start, n, span))
        mask[r, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def tiny_llama_config(hidden: int = 64, layers: int = 2, vocab: int = 64, intermediate: int | None = None):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )


def tiny_gpt2_config(hidden: int = 64, layers: int = 2, vocab: int = 64):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=512,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2,
    )
