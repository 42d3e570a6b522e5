"""FLOPs per token (PaLM convention) and the device table."""

from __future__ import annotations

import pytest

from megatron_lite.config import ModelConfig
from megatron_lite.planning.flops import encdec_training_flops, training_flops_per_token
from megatron_lite.planning.hardware import device_memory, peak_flops, register_device
from megatron_lite.planning.params import count_params
from megatron_lite.planning.presets import REFERENCE_PRESETS
from megatron_lite.planning.report import model_report


def test_palm_formula_by_hand() -> None:
    cfg = REFERENCE_PRESETS["llama3-8b"]
    n = count_params(cfg).non_embedding  # untied head is already non-embedding
    L, H, Q, T = 32, 32, 128, 8192
    assert training_flops_per_token(cfg, T) == 6 * n + 12 * L * H * Q * T
    assert training_flops_per_token(cfg, T, causal=True) == 6 * n + 6 * L * H * Q * T


def test_tied_head_counts_as_a_matmul() -> None:
    tied = ModelConfig(hidden_size=64, num_layers=2, num_heads=4, vocab_size=1000, pad_vocab_multiple=8)
    counts = count_params(tied)
    head = tied.padded_vocab_size * 64
    assert training_flops_per_token(tied, 16) == 6 * (counts.non_embedding + head) + 12 * 2 * 4 * 16 * 16


def test_gpt2_flops_close_to_nanogpt_rule() -> None:
    """~6N + 12LHQT with N ~ 124M gives the widely quoted ~0.86 GFLOPs/token for GPT-2 small at 1024."""
    assert training_flops_per_token(REFERENCE_PRESETS["gpt2-124m"], 1024) == pytest.approx(8.554e8, rel=1e-3)


def test_encdec_flops_is_per_processed_token() -> None:
    spec = REFERENCE_PRESETS["t5-small"]
    per_seq = encdec_training_flops(spec, 512, 512)
    assert training_flops_per_token(spec, 512) == pytest.approx(per_seq / 1024)
    assert encdec_training_flops(spec, 512, 512, causal=True) < per_seq


def test_encdec_convention_line_gives_the_number() -> None:
    """The printed encoder-decoder convention, 3N + 6 H Q T (L_enc + 2 L_dec) per processed token (causal: 1.5 L_dec),
    reproduces ``flops_per_token``."""
    spec = REFERENCE_PRESETS["t5-base"]
    r = model_report(spec, 512, meta=False)
    assert "encoder-decoder, per processed token" in r["flops_convention"]
    assert "3N + 6*H*Q*T*(L_enc + 2*L_dec)" in r["flops_convention"]
    n, hq, t = r["params_flops"], spec.num_heads * spec.d_kv, 512
    assert r["flops_per_token"] == pytest.approx(3 * n + 6 * hq * t * (12 + 2 * 12))
    assert r["flops_per_token_causal"] == pytest.approx(3 * n + 6 * hq * t * (12 + 1.5 * 12))
    assert model_report(REFERENCE_PRESETS["gpt2-124m"], 1024, meta=False)["flops_convention"].startswith("PaLM: 6N")


def test_peak_flops_lookup() -> None:
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA A100-SXM4-40GB", "fp32") == 19.5e12
    assert peak_flops("NVIDIA GH200 480GB") == 989e12
    assert peak_flops("cpu") is None
    assert peak_flops("Tesla V100-SXM2-32GB", "bf16") is None
    assert device_memory("h100") == 80 * 1024**3


def test_register_device_overrides() -> None:
    register_device("Z9000", {"bf16": 1e15}, 10**11)
    assert peak_flops("ACME Z9000 accelerator") == 1e15
