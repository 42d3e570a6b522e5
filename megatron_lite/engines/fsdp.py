"""PyTorch FSDP2 (``fully_shard``): parameters, gradients and AdamW state sharded as DTensors over the data mesh.

The model is sharded while still on the meta device and only then materialized, so each rank allocates and
initializes its own shards and never the whole model.

Each transformer block is its own FSDP unit, so only one block's full weights exist at a time; the root unit takes
the embedding, final norm and head. HSDP is the same call on a 2-D mesh (``dp_replicate x dp_shard``): shards inside
a replica group, all-reduce across groups. ``reshard_after_forward`` trades the memory of keeping gathered weights
for a second all-gather in backward.

Gradients are reduce-scattered on the last microbatch of a step only (``set_requires_gradient_sync``); earlier
microbatches accumulate locally. bf16 uses ``MixedPrecisionPolicy`` (bf16 compute, fp32 gradient reduction, fp32
master weights), so no autocast is needed. The gradient norm counts each DTensor shard once (``gradients.py``).

Checkpoints: the state dict of an FSDP2 module holds DTensor shards under the plain model's names, and the optimizer
state is keyed by the same DTensor parameters, so the logical view is a renaming; DCP writes each rank's shards in
parallel and reshards on load.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from megatron_lite.config import Config
from megatron_lite.engines.build import Built, ModelFactory
from megatron_lite.engines.torch_engine import TorchEngine
from megatron_lite.models.moe import is_expert_param
from megatron_lite.parallel.wrappers import blocks
from megatron_lite.topology import Topology, ensure_process_group
from megatron_lite.step.tasks import Task


def shard_model(model: nn.Module, mesh, cfg: Config, roots: list[nn.Module] | None = None,
                topology: Topology | None = None) -> nn.Module:
    """Apply ``fully_shard`` to each block of ``model.layers`` and then to each root: the model, or the pipeline
    stages that share its modules (on the meta device or not). With expert parallelism (``topology.ep > 1``) each
    routed expert is first its own unit over the ranks that hold it (``shard_experts``)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs: dict = {"mesh": mesh, "reshard_after_forward": cfg.parallel.reshard_after_forward}
    if cfg.training.precision == "bf16":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cfg.parallel.fsdp_cpu_offload:
        from torch.distributed.fsdp import CPUOffloadPolicy

        kwargs["offload_policy"] = CPUOffloadPolicy()
    if topology is not None and topology.ep > 1:
        shard_experts(model, topology, kwargs)
    for block in blocks(model):
        fully_shard(block, **kwargs)
    # The root keeps its gathered weights after forward: backward needs them first, so resharding would only add
    # an all-gather.
    for root in roots or [model]:
        fully_shard(root, **{**kwargs, "reshard_after_forward": False})
    return model


def shard_experts(model: nn.Module, topology: Topology, kwargs: dict) -> None:
    """Each routed expert of this rank its own FSDP unit over the expert-data mesh (the ranks holding the same
    experts), which averages its gradients there; ``FSDPEngine._reduce_expert_gradients`` divides them by ep
    afterwards (a custom divide factor would need NCCL's PreMulSum, which gloo lacks)."""
    from torch.distributed.fsdp import fully_shard

    mesh = topology.expert_data_mesh()
    for module in model.modules():
        if hasattr(module, "run_experts"):
            module.grouped_experts = False  # each expert's own forward gathers its weights; a stacked call would not
            for expert in module.experts.values():
                fully_shard(expert, **{**kwargs, "mesh": mesh})


class FSDPEngine(TorchEngine):
    """FSDP2 over ``topology.data_mesh()`` (1-D, or 2-D for HSDP) with a torch AdamW on the DTensor shards.

    Only sharding, gradient-sync skipping and mixed precision differ from the other PyTorch engines.
    """

    def __init__(self, cfg: Config, factory: ModelFactory, topology: Topology, task: Task) -> None:
        ensure_process_group(topology.device)
        super().__init__(cfg, factory, topology, task)

    def partition(self, model: nn.Module, roots: list[nn.Module]) -> None:
        self.roots = roots
        mesh = self.topology.data_mesh()
        if mesh is None:  # one process: a one-rank mesh, so the same code and checkpoints apply
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(self.topology.device.type, (1,), mesh_dim_names=("dp",))
        self.mesh = mesh
        shard_model(model, mesh, self.cfg, roots, self.topology)  # in place

    def materialize(self, model: nn.Module, rules: dict, seed: int, built: Built) -> None:
        """Fill this rank's shards, on ``materialize_device``."""
        from megatron_lite.engines.materialize import materialize

        materialize(model, rules, seed, self.materialize_device(), built.shards, built.aliases)

    def materialize_device(self) -> torch.device:
        """Where the shards are made: the CPU under ``parallel.fsdp_cpu_offload`` (``CPUOffloadPolicy`` keeps them there,
        copies each unit to the GPU for its all-gather, and refuses parameters materialized anywhere else), else this
        rank's device."""
        return torch.device("cpu") if self.cfg.parallel.fsdp_cpu_offload else self.topology.device

    def logical_state(self) -> dict[str, torch.Tensor]:
        """Reshard first: a root unit keeps its gathered weights after a forward that no backward followed (an
        evaluation), and until resharded its parameters are the gathered ones, not the shards the optimizer holds."""
        from torch.distributed.fsdp import FSDPModule

        for root in self.roots:
            if isinstance(root, FSDPModule):
                root.reshard()
        return super().logical_state()

    @torch.no_grad()
    def _reduce_expert_gradients(self) -> None:
        """An expert's gradient already holds the contributions of its whole ep group's tokens (they came to it by
        all-to-all), so its average over the (dp / ep) x cp ranks holding it is ep times that of a dense weight's
        average over the whole data axis."""
        if self.topology.ep == 1:
            return
        for name, p in self.model.named_parameters():
            if p.grad is not None and is_expert_param(name):
                p.grad.div_(self.topology.ep)

    def _offload(self) -> list[str]:
        return ["optimizer", "params"] if self.cfg.parallel.fsdp_cpu_offload else []

    @contextlib.contextmanager
    def _sync_gradients(self, last: bool) -> Iterator[None]:
        self.module.set_requires_gradient_sync(last)  # type: ignore[operator]
        try:
            yield
        finally:
            self.module.set_requires_gradient_sync(True)  # type: ignore[operator]

    def _autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # MixedPrecisionPolicy casts parameters; no autocast on top
