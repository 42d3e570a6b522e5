"""Enumerate the layouts that fit in GPU memory and rank them by the estimated time of one step of a fixed global batch.

Every candidate processes the same global batch (``--global-batch``, else the config's training batch, else
``DEFAULT_BATCH_TOKENS`` tokens rounded to a multiple of the GPU count), so the fastest step is also the highest
throughput. The step model is ``steptime.step_time``. Choices the user fixed (``Constraints``: --tp, --pp, --cp, --ep,
--zero or --fsdp, --micro-batch, --recompute) restrict the enumeration instead of being overridden by it.

A mixture-of-experts decoder also enumerates expert parallelism: ep in the divisors of dp that divide
``model.moe.num_experts`` (a dense model keeps ep 1).
"""

from __future__ import annotations

import dataclasses

from megatron_lite.config import ModelConfig
from megatron_lite.planning.encdec import EncDecSpec, as_spec
from megatron_lite.planning.errors import PlanError
from megatron_lite.planning.layout import INTERLEAVED, RECOMPUTE, Layout
from megatron_lite.planning.memory import estimate
from megatron_lite.planning.params import moe_of
from megatron_lite.planning.steptime import (
    LAYER_OVERHEAD_S,
    Network,
    check_rates,
    stage_param_split,
    step_time,
    tokens_per_sample,
)

ModelSpec = ModelConfig | EncDecSpec

DEFAULT_BATCH_TOKENS = 2**20  # ~1M tokens per step when neither --global-batch nor a config gives a batch
MICRO_BATCHES = (1, 2, 4, 8, 16, 32)


@dataclasses.dataclass(frozen=True)
class Constraints:
    """Choices the user fixed; None leaves that dimension to the enumeration."""

    tp: int | None = None
    pp: int | None = None
    cp: int | None = None
    ep: int | None = None
    engine: str | None = None  # "deepspeed" or "fsdp"
    zero: int | None = None  # with engine "deepspeed"
    micro_batch: int | None = None
    recompute: str | None = None

    def flags(self) -> str:
        """The constraints as the command-line flags that set them, for messages."""
        out = [f"--{k.replace('_', '-')} {v}" for k, v in dataclasses.asdict(self).items()
               if v is not None and k != "engine"]
        return " ".join((["--fsdp"] if self.engine == "fsdp" else []) + out)


def default_global_batch(spec: ModelSpec, base: Layout, micro_batch: int | None = None) -> int:
    """Sequences per step for ~``DEFAULT_BATCH_TOKENS`` tokens, rounded to a multiple of gpus (x a fixed micro-batch),
    so that every data-parallel size (a divisor of the GPU count) divides it; at least one such multiple."""
    unit = base.gpus * (micro_batch or 1)
    samples = DEFAULT_BATCH_TOKENS / tokens_per_sample(spec, base)
    return max(1, round(samples / unit)) * unit


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _engines(pp: int, dp: int, fixed: Constraints) -> list[tuple[str, int]]:
    """(engine, ZeRO stage) choices: DeepSpeed ZeRO 0-3 (0/1 only with pipeline parallelism) or FSDP2."""
    if fixed.engine == "fsdp":
        return [("fsdp", 0)]
    if fixed.zero is not None:
        return [("deepspeed", fixed.zero)]
    if dp == 1:  # nothing to shard over
        return [("deepspeed", 0)]
    return [("deepspeed", z) for z in (0, 1, 2, 3) if pp == 1 or z <= 1] + [("fsdp", 0)]


def _eps(spec: ModelSpec, dp: int, fixed: Constraints) -> list[int]:
    """Expert-parallel sizes: the fixed one, else (a mixture-of-experts model only) every divisor of dp that divides
    the experts of a layer."""
    if fixed.ep:
        return [fixed.ep]
    moe = moe_of(spec)
    if moe is None:
        return [1]
    return [e for e in _divisors(dp) if not moe.num_experts % e]


