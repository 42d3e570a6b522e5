"""Named presets: published parameter counts, and the YAML files in configs/models/ agree with presets.py."""

import dataclasses
from pathlib import Path

import pytest

from megatron_lite.config import load_config
from megatron_lite.models import PRESETS, build_model, get_preset

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"

# Published totals. GPT-2's counts a tied matrix once and uses the unpadded 50257-token vocabulary.
PUBLISHED = {
    "gpt2-124m": 124_439_808,
    "llama2-7b": 6_738_415_616,
    "llama-8b": 8_030_261_248,
    "llama-1b": 1_235_814_400,
    "llama2-13b": 13_015_864_320,
    "llama2-70b": 68_976_648_192,
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_parameter_counts(name: str) -> None:
    cfg = dataclasses.replace(get_preset(name), pad_vocab_multiple=1)
    model = build_model(cfg, device="meta")
    assert model.num_params() == PUBLISHED[name]


def test_vocab_padding_adds_rows() -> None:
    model = build_model(get_preset("gpt2-124m"), device="meta")
    assert model.embed.weight.shape[0] == 50304
    assert model.num_params() == PUBLISHED["gpt2-124m"] + (50304 - 50257) * 768


def test_tiny_is_about_one_million_parameters() -> None:
    model = build_model(get_preset("tiny"))
    assert 0.5e6 < model.num_params() < 2e6


@pytest.mark.parametrize("name", PRESETS)
def test_yaml_matches_preset(name: str) -> None:
    cfg = load_config(CONFIG_DIR / f"{name}.yaml")
    assert cfg.model == PRESETS[name]


def test_every_yaml_is_a_preset() -> None:
    assert {p.stem for p in CONFIG_DIR.glob("*.yaml")} == set(PRESETS)


def test_get_preset_returns_a_copy() -> None:
    cfg = get_preset("tiny")
    cfg.num_layers = 99
    assert PRESETS["tiny"].num_layers != 99
    with pytest.raises(KeyError, match="unknown model preset"):
        get_preset("gpt5")
