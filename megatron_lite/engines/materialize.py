"""Give a model built on the meta device (or partitioned by ZeRO-3 as it was built) its initial values, shard by shard.

Each rank allocates and fills only what it holds: whole tensors for single, DDP and ZeRO 0-2 (which hold full weights
by design), the local shard of each DTensor for FSDP (and later tensor parallelism), the flat partition of each
parameter for ZeRO-3. The values come from ``models/init.py`` by tensor name and seed, so every layout starts from
the same full weights, and a rank draws no more than its share plus the rows at a shard's edges.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megatron_lite.models.init import InitRule, initial_box, initial_values, to_empty_keeping_ties


@torch.no_grad()
def materialize(model: nn.Module, rules: dict[str, InitRule], seed: int, device: torch.device) -> None:
    """Allocate ``model``'s meta parameters on ``device`` (local shards only, for DTensors) and fill them."""
    to_empty_keeping_ties(model, device)
    for name, p in model.named_parameters():
        rule = _rule(rules, name)
        if hasattr(p, "device_mesh"):  # a DTensor: fill the box of the full tensor that this rank holds
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

            local = p.to_local()
            shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            if local.numel():
                local.copy_(initial_box(rule, name, p.shape, seed, offset, shape).reshape(local.shape))
        else:
            p.copy_(initial_values(rule, name, p.numel(), seed).view(p.shape))


@torch.no_grad()
def fill_zero3_partitions(model: nn.Module, rules: dict[str, InitRule], seed: int) -> None:
    """Fill each ZeRO-3 parameter's flat partition (``ds_tensor``): elements [r * n, (r + 1) * n) of the flat tensor.

    DeepSpeed splits every parameter's flattened elements into equal partitions of ``ceil(numel / dp)``, padding the
    last; rank ``r`` of the parameter's group holds partition ``r``. The padding is left as it is.
    """
    for name, p in model.named_parameters():
        part = p.ds_tensor.numel()
        start = dist.get_rank(group=p.ds_process_group) * part
        end = min(start + part, p.ds_numel)
        if end > start:
            values = initial_values(_rule(rules, name), name, p.ds_numel, seed, start, end)
            p.ds_tensor.data[: end - start].copy_(values)


def _rule(rules: dict[str, InitRule], name: str) -> InitRule:
    if name not in rules:
        raise KeyError(f"no initial-value rule for parameter {name}; the model's init_rules() must name every parameter")
    return rules[name]
