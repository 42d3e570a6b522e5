"""The gradient norm of a step, counting every parameter once however it is replicated or sharded, and clipping.

Each rank adds up the squares of the gradient pieces it holds, each divided by how many ranks hold that same piece,
and one all-reduce over all ranks gives the global sum. A replicated gradient (DDP) thus counts once, not dp times; a
sharded one (an FSDP DTensor) counts each shard once. A piece's replication is the number of ranks of its pipeline
stage divided by the number of pieces the gradient is split into: the mesh dimensions of its ``Shard`` placements
(FSDP), times the tensor-parallel group's size for a tensor-parallel shard; an expert's weights are held by only one
rank of each expert-parallel group, so by ``ep`` times fewer ranks.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from megatron_lite.models.moe import is_expert_param
from megatron_lite.parallel.tensor import TPShard
from megatron_lite.topology import Topology


def pieces(p: torch.Tensor) -> int:
    """Into how many distinct pieces the ranks of ``p``'s pipeline stage split it (1: every rank holds it whole)."""
    placements = getattr(p, "placements", None)
    if placements is None:
        return 1
    mesh = p.device_mesh
    return math.prod(mesh.size(i) for i, placement in enumerate(placements) if placement.is_shard())


def global_grad_norm(
    named_params: Iterable[tuple[str, nn.Parameter]], topology: Topology, shards: dict[str, TPShard] | None = None,
    copies: dict[str, int] | None = None,
) -> torch.Tensor:
    """The L2 norm of all gradients of the model, over every rank (float64, on this rank's device).

    ``copies`` names tensors held by several pipeline stages (tied embeddings: the same gradient twice), counted once.
    """
    shards, copies = shards or {}, copies or {}
    stage_ranks = topology.world_size // topology.pp
    by_weight: dict[float, list[torch.Tensor]] = {}  # gradients grouped by the share of them this rank counts
    for name, p in named_params:
        if p.grad is None:
            continue
        grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
        if grad.numel():
            split = pieces(p) * (shards[name].size if name in shards else 1)
            if topology.ep > 1 and is_expert_param(name):
                split *= topology.ep
            by_weight.setdefault(split / (stage_ranks * copies.get(name, 1)), []).append(grad)
    total = torch.zeros((), dtype=torch.float64, device=topology.device)
    for weight, grads in by_weight.items():
        # Per-tensor norms with the multi-tensor kernel (as clip_grad_norm_), accumulated in fp64 whatever the
        # gradients' dtype: torch's fp32 CPU kernel sums a large tensor's squares in fp32 (4e-4 off for an
        # embedding's 1.6M elements), and a bf16 norm would round every norm, and their total, to bf16.
        norms = torch._foreach_norm(grads, 2.0, dtype=torch.float64)
        total += torch.stack(norms).square().sum() * weight
    if topology.is_distributed:
        dist.all_reduce(total)
    return total.sqrt()


@torch.no_grad()
def clip_gradients(params: Iterable[nn.Parameter], max_norm: float, total_norm: float) -> None:
    """Scale the gradients by ``max_norm / total_norm`` when that is below 1 (as ``clip_grad_norm_`` does)."""
    if max_norm <= 0:
        return
    coef = max_norm / (total_norm + 1e-6)
    if coef >= 1.0:
        return
    for p in params:
        if p.grad is not None:
            p.grad.mul_(coef)
