"""Estimated time of one optimizer step of a layout on a fixed global batch, so that layouts doing equal work compare.

Every layout processes the same ``global_batch`` sequences per step, in m = global_batch / (dp * micro_batch)
microbatches per data-parallel rank. Each pipeline stage runs the m microbatches one after another; one microbatch on
one stage costs

    t_mb = compute_mb + fixed_mb + tp_mb + pp_mb

- compute_mb: the microbatch's share of the training FLOPs (causal attention, as flash kernels compute, or all the
  scores without flash; plus one extra forward of the layers with full recomputation, or of the attention scores
  with selective recomputation, or of the projections torchtitan's op policy does not save with selective-op),
  divided by peak FLOP/s * the matmul efficiency: ``mfu`` when given, else the
  calibrated ``matmul_efficiency`` of the model (larger hidden sizes run closer to peak);
- fixed_mb: ``layer_overhead_s`` per layer of the stage (x 4/3 with full recomputation, which reruns the forward): the
  fixed cost of every kernel launch and wave tail, which does not shrink with the microbatch. This is what makes
  larger micro-batches faster per token;
- tp_mb: 4 all-reduces (2 forward, 2 backward; 6 with full recomputation) of s*b*h activations per layer, ring cost
  2 (t - 1)/t * bytes / bandwidth;
- pp_mb: one s*b*h send forward and one backward at the stage boundary;
- ep_mb (expert parallelism, ep > 1): per mixture layer two all-to-alls forward (dispatch the routed tokens to the
  ranks holding their experts, combine them back) and two backward (four forward with full recomputation, which
  reruns the dispatch and the combine), each moving tokens * top_k * (ep - 1)/ep rows of h values per rank
  (dropless routing over balanced experts), over NVLink while the ep group (ep x cp x tp neighbouring ranks) stays
  within a node.

The step is the m microbatches, the pipeline bubble of (pp - 1) / v more microbatch slots (v = virtual stages of the
interleaved schedule, else 1; Narayanan et al. 2021), and the part of the engine's data-parallel traffic that is not
hidden under compute (``exposed_dp_comm``: FSDP2 and ZeRO-3 overlap it, ZeRO 0-2 as configured here do not):

    step = m * t_mb + (pp - 1) / v * t_mb + exposed(dp_comm)

dp_comm (Ψ = parameters of the rank's TP/PP slice, p = bytes of the training dtype, ring factor (d - 1)/d):
- DeepSpeed ZeRO 0: one gradient all-reduce at the accumulation boundary: 2 Ψ p;
- ZeRO 1: one reduce-scatter at the boundary and one all-gather of the updated weights: 2 Ψ p;
- ZeRO 2: a reduce-scatter every microbatch (DeepSpeed reduces between boundaries too) and the all-gather: (m + 1) Ψ p;
- ZeRO 3: all-gathers for forward and backward and a reduce-scatter, every microbatch: 3 m Ψ p;
- FSDP2 (as the engine runs it): all-gathers for forward and backward every microbatch, and one reduce-scatter in
  fp32 on the last microbatch only: (2 m p + 4) Ψ.
Over the inter-node links once the job spans nodes. With ep > 1 the routed experts' parameters (Ψ_e) are reduced over
the (dp / ep) x cp ranks that replicate them, ring factor (d_e - 1)/d_e, the rest (Ψ - Ψ_e) over all dp x cp ranks:
under FSDP2 by the same collectives, under DeepSpeed (which keeps the experts out of ZeRO) by one all-reduce per step,
2 Ψ_e p.
"""

from __future__ import annotations

import dataclasses
import math

from megatron_lite.config import ModelConfig
from megatron_lite.planning.encdec import EncDecSpec
from megatron_lite.planning.errors import PlanError
from megatron_lite.planning.flops import sequence_flops
from megatron_lite.planning.layout import DTYPE_BYTES, INTERLEAVED, Layout, rank_layers, stage_shapes
from megatron_lite.planning.params import is_expert, is_moe_layer, moe_of

ModelSpec = ModelConfig | EncDecSpec

# Fixed cost per transformer layer and microbatch, forward and backward together: about 50 kernels at ~2 µs each of
# launch gap and wave tail. A rough constant, to be fitted against the GPU benchmarks like the activation model.
LAYER_OVERHEAD_S = 100e-6


