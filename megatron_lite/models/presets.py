"""Named model sizes. Each has a twin in ``configs/models/<name>.yaml`` (a test keeps the two equal).

GPT-2 shapes follow the released checkpoints; Llama shapes follow the published configs, including Llama 3.2's
long-context rope rescaling. Mixtral-8x7B follows ``mistralai/Mixtral-8x7B-v0.1``'s config.json (Jiang et al. 2024,
arXiv:2401.04088): a Mistral-7B-shaped decoder whose every feed-forward layer is 8 SwiGLU experts, 2 per token
(46,702,792,704 parameters, 12,879,925,248 active per token). The encoder-decoder presets are T5 v1.1's released
shapes (``google/t5-v1_1-*``) and the base model of "Attention Is All You Need" (its 37k shared BPE vocabulary).
"""

from __future__ import annotations

import copy
import dataclasses

from megatron_lite.config import ModelConfig, MoEConfig


def _gpt2(hidden: int, layers: int, heads: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=50257, hidden_size=hidden, num_layers=layers, num_heads=heads, max_seq_len=1024,
        position="learned", norm="layernorm", norm_eps=1e-5, norm_position="pre", activation="gelu_tanh",
        bias=True, tie_embeddings=True,
    )  # fmt: skip


def _llama(
    vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, ffn: int, seq: int, theta: float, tied: bool
) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
        ffn_hidden_size=ffn, max_seq_len=seq, position="rotary", rope_theta=theta, norm="rmsnorm", norm_eps=1e-5,
        norm_position="pre", activation="swiglu", bias=False, tie_embeddings=tied,
    )  # fmt: skip


def _t5_v1_1(hidden: int, layers: int, heads: int, ffn: int) -> ModelConfig:
    return ModelConfig(
        family="encoder_decoder", vocab_size=32128, hidden_size=hidden, num_layers=layers, num_heads=heads,
        kv_channels=64, ffn_hidden_size=ffn, max_seq_len=512, position="relative", norm="rmsnorm", norm_eps=1e-6,
        norm_position="pre", activation="geglu", bias=False, tie_embeddings=False, scale_attn_logits=False,
        init_std=1.0, scaled_residual_init=False,
    )  # fmt: skip


PRESETS: dict[str, ModelConfig] = {
    "gpt2-124m": _gpt2(768, 12, 12),
    "gpt2-355m": _gpt2(1024, 24, 16),
    "gpt2-774m": _gpt2(1280, 36, 20),
    "gpt2-1.5b": _gpt2(1600, 48, 25),
    "llama-1b": dataclasses.replace(  # Llama-3.2-1B
        _llama(128256, 2048, 16, 32, 8, 8192, 131072, 500000.0, tied=True),
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    ),
    "llama-8b": _llama(128256, 4096, 32, 32, 8, 14336, 8192, 500000.0, tied=False),  # Llama-3-8B
    "llama2-7b": _llama(32000, 4096, 32, 32, 32, 11008, 4096, 10000.0, tied=False),
    "llama2-13b": _llama(32000, 5120, 40, 40, 40, 13824, 4096, 10000.0, tied=False),
    "llama2-70b": _llama(32000, 8192, 80, 64, 8, 28672, 4096, 10000.0, tied=False),
    "mixtral-8x7b": dataclasses.replace(  # Mixtral-8x7B-v0.1: router_aux_loss_coef 0.02, no shared experts
        _llama(32000, 4096, 32, 32, 8, 14336, 32768, 1000000.0, tied=False),
        moe=MoEConfig(num_experts=8, top_k=2, every=1, expert_ffn_size=14336, router="softmax",
                      normalize_top_k=True, aux_loss_coef=0.02, z_loss_coef=0.0),
    ),
    # A ~1M-parameter Llama-style model (GQA, rotary, RMSNorm, SwiGLU) for tests and debugging.
    "tiny": _llama(512, 128, 4, 4, 2, 512, 1024, 10000.0, tied=True),
    "t5-v1_1-small": _t5_v1_1(512, 8, 6, 1024),
    "t5-v1_1-base": _t5_v1_1(768, 12, 12, 2048),
    "t5-v1_1-large": _t5_v1_1(1024, 24, 16, 2816),
    "transformer-base": ModelConfig(
        family="encoder_decoder", vocab_size=37000, hidden_size=512, num_layers=6, num_heads=8, ffn_hidden_size=2048,
        max_seq_len=1024, position="sinusoidal", norm="layernorm", norm_eps=1e-6, norm_position="post",
        activation="relu", bias=True, tie_embeddings=True, scale_embeddings=True, embedding_dropout=0.1,
        attention_dropout=0.0, residual_dropout=0.1, scaled_residual_init=False,
    ),  # fmt: skip
}


def get_preset(name: str) -> ModelConfig:
    """A fresh copy of the named preset, safe to modify (its nested ``moe`` and ``rope_scaling`` too)."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
