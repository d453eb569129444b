"""Tiny decoder LMs built from configs (no downloads) and PEFT tasks over them."""

from __future__ import annotations

import copy

import torch
import transformers as T
from peft import get_peft_model

VOCAB = 96
_COMMON = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _cfg(family: str):
    h, layers, heads, ff = 32, 2, 4, 64
    if family == "gpt2":
        return T.GPT2Config(n_embd=h, n_layer=layers, n_head=heads, n_positions=128, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, **_COMMON), T.GPT2LMHeadModel
    if family == "llama":
        return T.LlamaConfig(hidden_size=h, intermediate_size=ff, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=2,
                             max_position_embeddings=128, **_COMMON), T.LlamaForCausalLM
    if family == "opt":
        return T.OPTConfig(hidden_size=h, ffn_dim=ff, num_hidden_layers=layers, num_attention_heads=heads,
                           max_position_embeddings=128, word_embed_proj_dim=h, dropout=0.0,
                           attention_dropout=0.0, **_COMMON), T.OPTForCausalLM
    if family == "qwen2":
        return T.Qwen2Config(hidden_size=h, intermediate_size=ff, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=2,
                             max_position_embeddings=128, **_COMMON), T.Qwen2ForCausalLM
    if family == "qwen3":
        return T.Qwen3Config(hidden_size=h, intermediate_size=ff, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=2, head_dim=8,
                             max_position_embeddings=128, **_COMMON), T.Qwen3ForCausalLM
    if family == "mistral":
        return T.MistralConfig(hidden_size=h, intermediate_size=ff, num_hidden_layers=layers,
                               num_attention_heads=heads, num_key_value_heads=2,
                               max_position_embeddings=128, **_COMMON), T.MistralForCausalLM
    if family == "gpt_neox":
        return T.GPTNeoXConfig(hidden_size=h, intermediate_size=ff, num_hidden_layers=layers,
                               num_attention_heads=heads, max_position_embeddings=128,
                               hidden_dropout=0.0, attention_dropout=0.0, **_COMMON), T.GPTNeoXForCausalLM
    if family == "phi":
        return T.PhiConfig(hidden_size=h, intermediate_size=ff, num_hidden_layers=layers,
                           num_attention_heads=heads, max_position_embeddings=128, resid_pdrop=0.0,
                           embd_pdrop=0.0, attention_dropout=0.0, **_COMMON), T.PhiForCausalLM
    if family == "gemma":
        return T.GemmaConfig(hidden_size=h, intermediate_size=ff, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=2, head_dim=8,
                             max_position_embeddings=128, **_COMMON), T.GemmaForCausalLM
    if family == "bloom":
        return T.BloomConfig(hidden_size=h, n_layer=layers, n_head=heads, hidden_dropout=0.0,
                             attention_dropout=0.0, **_COMMON), T.BloomForCausalLM
    if family == "falcon":
        return T.FalconConfig(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                              hidden_dropout=0.0, attention_dropout=0.0, **_COMMON), T.FalconForCausalLM
    if family == "stablelm":
        return T.StableLmConfig(hidden_size=h, intermediate_size=ff, num_hidden_layers=layers,
                                num_attention_heads=heads, num_key_value_heads=2,
                                max_position_embeddings=128, **_COMMON), T.StableLmForCausalLM
    if family == "gpt_bigcode":
        return T.GPTBigCodeConfig(n_embd=h, n_layer=layers, n_head=heads, n_positions=128,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **_COMMON), T.GPTBigCodeForCausalLM
    raise ValueError(family)


CORE_FAMILIES = ("gpt2", "llama", "opt")
OTHER_FAMILIES = ("qwen2", "qwen3", "mistral", "gpt_neox", "phi", "gemma", "bloom", "falcon", "stablelm", "gpt_bigcode")


def build_base(family: str, seed: int = 0) -> torch.nn.Module:
    cfg, cls = _cfg(family)
    torch.manual_seed(seed)
    return cls(cfg).eval()


def make_peft(base: torch.nn.Module, config, seed: int = 1, copy_base: bool = True):
    """A PeftModel over a copy of ``base`` with non-trivial adapter weights (so every grad is nonzero)."""
    model = copy.deepcopy(base) if copy_base else base
    pm = get_peft_model(model, config)
    perturb(pm, seed)
    return pm


def lengths_batch(lengths, seed: int) -> dict:
    """A right-padded causal-LM batch whose rows hold ``lengths`` real tokens."""
    batch = make_batch(len(lengths), max(lengths), seed, pad_rows=0)
    mask = torch.zeros_like(batch["input_ids"])
    for r, n in enumerate(lengths):
        mask[r, :n] = 1
    return {"input_ids": batch["input_ids"] * mask, "attention_mask": mask,
            "labels": batch["input_ids"].masked_fill(mask == 0, -100)}


def lora_and_ia3_tasks(base: torch.nn.Module) -> list:
    """Two tasks on copies of ``base``: "a" LoRA r=4 on every linear, "b" IA3 (PEFT's
    defaults), the mix the graph-rewrite passes' tests run."""
    import muxc
    from peft import IA3Config, LoraConfig

    return [muxc.Task(name="a", model=make_peft(base, LoraConfig(r=4, target_modules="all-linear",
                                                                 lora_dropout=0.0), 1)),
            muxc.Task(name="b", model=make_peft(base, IA3Config(), 2))]


def perturb(pm, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "lora_A" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif "ia3_l" in n:
                p.copy_(1 + torch.randn(p.shape, generator=g) * 0.2)


def make_batch(rows: int, seq: int, seed: int, pad_rows: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded batch: the first ``pad_rows`` rows end with 1..3 padding tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, seq), generator=g)
    mask = torch.ones_like(ids)
    for r in range(min(pad_rows, rows)):
        k = 1 + (r + seed) % min(3, seq - 1)
        mask[r, seq - k:] = 0
        ids[r, seq - k:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
