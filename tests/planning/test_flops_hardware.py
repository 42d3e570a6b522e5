"""FLOPs per token (PaLM convention) and the device table."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_lite.config import ModelConfig, config_from_dict, load_config
from megatron_lite.planning.encdec import as_spec, encdec_lengths
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


TINY_T5 = dict(family="encoder_decoder", vocab_size=256, hidden_size=64, num_layers=2, num_decoder_layers=3,
               num_heads=4, kv_channels=16, ffn_hidden_size=96, max_seq_len=32, position="relative", norm="rmsnorm",
               activation="geglu", bias=False, tie_embeddings=False, scale_attn_logits=False)


def test_trainer_uses_the_encdec_rule_for_t5_runs() -> None:
    """T5 v1.1 small on span corruption of 512 inputs: the trainer's FLOPs/token are the planner's encoder-decoder
    FLOPs of a (512 input, 114 target) sample per data.seq_len token, far below the decoder formula on 512 tokens."""
    from megatron_lite.training.trainer import _flops_per_token

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "models" / "t5-v1_1-small.yaml")
    spec = as_spec(cfg.model)
    assert encdec_lengths(cfg.data) == (512, 114)
    assert _flops_per_token(cfg) == pytest.approx(encdec_training_flops(spec, 512, 114) / 512, rel=1e-12)
    assert _flops_per_token(cfg) < 0.75 * 2 * training_flops_per_token(spec, 512)  # the 512 + 512 reading


@pytest.mark.parametrize("data", [{"objective": "seq2seq", "seq_len": 32, "target_seq_len": 12},
                                  {"objective": "span_corruption", "seq_len": 32}])
def test_trainer_encdec_flops_match_the_counted_matmuls(data: dict) -> None:
    """The trainer's figure times the tokens it counts per step equals the matmul FLOPs torch counts in a forward and
    backward of the real model on the lengths the data makes, once the 6 FLOPs per token that the convention gives
    the norm scales and relative-position tables (parameters, but not matmuls) are taken back out."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_lite.models.encoder_decoder import build_encoder_decoder
    from megatron_lite.training.trainer import _flops_per_token

    cfg = config_from_dict({"model": TINY_T5, "data": data})
    s, t = encdec_lengths(cfg.data)
    model = build_encoder_decoder(cfg.model, "cpu")
    batch = 2
    x, y = torch.randint(0, 256, (batch, s)), torch.randint(0, 256, (batch, t))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # fused kernels go uncounted
        model(x, y).float().sum().backward()
    ne = cfg.model.num_layers
    not_matmul = 0
    for name, p in model.named_parameters():
        if "norm" in name or "pos_bias" in name:
            encoder = name.startswith("encoder_") or (name.startswith("layers.") and int(name.split(".")[1]) < ne)
            not_matmul += p.numel() * (s if encoder else t)
    expected = _flops_per_token(cfg) * cfg.data.seq_len * batch - 6 * not_matmul * batch
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-9)


def test_peak_flops_lookup() -> None:
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA A100-SXM4-40GB", "fp32") == 19.5e12
    assert peak_flops("NVIDIA GH200 480GB") == 989e12
    assert peak_flops("cpu") is None
    assert peak_flops("Tesla V100-SXM2-32GB", "bf16") is None



def test_device_memory_is_what_the_device_reports() -> None:
    """nvidia-smi --query-gpu=memory.total: 'NVIDIA H200, 143771 MiB', 'NVIDIA H100 80GB HBM3, 81559 MiB',
    'NVIDIA A100-SXM4-80GB, 81920 MiB' (the figures those GPUs print; the H200 is sold as 141 GB, 131.3 GiB)."""
    assert device_memory("NVIDIA H200") == 143771 * 2**20  # 140.4 GiB, more than the 141e9 bytes it was listed as
    assert device_memory("NVIDIA H100 80GB HBM3") == 81559 * 2**20
    assert device_memory("NVIDIA A100-SXM4-80GB") == 81920 * 2**20


def test_register_device_overrides() -> None:
    register_device("Z9000", {"bf16": 1e15}, 10**11)
    assert peak_flops("ACME Z9000 accelerator") == 1e15