def candidate_layouts(spec: ModelSpec, base: Layout, fixed: Constraints | None = None) -> list[Layout]:
    """Every (tp, pp, cp, ep, engine/ZeRO, micro-batch, recompute) that training runs (``Layout.validate``, which asks
    the engines' config check) for the model, the GPU count and ``fixed``.

    Raises ``PlanError`` naming the first reason when no layout is valid at all (e.g. a fixed --tp that does not
    divide the heads).
    """
    fixed = fixed or Constraints()
    base.check_sizes()
    out: list[Layout] = []
    first_error: str | None = None
    # tp dividing the heads; the rest (kv heads, FFN, vocabulary) is the engine check's, in validate()
    tps = [fixed.tp] if fixed.tp else [t for t in _divisors(base.gpus)
                                       if t <= base.gpus_per_node and not spec.num_heads % t]
    for tp in tps:
        for pp, cp in _pp_cp(spec, base, tp, fixed):
            dp = max(base.gpus // (tp * pp * cp), 1)
            mbs = [fixed.micro_batch] if fixed.micro_batch else MICRO_BATCHES  # validate() keeps those dividing gb/dp
            for ep in _eps(spec, dp, fixed):
                for engine, zero in _engines(pp, dp * cp, fixed):
                    for mb in mbs:
                        for rc in [fixed.recompute] if fixed.recompute else RECOMPUTE:
                            lay = dataclasses.replace(base, tp=tp, pp=pp, cp=cp, ep=ep, engine=engine, zero=zero,
                                                      micro_batch=mb, recompute=rc, offload=None)
                            if pp == 1 and lay.schedule in INTERLEAVED:
                                lay.schedule = "1f1b"
                            try:
                                lay.validate(spec)
                            except PlanError as e:
                                first_error = first_error or str(e)
                                continue
                            out.append(lay)
    if not out:
        where = f" with {fixed.flags()}" if fixed.flags() else ""
        raise PlanError(f"no valid layout on {base.gpus} GPUs{where}: {first_error or 'nothing to enumerate'}")
    return out


LONG_SEQUENCE = 16384  # from this length on, the search also splits sequences over context-parallel ranks
CONTEXT_PARALLEL = (1, 2, 4, 8)


def _pp_cp(spec: ModelSpec, base: Layout, tp: int, fixed: Constraints) -> list[tuple[int, int]]:
    """(pp, cp) pairs for ``tp``: pp up to the layers; cp > 1 only for long sequences of a decoder (or as fixed)."""
    pps = [fixed.pp] if fixed.pp else [p for p in _divisors(max(base.gpus // tp, 1)) if p <= spec.num_layers]
    if fixed.cp:
        cps = [fixed.cp]
    elif base.seq_len >= LONG_SEQUENCE and not isinstance(spec, EncDecSpec):
        cps = [c for c in CONTEXT_PARALLEL if not base.seq_len % (2 * c)]
    else:
        cps = [1]
    return [(pp, cp) for pp in pps for cp in cps]  # Layout.validate refuses a split the GPUs do not divide


def search(spec: ModelSpec, base: Layout, gpu_memory: int, peak: float, mfu: float | None = None,
           net: Network | None = None, top: int = 10, fixed: Constraints | None = None,
           layer_overhead_s: float = LAYER_OVERHEAD_S) -> list[dict]:
    """The ``top`` fitting layouts, fastest step of the same global batch first (ties: less memory first).

    ``base`` carries what is not enumerated (GPU count, sequence length, dtype, schedule, global batch); a missing
    global batch gets ``default_global_batch``.
    """
    spec = as_spec(spec)
    if gpu_memory <= 0:
        raise PlanError(f"--gpu-memory must be positive, got {gpu_memory}")
    if top < 1:
        raise PlanError(f"--top must be a positive integer, got {top}")
    net = net or Network()
    net.check()
    check_rates(peak, mfu, layer_overhead_s)
    fixed = fixed or Constraints()
    base.check_sizes()
    if base.global_batch is None:
        base = dataclasses.replace(base, global_batch=default_global_batch(spec, base, fixed.micro_batch))
    results = []
    params: dict[tuple[int, int, int, int], tuple[int, int]] = {}
    for lay in candidate_layouts(spec, base, fixed):
        mem = estimate(spec, lay, gpu_memory)
        if not mem["fits"]:
            continue
        key = (lay.tp, lay.pp, lay.cp, lay.ep)
        if key not in params:
            params[key] = stage_param_split(spec, lay)
        row = {"layout": mem["layout"], "per_gpu_bytes": mem["per_gpu_bytes"], "breakdown": mem["breakdown"]}
        row.update(step_time(spec, lay, peak, mfu, net, params[key], layer_overhead_s))
        results.append(row)
    results.sort(key=lambda r: (r["step_time_s"], r["per_gpu_bytes"]))
    return _drop_ties(results)[:top]


def _drop_ties(rows: list[dict]) -> list[dict]:
    """Leave out a row whose split (tp, pp, cp, ep, micro-batch, recompute) and step time equal an earlier, smaller
    row's: e.g. ZeRO 0 beside ZeRO 1, which moves the same bytes and only needs more memory."""
    kept, seen = [], set()
    for r in rows:
        lay = r["layout"]
        key = (lay["tp"], lay["pp"], lay.get("cp", 1), lay.get("ep", 1), lay["micro_batch"], lay["recompute"],
               r["step_time_s"])
        if key not in seen:
            seen.add(key)
            kept.append(r)
    return kept


def smallest_footprint(spec: ModelSpec, base: Layout, fixed: Constraints | None = None) -> int:
    """The least per-GPU memory any candidate needs, to say how far off a search that found nothing was."""
    return min(estimate(spec, lay)["per_gpu_bytes"] for lay in candidate_layouts(spec, base, fixed))


def candidate_count(spec: ModelSpec, base: Layout) -> int:
    return len(candidate_layouts(spec, base))


__all__ = ["Constraints", "DEFAULT_BATCH_TOKENS", "Network", "candidate_count", "candidate_layouts",
           "default_global_batch", "search", "smallest_footprint", "step_time"]
