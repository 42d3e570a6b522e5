"""Every shipped config loads, validates and describes a layout that tools/plan.py can size."""

from pathlib import Path

import pytest

from megatron_lite.config import load_config
from megatron_lite.models.presets import PRESETS

CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_training_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.data.seq_len <= cfg.model.max_seq_len
    assert cfg.global_batch_size % cfg.training.micro_batch_size == 0
    name = path.stem
    if name in PRESETS:  # a training config named after a preset trains exactly that model shape
        preset = PRESETS[name]
        for field in ("hidden_size", "num_layers", "num_heads", "vocab_size", "position", "activation"):
            assert getattr(cfg.model, field) == getattr(preset, field), field


def test_llama_8b_config_counts_tokens_per_step() -> None:
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "llama-8b.yaml")
    assert cfg.global_batch_size == 512 and cfg.model.activation_checkpointing