@dataclasses.dataclass
class Network:
    """Per-GPU bus bandwidths in bytes/s for ring collectives."""

    intra_node: float = 300e9  # NVLink (H100 SXM: ~450 GB/s per direction, ~300-370 measured bus bandwidth)
    inter_node: float = 25e9  # one 200 Gb/s NIC per GPU

    def check(self) -> None:
        for name, value in (("intra-node-bandwidth", self.intra_node), ("inter-node-bandwidth", self.inter_node)):
            if not (value > 0 and math.isfinite(value)):
                raise PlanError(f"--{name} must be a positive number of bytes/s, got {value:g}")


# The fraction of peak FLOP/s the matmuls of a training step attain, as a function of the hidden size h (larger
# GEMMs run closer to peak): EFFICIENCY_AT_4096 + EFFICIENCY_PER_DOUBLING * log2(h / 4096), within
# EFFICIENCY_RANGE. Fitted (least squares on log step time) to 14 published measured runs on A100s with stated
# layouts: Narayanan et al. 2021 Table 1, Korthikanti et al. 2022 Tables 3 and 5, torchtitan's FSDP2 runs on 64
# A100s (docs/plan.md lists each run, the prediction and the error; tests/planning/test_calibration.py checks them).
EFFICIENCY_AT_4096 = 0.525
EFFICIENCY_PER_DOUBLING = 0.055
EFFICIENCY_RANGE = (0.3, 0.8)


def matmul_efficiency(spec: ModelSpec) -> float:
    """The calibrated fraction of peak for this model's matmuls (see ``EFFICIENCY_AT_4096``)."""
    e = EFFICIENCY_AT_4096 + EFFICIENCY_PER_DOUBLING * math.log2(spec.hidden_size / 4096)
    return min(max(e, EFFICIENCY_RANGE[0]), EFFICIENCY_RANGE[1])


def check_rates(peak: float, mfu: float | None, layer_overhead_s: float) -> None:
    """One-line errors for the step model's own inputs."""
    if not (peak > 0 and math.isfinite(peak)):
        raise PlanError(f"--peak-flops must be a positive number, got {peak:g}")
    if mfu is not None and not 0 < mfu <= 1:
        raise PlanError(f"--mfu must be in (0, 1], got {mfu:g}")
    if not (layer_overhead_s >= 0 and math.isfinite(layer_overhead_s)):
        raise PlanError(f"--layer-overhead-us must be >= 0, got {layer_overhead_s * 1e6:g}")


def tokens_per_sample(spec: ModelSpec, layout: Layout) -> int:
    """Tokens one sequence contributes: its length, or input plus target for an encoder-decoder."""
    if isinstance(spec, EncDecSpec):
        return layout.seq_len + (layout.target_len or layout.seq_len)
    return layout.seq_len


def _training_flops(spec: ModelSpec, layout: Layout) -> float:
    """FLOPs of one sequence on the GPUs: model FLOPs plus what recomputation repeats. A causal flash kernel computes
    half the attention scores; attention that materializes the scores (``--no-flash``) computes all of them."""
    target = layout.target_len or layout.seq_len
    flops, attn = sequence_flops(spec, layout.seq_len, target, causal=layout.flash_attention)
    if layout.recompute == "full":  # one more forward of the layers (a third of their training FLOPs), not the head
        if isinstance(spec, EncDecSpec):
            head = 6.0 * spec.padded_vocab_size * spec.d_model * target
        else:
            head = 6.0 * spec.padded_vocab_size * spec.hidden_size * layout.seq_len
        flops += (flops - head) / 3
    elif layout.recompute == "selective":  # one more forward of the attention scores
        flops += attn / 3
    elif layout.recompute == "selective-op":  # one more forward of the projections the op policy does not save
        from megatron_lite.planning.memory import op_policy_matmuls

        rerun = sum(w for _, _, w, saved in op_policy_matmuls(spec, layout) if not saved) * layout.tp
        flops += 2.0 * rerun * spec.num_layers * layout.seq_len
    return flops


