"""Give a model built on the meta device (or partitioned by ZeRO-3 as it was built) its initial values, shard by shard.

Each rank allocates and fills only what it holds: whole tensors for single, DDP and ZeRO 0-2 (which hold full weights
by design, or their tensor-parallel shards), the local shard of each DTensor for FSDP (within the tensor-parallel
shard), the flat partition of each parameter for ZeRO-3. The values come from ``models/init.py`` by tensor name and seed, so every layout starts from
the same full weights, and a rank draws no more than its share plus the rows at a shard's edges.

ZeRO-3's partitions are made here too (``partition_for_zero3``), from the meta model, without ever holding the whole
model on a rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megatron_lite.models.init import InitRule, initial_box, initial_values, to_empty_keeping_ties
from megatron_lite.parallel.tensor import TPShard


def local_box(name: str, p: torch.Tensor, shards: dict[str, TPShard]) -> tuple[tuple, tuple, tuple]:
    """(full shape, offset, local shape) of the part of tensor ``name`` that ``p`` holds on this rank.

    The part is a box of the full tensor: a DTensor's shard (FSDP over the data axis) within the tensor-parallel
    shard that ``shards`` names (if any), offsets adding up.
    """
    full, local, offset = tuple(p.shape), tuple(p.shape), [0] * p.dim()
    if hasattr(p, "device_mesh"):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local, data_offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        offset = list(data_offset)
    shard = shards.get(name)
    if shard is not None:
        offset[shard.dim] += shard.offset
        full = shard.global_shape
    return full, tuple(offset), tuple(local)


@torch.no_grad()
def materialize(model: nn.Module, rules: dict[str, InitRule], seed: int, device: torch.device,
                shards: dict[str, TPShard] | None = None, aliases: dict[str, str] | None = None) -> None:
    """Allocate ``model``'s meta parameters on ``device`` (local shards only) and fill them with their part of the
    full tensors' initial values; ``shards`` says which parameters are tensor-parallel shards, ``aliases`` maps each
    name of a tied tensor to its first name (a pipeline stage may hold a tied copy under its second name)."""
    shards, aliases = shards or {}, aliases or {}
    to_empty_keeping_ties(model, device)
    for local_name, p in model.named_parameters():
        name = aliases.get(local_name, local_name)
        rule = _rule(rules, name)
        local = p.to_local() if hasattr(p, "to_local") else p
        full, offset, shape = local_box(name, p, shards)
        if not local.numel():
            continue
        if full == shape:  # the whole tensor: write it in place
            initial_values(rule, name, local.numel(), seed, out=local.view(-1))
        else:
            local.copy_(initial_box(rule, name, torch.Size(full), seed, offset, shape).reshape(local.shape))


def partition_for_zero3(model: nn.Module, ds_config: dict, group, deepspeed) -> None:
    """Turn the meta parameters of ``model`` into ZeRO-3 partitioned parameters, one module's parameters at a time.

    This is what ``deepspeed.zero.Init`` does while a model is constructed, except for where the full tensors live:
    each module's parameters are given storage in one scratch buffer the size of the largest module's parameters,
    reused for every module, and ``zero.Init(module=...)`` partitions them from there. Allocating and freeing every
    full tensor instead (as construction inside ``zero.Init`` does) leaves the host heap fragmented on the CPU, where
    the measured peak was the whole model. The scratch values are not initial values: ``fill_zero3_partitions`` writes
    those into each rank's partitions afterwards.
    """
    precision = "bf16" if ds_config["bf16"]["enabled"] else "fp16" if ds_config["fp16"]["enabled"] else "fp32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for key, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((module, key))
    # Each distinct tensor once, with the first module that holds it (a tied tensor is converted with that module).
    per_module: list[list[nn.Parameter]] = []
    seen: set[int] = set()
    for module in model.modules():
        mine = list({id(p): p for p in module._parameters.values() if p is not None and id(p) not in seen}.values())
        seen.update(id(p) for p in mine)
        per_module.append(mine)
    largest = max((sum(p.numel() for p in params) for params in per_module), default=0)
    scratch = torch.empty(largest, dtype=dtype, device=get_device())
    for params in per_module:
        if not params:
            continue
        holder, offset = nn.Module(), 0
        for i, p in enumerate(params):
            real = nn.Parameter(scratch[offset : offset + p.numel()].view(p.shape), requires_grad=p.requires_grad)
            offset += p.numel()
            for module, key in owners[id(p)]:  # every module that shares the tensor (tied weights) gets it
                module._parameters[key] = real
            holder.register_parameter(f"p{i}", real)
        deepspeed.zero.Init(module=holder, config_dict_or_path=ds_config, data_parallel_group=group)


def get_device() -> torch.device:
    """The device DeepSpeed's accelerator puts parameters on (this rank's GPU, or the CPU)."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


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
            initial_values(_rule(rules, name), name, p.ds_numel, seed, start, end, out=p.ds_tensor.data[: end - start])


def _rule(rules: dict[str, InitRule], name: str) -> InitRule:
    if name not in rules:
        raise KeyError(f"no initial-value rule for parameter {name}; the model's init_rules() must name every parameter")
    return rules[name]
