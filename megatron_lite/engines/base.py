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

Engines average gradients over the data-parallel ranks (DDP, FSDP and DeepSpeed all reduce with a mean), and with
context parallelism over the cp ranks too (each holding part of every sample's tokens), so a microbatch's backward
runs on ``loss_sum * dp * cp / total_tokens``.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from megatron_lite.config import Config
from megatron_lite.engines.build import Built
from megatron_lite.engines.mixture import MixtureStep
from megatron_lite.parallel.context import split_sequence
from megatron_lite.topology import Topology
from megatron_lite.step.tasks import Microbatch, Task

if TYPE_CHECKING:
    from megatron_lite.parallel.pipeline import PipelineRunner


@dataclass(frozen=True)
class GradientPiece:
    """One rank's piece of a parameter's gradient: the box ``[offset, offset + grad.shape)`` of the full gradient of
    the tensor first named ``name`` (of ``full_shape``), as fp32 on the CPU. A rank holding the whole tensor (or a
    replicated copy of it) reports the whole box."""

    name: str
    full_shape: tuple[int, ...]
    offset: tuple[int, ...]
    grad: torch.Tensor


@dataclass
class StepMetrics:
    loss: float  # summed token loss of the global batch / its valid tokens
    grad_norm: float  # global L2 norm of the gradients before clipping
    lr: float
    skipped: bool = False  # the optimizer step was skipped (fp16 overflow)
    tokens: int = 0  # valid tokens in the global batch
    extra: dict[str, Any] = field(default_factory=dict)  # mixture models: auxiliary losses and expert load


class Engine(ABC):
    """Build the model and optimizer for one layout; run the shared step; save and load logical checkpoints."""

    cfg: Config
    topology: Topology
    task: Task
    model: nn.Module  # the plain (unwrapped) model, possibly holding only this rank's shards or pipeline stages
    module: nn.Module  # what the forward calls: the model or its wrapper (DDP, DeepSpeed)
    pipeline: "PipelineRunner | None" = None  # with parallel.pp > 1: the schedule that runs the microbatches
    # Called once per step when the gradients are final (reduced over the data axis, tied copies summed) and not yet
    # clipped or applied: the parity harness reads them there through ``gradient_pieces``. None while training.
    on_gradients: Callable[[], None] | None = None

    # ------------------------------------------------------------------------------------------------------------------
    # The engine's steps of the one build sequence (``build.py``)
    # ------------------------------------------------------------------------------------------------------------------

    def partition(self, model: nn.Module, roots: list[nn.Module]) -> None:
        """Shard or partition ``model`` while it is still on the meta device (FSDP2, ZeRO-3); ``roots`` are the
        modules that run forwards (the model, or its pipeline stages). Default: nothing, every rank holds it all."""

    def materialize(self, model: nn.Module, rules: dict, seed: int, built: Built) -> None:
        """Give ``model`` this rank's initial values, by tensor name and seed. Default: allocate what the rank holds
        on its device and fill it (``materialize.py``)."""
        from megatron_lite.engines.materialize import materialize

        materialize(model, rules, seed, self.topology.device, built.shards, built.aliases)

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

    def _reduce_pipeline_gradients(self) -> None:
        """After a pipeline schedule: average the gradients over the data-parallel ranks, for engines whose wrapper
        cannot follow a schedule's forwards and backwards (DDP); FSDP reduces inside the schedule."""

    def _reduce_expert_gradients(self) -> None:
        """After the step's backwards, with expert parallelism: reduce the routed experts' gradients over the ranks
        holding the same experts, for engines whose wrapper leaves them out (DDP); FSDP shards them over those
        ranks and reduces them itself."""

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
    # What a rank holds: for the parity harness and the dry run
    # ------------------------------------------------------------------------------------------------------------------

    @abstractmethod
    def gradient_pieces(self) -> list[GradientPiece]:
        """This rank's gradient of every parameter it holds, under the tensor's first name, as the box of the full
        gradient that it is; only valid inside ``on_gradients``. Under ZeRO assembling a gradient is a collective:
        every rank calls this."""

    @abstractmethod
    def reset_optimizer_state(self) -> None:
        """Forget the optimizer's state (moments and step counts), as before the first step."""

    def holdings(self) -> dict[str, Any]:
        """What this rank built, as JSON: the engine, the wrapper the forward calls, the axis sizes, its pipeline
        stages, and for every parameter its full and held element counts (``params``: name -> [full, held]), and the
        elements the optimizer steps here (``optimizer_numel``)."""
        topo = self.topology
        return {
            "engine": type(self).__name__,
            "module": type(self.module).__name__,
            "world": topo.world_size, "dp": topo.dp, "tp": topo.tp, "pp": topo.pp, "dp_replicate": topo.dp_replicate,
            "cp": topo.cp, "ep": topo.ep,
            "coords": {"pp": topo.pp_rank, "dp": topo.dp_rank, "cp": topo.cp_rank, "tp": topo.tp_rank},
            "sequence_parallel": any(getattr(m, "sequence_parallel", False) for m in self.model.modules()),
            "stages": list(self.pipeline.parts.indices) if self.pipeline is not None else [0],
            "num_stages": self.pipeline.parts.num_stages if self.pipeline is not None else 1,
            "params": {name: [full, held] for name, full, held in self._held_params()},
            "optimizer_numel": self._optimizer_numel(),
            "offload": self._offload(),
        }

    def _offload(self) -> list[str]:
        """What this engine keeps in host memory instead of the device (``optimizer``, ``params``)."""
        return []

    @abstractmethod
    def _held_params(self) -> list[tuple[str, int, int]]:
        """(first name, elements of the full tensor, elements this rank holds) of every parameter on this rank."""

    @abstractmethod
    def _optimizer_numel(self) -> int:
        """Elements of the tensors this rank's optimizer steps (its state holds two moments of each)."""

    # ------------------------------------------------------------------------------------------------------------------
    # The shared step
    # ------------------------------------------------------------------------------------------------------------------

    def _local(self, microbatch: Microbatch) -> Microbatch:
        """This rank's part of a microbatch: its context-parallel chunks of each sequence (all of it without cp)."""
        return split_sequence(microbatch, self.topology.cp, self.topology.cp_rank)

    def to_device(self, microbatch: Microbatch) -> Microbatch:
        dev = self.topology.device
        return {k: v.to(dev, non_blocking=True) for k, v in microbatch.items()}

    def _sum_over(self, axes: tuple[str, ...], *values: torch.Tensor) -> list[float]:
        """Sum scalars over the ranks along ``axes`` ("dp": data-parallel ranks; "cp": the context-parallel ranks
        holding parts of the same samples; "pp": pipeline stages, of which only the last computes losses), in
        float64."""
        stacked = torch.stack([v.detach().to(self.topology.device, torch.float64).reshape(()) for v in values])
        if self.topology.is_distributed:
            for axis in axes:
                if getattr(self.topology, axis) > 1:
                    dist.all_reduce(stacked, group=self.topology.group(axis))
        return stacked.tolist()

    def _forward_backward(self, batches: list[Microbatch], targets: list[torch.Tensor], scale: float) -> torch.Tensor:
        """Forward and backward of every microbatch, each loss scaled by ``scale``; their summed token loss."""
        if self.pipeline is not None:  # the schedule interleaves the stages' microbatches
            with self._autocast():
                loss_sum = self.pipeline.run([self.task.inputs(mb) for mb in batches], targets, scale, train=True)
            self.pipeline.sum_tied_gradients(self.model)  # before DeepSpeed moves gradients into its partitions
            self._reduce_pipeline_gradients()
            return loss_sum
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.topology.device)
        for i, (mb, target) in enumerate(zip(batches, targets)):
            last = i == len(batches) - 1
            with self._sync_gradients(last):
                with self._autocast():
                    total, _ = self.task.loss(self._forward(self.task.inputs(mb)), target, training=True)
                self._backward(total * scale, last)
            loss_sum += total.detach()
        return loss_sum

    def train_step(self, microbatches: list[Microbatch], lr: float) -> StepMetrics:
        """One optimizer step over this rank's share of the global batch."""
        self._begin_step(lr, len(microbatches))
        batches = [self.to_device(self._local(mb)) for mb in microbatches]
        targets = [self.task.target(mb) for mb in batches]
        (tokens,) = self._sum_over(("dp", "cp"), sum(self.task.num_tokens(t) for t in targets))
        scale = self.topology.data_size / max(tokens, 1.0)
        mixture = self._mixture()
        mixture.begin(scale)
        loss_sum = self._forward_backward(batches, targets, scale)
        self._reduce_expert_gradients()
        if self.on_gradients is not None:
            self.on_gradients()
        grad_norm, skipped = self._finish_step(self.cfg.training.grad_clip)
        (loss_sum_global,) = self._sum_over(("dp", "cp", "pp"), loss_sum)
        loss = loss_sum_global / max(tokens, 1.0)
        extra = mixture.finish() if mixture.enabled else {}
        return StepMetrics(loss=loss, grad_norm=grad_norm, lr=lr, skipped=skipped, tokens=int(tokens), extra=extra)

    def _mixture(self) -> MixtureStep:
        """The mixture layers this rank holds (made once)."""
        if getattr(self, "_mixture_step", None) is None:
            self._mixture_step = MixtureStep(self.model, self.cfg.model.moe, self.cfg.model.num_layers, self.topology)
        return self._mixture_step

    @torch.no_grad()
    def eval_loss(self, microbatches: list[Microbatch]) -> float:
        """Summed token loss over the microbatches of all data-parallel ranks / their valid tokens, without gradients."""
        self.module.eval()
        try:
            batches = [self.to_device(self._local(mb)) for mb in microbatches]
            targets = [self.task.target(mb) for mb in batches]
            tokens = sum(self.task.num_tokens(t) for t in targets)
            if self.pipeline is not None:
                with self._autocast():
                    loss_sum = self.pipeline.run([self.task.inputs(mb) for mb in batches], targets, 1.0, train=False)
            else:
                loss_sum = torch.zeros((), dtype=torch.float64, device=self.topology.device)
                for mb, target in zip(batches, targets):
                    with self._autocast():
                        loss_sum += self.task.loss(self._forward(self.task.inputs(mb)), target, False)[0]
        finally:
            self.module.train()
        (loss_sum_global,) = self._sum_over(("dp", "cp", "pp"), loss_sum)
        (tokens_global,) = self._sum_over(("dp", "cp"), tokens)
        return loss_sum_global / max(tokens_global, 1.0)
