"""The step-time and memory models against published measured runs that state their layout.

Sources (each run below names its table):

- [N21] Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM"
  (arXiv:2104.04473), Table 1: GPT, V = 51200, s = 2048, A100 (312 TFLOP/s), full activation recomputation;
  teraFLOP/s per GPU counted with the paper's Eq. 3, so a step takes Eq. 3 / (GPUs x that rate). The pp = 1 rows
  and the first two pipelined ones are used (the table gives no micro-batch size; 1 is assumed, and with pp = 1 it
  only moves the fixed per-layer cost, ~1% of these steps).
- [K22] Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models" (arXiv:2205.05198),
  Table 3 (layouts: TP 8, no data parallelism, micro-batch 4 for 22B and 1 otherwise, 3 interleaved stages for 175B
  and 530B) and Table 5 (seconds per iteration with sequence parallelism and selective recomputation).
- [TT-A100] torchtitan ``docs/performance.md``: FSDP2 on 64 A100 80GB, tokens/s per GPU ("WPS"), local batch as
  given, Llama 3 at s = 8192, Llama 2 at s = 4096, bf16.
- [TT-H100] torchtitan ``benchmarks/llama3_h100_202412_torchtitan.md``
  (https://github.com/pytorch/torchtitan/blob/main/benchmarks/llama3_h100_202412_torchtitan.md), Tables 1-3:
  Llama 3.1 8B, FSDP, local batch 2 (Table 2: 1), selective "op" activation checkpointing (Table 2: full), on 8 and
  128 H100s (96 GB HBM2e, 500 W power limit, 400 Gb/s per GPU between hosts), TPS/GPU and peak memory in GiB.

Rules for the comparison: a step processes the run's global batch; the network is the run's (Selene: NVLink
300 GB/s within a node, 8 x 200 Gb/s HDR per node = 25 GB/s per GPU across nodes; Grand Teton: 400 Gb/s = 50 GB/s
per GPU); attention without flash kernels for [N21] and [K22] (2021-22 Megatron), with them for torchtitan;
Megatron's data parallelism is an all-reduce after the backward (our DeepSpeed ZeRO-0 row). Memory is compared with
``per_gpu_bytes`` against the peak memory torchtitan reports (rules above ``MEMORY_RUNS``).
"""

from __future__ import annotations

import math

import pytest

from megatron_lite.config import ModelConfig
from megatron_lite.planning.layout import Layout
from megatron_lite.planning.memory import estimate
from megatron_lite.planning.presets import _llama, get_preset
from megatron_lite.planning.steptime import Network, matmul_efficiency, step_time

A100, H100 = 312e12, 989e12
SELENE = Network(intra_node=300e9, inter_node=25e9)
GRAND_TETON = Network(intra_node=300e9, inter_node=50e9)
STEP_TOLERANCE = 0.15  # every A100 run below is within 13.3% (docs/plan.md has the table)
GiB = 2**30


def _gpt(h: int, layers: int, heads: int) -> ModelConfig:
    """The GPT shape of [N21] and [K22]: learned positions, LayerNorm, GELU, biases, tied embeddings."""
    return ModelConfig(vocab_size=51200, hidden_size=h, num_layers=layers, num_heads=heads, max_seq_len=2048,
                       position="learned", norm="layernorm", activation="gelu", bias=True, tie_embeddings=True)


def _eq3_seconds(batch: int, layers: int, h: int, gpus: int, tflops: float) -> float:
    """[N21] Eq. 3 (FLOPs of an iteration with recomputation) over the measured rate: the measured step time."""
    s, v = 2048, 51200
    flops = 96 * batch * s * layers * h * h * (1 + s / (6 * h) + v / (16 * layers * h))
    return flops / (gpus * tflops * 1e12)


LLAMA3_70B = _llama(128256, 8192, 80, 64, 8, 28672, 8192, 500000.0, 1e-5)  # Meta Llama 3 70B model card

