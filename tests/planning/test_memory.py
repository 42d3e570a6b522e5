"""Memory model: Korthikanti's activation formulas, pipeline in-flight microbatches, model-state accounting."""

from __future__ import annotations

import dataclasses
import math

import pytest

from megatron_lite.planning.errors import PlanError
from megatron_lite.planning.layout import Layout, stage_shapes
from megatron_lite.planning.memory import (
    estimate,
    inflight_microbatches,
    layer_activation_bytes,
    model_state_bytes,
    param_groups,
)
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
    head inputs and the loss's three fp32 logit-sized tensors (log-softmax output, its gradient, the gradient it
    returns) live as backward begins."""
    L, V = GPT3_LIKE.num_layers, GPT3_LIKE.padded_vocab_size
    assert _gpt3_layer(2, False) == S * B * H * (34 + 5 * A * S / H)
    lay = Layout(seq_len=S, micro_batch=B, recompute="full", flash_attention=flash, dtype=dtype)
    head = 2 * S * B * H * p + S * B * V * 12
    assert estimate(GPT3_LIKE, lay)["phases"]["activations"] == L * p * S * B * H + _gpt3_layer(p, flash) + head
    # 1F1B on 2 stages, 4 microbatches: stage 0 keeps its 12 layer inputs for min(pp - 0, m) = 2 microbatches
    piped = dataclasses.replace(lay, gpus=2, pp=2, global_batch=4 * B)
    stage0 = estimate(GPT3_LIKE, piped)["stages"][0]["phases"]["activations"]
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

    def resident(**kw) -> int:
        r = model_state_bytes(shapes, Layout(gpus=64, **kw))
        return r["weights"] + r["gradients"] + r["optimizer"]

    assert resident(zero=0) == pytest.approx(16 * psi, rel=1e-6)
    # DeepSpeed ZeRO 1/2 in bf16: whole bf16 weights; gradients, fp32 master and moments partitioned
    for zero, expected in ((1, 2 + 14 / 64), (2, 2 + 14 / 64), (3, 16 / 64)):
        assert resident(zero=zero) == pytest.approx(expected * psi, rel=1e-3), zero
    assert resident(engine="fsdp") == pytest.approx(16 / 64 * psi, rel=1e-3)
    # The optimizer step's fp32 gradient copy: of everything (ZeRO 0's unfused optimizer), of the partition of the
    # largest parameter group (ZeRO 1/2 flatten one group at a time: the decay group, all but embeddings and norms),
    # of the largest sub-group's partition (ZeRO 3; the whole group here, under sub_group_size).
    decay = sum(math.prod(shape) for _, shape in param_groups(shapes)[0])
    assert model_state_bytes(shapes, Layout(gpus=64, zero=0))["step_gradients"] == 4 * psi
    for zero in (1, 2, 3):
        step = model_state_bytes(shapes, Layout(gpus=64, zero=zero))["step_gradients"]
        assert step == pytest.approx(4 * decay / 64, rel=1e-6), zero


def test_offload_moves_states_to_host() -> None:
    spec = REFERENCE_PRESETS["llama2-7b"]
    r = estimate(spec, Layout(gpus=8, zero=3, offload="params"))
    persistent = sum(math.prod(s) for _, s in stage_shapes(spec, 1, 1, 0) if math.prod(s) < 100_000)  # the norms
    assert r["breakdown"]["weights"] == 2 * persistent and r["breakdown"]["optimizer"] == 0
    assert r["breakdown"]["gradients"] == 0 and r["cpu_bytes"] > 0


def test_offload_puts_the_gradients_where_deepspeed_and_fsdp_do() -> None:
    """Llama-3 8B on 8 GPUs, bf16. DeepSpeed 0.19 ZeRO-3 with the optimizer offloaded allocates its gradient
    partition buffer on the host (``stage3.py``: ``self.device`` is the CPU, ``grad_partitions_flat_buffer`` is
    made there) beside an fp32 gradient per sub-group; ZeRO-2 copies the reduced gradients into the host partition's
    fp32 gradient; FSDP2's CPUOffloadPolicy keeps the fp32 gradient shards on the host. None stays on the GPU (it
    kept a 1.87 GiB partition before), and each is counted on the host."""
    spec = REFERENCE_PRESETS["llama3-8b"]
    shapes = stage_shapes(spec, 1, 1, 0)
    psi = count_params(spec).total
    z3 = estimate(spec, Layout(gpus=8, zero=3, offload="params"))
    assert z3["breakdown"]["gradients"] == 0 and z3["breakdown"]["fp32_gradients"] == 0
    part = sum(math.ceil(math.prod(s) / 8) for _, s in shapes)
    steps = 4 * len(param_groups(shapes))
    assert z3["cpu_bytes"] == (2 + 2 + 4 + 4 + 8) * part + steps  # weights, grads, fp32 grads, master, moments
    z2 = model_state_bytes(shapes, Layout(gpus=8, zero=2, offload="optimizer"))
    assert z2["gradients"] == 0 and z2["step_gradients"] == 0
    assert z2["cpu"] == pytest.approx((4 + 4 + 8 + 2) * psi / 8, rel=1e-4)  # master, fp32 grads, moments, bf16 copy
    fsdp = model_state_bytes(shapes, Layout(gpus=8, engine="fsdp", offload="params"))
    assert (fsdp["weights"], fsdp["gradients"], fsdp["optimizer"]) == (0, 0, 0)
    assert fsdp["cpu"] == pytest.approx((4 + 4 + 8) * psi / 8, rel=1e-3)  # fp32 shard, its gradient, moments


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
    (dict(gpus=6, tp=6), "training refuses .*: model.num_heads=32 is not divisible by parallel.tp=6"),
    (dict(gpus=4, pp=2, zero=2), "supports ZeRO stage 0 or 1 only"),
    (dict(gpus=2, zero=1, offload="params"), "offload_params needs parallel.zero_stage=3"),
    (dict(gpus=4, global_batch=3), "multiple of"),
    (dict(gpus=0), "positive"),
])
def test_impossible_layouts(kw: dict, msg: str) -> None:
    with pytest.raises(PlanError, match=msg):
        estimate(REFERENCE_PRESETS["llama2-7b"], Layout(**kw))


def test_two_peaks_backward_and_optimizer_step() -> None:
    """ZeRO 0 in bf16 on a short sequence: the unfused optimizer's fp32 copy of every gradient (4Ψ) outweighs the
    activations, so the optimizer step is the peak; the breakdown keeps the backward's items (activations included)
    and adds what the step puts above them, summing to the peak."""
    spec = REFERENCE_PRESETS["llama2-7b"]
    r = estimate(spec, Layout(gpus=1, seq_len=128))
    b, ph = r["breakdown"], r["phases"]
    assert r["peak_phase"] == "optimizer step" and b["activations"] == ph["activations"] > 0
    assert b["fp32_gradients"] == ph["optimizer_step"] - ph["backward"] > 0
    assert ph["fp32_gradients"] == 4 * count_params(spec).total
    assert sum(b.values()) == r["per_gpu_bytes"] == ph["optimizer_step"]
    long = estimate(spec, Layout(gpus=8, zero=1, seq_len=4096, micro_batch=4))  # activations dominate
    assert long["peak_phase"] == "backward" and long["breakdown"]["fp32_gradients"] == 0
    assert sum(long["breakdown"].values()) == long["per_gpu_bytes"] == long["phases"]["backward"]


LLAMA_LIKE = dataclasses.replace(REFERENCE_PRESETS["llama3-8b"], num_layers=4)  # GQA, SwiGLU, no bias, no dropout


def test_selective_op_keeps_every_other_matmul_output() -> None:
    """torchtitan's op policy on a Llama block (matmuls q, k, v, o, gate, up, down): the block input, q, v, gate and
    down outputs and the flash attention output with its log-sum-exp are kept per layer; the block recomputed in
    backward adds the rest of its activations (all of them minus the kept ones a plain block keeps too: not down)."""
    spec, s, b = LLAMA_LIKE, 512, 2
    h, f, heads, kv = spec.hidden_size, spec.ffn_size, spec.num_heads, spec.kv_heads * spec.head_dim
    T = s * b
    lay = Layout(seq_len=s, micro_batch=b, recompute="selective-op")
    saved = T * (2 * (h + h + kv + f + h + h) + 4 * heads)  # input, q, v, gate, down, attention output; LSE
    plain = T * (2 * (2 * h + 2 * h + 2 * kv) + 4 * heads + 2 * (2 * h + 4 * f))  # layer_activation_bytes, flash
    assert layer_activation_bytes(spec, dataclasses.replace(lay, recompute="none")) == plain
    head = 2 * T * h * 2 + T * spec.padded_vocab_size * 12
    working = plain - (saved - 2 * T * h)
    assert estimate(spec, lay)["phases"]["activations"] == spec.num_layers * saved + working + head
    # A linear with a bias runs as addmm, which the policy does not save: only the input and attention output stay.
    biased = dataclasses.replace(spec, bias=True)
    assert estimate(biased, lay)["phases"]["activations"] < estimate(spec, lay)["phases"]["activations"]
    order = [e["phases"]["activations"] for e in
             (estimate(spec, dataclasses.replace(lay, recompute=rc)) for rc in ("full", "selective-op", "selective"))]
    assert order == sorted(order)


def test_selective_op_step_reruns_the_unsaved_projections() -> None:
    """Its step recomputes the k, o and up projections once more forward: 2 FLOPs per weight and token."""
    from megatron_lite.planning.steptime import step_time

    spec = LLAMA_LIKE
    h, f, kv = spec.hidden_size, spec.ffn_size, spec.kv_heads * spec.head_dim
    lay = Layout(gpus=1, seq_len=512, micro_batch=1, global_batch=1)
    base = step_time(spec, lay, 1e15, mfu=0.5)["compute_s"]
    op = step_time(spec, dataclasses.replace(lay, recompute="selective-op"), 1e15, mfu=0.5)["compute_s"]
    extra = 2 * (h * kv + spec.num_heads * spec.head_dim * h + h * f) * spec.num_layers * 512
    assert op - base == pytest.approx(extra / (1e15 * 0.5), rel=1e-9)


def test_selective_op_is_refused_for_encoder_decoders() -> None:
    with pytest.raises(PlanError, match="selective-op is a decoder policy"):
        estimate(REFERENCE_PRESETS["t5-small"], Layout(recompute="selective-op"))
