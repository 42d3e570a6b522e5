"""The one engine interface the trainer talks to, and the one training step every engine runs.

An engine builds and owns the model (only the part of it this rank holds) and its optimizer. The trainer hands it
this rank's microbatches for one optimizer step and gets back metrics; it never asks which kind of engine it holds.

The step itself lives here, once (``Engine.train_step`` and ``Engine.eval_loss``):

- The loss of a step is the summed token loss of the whole global batch divided by its number of valid tokens, over
  all microbatches and data-parallel ranks. The valid tokens are counted from the targets before any forward, with
  one all-reduce, so every microbatch's backward is already scaled right: the gradients are those of that global
  token mean under every engine, however unevenly padding spreads the tokens. (For packed data every microbatch has
  the same count, and this equals the mean of the microbatch means.)
- Engines keep only what differs between them: building and wrapping the model, the forward and backward of one
  microbatch, skipping gradient synchronization between microbatches, and the end of the step (clipping with the
  norm of their own gradients, the optimizer step, the fp16 scaler).

Engines average gradients over the data-parallel ranks (DDP, FSDP and DeepSpeed all reduce with a mean), so a
microbatch's backward runs on ``loss_sum * dp / total_tokens``.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from megatron_lite.config import Config
from megatron_lite.topology import Topology
from megatron_lite.training.tasks import Microbatch, Task


@dataclass
class StepMetrics:
    loss: float  # summed token loss of the global batch / its valid tokens
    grad_norm: float  # global L2 norm of the gradients before clipping
    lr: float
    skipped: bool = False  # the optimizer step was skipped (fp16 overflow)
    tokens: int = 0  # valid tokens in the global batch


def _identity(model: nn.Module) -> nn.Module:
    return model


@dataclass
class ModelFactory:
    """How an engine builds its model, shard by shard.

    ``construct`` creates the plain model with its parameters on whatever device is current; engines call it under
    ``torch.device("meta")`` and then materialize only what the rank holds (``materialize.py``). Initial values come
    from the model's ``init_rules`` and ``seed``, by name, so they do not depend on the layout. ``prepare`` applies what goes between the plain model and the engine's
    own wrapping, in order: tensor parallelism, activation checkpointing, compilation.
    """

    construct: Callable[[], nn.Module]
    seed: int
    prepare: Callable[[nn.Module], nn.Module] = field(default=_identity)


class Engine(ABC):
    """Build the model and optimizer for one layout; run the shared step; save and load logical checkpoints."""

    cfg: Config
    topology: Topology
    task: Task
    model: nn.Module  # the plain (unwrapped) model, possibly holding only this rank's shards
    module: nn.Module  # what the forward calls: the model or its wrapper (DDP, DeepSpeed)

    # ------------------------------------------------------------------------------------------------------------------
    # What differs between engines
    # ------------------------------------------------------------------------------------------------------------------

    @abstractmethod
    def _begin_step(self, lr: float, num_microbatches: int) -> None:
        """Set the learning rate and clear the gradients before ``num_microbatches`` forward/backward passes."""

    def _forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.module(**inputs)

    @abstractmethod
    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        """Backward of one microbatch's (already normalized) loss; ``last`` is the step's final microbatch."""

    def _sync_gradients(self, last: bool) -> contextlib.AbstractContextManager:
        """Around a microbatch: skip the gradient reduction unless it is the last one."""
        return contextlib.nullcontext()

    def _autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @abstractmethod
    def _finish_step(self, max_norm: float) -> tuple[float, bool]:
        """Clip to ``max_norm`` (0: no clipping) and step the optimizer; return (norm before clipping, skipped)."""

    @abstractmethod
    def save(self, path: Path) -> None:
        """Write the logical model and optimizer tensors under ``path`` (all ranks call this)."""

    @abstractmethod
    def load(self, path: Path) -> None:
        """Read logical tensors written by any engine and any layout (all ranks call this)."""

    def extra_state(self) -> dict[str, Any]:
        """JSON-safe state beside the tensors (e.g. the fp16 loss scale), identical on every rank; rank 0 writes it.

        Kept in meta.json, not as tensors: it is a handful of numbers that no other layout needs to reshard.
        """
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what ``extra_state`` returned; keys this engine does not use (another precision) are ignored."""

    # ------------------------------------------------------------------------------------------------------------------
    # The shared step
    # ------------------------------------------------------------------------------------------------------------------

    def to_device(self, microbatch: Microbatch) -> Microbatch:
        dev = self.topology.device
        return {k: v.to(dev, non_blocking=True) for k, v in microbatch.items()}

    def _sum_over_dp(self, *values: torch.Tensor) -> list[float]:
        """Sum scalars over the data-parallel ranks, in float64 and in one all-reduce."""
        stacked = torch.stack([v.detach().to(self.topology.device, torch.float64).reshape(()) for v in values])
        if self.topology.is_distributed:
            dist.all_reduce(stacked, group=self.topology.group("dp"))
        return stacked.tolist()

    def train_step(self, microbatches: list[Microbatch], lr: float) -> StepMetrics:
        """One optimizer step over this rank's share of the global batch."""
        self._begin_step(lr, len(microbatches))
        batches = [self.to_device(mb) for mb in microbatches]
        targets = [self.task.target(mb) for mb in batches]
        (tokens,) = self._sum_over_dp(sum(self.task.num_tokens(t) for t in targets))
        scale = self.topology.dp / max(tokens, 1.0)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.topology.device)
        for i, (mb, target) in enumerate(zip(batches, targets)):
            last = i == len(batches) - 1
            with self._sync_gradients(last):
                with self._autocast():
                    total, _ = self.task.loss(self._forward(self.task.inputs(mb)), target, training=True)
                self._backward(total * scale, last)
            loss_sum += total.detach()
        grad_norm, skipped = self._finish_step(self.cfg.training.grad_clip)
        (loss_sum_global,) = self._sum_over_dp(loss_sum)
        loss = loss_sum_global / max(tokens, 1.0)
        return StepMetrics(loss=loss, grad_norm=grad_norm, lr=lr, skipped=skipped, tokens=int(tokens))

    @torch.no_grad()
    def eval_loss(self, microbatches: list[Microbatch]) -> float:
        """Summed token loss over the microbatches of all data-parallel ranks / their valid tokens, without gradients."""
        self.module.eval()
        try:
            loss_sum = torch.zeros((), dtype=torch.float64, device=self.topology.device)
            tokens = torch.zeros((), dtype=torch.float64, device=self.topology.device)
            for mb in microbatches:
                mb = self.to_device(mb)
                with self._autocast():
                    total, count = self.task.loss(self._forward(self.task.inputs(mb)), self.task.target(mb), False)
                loss_sum += total
                tokens += count
        finally:
            self.module.train()
        loss_sum_global, tokens_global = self._sum_over_dp(loss_sum, tokens)
        return loss_sum_global / max(tokens_global, 1.0)