def _dp_bytes(layout: Layout, params: int, m: int, data: int | None = None) -> float:
    """Bytes one data-parallel rank moves per step through ring collectives (see the module docstring); context-
    parallel ranks average and shard with them. ``data``: the ranks of the collective (default dp x cp)."""
    d, p = layout.data if data is None else data, DTYPE_BYTES[layout.dtype]
    if d == 1:
        return 0.0
    ring = (d - 1) / d * params
    if layout.engine == "fsdp":
        return ring * (2 * m * p + 4)
    rounds = {0: 2, 1: 2, 2: m + 1, 3: 3 * m}[layout.zero]
    return ring * rounds * p


def stage_params(spec: ModelSpec, layout: Layout) -> int:
    """Parameters of the most loaded (TP rank, pipeline stage): what one data-parallel group reduces."""
    return sum(stage_param_split(spec, layout))


def stage_param_split(spec: ModelSpec, layout: Layout) -> tuple[int, int]:
    """(dense, routed-expert) parameters of the most loaded (TP rank, pipeline stage), by their sum: with expert
    parallelism the first reduce over all dp x cp ranks, the second over the ``expert_data`` ranks."""
    best = (0, 0)
    for st in range(layout.pp):
        dense = expert = 0
        for name, shape in stage_shapes(spec, layout.tp, layout.pp, st, layout):
            if is_expert(name):
                expert += math.prod(shape)
            else:
                dense += math.prod(shape)
        if dense + expert > sum(best):
            best = (dense, expert)
    return best


def ep_comm_bytes(spec: ModelSpec, layout: Layout) -> float:
    """Bytes one rank sends in one all-to-all of a mixture layer for one microbatch: its tokens x top_k routed
    copies, of which (ep - 1)/ep go to other ranks, h values each (0 without expert parallelism)."""
    moe = moe_of(spec)
    if moe is None or layout.ep == 1:
        return 0.0
    tokens = layout.seq_len // layout.cp * layout.micro_batch
    rows = tokens * moe.top_k * (layout.ep - 1) / layout.ep
    return rows * spec.hidden_size * DTYPE_BYTES[layout.dtype]


def overlaps_dp_comm(layout: Layout) -> bool:
    """Whether the engine runs its data-parallel collectives beside compute: FSDP2 (prefetched all-gathers, and
    reduce-scatters issued as each block's backward ends) and DeepSpeed ZeRO-3 (``overlap_comm`` is on by default
    for stage 3). DeepSpeed ZeRO 0-2 as configured here (``overlap_comm`` off, its default below stage 3) reduce after
    the backward, and all-gather the updated weights after the step."""
    return layout.engine == "fsdp" or layout.zero == 3


def exposed_dp_comm(layout: Layout, dp_total: float, overlap_window: float, layers: int) -> float:
    """The part of the data-parallel traffic the step waits for: all of it without overlap; with overlap, what does
    not fit under the compute of the step, and at least one layer's share (the last reduce-scatter, the first
    all-gather), which nothing can hide."""
    if not overlaps_dp_comm(layout) or dp_total == 0:
        return dp_total
    return max(dp_total - overlap_window, dp_total / max(layers, 1))


def bubble_fraction(pp: int, microbatches: int, virtual_stages: int = 1) -> float:
    """The share of a pipelined step spent idle: (pp - 1) / v microbatch slots out of m + (pp - 1) / v."""
    idle = (pp - 1) / virtual_stages
    return idle / (microbatches + idle)