# (label, model, layout, peak FLOP/s, network, measured seconds per step)
STEP_RUNS = [
    *[(f"[N21] Table 1, {p}B: t{t} p{pp}, {n} GPUs, batch {b}", _gpt(h, L, a),
       Layout(gpus=n, tp=t, pp=pp, micro_batch=1, seq_len=2048, global_batch=b, recompute="full",
              flash_attention=False), A100, SELENE, _eq3_seconds(b, L, h, n, x))
      for p, a, h, L, t, pp, n, b, x in [
          (1.7, 24, 2304, 24, 1, 1, 32, 512, 137), (3.6, 32, 3072, 30, 2, 1, 64, 512, 138),
          (7.5, 32, 4096, 36, 4, 1, 128, 512, 142), (18.4, 48, 6144, 40, 8, 1, 256, 1024, 135),
          (39.1, 64, 8192, 48, 8, 2, 512, 1536, 138), (145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148)]],
    *[(f"[K22] Tables 3/5, {name}: t8 p{pp}, {n} GPUs, batch {b}", _gpt(h, L, a),
       Layout(gpus=n, tp=8, pp=pp, micro_batch=mb, seq_len=2048, global_batch=b, recompute="selective",
              sequence_parallel=True, flash_attention=False, schedule="interleaved" if v > 1 else "1f1b",
              virtual_stages=v), A100, SELENE, seconds)
      for name, a, h, L, pp, n, b, mb, v, seconds in [
          ("22B", 64, 6144, 48, 1, 8, 4, 4, 1, 1.10), ("175B", 96, 12288, 96, 8, 64, 64, 1, 3, 13.75),
          ("530B", 128, 20480, 105, 35, 280, 280, 1, 3, 37.83), ("1T", 160, 25600, 128, 64, 512, 512, 1, 1, 71.49)]],
    *[(f"[TT-A100] {name}: FSDP, 64 GPUs, local batch {mb}, AC {rc}", spec,
       Layout(gpus=64, engine="fsdp", micro_batch=mb, seq_len=seq, global_batch=64 * mb, recompute=rc), A100,
       SELENE, 64 * mb * seq / (wps * 64))
      for name, spec, mb, rc, seq, wps in [
          ("Llama 3 8B", get_preset("llama3-8b"), 1, "selective", 8192, 2973),
          ("Llama 3 70B", LLAMA3_70B, 1, "full", 8192, 331),
          ("Llama 2 13B", get_preset("llama2-13b"), 2, "none", 4096, 2162),
          ("Llama 2 70B", get_preset("llama2-70b"), 2, "full", 4096, 353)]],
]


@pytest.mark.parametrize("label,spec,layout,peak,net,measured", STEP_RUNS, ids=[r[0].split(":")[0] for r in STEP_RUNS])
def test_step_time_matches_published_runs(label: str, spec, layout: Layout, peak: float, net: Network,
                                          measured: float) -> None:
    layout.validate(spec)  # every reference layout is one training runs
    predicted = step_time(spec, layout, peak, net=net)["step_time_s"]
    assert predicted == pytest.approx(measured, rel=STEP_TOLERANCE), (label, predicted, measured)


def test_calibration_has_no_bias() -> None:
    """The geometric mean of predicted / measured over the 14 runs is within 2% of 1."""
    ratios = [step_time(spec, lay, peak, net=net)["step_time_s"] / meas for _, spec, lay, peak, net, meas in STEP_RUNS]
    assert len(ratios) == 14
    assert math.exp(sum(map(math.log, ratios)) / len(ratios)) == pytest.approx(1.0, abs=0.02)


def _titan_h100(gpus: int) -> tuple[dict, dict]:
    lay = Layout(gpus=gpus, engine="fsdp", micro_batch=2, seq_len=8192, global_batch=2 * gpus, recompute="selective",
                 overhead_bytes=0)
    spec = get_preset("llama3-8b")
    return step_time(spec, lay, H100, net=GRAND_TETON), estimate(spec, lay)


def test_fsdp_throughput_holds_from_8_to_128_gpus() -> None:
    """[TT-H100] Tables 1 and 3: per-GPU throughput falls 2.7% from 8 to 128 H100s (5,762 -> 5,605 tokens/s), since
    FSDP2 hides its collectives under compute. The model, which overlaps them as the engine does, predicts a drop
    within 2 points of that (it predicted ~55% when it summed them at 25 GB/s). The absolute rate is not compared:
    these H100s ran at 500 W with HBM2e, at a peak torchtitan does not know (its footnote 2)."""
    small, large = _titan_h100(8)[0], _titan_h100(128)[0]
    measured_drop = 1 - 5605 / 5762
    predicted_drop = 1 - (large["tokens_per_s"] / 128) / (small["tokens_per_s"] / 8)
    assert predicted_drop == pytest.approx(measured_drop, abs=0.02)
    assert large["dp_comm_s"] < 0.1 * large["dp_comm_total_s"]  # the collectives are hidden


