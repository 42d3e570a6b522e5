"""The shared step's part for mixture-of-experts layers: the auxiliary losses' gradient scale before the backwards,
and after the step the routing statistics of the whole global batch, the balancing bias and the metrics.

A mixture layer counts, for the microbatches it ran, the tokens each expert received, its balancing and z-loss sums
and the tokens it routed (``models/moe.py``). Summed over the data-parallel ranks (each routed its own tokens) and the
pipeline stages (each holds its own layers, the others report zeros), these are the global batch's, the same on
every layout; not over tensor-parallel ranks, which route the same tokens alike.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megatron_lite.config import MoEConfig
from megatron_lite.models.moe import moe_layers
from megatron_lite.topology import Topology


class MixtureStep:
    """The mixture layers of this rank's part of the model, and what the step does with them."""

    def __init__(self, model: nn.Module, moe: MoEConfig, num_layers: int, topology: Topology) -> None:
        self.layers = moe_layers(model)
        self.moe, self.num_layers, self.topology = moe, num_layers, topology
        self.rows = [i for i in range(num_layers) if moe.is_moe_layer(i)]

    @property
    def enabled(self) -> bool:
        return bool(self.rows)

    def begin(self, loss_scale: float) -> None:
        """Before a step's backwards: the auxiliary losses' gradient is what the step scales its loss by."""
        for layer in self.layers.values():
            layer.loss_scale = loss_scale
            layer.take_statistics()  # nothing left over from an interrupted step

    @torch.no_grad()
    def finish(self) -> dict[str, Any]:
        """After the optimizer step: reduce the statistics, move the balancing biases, and return the metrics."""
        e, topo = self.moe.num_experts, self.topology
        stats = torch.zeros(self.num_layers, e + 3, dtype=torch.float64, device=topo.device)
        for index, layer in self.layers.items():
            stats[index] = layer.take_statistics()
        if topo.is_distributed:
            for axis in ("dp", "cp", "pp"):
                if getattr(topo, axis) > 1:
                    dist.all_reduce(stats, group=topo.group(axis))
        for index, layer in self.layers.items():
            layer.update_bias(stats[index, :e], self.moe.bias_update_rate)
        rows = stats[self.rows]
        load, tokens = rows[:, :e], rows[:, e + 2].clamp(min=1)
        per_layer = (load.max(1).values / load.mean(1).clamp(min=1e-9)).tolist()
        return {
            "moe_aux_loss": float((rows[:, e] / tokens).mean()),
            "moe_z_loss": float((rows[:, e + 1] / tokens).mean()),
            "moe_load_max": max(per_layer),
            "moe_load_per_layer": [round(x, 4) for x in per_layer],
            "moe_dropped_tokens": int((rows[:, e + 2] * self.moe.top_k - load.sum(1)).sum()),
        }