def step_time(spec: ModelSpec, layout: Layout, peak: float, mfu: float | None = None, net: Network | None = None,
              params: int | tuple[int, int] | None = None,
              layer_overhead_s: float = LAYER_OVERHEAD_S) -> dict[str, float]:
    """Seconds per optimizer step of ``layout.global_batch`` sequences, by component (see the module docstring).

    ``params``: the rank's parameter count for the data-parallel traffic (default: computed from the stage shapes),
    or (dense, routed-expert) counts (``stage_param_split``) where expert parallelism reduces the two over different
    ranks; a single count is reduced over all dp x cp ranks.
    """
    if layout.global_batch is None:
        raise PlanError("the step-time model needs a global batch (--global-batch) so that layouts do the same work")
    net = net or Network()
    net.check()
    check_rates(peak, mfu, layer_overhead_s)
    efficiency = matmul_efficiency(spec) if mfu is None else mfu
    s, b, t, pp = layout.seq_len, layout.micro_batch, layout.tp, layout.pp
    m = layout.num_microbatches
    tokens = layout.global_batch * tokens_per_sample(spec, layout)
    compute = layout.global_batch * _training_flops(spec, layout) / (layout.gpus * peak * efficiency)
    layers = max(len(ids) for ids in rank_layers(spec, pp, layout))
    passes = 4 / 3 if layout.recompute == "full" else 1.0
    fixed = m * layers * layer_overhead_s * passes
    act = s // layout.cp * b * spec.hidden_size * DTYPE_BYTES[layout.dtype]  # one rank's part of the sequence
    tp_bw = net.intra_node if t <= layout.gpus_per_node else net.inter_node
    n_ar = 6 if layout.recompute == "full" else 4
    tp_comm = 0.0 if t == 1 else m * layers * n_ar * 2 * (t - 1) / t * act / tp_bw
    pp_bw = net.intra_node if t * pp <= layout.gpus_per_node else net.inter_node
    pp_comm = 0.0 if pp == 1 else m * 2 * act / pp_bw
    # Context parallelism all-gathers each layer's keys and values in forward (again when recomputing) and
    # reduce-scatters their gradients in backward; the cp ranks sit beside the tp ranks.
    c = layout.cp
    kv = 0.0 if isinstance(spec, EncDecSpec) else s * b * spec.kv_heads * spec.head_dim * DTYPE_BYTES[layout.dtype] / t
    cp_bw = net.intra_node if t * c <= layout.gpus_per_node else net.inter_node
    cp_comm = 0.0 if c == 1 else m * layers * (3 if layout.recompute == "full" else 2) * 2 * (c - 1) / c * kv / cp_bw
    # Expert parallelism: two all-to-alls per mixture layer forward (dispatch, combine), two backward, two more in the
    # recomputed forward; the ep group is ep neighbouring data-parallel ranks, each tp x cp ranks apart.
    a2a = ep_comm_bytes(spec, layout)
    ep_comm = 0.0
    if a2a:
        mixtures = max(sum(1 for i in ids if is_moe_layer(spec, i)) for ids in rank_layers(spec, pp, layout))
        ep_bw = net.intra_node if t * c * layout.ep <= layout.gpus_per_node else net.inter_node
        ep_comm = m * mixtures * (6 if layout.recompute == "full" else 4) * a2a / ep_bw
    v = layout.virtual_stages if layout.schedule in INTERLEAVED else 1
    share = bubble_fraction(pp, m, v)
    bubble = share / (1 - share) * (compute + fixed + tp_comm + pp_comm + cp_comm + ep_comm)
    dp_bw = net.intra_node if layout.gpus <= layout.gpus_per_node else net.inter_node
    params = stage_param_split(spec, layout) if params is None else params
    dense, expert = (params, 0) if isinstance(params, int) else params
    dp_bytes = _dp_bytes(layout, dense, m)
    if expert:  # DeepSpeed keeps the experts out of ZeRO: one all-reduce per step, as ZeRO 0 (and DDP) reduce
        outside = dataclasses.replace(layout, zero=0) if layout.engine == "deepspeed" else layout
        dp_bytes += _dp_bytes(outside, expert, m, layout.expert_data)
    dp_total = dp_bytes / dp_bw
    dp_comm = exposed_dp_comm(layout, dp_total, compute + fixed, layers)
    total = compute + fixed + tp_comm + pp_comm + cp_comm + ep_comm + bubble + dp_comm
    model_flops = layout.global_batch * sequence_flops(spec, s, layout.target_len, causal=False)[0]
    mfu_achieved = model_flops / total / (layout.gpus * peak)
    return {"step_time_s": total, "compute_s": compute, "fixed_s": fixed, "tp_comm_s": tp_comm, "pp_comm_s": pp_comm,
            "cp_comm_s": cp_comm, "ep_comm_s": ep_comm,
            "bubble_s": bubble, "dp_comm_s": dp_comm, "dp_comm_total_s": dp_total, "global_batch": layout.global_batch,
            "microbatches": m, "tokens_per_step": tokens, "tokens_per_s": tokens / total, "mfu": mfu_achieved,
            "matmul_efficiency": efficiency}


__all__ = ["LAYER_OVERHEAD_S", "Network", "check_rates", "ep_comm_bytes", "exposed_dp_comm", "matmul_efficiency",
           "stage_param_split", "stage_params", "step_time", "tokens_per_sample"]
