"""PyTorch DistributedDataParallel: the full model and optimizer on every rank, gradients all-reduced once per step.

The gradient all-reduce is skipped (``no_sync``) on all but the last microbatch, so a step costs one all-reduce however
many microbatches it accumulates. DDP averages the gradients over the data-parallel group, which the shared step's
scaling (``dp / global tokens``) turns into the gradient of the global token mean, the same as one process.

Checkpoints: every rank holds identical full tensors; DCP writes each one once, spreading the files over the ranks.
"""

from __future__ import annotations

import contextlib

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from megatron_lite.engines.torch_engine import TorchEngine
from megatron_lite.topology import ensure_process_group


class DDPEngine(TorchEngine):
    """The module wrapped in DDP over the data-parallel group."""

    def wrap(self, model: nn.Module) -> nn.Module:
        ensure_process_group(self.topology.device)
        device_ids = [self.topology.device.index] if self.topology.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, process_group=self.topology.group("dp"))

    def _sync_gradients(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last else self.module.no_sync()
