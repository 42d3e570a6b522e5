"""PyTorch DistributedDataParallel: the full model and optimizer on every rank, gradients all-reduced once per step.

Everything but the wrapping is the single-device engine: the gradient all-reduce is skipped (``no_sync``) on all but
the last microbatch, so a step costs one all-reduce however many microbatches it accumulates. DDP averages the
gradients over the data-parallel group, which with the per-rank mean over microbatches gives the mean over the global
batch, the same as one process.

Checkpoints: every rank holds identical full tensors; DCP writes each one once, spreading the files over the ranks.
"""

from __future__ import annotations

import contextlib

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from megatron_lite.engines.single import SingleEngine
from megatron_lite.topology import ensure_process_group


class DDPEngine(SingleEngine):
    """SingleEngine with the module wrapped in DDP over the data-parallel group."""

    def wrap(self, model: nn.Module) -> nn.Module:
        ensure_process_group(self.topology.device)
        device_ids = [self.topology.device.index] if self.topology.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, process_group=self.topology.group("dp"))

    def no_sync(self, is_last_microbatch: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if is_last_microbatch else self.module.no_sync()
