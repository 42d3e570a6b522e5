"""Parameter counts: closed form == published numbers == the model built on the meta device."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from megatron_lite.config import ModelConfig, load_config
from megatron_lite.models.decoder import build_model
from megatron_lite.models.encoder_decoder import build_encoder_decoder
from megatron_lite.models.presets import PRESETS
from megatron_lite.planning.encdec import EncDecSpec, as_spec
from megatron_lite.planning.params import count_params, decoder_shapes, encdec_shapes
from megatron_lite.planning.presets import REFERENCE_PRESETS, get_preset, preset_names
from megatron_lite.planning.errors import PlanError

ROOT = Path(__file__).resolve().parents[2]

PUBLISHED = {  # HF model classes' counts, with the unpadded vocabulary and tied heads where the model ties them
    "gpt2-124m": 124_439_808,
    "gpt2-355m": 354_823_168,
    "gpt2-774m": 774_030_080,
    "gpt2-1.5b": 1_557_611_200,
    "llama2-7b": 6_738_415_616,
    "llama2-13b": 13_015_864_320,
    "llama2-70b": 68_976_648_192,
    "llama3-8b": 8_030_261_248,
    "t5-small": 60_506_624,
    "t5-base": 222_903_552,
    "t5-large": 737_668_096,
}


def _unpadded(spec):
    return dataclasses.replace(spec, pad_vocab_multiple=1) if isinstance(spec, ModelConfig) else spec


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_counts(name: str) -> None:
    counts = count_params(_unpadded(REFERENCE_PRESETS[name]))
    assert counts.total == PUBLISHED[name]
    assert counts.embedding + counts.non_embedding == counts.total


@pytest.mark.parametrize("name", ["gpt2-124m", "llama2-7b", "llama-8b", "llama3-8b"])
def test_model_presets_match_published(name: str) -> None:
    """The presets users select (the model code's own table first) reproduce the published counts."""
    spec = _unpadded(get_preset(name))
    key = {"llama-8b": "llama3-8b"}.get(name, name)
    assert count_params(spec).total == PUBLISHED[key]


def test_vocab_padding_is_explicit() -> None:
    spec = REFERENCE_PRESETS["gpt2-124m"]
    counts = count_params(spec)
    assert spec.padded_vocab_size == 50304
    assert counts.vocab_padding == (50304 - 50257) * 768
    assert counts.total - counts.vocab_padding == PUBLISHED["gpt2-124m"]


SHAPES = [
    dict(),  # GPT-2 style
    dict(position="rotary", norm="rmsnorm", activation="swiglu", bias=False, tie_embeddings=False, num_kv_heads=2),
    dict(position="sinusoidal", norm_position="post", activation="relu", vocab_size=1000, pad_vocab_multiple=64),
    dict(num_kv_heads=1, ffn_hidden_size=100, tie_embeddings=False, norm="layernorm", bias=False),
]


@pytest.mark.parametrize("kw", SHAPES)
def test_meta_model_agrees_name_by_name(kw: dict) -> None:
    cfg = ModelConfig(hidden_size=64, num_layers=3, num_heads=4, max_seq_len=32, **kw)
    model = build_model(cfg, device="meta")
    got = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert got == decoder_shapes(cfg)
    assert model.num_params(exclude_embeddings=True) == count_params(cfg).non_embedding


@pytest.mark.parametrize("name", ["gpt2-1.5b", "llama2-70b", "llama-8b"])
def test_meta_model_agrees_at_scale(name: str) -> None:
    spec = get_preset(name)
    model = build_model(spec, device="meta")
    assert sum(p.numel() for p in model.parameters()) == count_params(spec).total


# Published T5 v1.1 counts (google/t5-v1_1-*, HF T5ForConditionalGeneration with an untied head)
T5_V1_1 = {"t5-v1_1-small": 76_961_152, "t5-v1_1-base": 247_577_856, "t5-v1_1-large": 783_150_080}
ENCDEC_PRESETS = sorted(n for n, c in PRESETS.items() if c.family == "encoder_decoder")


def _encdec_config(name: str) -> ModelConfig:
    """The ModelConfig that trains an encoder-decoder preset: the model code's own, or the reference T5's."""
    return PRESETS[name] if name in PRESETS else REFERENCE_PRESETS[name].to_model_config()


@pytest.mark.parametrize("name", sorted(T5_V1_1))
def test_t5_v1_1_config_counts_match_published(name: str) -> None:
    """configs/models/<name>.yaml, read as the planner reads --config, counts the published parameters."""
    cfg = load_config(ROOT / "configs" / "models" / f"{name}.yaml").model
    spec = as_spec(cfg)
    assert isinstance(spec, EncDecSpec) and spec.gated and not spec.tie_embeddings
    assert count_params(spec).total == count_params(cfg).total == T5_V1_1[name]
    assert count_params(get_preset(name)).total == T5_V1_1[name]


@pytest.mark.parametrize("name", ENCDEC_PRESETS + ["t5-small", "t5-base", "t5-large"])
def test_encdec_presets_agree_with_the_model_on_meta(name: str) -> None:
    """Every encoder-decoder preset (T5 v1.1, the original T5, the original Transformer): the closed form lists the
    real model's parameters name by name, and its total is ``sum(p.numel())`` of that model on the meta device."""
    cfg = _encdec_config(name)
    model = build_encoder_decoder(cfg, device="meta")
    spec = EncDecSpec.from_model_config(cfg)
    assert [(n, tuple(p.shape)) for n, p in model.named_parameters()] == encdec_shapes(spec)
    counts = count_params(spec)
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.non_embedding == model.num_params(exclude_embeddings=True)
    if name in PUBLISHED:
        assert counts.total == PUBLISHED[name]


def test_transformer_base_counts_biases_and_layernorm_biases() -> None:
    spec = as_spec(PRESETS["transformer-base"])
    names = [n for n, _ in encdec_shapes(spec)]
    assert "layers.0.attn.q_proj.bias" in names and "layers.11.cross_norm.bias" in names
    assert "final_norm.weight" not in names and "lm_head.weight" not in names  # post-norm, tied head
    h, f, layers = 512, 2048, 6
    attn = 4 * (h * h + h)
    mlp = 2 * h * f + f + h
    norm = 2 * h
    expected = 37_120 * h + layers * (attn + mlp + 2 * norm) + layers * (2 * attn + mlp + 3 * norm)
    assert count_params(spec).total == expected == 63_143_936


SPECS = [  # shapes the presets do not cover: learned positions, unequal stacks, pre-norm LayerNorm with biases
    dict(position="learned", norm="layernorm", bias=True, norm_position="pre", activation="gelu", num_layers=3,
         num_decoder_layers=1, tie_embeddings=False),
    dict(position="relative", norm="rmsnorm", bias=False, activation="geglu", num_layers=1, num_decoder_layers=3,
         kv_channels=12, pad_vocab_multiple=64, vocab_size=300),
    dict(position="sinusoidal", norm="layernorm", bias=False, norm_position="post", activation="relu",
         num_layers=2, num_decoder_layers=2),
]


@pytest.mark.parametrize("kw", SPECS)
def test_encdec_shapes_agree_name_by_name(kw: dict) -> None:
    cfg = ModelConfig(family="encoder_decoder", hidden_size=32, num_heads=4, ffn_hidden_size=48, max_seq_len=16, **kw)
    spec = EncDecSpec.from_model_config(cfg)
    assert [(n, tuple(p.shape)) for n, p in build_encoder_decoder(cfg, "meta").named_parameters()] == \
        encdec_shapes(spec)
    again = EncDecSpec.from_model_config(spec.to_model_config())
    assert again == spec  # the config training would be given has the same shape


@pytest.mark.parametrize("spec", [REFERENCE_PRESETS["t5-small"],
                                  EncDecSpec(d_model=64, d_kv=8, num_heads=4, d_ff=96, num_encoder_layers=3,
                                             num_decoder_layers=2, gated=True, vocab_size=300)])
def test_t5_closed_form_matches_hf_meta(spec: EncDecSpec) -> None:
    """A tied T5 counts as HF's T5ForConditionalGeneration does (the published counts are HF's)."""
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        model = transformers.T5ForConditionalGeneration(transformers.T5Config(**spec.to_hf_config()))
    assert sum(p.numel() for p in model.parameters()) == count_params(spec).total


def test_unknown_preset_suggests() -> None:
    with pytest.raises(PlanError, match="did you mean 'gpt2-124m'"):
        get_preset("gpt2-124")
    assert "t5-base" in preset_names() and "t5-v1_1-base" in preset_names()
