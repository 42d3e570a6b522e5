"""Memory model: Korthikanti's activation formulas, pipeline in-flight microbatches, model-state accounting."""

from __future__ import annotations

import dataclasses

import pytest

from megatron_lite.planning.errors import PlanError
from megatron_lite.planning.layout import Layout, stage_shapes
from megatron_lite.planning.memory import estimate, inflight_microbatches, layer_activation_bytes, model_state_bytes
from megatron_lite.planning.params import count_params
from megatron_lite.planning.presets import REFERENCE_PRESETS

GPT3_LIKE = dataclasses.replace(REFERENCE_PRESETS["gpt2-355m"], attention_dropout=0.1, residual_dropout=0.1)
S, B, H, A = 1024, 2, 1024, 16


def test_korthikanti_no_parallelism() -> None:
    lay = Layout(seq_len=S, micro_batch=B, flash_attention=False)
    assert layer_activation_bytes(GPT3_LIKE, lay) == S * B * H * (34 + 5 * A * S / H)


@pytest.mark.parametrize("t", [2, 4, 8])
def test_korthikanti_tensor_and_sequence_parallel(t: int) -> None:
    lay = Layout(gpus=t, tp=t, seq_len=S, micro_batch=B, flash_attention=False)
    assert layer_activation_bytes(GPT3_LIKE, lay) == pytest.approx(S * B * H * (10 + 24 / t + 5 * A * S / (H * t)))
    sp = dataclasses.replace(lay, sequence_parallel=True)
    assert layer_activation_bytes(GPT3_LIKE, sp) == pytest.approx(S * B * H / t * (34 + 5 * A * S / H))
    sel = dataclasses.replace(sp, recompute="selective")  # scores recomputed; a float32 log-sum-exp remains
    assert layer_activation_bytes(GPT3_LIKE, sel) == pytest.approx(S * B * H / t * 34 + 4 * A * S * B / t)


def test_flash_drops_the_quadratic_term() -> None:
    lay = Layout(seq_len=S, micro_batch=B, flash_attention=True)
    assert layer_activation_bytes(GPT3_LIKE, lay) == S * B * H * 34 + 4 * A * S * B


def test_full_recompute_keeps_layer_inputs() -> None:
    spec = dataclasses.replace(REFERENCE_PRESETS["gpt2-355m"], vocab_size=128)  # layers, not logits, dominate
    none = estimate(spec, Layout(seq_len=S, micro_batch=B))["breakdown"]["activations"]
    full = estimate(spec, Layout(seq_len=S, micro_batch=B, recompute="full"))["breakdown"]["activations"]
    assert full < none / 5


def _gpt3_layer(p: int, flash: bool) -> int:
    """One GPT-3 style layer's activations at p bytes per value: Korthikanti's s*b*h*(34 + 5*a*s/h) at p = 2, i.e.
    16p + 2 bytes per s*b*h (the 2: two 1-byte dropout masks) and (2p + 1) per score, or a float32 LSE with flash."""
    return S * B * H * (16 * p + 2) + (4 * A * S * B if flash else (2 * p + 1) * A * S * S * B)


