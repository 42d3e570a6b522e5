"""PyTorch FSDP2 (``fully_shard``): parameters, gradients and AdamW state sharded as DTensors over the data mesh.

Each transformer block is its own FSDP unit, so only one block's full weights exist at a time; the root unit takes
the embedding, final norm and head. HSDP is the same call on a 2-D mesh (``dp_replicate x dp_shard``): shards inside
a replica group, all-reduce across groups. ``reshard_after_forward`` trades the memory of keeping gathered weights
for a second all-gather in backward.

Gradients are reduce-scattered on the last microbatch of a step only (``set_requires_gradient_sync``); earlier
microbatches accumulate locally. bf16 uses ``MixedPrecisionPolicy`` (bf16 compute, fp32 gradient reduction, fp32
master weights), so no autocast is needed. Clipping runs ``clip_grad_norm_`` on the DTensor gradients, which
computes the global norm across shards.

Checkpoints: the state dict of an FSDP2 module holds DTensor shards under the plain model's names, and the optimizer
state is keyed by the same DTensor parameters, so the logical view is a renaming; DCP writes each rank's shards in
parallel and reshards on load.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from megatron_lite.config import Config, ConfigError
from megatron_lite.engines.base import (
    Engine,
    ForwardLoss,
    Microbatch,
    StepMetrics,
    all_reduce_mean,
    model_state,
    read_logical,
    torch_optimizer_state,
    write_logical,
)
from megatron_lite.topology import Topology, ensure_process_group
from megatron_lite.training.optim import build_adamw


def check_fsdp_config(cfg: Config, device: torch.device) -> None:
    """Refuse settings FSDP2 cannot honour here, with the reason."""
    if cfg.training.precision == "fp16":
        raise ConfigError(
            "training.precision=fp16 is not supported by parallel.engine=fsdp (FSDP2 has no sharded loss scaler); "
            "use bf16, or fp16 with the ddp or deepspeed engine"
        )
    if cfg.parallel.fsdp_cpu_offload:
        from torch.distributed import fsdp

        if not hasattr(fsdp, "CPUOffloadPolicy"):
            raise ConfigError(
                f"parallel.fsdp_cpu_offload needs torch >= 2.6 (CPUOffloadPolicy); found {torch.__version__}"
            )
        if device.type != "cuda":
            raise ConfigError(
                "parallel.fsdp_cpu_offload offloads parameters from GPU to CPU memory; it is not supported when "
                f"training on {device.type} (parameters already live in host memory)"
            )


def shard_model(model: nn.Module, mesh, cfg: Config) -> nn.Module:
    """Apply ``fully_shard`` to each block of ``model.layers`` and then to the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs: dict = {"mesh": mesh, "reshard_after_forward": cfg.parallel.reshard_after_forward}
    if cfg.training.precision == "bf16":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cfg.parallel.fsdp_cpu_offload:
        from torch.distributed.fsdp import CPUOffloadPolicy

        kwargs["offload_policy"] = CPUOffloadPolicy()
    blocks = getattr(model, "layers", None)
    if blocks is None:
        raise ConfigError(f"the fsdp engine wraps each block of model.layers, but {type(model).__name__} has none")
    for block in blocks:
        fully_shard(block, **kwargs)
    # The root keeps its gathered weights after forward: backward needs them first, so resharding would only add
    # an all-gather.
    fully_shard(model, **{**kwargs, "reshard_after_forward": False})
    return model


class FSDPEngine(Engine):
    """FSDP2 over ``topology.data_mesh()`` (1-D, or 2-D for HSDP) with a torch AdamW on the DTensor shards."""

    def __init__(self, cfg: Config, model: nn.Module, topology: Topology, forward_loss: ForwardLoss) -> None:
        check_fsdp_config(cfg, topology.device)
        self.cfg = cfg
        self.topology = topology
        self.forward_loss = forward_loss
        ensure_process_group(topology.device)
        mesh = topology.data_mesh()
        if mesh is None:  # one process: a one-rank mesh, so the same code and checkpoints apply
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(topology.device.type, (1,), mesh_dim_names=("dp",))
        self.mesh = mesh
        self.model = shard_model(model.to(topology.device), mesh, cfg)
        self.optimizer = build_adamw(self.model, cfg.optimizer, topology.device)

    def _set_sync(self, enabled: bool) -> None:
        self.model.set_requires_gradient_sync(enabled)  # type: ignore[operator]

    def train_step(self, microbatches: list[Microbatch], lr: float) -> StepMetrics:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.topology.device)
        n = len(microbatches)
        try:
            for i, mb in enumerate(microbatches):
                self._set_sync(i == n - 1)
                loss = self.forward_loss(self.model, self.to_device(mb))
                (loss / n).backward()
                total += loss.detach().float()
        finally:
            self._set_sync(True)
        clip = self.cfg.training.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else math.inf)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        self.optimizer.step()
        loss = all_reduce_mean(total.item() / n, self.topology, self.topology.device)
        return StepMetrics(loss=loss, grad_norm=grad_norm, lr=lr)

    @torch.no_grad()
    def eval_loss(self, microbatches: list[Microbatch]) -> float:
        self.model.eval()
        try:
            total = sum(self.forward_loss(self.model, self.to_device(mb)).float().item() for mb in microbatches)
        finally:
            self.model.train()
        return all_reduce_mean(total / max(len(microbatches), 1), self.topology, self.topology.device)

    def logical_state(self) -> dict[str, torch.Tensor]:
        """DTensor shards under logical names (shared with the live model and optimizer, not copied)."""
        return {**model_state(self.model), **torch_optimizer_state(self.model, self.optimizer)}

    def save(self, path: Path) -> None:
        write_logical(self.logical_state(), path)

    def load(self, path: Path) -> None:
        read_logical(self.logical_state(), path)
