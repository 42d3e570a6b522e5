"""Enumerate the layouts that fit in GPU memory and rank them by an estimated step time.

Step-time model (no overlap of communication with compute, so it is an upper bound that penalizes chatty layouts):

    step = compute * (1 + bubble) + tp_comm + pp_comm + dp_comm

- compute: training FLOPs of the global batch (causal attention, as flash kernels do), plus one extra forward of the
  layers with full recomputation, or of the attention scores with selective recomputation, divided by
  gpus * peak FLOP/s * ``mfu`` (the fraction of peak that large matmuls attain).
- bubble: (pp - 1) / m for GPipe and 1F1B, (pp - 1) / (m v) for the interleaved schedule (Narayanan et al. 2021).
- tp_comm: 4 all-reduces (2 forward, 2 backward; 6 with full recomputation) of s*b*h activations per layer and
  microbatch, ring cost 2 (t - 1)/t * bytes / bandwidth; within a node when tp <= gpus_per_node.
- pp_comm: one s*b*h send forward and one backward per microbatch at each stage boundary.
- dp_comm: gradient all-reduce (ZeRO 0-2: reduce-scatter + all-gather, the same volume) 2 (d - 1)/d * params * bytes;
  ZeRO-3 / FSDP also all-gather the weights for forward and backward of every microbatch: (2 m + 1)(d - 1)/d * ...
  Over the inter-node links once the job spans nodes.
"""

from __future__ import annotations

import dataclasses

from megatron_lite.config import ModelConfig
from megatron_lite.planning.encdec import EncDecSpec
from megatron_lite.planning.errors import PlanError
from megatron_lite.planning.flops import attention_flops_per_token, training_flops_per_token
from megatron_lite.planning.layout import DTYPE_BYTES, Layout, stage_layers
from megatron_lite.planning.memory import estimate
from megatron_lite.planning.params import count_params

ModelSpec = ModelConfig | EncDecSpec


@dataclasses.dataclass
class Network:
    """Per-GPU bus bandwidths in bytes/s for ring collectives."""

    intra_node: float = 300e9  # NVLink (H100 SXM: ~450 GB/s per direction, ~300-370 measured bus bandwidth)
    inter_node: float = 25e9  # one 200 Gb/s NIC per GPU


def step_time(spec: ModelSpec, layout: Layout, peak: float, mfu: float, net: Network,
              total_params: int | None = None) -> dict[str, float]:
    """Seconds per optimizer step, by component (see the module docstring)."""
    s = layout.seq_len
    gb = layout.global_batch or layout.dp * layout.micro_batch
    m = layout.num_microbatches
    tokens = gb * (s + (layout.target_len or s) if isinstance(spec, EncDecSpec) else s)
    flops = training_flops_per_token(spec, s, causal=True) * tokens
    if layout.recompute == "full":
        flops *= 4 / 3
    elif layout.recompute == "selective":
        d = spec.d_kv if isinstance(spec, EncDecSpec) else spec.head_dim
        flops += attention_flops_per_token(spec.num_layers, spec.num_heads, d, s, True) / 3 * tokens
    compute = flops / (layout.gpus * peak * mfu)
    v = layout.virtual_stages if layout.schedule == "interleaved" else 1
    bubble = (layout.pp - 1) / (m * v)
    p = DTYPE_BYTES[layout.dtype]
    act = s * layout.micro_batch * spec.hidden_size * p
    t = layout.tp
    layers = max(stage_layers(spec.num_layers, layout.pp))
    tp_bw = net.intra_node if t <= layout.gpus_per_node else net.inter_node
    n_ar = 6 if layout.recompute == "full" else 4
    tp_comm = 0.0 if t == 1 else layers * m * n_ar * 2 * (t - 1) / t * act / tp_bw
    pp_bw = net.intra_node if t * layout.pp <= layout.gpus_per_node else net.inter_node
    pp_comm = 0.0 if layout.pp == 1 else 2 * m * act / pp_bw
    d = layout.dp
    dp_bw = net.intra_node if layout.gpus <= layout.gpus_per_node else net.inter_node
    total_params = count_params(spec).total if total_params is None else total_params
    params = total_params // (layout.tp * layout.pp)  # gradients one data-parallel group reduces
    rounds = (2 * m + 1) if layout.sharded else 2
    dp_comm = 0.0 if d == 1 else rounds * (d - 1) / d * params * p / dp_bw
    total = compute * (1 + bubble) + tp_comm + pp_comm + dp_comm
    return {"step_time_s": total, "compute_s": compute, "bubble_s": compute * bubble, "tp_comm_s": tp_comm,
            "pp_comm_s": pp_comm, "dp_comm_s": dp_comm, "tokens_per_s": tokens / total,
            "mfu": training_flops_per_token(spec, s, causal=False) * tokens / total / (layout.gpus * peak)}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(spec: ModelSpec, base: Layout) -> list[Layout]:
    """Every (tp, pp, engine/ZeRO, micro-batch, recompute) that is valid for the model and the GPU count."""
    out = []
    heads = spec.num_heads
    kv = spec.kv_heads if isinstance(spec, ModelConfig) else heads
    gb = base.global_batch
    for tp in _divisors(base.gpus):
        if tp > base.gpus_per_node or heads % tp or kv % tp:
            continue
        for pp in _divisors(base.gpus // tp):
            if pp > spec.num_layers:
                continue
            dp = base.gpus // (tp * pp)
            per_rank = gb // dp if gb is not None and gb % dp == 0 else None
            if gb is not None and per_rank is None:
                continue
            mbs = [b for b in (1, 2, 4, 8, 16, 32) if per_rank is None or per_rank % b == 0]
            engines = [("deepspeed", z) for z in (0, 1, 2, 3) if pp == 1 or z <= 1] + [("fsdp", 0)]
            if dp == 1:  # nothing to shard over
                engines = [("deepspeed", 0)]
            for engine, zero in engines:
                for mb in mbs:
                    for rc in ("none", "selective", "full"):
                        lay = dataclasses.replace(base, tp=tp, pp=pp, engine=engine, zero=zero, micro_batch=mb,
                                                  recompute=rc, offload=None)
                        if pp == 1 and lay.schedule == "interleaved":
                            lay.schedule = "1f1b"
                        try:
                            lay.validate(spec)
                        except PlanError:
                            continue
                        out.append(lay)
    return out


def search(spec: ModelSpec, base: Layout, gpu_memory: int, peak: float, mfu: float = 0.5,
           net: Network | None = None, top: int = 10) -> list[dict]:
    """The ``top`` fitting layouts, fastest first."""
    if gpu_memory <= 0:
        raise PlanError(f"--gpu-memory must be positive, got {gpu_memory}")
    net = net or Network()
    results = []
    total = count_params(spec).total
    for lay in candidate_layouts(spec, base):
        mem = estimate(spec, lay, gpu_memory)
        if not mem["fits"]:
            continue
        row = {"layout": mem["layout"], "per_gpu_bytes": mem["per_gpu_bytes"], "breakdown": mem["breakdown"]}
        row.update(step_time(spec, lay, peak, mfu, net, total))
        results.append(row)
    results.sort(key=lambda r: (r["step_time_s"], r["per_gpu_bytes"]))
    return results[:top]


def candidate_count(spec: ModelSpec, base: Layout) -> int:
    return len(candidate_layouts(spec, base))


__all__ = ["Network", "search", "step_time", "candidate_layouts", "candidate_count"]
