"""One rank of a real world size, built in this process: the fake process group plays rank r of W.

``torch.distributed``'s fake backend (``FakeStore``) lets one process join a group of any size; collectives return
at once and move no data. Under it the trainer's own pieces run unchanged for that rank: ``Topology.from_env`` builds
the real (pp, dp, tp) meshes, and the one build sequence (``engines/build.py``) applies the model's tensor-parallel
plan, splits the pipeline and shards with FSDP2, all on the meta device, with the rank's real shapes. Nothing is
materialized: the bytes below are counted from the tensors' shapes and the engine's dtypes.

Per category, for the engine the config names:

- single, DDP, FSDP2 (torch AdamW on fp32 master weights, whatever the precision): weights 4 bytes per element this
  rank holds, gradients 4 (FSDP2 accumulating over microbatches holds the rank's unsharded TP/PP slice, as it skips
  the reduce-scatter until the last one), AdamW two fp32 moments and a 4-byte step count per tensor;
- DeepSpeed, which cannot build on the meta device: computed from ZeRO's partition rules over the same real tensors
  and optimizer groups (ZeRO 1/2: each group flattened, padded to a multiple of 2 x dp, split in dp partitions;
  ZeRO-3: each tensor in partitions of ceil(numel / dp), tensors under the persistence threshold whole), with the
  training dtype for weights and gradients and an fp32 master copy beside the moments.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from megatron_lite.config import Config, microbatches_per_rank
from megatron_lite.engines.build import Built, build_model
from megatron_lite.engines.materialize import local_box
from megatron_lite.families import get_family
from megatron_lite.step.optim import build_adamw
from megatron_lite.topology import Topology

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ZERO_ALIGNMENT = 2  # DeepSpeed ZeRO 1/2 pad each flat group to a multiple of this x dp elements
PERSISTENCE_THRESHOLD = 100_000  # DeepSpeed ZeRO-3 default: smaller tensors stay whole on every rank
PREFETCH_BUCKET = 50_000_000  # DeepSpeed ZeRO-3 default stage3_prefetch_bucket_size, elements gathered ahead
MAX_LIVE_PARAMETERS = 1_000_000_000  # DeepSpeed ZeRO-3 default stage3_max_live_parameters


@dataclass
class RankHoldings:
    """What one simulated rank holds, counted from its real tensors."""

    rank: int
    coords: dict[str, int]
    params: int  # elements of the parameters this rank holds (its shards, partitions or whole tensors)
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    gathered_bytes: int  # parameters gathered whole while a block runs (FSDP2, ZeRO-3), in the compute dtype
    blocks: list[int] = field(default_factory=list)  # the transformer blocks of this rank's stages
    tensors: dict[str, int] = field(default_factory=dict)  # elements per parameter (first names)
    traced: dict[str, int] | None = None  # a traced step's peak by category (trace.py), when traced

    @property
    def state_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes


@contextlib.contextmanager
def fake_rank(rank: int, world: int, local_world: int = 8) -> Iterator[None]:
    """This process as rank ``rank`` of ``world`` under the fake process group (the launcher's variables set), and
    the group torn down after."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    saved = {k: os.environ.get(k) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank % local_world),
                      LOCAL_WORLD_SIZE=str(min(local_world, world)))
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _MetaBuild:
    """The engine's steps of the build sequence, for a dry run: FSDP2 shards on meta as the real engine does; no
    engine materializes (the tensors stay shapes)."""

    def __init__(self, cfg: Config, topology: Topology) -> None:
        self.cfg, self.topology = cfg, topology

    def partition(self, model: nn.Module, roots: list[nn.Module]) -> None:
        if self.cfg.parallel.engine == "fsdp":
            from megatron_lite.engines.fsdp import shard_model

            shard_model(model, self.topology.data_mesh(), self.cfg, roots, self.topology)

    def materialize(self, model: nn.Module, rules: dict, seed: int, built: Built) -> None:
        """Nothing: a dry run counts shapes."""


def build_rank(cfg: Config, topology: Topology) -> Built:
    """This rank's part of the model, built by the training build sequence on the meta device."""
    family = get_family(cfg.model.family)
    return build_model(family.factory(cfg, topology), cfg, topology, _MetaBuild(cfg, topology))