@pytest.mark.parametrize("flash", [True, False])
@pytest.mark.parametrize("dtype,p", [("bf16", 2), ("fp32", 4)])
def test_full_recompute_activations_exactly(flash: bool, dtype: str, p: int) -> None:
    """Full recomputation: each layer keeps its input, s*b*h values (2 s*b*h bytes in bf16), plus one layer recomputed
    at a time with its whole working set (the s*s scores too without flash); the last stage adds the final-norm and
    head inputs and the logits in the training dtype and in fp32."""
    L, V = GPT3_LIKE.num_layers, GPT3_LIKE.padded_vocab_size
    assert _gpt3_layer(2, False) == S * B * H * (34 + 5 * A * S / H)
    lay = Layout(seq_len=S, micro_batch=B, recompute="full", flash_attention=flash, dtype=dtype)
    head = 2 * S * B * H * p + S * B * V * (p + 4)
    assert estimate(GPT3_LIKE, lay)["breakdown"]["activations"] == L * p * S * B * H + _gpt3_layer(p, flash) + head
    # 1F1B on 2 stages, 4 microbatches: stage 0 keeps its 12 layer inputs for min(pp - 0, m) = 2 microbatches
    piped = dataclasses.replace(lay, gpus=2, pp=2, global_batch=4 * B)
    stage0 = estimate(GPT3_LIKE, piped)["stages"][0]["breakdown"]["activations"]
    assert stage0 == 2 * (L // 2) * p * S * B * H + _gpt3_layer(p, flash)


def test_accumulation_keeps_whole_gradients_for_zero1_and_fsdp() -> None:
    """With m > 1, ZeRO 1 accumulates the whole low-precision gradients and FSDP2 unsharded fp32 ones; ZeRO 2/3
    reduce every microbatch and keep the partition (the engine test measures the first two on 2 CPU ranks)."""
    spec = REFERENCE_PRESETS["gpt2-124m"]
    shapes = stage_shapes(spec, 1, 1, 0)
    psi = count_params(spec).total
    one = dict(gpus=8, micro_batch=1, global_batch=8)  # m = 1
    acc = dict(gpus=8, micro_batch=1, global_batch=32)  # m = 4
    assert model_state_bytes(shapes, Layout(zero=1, **acc))["gradients"] == 2 * psi
    assert model_state_bytes(shapes, Layout(engine="fsdp", **acc))["gradients"] == 4 * psi
    for kw in (dict(zero=1), dict(engine="fsdp")):
        assert model_state_bytes(shapes, Layout(**kw, **one))["gradients"] < psi
    for zero in (2, 3):
        accumulating = model_state_bytes(shapes, Layout(zero=zero, **acc))
        assert accumulating == model_state_bytes(shapes, Layout(zero=zero, **one))


def test_inflight_microbatches() -> None:
    lay = Layout(gpus=8, pp=4, global_batch=32, micro_batch=1, schedule="1f1b")  # dp=2, m=16
    assert [inflight_microbatches(lay, s) for s in range(4)] == [4, 3, 2, 1]
    assert inflight_microbatches(dataclasses.replace(lay, schedule="gpipe"), 0) == 16
    inter = dataclasses.replace(lay, schedule="interleaved", virtual_stages=2)
    assert inflight_microbatches(inter, 0) == pytest.approx(4 * (1 + 3 / (4 * 2)))


def test_model_states_scale_like_zero_paper() -> None:
    spec = REFERENCE_PRESETS["llama2-7b"]
    shapes = stage_shapes(spec, 1, 1, 0)
    psi = count_params(spec).total
    z0 = model_state_bytes(shapes, Layout(gpus=64, zero=0))
    assert sum(z0.values()) == pytest.approx(16 * psi, rel=1e-6)
    # DeepSpeed ZeRO 1/2 in bf16: whole bf16 weights; gradients, fp32 master and moments partitioned
    for zero, expected in ((1, 2 + 14 / 64), (2, 2 + 14 / 64), (3, 16 / 64)):
        got = sum(model_state_bytes(shapes, Layout(gpus=64, zero=zero)).values())
        assert got == pytest.approx(expected * psi, rel=1e-3), zero
    fsdp = sum(model_state_bytes(shapes, Layout(gpus=64, engine="fsdp")).values())
    assert fsdp == pytest.approx(16 / 64 * psi, rel=1e-3)


def test_offload_moves_states_to_host() -> None:
    spec = REFERENCE_PRESETS["llama2-7b"]
    r = estimate(spec, Layout(gpus=8, zero=3, offload="params"))
    assert r["breakdown"]["weights"] == 0 and r["breakdown"]["optimizer"] == 0 and r["cpu_bytes"] > 0


def test_tp_and_pp_split_the_weights() -> None:
    spec = REFERENCE_PRESETS["llama2-7b"]
    one = estimate(spec, Layout(gpus=1))["breakdown"]["weights"]
    split = estimate(spec, Layout(gpus=8, tp=2, pp=4, global_batch=8))
    assert split["breakdown"]["weights"] == pytest.approx(one / 8, rel=0.1)
    assert split["most_loaded_stage"] in (0, 3)


def test_fits() -> None:
    spec = REFERENCE_PRESETS["llama2-70b"]
    assert estimate(spec, Layout(gpus=8), 80 * 2**30)["fits"] is False
    assert estimate(spec, Layout(gpus=64, tp=8, pp=8, zero=1, global_batch=64, recompute="full"),
                    80 * 2**30)["fits"] is True


@pytest.mark.parametrize("kw,msg", [
    (dict(gpus=8, tp=3), "not divisible"),
    (dict(gpus=6, tp=6), "must divide the number of attention heads"),
    (dict(gpus=4, pp=2, zero=2), "ZeRO 0/1 only"),
    (dict(gpus=2, zero=1, offload="params"), "needs sharded parameters"),
    (dict(gpus=4, global_batch=3), "multiple of"),
    (dict(gpus=0), "positive"),
])
def test_impossible_layouts(kw: dict, msg: str) -> None:
    with pytest.raises(PlanError, match=msg):
        estimate(REFERENCE_PRESETS["llama2-7b"], Layout(**kw))
