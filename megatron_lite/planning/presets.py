"""Published architectures by name, for planning and for checking counts against the published numbers.

Names found in ``megatron_lite.models.presets`` (the model code's own presets) win; the table here covers the reference
architectures whose published parameter counts the tests check, among them the original T5 (v1.0: ReLU, tied head),
beside the model code's T5 v1.1 presets. An encoder-decoder comes back as the planner's ``EncDecSpec``.

GPT-2 presets keep the model code's default vocab padding (50257 -> 50304 rows with ``pad_vocab_multiple=128``); the
published GPT-2 counts use the unpadded 50257 rows, i.e. ``pad_vocab_multiple=1``.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib

from megatron_lite.config import ModelConfig
from megatron_lite.planning.encdec import EncDecSpec, as_spec
from megatron_lite.planning.errors import PlanError


def _gpt2(h: int, layers: int, heads: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=50257, hidden_size=h, num_layers=layers, num_heads=heads, max_seq_len=1024, position="learned",
        norm="layernorm", activation="gelu_tanh", bias=True, tie_embeddings=True,
    )


def _llama(vocab: int, h: int, layers: int, heads: int, kv: int | None, ffn: int | None, seq: int, theta: float,
           eps: float) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab, hidden_size=h, num_layers=layers, num_heads=heads, num_kv_heads=kv, ffn_hidden_size=ffn,
        max_seq_len=seq, position="rotary", rope_theta=theta, norm="rmsnorm", norm_eps=eps, activation="swiglu",
        bias=False, tie_embeddings=False,
    )


REFERENCE_PRESETS: dict[str, ModelConfig | EncDecSpec] = {
    # Radford et al. 2019; counts as in HF GPT2LMHeadModel (124,439,808 / 354,823,168 / 774,030,080 / 1,557,611,200)
    "gpt2-124m": _gpt2(768, 12, 12),
    "gpt2-355m": _gpt2(1024, 24, 16),
    "gpt2-774m": _gpt2(1280, 36, 20),
    "gpt2-1.5b": _gpt2(1600, 48, 25),
    # Touvron et al. 2023 (Llama 2); Meta Llama 3 model card. Counts as in HF LlamaForCausalLM.
    "llama2-7b": _llama(32000, 4096, 32, 32, None, None, 4096, 10000.0, 1e-5),
    "llama2-13b": _llama(32000, 5120, 40, 40, None, None, 4096, 10000.0, 1e-5),
    "llama2-70b": _llama(32000, 8192, 80, 64, 8, 28672, 4096, 10000.0, 1e-5),
    "llama3-8b": _llama(128256, 4096, 32, 32, 8, 14336, 8192, 500000.0, 1e-5),
    # Raffel et al. 2020 (T5 v1.0); counts as in HF T5ForConditionalGeneration (60,506,624 / 222,903,552 / 737,668,096)
    "t5-small": EncDecSpec(d_model=512, d_kv=64, num_heads=8, d_ff=2048, num_encoder_layers=6, num_decoder_layers=6),
    "t5-base": EncDecSpec(d_model=768, d_kv=64, num_heads=12, d_ff=3072, num_encoder_layers=12, num_decoder_layers=12),
    "t5-large": EncDecSpec(d_model=1024, d_kv=64, num_heads=16, d_ff=4096, num_encoder_layers=24,
                           num_decoder_layers=24),
}
ALIASES = {"gpt2": "gpt2-124m", "gpt2-small": "gpt2-124m", "gpt2-medium": "gpt2-355m", "gpt2-large": "gpt2-774m",
           "gpt2-xl": "gpt2-1.5b", "gpt2-1558m": "gpt2-1.5b", "llama-8b": "llama3-8b", "llama-7b": "llama2-7b",
           "llama-13b": "llama2-13b", "llama-70b": "llama2-70b"}


def _model_presets() -> dict[str, ModelConfig]:
    """The model code's presets, when that module exists (``PRESETS`` or ``presets``)."""
    try:
        mod = importlib.import_module("megatron_lite.models.presets")
    except ImportError:
        return {}
    table = getattr(mod, "PRESETS", None) or getattr(mod, "presets", None) or {}
    return dict(table) if isinstance(table, dict) else {}


def preset_names() -> list[str]:
    return sorted(set(_model_presets()) | set(REFERENCE_PRESETS) | set(ALIASES))


def get_preset(name: str) -> ModelConfig | EncDecSpec:
    """A fresh copy of the named architecture; ``PlanError`` naming the closest match when unknown."""
    model = _model_presets()
    if name in model:
        return as_spec(dataclasses.replace(model[name]))
    key = ALIASES.get(name, name)
    if key in REFERENCE_PRESETS:
        return dataclasses.replace(REFERENCE_PRESETS[key])
    close = difflib.get_close_matches(name, preset_names(), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; known: {', '.join(preset_names())}"
    raise PlanError(f"unknown preset '{name}'{hint}")