def holdings(cfg: Config, topology: Topology, built: Built, rank: int) -> RankHoldings:
    """Bytes by category for the engine ``cfg`` names (see the module docstring)."""
    engine, precision = cfg.parallel.engine, cfg.training.precision
    local: dict[str, int] = {}
    tp_local: dict[str, int] = {}
    for name, p in built.model.named_parameters():
        first = built.aliases.get(name, name)
        full, _, shape = local_box(name, p, built.shards)
        local[first] = math.prod(shape)
        tp_local[first] = math.prod(full) // (built.shards[name].size if name in built.shards else 1)
    total = sum(local.values())
    m = microbatches_per_rank(cfg.global_batch_size, cfg.training.micro_batch_size, topology.dp)
    compute = DTYPE_BYTES.get(precision, 4)
    blocks = sorted({int(n.split(".")[1]) for n in local if n.startswith("layers.")})
    if engine == "deepspeed":
        w, g, o, gathered = _zero_bytes(cfg, built, topology.data_size, local, m)
    else:
        optimizer = build_adamw(built.model, cfg.optimizer, torch.device("cpu"), built.no_decay)
        stepped = [p for group in optimizer.param_groups for p in group["params"]]
        elements = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in stepped)
        w = 4 * total
        g = 4 * (sum(tp_local.values()) if engine == "fsdp" and m > 1 else total)
        o = 8 * elements + 4 * len(stepped)
        gathered = 2 * max(_per_block(tp_local).values()) * compute if engine == "fsdp" else 0
    coords = {"pp": topology.pp_rank, "dp": topology.dp_rank, "cp": topology.cp_rank, "tp": topology.tp_rank}
    return RankHoldings(rank, coords, total, w, g, o, gathered, blocks, local)


def _per_block(elements: dict[str, int]) -> dict[str, int]:
    """Elements per FSDP unit: each block, and the root's parameters together."""
    out: dict[str, int] = {}
    for name, n in elements.items():
        key = ".".join(name.split(".")[:2]) if name.startswith("layers.") else "root"
        out[key] = out.get(key, 0) + n
    return out


def _zero_bytes(cfg: Config, built: Built, dp: int, local: dict[str, int], m: int) -> tuple[int, int, int, int]:
    """(weights, gradients, optimizer, gathered) bytes of DeepSpeed ZeRO 0-3 over this rank's real tensors and
    optimizer groups, by ZeRO's partition rules."""
    stage, p = cfg.parallel.zero_stage, DTYPE_BYTES[cfg.training.precision]
    optimizer = build_adamw(built.model, cfg.optimizer, torch.device("cpu"), built.no_decay)
    first = {id(param): built.aliases.get(n, n) for n, param in built.model.named_parameters()}
    groups = [[local[first[id(q)]] for q in group["params"]] for group in optimizer.param_groups if group["params"]]
    total = sum(local.values())
    if stage == 0:
        return p * total, p * total, 8 * total + 4 * len(local) + (4 * total if p != 4 else 0), 0
    if stage in (1, 2):
        align = ZERO_ALIGNMENT * dp
        padded = [math.ceil(sum(grp) / align) * align for grp in groups]
        part = sum(n // dp for n in padded)
        grads = total if stage == 1 and m > 1 else part
        return p * sum(padded), p * grads, 12 * part + 4 * len(groups), 0
    parts = [sum(math.ceil(n / dp) for n in grp) for grp in groups]
    part = sum(parts)
    persistent = sum(n for n in local.values() if n < PERSISTENCE_THRESHOLD)
    modules: dict[str, int] = {}
    for name, n in local.items():
        if n >= PERSISTENCE_THRESHOLD:
            modules[name.rpartition(".")[0]] = modules.get(name.rpartition(".")[0], 0) + n
    largest = max(modules.values(), default=0)  # gathered with its gradient, beside what is prefetched
    live = min(largest + PREFETCH_BUCKET, max(MAX_LIVE_PARAMETERS, largest))
    return p * (part + persistent), p * part, 12 * part + 4 * len(parts), p * (live + largest)


def simulate(cfg: Config, world: int, rank: int) -> tuple[RankHoldings, Topology, Built]:
    """Build rank ``rank`` of ``world`` under the fake process group and count what it holds. The caller must hold
    ``fake_rank(rank, world)``."""
    topology = Topology.from_env(cfg.parallel, "cpu")
    built = build_rank(cfg, topology)
    return holdings(cfg, topology, built, rank), topology, built


def rank_classes(cfg: Config, world: int) -> list[int]:
    """Ranks that stand for all others: every pipeline stage, the first and last tensor-parallel rank, and the first
    and last data-parallel shard (where a dimension splits unevenly, the last shard holds less; the first, most; the
    shards run over dp x cp)."""
    par = cfg.parallel
    dp = world // (par.tp * par.pp * par.cp)
    shards = dp // par.dp_replicate
    ranks = set()
    for pp in range(par.pp):
        for tp in sorted({0, par.tp - 1}):
            for d, c in sorted({(0, 0), (shards - 1, par.cp - 1)}):
                ranks.add(((pp * dp + d) * par.cp + c) * par.tp + tp)  # rank order pp, dp, cp, tp (topology.py)
    return sorted(ranks)
