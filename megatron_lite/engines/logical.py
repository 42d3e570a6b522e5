"""An engine's view of the logical checkpoint tensors (``step/checkpoint_format.py`` says what they are): its
parameters and AdamW state under logical names, tensor-parallel shards as parts of full tensors, and helpers that
spread saving and loading over ranks.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from megatron_lite.parallel.tensor import TPShard
from megatron_lite.step.checkpoint_format import OPTIM_STATE_KEYS
from megatron_lite.topology import Topology



def param_names(model: nn.Module) -> dict[nn.Parameter, str]:
    """Each parameter's first fully qualified name (tied weights get one name)."""
    return {p: n for n, p in model.named_parameters()}


def ensure_adamw_state(optimizer: torch.optim.Optimizer) -> None:
    """Create zero AdamW state for parameters that have none yet, so a checkpoint can be loaded into it in place."""
    ensure_adamw_state_for(optimizer, [p for group in optimizer.param_groups for p in group["params"]])


def ensure_adamw_state_for(optimizer: torch.optim.Optimizer, tensors: list[torch.Tensor]) -> None:
    """``ensure_adamw_state`` for the given tensors (e.g. flat partitions an optimizer wrapper steps on).

    The entries sit where torch AdamW itself (and its ``load_state_dict``) puts them: moments beside the tensor, and
    the step count on the tensor's device for a fused or capturable optimizer (its kernels read it there; a CPU step
    fails on CUDA) but on the CPU otherwise. A tensor outside the parameter groups (ZeRO-3 adds its partitions only
    for the length of a step) follows the optimizer's defaults.
    """
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for p in tensors:
        state = optimizer.state[p]
        if not state:
            group = groups.get(id(p), optimizer.defaults)
            on_device = bool(group.get("fused")) or bool(group.get("capturable"))
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu")
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def torch_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                          aliases: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """The logical ``optim.<fqn>.<key>`` view of a torch AdamW's state (tensors shared, not copied), under each
    tensor's first name in the whole model (``aliases``: a pipeline stage may hold a tied copy under another)."""
    ensure_adamw_state(optimizer)
    aliases = aliases or {}
    names = {p: aliases.get(n, n) for p, n in param_names(model).items()}
    out: dict[str, torch.Tensor] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key in OPTIM_STATE_KEYS:
                out[f"optim.{names[p]}.{key}"] = optimizer.state[p][key]
    return out


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The ``model.<fqn>`` view of a model's parameters and buffers as this rank holds them (shared, not copied)."""
    return {f"model.{k}": v for k, v in model.state_dict(keep_vars=False).items()}


def balance_owners(sizes: Sequence[int], world_size: int) -> list[int]:
    """Assign item ``i`` (of ``sizes[i]`` bytes) to a rank so that every rank gets about the same number of bytes.

    Largest items first, each to the rank with the fewest bytes so far (ties: lowest rank). A pure function of the
    sizes, so every rank computes the same assignment without communicating.
    """
    load = [0] * world_size
    owners = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[i] = rank
        load[rank] += sizes[i]
    return owners


def budget_groups(sizes: Sequence[int], budget_bytes: int) -> list[list[int]]:
    """Consecutive item indices in groups of at most ``budget_bytes`` (an item larger than that forms its own group)."""
    groups: list[list[int]] = []
    used = 0
    for i, size in enumerate(sizes):
        if groups and used + size <= budget_bytes:
            groups[-1].append(i)
            used += size
        else:
            groups.append([i])
            used = size
    return groups


def tensor_parallel_view(t: torch.Tensor, shard: TPShard | None, topology: Topology) -> torch.Tensor:
    """``t`` (this rank's piece of a tensor-parallel shard, plain or an FSDP DTensor) as a DTensor of the full tensor.

    DCP then writes each rank's piece at its offset in the full tensor and reads back whatever box a layout needs, so
    checkpoints keep full shapes under plain names at any TP size. The view wraps ``t``'s own memory on whatever device
    ``t`` is (a CPU buffer under a CUDA mesh, an FSDP-offloaded shard), so loading fills ``t`` in place and saving
    writes it without a copy; ``DTensor.from_local`` would copy a tensor whose device differs from the mesh's, and the
    load would fill the copy. A replicated tensor (``shard`` None) is returned as it is.
    """
    if shard is None or topology.tp == 1:
        return t
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
    from torch.distributed.tensor.placement_types import _StridedShard

    full = torch.Size(shard.global_shape)
    stride = torch.empty(full, device="meta").stride()
    if not isinstance(t, DTensor):
        local, mesh, placements = t, topology.mesh_of("tp"), [Shard(shard.dim)]
    else:
        # FSDP splits the tensor-parallel shard along dim 0 over the data mesh; add the tensor axis after the data axes.
        placements = []
        for placement in t.placements:
            if isinstance(placement, Replicate) or placement.dim != shard.dim:
                placements.append(placement)
            else:  # both split dim 0: the data axis splits each tensor-parallel shard, not the whole tensor
                placements.append(_StridedShard(shard.dim, split_factor=shard.size))
        local, mesh = t.to_local(), topology.mesh_of(*t.device_mesh.mesh_dim_names, "tp")
        placements.append(Shard(shard.dim))
    spec = DTensorSpec(mesh, tuple(placements), tensor_meta=TensorMeta(full, stride, local.dtype))
    view = DTensor(local.detach(), spec, requires_grad=False)
    check_view_of(view, local)
    return view


def check_view_of(view: torch.Tensor, buffer: torch.Tensor) -> None:
    """Raise unless the DTensor ``view`` holds ``buffer``'s memory: a checkpoint read through a copy would leave the
    buffer as it was (uninitialized, for a load buffer) without any error."""
    local = view.to_local() if hasattr(view, "to_local") else view
    same = local.device == buffer.device and (
        buffer.numel() == 0 or local.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr())
    if not same:
        mesh = getattr(view, "device_mesh", None)
        raise RuntimeError(
            f"checkpoint view of a {tuple(buffer.shape)} {buffer.dtype} tensor on {buffer.device} is a copy on "
            f"{local.device} (mesh on {mesh.device_type if mesh is not None else 'none'}): reading would not fill it"
        )
