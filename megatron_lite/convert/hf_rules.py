"""What the Hugging Face conversions of the decoder family share: the rule a conversion is made of, the tensor
functions rules apply, the embedding and head rules, and the config keys every Llama-style architecture (Llama,
Mixtral, Qwen2-MoE) spells alike. ``convert/hf.py`` (GPT-2, Llama, and the choice of architecture) and
``convert/hf_moe.py`` (Mixtral, Qwen2-MoE) both build on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from megatron_lite.config import ModelConfig

StateDict = dict[str, torch.Tensor]


def rotary_from_hf(hf: dict) -> dict:
    """The ModelConfig fields a Llama-style HF config (Llama, Mixtral, Qwen2-MoE) gives alike: shape, rotary
    positions, rmsnorm, SwiGLU; the MLP widths and biases are each architecture's own."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise ValueError(f"rope scaling {rope!r} is not supported (only unscaled rotary and rope_type llama3)")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = None
    if rope_type == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        missing = [k for k in keys if k not in rope]
        if missing:
            raise ValueError(f"rope scaling {rope!r} (llama3) lacks {', '.join(missing)}")
        scaling = {"rope_type": "llama3", **{k: rope[k] for k in keys}}
    heads = hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, hf["hidden_size"] // heads):
        raise ValueError(f"head_dim={hf['head_dim']} differs from hidden_size/num_attention_heads")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported {hf.get('model_type')} hidden_act {hf['hidden_act']!r}")
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        max_seq_len=hf["max_position_embeddings"],
        position="rotary",
        rope_theta=float(theta),
        rope_scaling=scaling,
        norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        norm_position="pre",
        activation="swiglu",
        tie_embeddings=hf.get("tie_word_embeddings", False),
        attention_dropout=hf.get("attention_dropout", 0.0),
        init_std=hf.get("initializer_range", 0.02),
    )


def rotary_to_hf(cfg: ModelConfig) -> dict:
    """The ``config.json`` keys of a Llama-style HF config (Llama, Mixtral, Qwen2-MoE) alike."""
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", **(cfg.rope_scaling or {}), "rope_theta": cfg.rope_theta},
        "rms_norm_eps": cfg.norm_eps,
        "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": cfg.attention_dropout,
        "initializer_range": cfg.init_std,
    }


# A conversion is a list of rules, each computing one or more target tensors from a few source tensors (a GPT-2
# layer's q, k and v from its fused c_attn, or the reverse). Whole state dicts go through ``apply_rules``; the
# checkpoint tool runs the same rules one at a time, so a conversion never holds more than a layer's attention.


@dataclass(frozen=True)
class Rule:
    """``targets`` = ``fn(*sources)``; ``tied`` marks a target that is the same tensor as another (a tied head)."""

    targets: tuple[str, ...]
    sources: tuple[str, ...]
    fn: Callable[..., tuple[torch.Tensor, ...]]
    tied: bool = False


def unchanged(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return ts


def transposed(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (t.t().contiguous(),)


def pad_to(rows: int) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]]:
    def pad(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if t.shape[0] > rows:
            raise ValueError(f"a vocabulary tensor of {t.shape[0]} rows does not fit the padded vocabulary of {rows}")
        if t.shape[0] == rows:
            return (t,)
        return (torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])]),)
    return pad


def unpad_to(rows: int) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]]:
    return lambda t: (t[:rows].contiguous(),)


def linear_rules(ours: str, theirs: str, bias: bool, transpose: bool, to_hf: bool) -> list[Rule]:
    """A linear (or norm) module's weight, and its bias, in one direction."""
    src, dst = (ours, theirs) if to_hf else (theirs, ours)
    rules = [Rule((f"{dst}.weight",), (f"{src}.weight",), transposed if transpose else unchanged)]
    if bias:
        rules.append(Rule((f"{dst}.bias",), (f"{src}.bias",), unchanged))
    return rules


def head_rules(cfg: ModelConfig, embed_ours: str, embed_hf: str, to_hf: bool) -> list[Rule]:
    """The embedding (padded in ours, unpadded in HF) and the head (the embedding's tensor when tied)."""
    v, padded = cfg.vocab_size, cfg.padded_vocab_size
    if to_hf:
        rules = [Rule((embed_hf,), (embed_ours,), unpad_to(v))]
        if cfg.tie_embeddings:  # our state holds the tied head under both names; HF's is the embedding's tensor
            head = Rule(("lm_head.weight",), (embed_ours, "lm_head.weight"), lambda e, _: unpad_to(v)(e), tied=True)
        else:
            head = Rule(("lm_head.weight",), ("lm_head.weight",), unpad_to(v))
    else:
        rules = [Rule((embed_ours,), (embed_hf,), pad_to(padded))]
        head = Rule(("lm_head.weight",), (embed_hf if cfg.tie_embeddings else "lm_head.weight",), pad_to(padded),
                    tied=cfg.tie_embeddings)
    return [*rules, head]
