"""Expert parallelism: the experts of each mixture layer split over ``parallel.ep`` of the data-parallel ranks.

The ep group is carved from the data axis (consecutive data-parallel ranks, so it stays within a node first), as
Megatron-LM and torchtitan do: it adds no ranks. Each ep rank keeps ``num_experts / ep`` experts whole (the dense parts
are untouched, tensor-parallel or not) under their global indices, so checkpoints keep every expert's own name.

A mixture layer sorts its routed tokens by expert and hands them to ``run_experts`` (``models/moe.py``), the one point
this extends:

1. the counts per expert are exchanged (an all-to-all of E integers), so each rank knows what it will receive;
2. each run of tokens travels to the rank holding its expert (``all_to_all``, whose backward sends the gradients back);
3. the received rows, grouped by source rank, are regrouped by local expert and run through the experts;
4. the outputs go back the same way, in the order they came, and the layer combines them as in one process.

Routing is dropless, so every token meets exactly the experts it would meet in one process, and the losses and
gradients equal one process's. Gradients of expert weights are reduced over the ranks that replicate them (the
expert-data group: the same ep index in every ep group, times cp), by the engines.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megatron_lite.parallel.collectives import all_to_all
from megatron_lite.parallel.extend import extend
from megatron_lite.topology import Topology


class ExpertParallelMoE:
    """A mixture layer whose experts live on the ranks of ``ep_group``, ``experts`` holding this rank's."""

    ep_group: object
    ep: int

    def run_experts(self, tokens: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        local = len(self.experts)
        per_rank = counts.view(self.ep, local)  # row r: tokens for the experts of ep rank r
        incoming = torch.empty_like(per_rank)  # row r: tokens from ep rank r for each of this rank's experts
        dist.all_to_all_single(incoming, per_rank.contiguous(), group=self.ep_group)
        send = self.run_lengths(per_rank.sum(1), tokens.shape[0], self.ep)
        runs = self.run_lengths(incoming.reshape(-1), tokens.shape[0], self.ep * local)  # even: as many come as go
        recv = [sum(runs[r * local:(r + 1) * local]) for r in range(self.ep)]
        received = all_to_all(tokens, send, recv, self.ep_group)
        expert_of = torch.arange(local, device=tokens.device).repeat(self.ep).repeat_interleave(
            incoming.reshape(-1), output_size=sum(runs))
        by_expert = expert_of.argsort(stable=True)
        out = super().run_experts(received[by_expert], incoming.sum(0))
        return all_to_all(out[by_expert.argsort()], recv, send, self.ep_group)


def local_experts(num_experts: int, ep: int, ep_rank: int) -> range:
    """The global indices of the experts ep rank ``ep_rank`` holds."""
    n = num_experts // ep
    return range(ep_rank * n, (ep_rank + 1) * n)


def apply_expert_parallel(model: nn.Module, topology: Topology) -> nn.Module:
    """Keep only this rank's experts in every mixture layer (a module with ``experts`` and ``run_experts``) and give
    the layer its expert-parallel class; in place, on the meta device before anything is allocated."""
    if topology.ep == 1:
        return model
    group = topology.expert_group()
    for module in model.modules():
        if not (hasattr(module, "run_experts") and isinstance(getattr(module, "experts", None), nn.ModuleDict)):
            continue
        keep = local_experts(len(module.experts), topology.ep, topology.ep_rank)
        for key in [k for k in module.experts if int(k) not in keep]:
            del module.experts[key]
        extend(module, ExpertParallelMoE, ep_group=group, ep=topology.ep)
    return model
