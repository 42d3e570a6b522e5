"""PyTorch DistributedDataParallel: the full model and optimizer on every rank, gradients all-reduced once per step.

The gradient all-reduce is skipped (``no_sync``) on all but the last microbatch, so a step costs one all-reduce however
many microbatches it accumulates. DDP averages the gradients over the data-parallel group, which the shared step's
scaling (``dp / global tokens``) turns into the gradient of the global token mean, the same as one process.

Under pipeline parallelism the stages are not wrapped: a schedule runs several forwards before their backwards (GPipe),
which DDP's reducer cannot follow, so the gradients are averaged over the data-parallel group after the schedule, in
buckets of ``BUCKET_BYTES``, one all-reduce each.

With expert parallelism the routed experts' weights differ between the ranks of an ep group, so DDP leaves them out
and their gradients are summed over the ranks that hold the same experts (the expert-data group) after the backward,
divided by the whole data axis: each expert's gradient already holds the contributions of its whole ep group's tokens.

Checkpoints: every rank holds identical full tensors; DCP writes each one once, spreading the files over the ranks.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from megatron_lite.engines.torch_engine import TorchEngine
from megatron_lite.models.moe import is_expert_param
from megatron_lite.topology import ensure_process_group


BUCKET_BYTES = 25 * 2**20


class DDPEngine(TorchEngine):
    """The module wrapped in DDP over the data-parallel group."""

    wraps_pipeline_stages = False

    def wrap(self, model: nn.Module) -> nn.Module:
        ensure_process_group(self.topology.device)
        if self.topology.data_size == 1:  # nothing to synchronize (e.g. tensor or pipeline parallelism alone)
            return model
        device_ids = [self.topology.device.index] if self.topology.device.type == "cuda" else None
        if self.topology.ep > 1:
            experts = [name for name, _ in model.named_parameters() if is_expert_param(name)]
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, experts)
        return DistributedDataParallel(model, device_ids=device_ids, process_group=self.topology.data_group())

    def _sync_gradients(self, last: bool) -> contextlib.AbstractContextManager:
        if last or not isinstance(self.module, DistributedDataParallel):
            return contextlib.nullcontext()
        return self.module.no_sync()

    @torch.no_grad()
    def _reduce_pipeline_gradients(self) -> None:
        if self.topology.data_size == 1:
            return
        ep = self.topology.ep > 1
        grads = [p.grad for name, p in self.model.named_parameters()
                 if p.grad is not None and not (ep and is_expert_param(name))]
        all_reduce_mean(grads, self.topology.data_group(), self.topology.data_size)

    @torch.no_grad()
    def _reduce_expert_gradients(self) -> None:
        if self.topology.ep == 1:
            return
        grads = [p.grad for name, p in self.model.named_parameters() if p.grad is not None and is_expert_param(name)]
        all_reduce_mean(grads, self.topology.expert_data_group(), self.topology.data_size)


def all_reduce_mean(grads: list[torch.Tensor], group, divisor: int) -> None:
    """Sum ``grads`` over ``group`` and divide by ``divisor``, in place, in buckets of ``BUCKET_BYTES`` (one
    all-reduce each)."""
    bucket: list[torch.Tensor] = []
    for i, grad in enumerate(grads):
        bucket.append(grad)
        if sum(g.numel() * g.element_size() for g in bucket) >= BUCKET_BYTES or i == len(grads) - 1:
            flat = torch.cat([g.reshape(-1) for g in bucket])
            if dist.get_world_size(group) > 1:
                dist.all_reduce(flat, group=group)
            flat /= divisor
            offset = 0
            for g in bucket:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
            bucket = []