def test_flops_convention_matches_torchtitans_mfu() -> None:
    """[TT-H100]: 1D FSDP Llama 3.1 8B without torch.compile runs at 33% MFU of the SXM peak (footnote and text),
    5,762 tokens/s per GPU: 5,762 x (6N + 12 L H Q T at 8192) / 989e12 is 33.7%, the same convention."""
    from megatron_lite.planning.flops import training_flops_per_token

    mfu = 5762 * training_flops_per_token(get_preset("llama3-8b"), 8192) / H100
    assert mfu == pytest.approx(0.33, abs=0.01)


# [TT-H100] peak memory, as torchtitan reports it: the caching allocator's ``reserved_bytes.all.peak`` in GiB
# (``torchtitan/metrics.py`` at the benchmark's commit 9dec370), the maximum over ranks. The estimate counts live
# tensors, so it is below a reserved peak by the allocator's reserve; every row must lie within MEMORY_TOLERANCE
# under it and never above it. torchtitan's setup at that commit (``train.py``, ``parallelize_llama.py``,
# ``train_configs/llama3_8b.toml``): Llama 3.1 8B, bf16 FSDP2 (fp32 shards and reduce), AdamW, local batch = the
# micro-batch (no accumulation), flash attention, the loss ``cross_entropy(pred.float())`` not compiled (its
# compilation was disabled then), "selective" AC with ``selective_ac_option = "op"``: our ``selective-op``.
MEMORY_TOLERANCE = 0.15
MEMORY_RUNS = [
    # (label, gpus, micro-batch, sequence, recompute, measured GiB)
    ("Table 1 FSDP: 8 GPUs, op AC", 8, 2, 8192, "selective-op", 82.4),
    ("Table 3 FSDP: 128 GPUs, op AC", 128, 2, 8192, "selective-op", 67.0),
    # torch.compile fuses each block's elementwise ops (not modelled; measured 5.4 and 5.0 GiB lower than eager).
    ("Table 1 FSDP + torch.compile: 8 GPUs, op AC", 8, 2, 8192, "selective-op", 77.0),
    ("Table 3 FSDP + torch.compile: 128 GPUs, op AC", 128, 2, 8192, "selective-op", 62.0),
    # Full AC keeps only each block's input, whatever compile and Float8 do inside the block; CP 1 is no CP.
    ("Table 2 FSDP 8, CP 1 + compile + Float8: s 32768, full AC", 8, 1, 32768, "full", 83.9),
]


@pytest.mark.parametrize("label,gpus,mb,seq,recompute,measured", MEMORY_RUNS, ids=[r[0] for r in MEMORY_RUNS])
def test_peak_memory_matches_published_runs(label: str, gpus: int, mb: int, seq: int, recompute: str,
                                            measured: float) -> None:
    """[TT-H100] Tables 1-3: the planner's per-GPU peak for torchtitan's layout is 2.6-9.8% under the reserved
    peak it measured (docs/plan.md has the table; the 70B and 405B rows, which it misses, are recorded there)."""
    lay = Layout(gpus=gpus, engine="fsdp", micro_batch=mb, seq_len=seq, global_batch=gpus * mb, recompute=recompute)
    spec = get_preset("llama3-8b")
    lay.validate(spec)
    predicted = estimate(spec, lay)["per_gpu_bytes"] / GiB
    assert (1 - MEMORY_TOLERANCE) * measured <= predicted <= measured, (label, predicted, measured)


def test_model_state_memory_matches_published_runs() -> None:
    """[TT-H100] Tables 1 and 3 (FSDP rows without torch.compile): peak memory is 82.4 GiB on 8 GPUs and 67.0 GiB on
    128; the same microbatch and recomputation policy, so the 15.4 GiB between them is the model states FSDP2 shards
    over 8 instead of 128 ranks (weights, gradients, AdamW states, gathered blocks). Ours: within 15% of it."""
    measured = (82.4 - 67.0) * GiB
    predicted = _titan_h100(8)[1]["per_gpu_bytes"] - _titan_h100(128)[1]["per_gpu_bytes"]
    assert predicted == pytest.approx(measured, rel=0.15)
    assert _titan_h100(8)[1]["phases"]["activations"] == _titan_h100(128)[1]["phases"]["activations"]


def test_efficiency_curve() -> None:
    assert matmul_efficiency(get_preset("llama3-8b")) == pytest.approx(0.525)  # h = 4096
    assert matmul_efficiency(_gpt(25600, 128, 160)) == pytest.approx(0.525 + 0.055 * math.log2(25600 / 4096))
