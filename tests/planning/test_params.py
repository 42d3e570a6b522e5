"""Parameter counts: closed form == published numbers == the model built on the meta device."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_lite.config import ModelConfig
from megatron_lite.models.decoder import build_model
from megatron_lite.planning.encdec import EncDecSpec
from megatron_lite.planning.params import count_params, decoder_shapes
from megatron_lite.planning.presets import REFERENCE_PRESETS, get_preset, preset_names
from megatron_lite.planning.errors import PlanError

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


@pytest.mark.parametrize("spec", [REFERENCE_PRESETS["t5-small"],
                                  EncDecSpec(d_model=64, d_kv=8, num_heads=4, d_ff=96, num_encoder_layers=3,
                                             num_decoder_layers=2, gated=True, vocab_size=300)])
def test_t5_closed_form_matches_hf_meta(spec: EncDecSpec) -> None:
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        model = transformers.T5ForConditionalGeneration(transformers.T5Config(**spec.to_hf_config()))
    got = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert got == spec.shapes()


def test_unknown_preset_suggests() -> None:
    with pytest.raises(PlanError, match="did you mean 'gpt2-124m'"):
        get_preset("gpt2-124")
    assert "t5-base" in preset_names()
