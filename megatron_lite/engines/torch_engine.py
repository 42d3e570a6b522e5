"""What the PyTorch engines (single, DDP, FSDP2) share: building from meta, torch AdamW, autocast, the GradScaler.

The model is built by the one build sequence (``build.py``: meta, tensor parallelism, checkpointing, compile,
pipeline split, the engine's ``partition`` (FSDP) and materialization of local shards by name) and wrapped where the
engine wraps (``wrap``: DDP). The end of a step unscales fp16 gradients, takes the global
gradient norm (``gradients.py``: every parameter once, replicated or sharded), clips, and steps AdamW through the
scaler when there is one.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megatron_lite.config import Config
from megatron_lite.engines.base import Engine, GradientPiece
from megatron_lite.engines.build import ModelFactory
from megatron_lite.engines.gradients import clip_gradients, global_grad_norm
from megatron_lite.engines.logical import model_state, tensor_parallel_view, torch_optimizer_state
from megatron_lite.step.checkpoint_format import param_name_of, read_logical, write_logical
from megatron_lite.engines.build import build_model
from megatron_lite.engines.materialize import local_box
from megatron_lite.parallel.pipeline import HALF_DTYPES, PipelineRunner
from megatron_lite.topology import Topology
from megatron_lite.step.optim import build_adamw
from megatron_lite.step.tasks import Task


class TorchEngine(Engine):
    """fp32 master weights, optional bf16/fp16 autocast (fp16 with dynamic loss scaling), torch AdamW."""

    def __init__(self, cfg: Config, factory: ModelFactory, topology: Topology, task: Task) -> None:
        self.cfg = cfg
        self.topology = topology
        self.task = task
        built = build_model(factory, cfg, topology, self)
        self.model, self.shards, self.aliases = built.model, built.shards, built.aliases
        parts = built.parts
        wrapped = built.roots if parts and not self.wraps_pipeline_stages else [self.wrap(r) for r in built.roots]
        self.module = self.model if parts else wrapped[0]
        if parts:
            self.pipeline = PipelineRunner(wrapped, parts, cfg, topology, lambda out, tgt, train: task.loss(
                out, tgt, train)[0])
        self.copies = parts.copies if parts else {}
        self.optimizer = build_adamw(self.model, cfg.optimizer, topology.device, built.no_decay)
        precision = cfg.training.precision
        self.autocast_dtype = HALF_DTYPES.get(precision)
        self.scaler = torch.amp.GradScaler(topology.device.type) if precision == "fp16" else None

    wraps_pipeline_stages = True  # False: the engine's wrapper is not applied to pipeline stages

    def wrap(self, model: nn.Module) -> nn.Module:
        """Hook for engines that wrap the materialized module (DDP)."""
        return model

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.topology.device.type, dtype=self.autocast_dtype)

    def _begin_step(self, lr: float, num_microbatches: int) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _finish_step(self, max_norm: float) -> tuple[float, bool]:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
            self._agree_on_overflow()
        named = list(self.model.named_parameters())
        grad_norm = float(global_grad_norm(named, self.topology, self.shards, self.copies))
        if self.scaler is None and not math.isfinite(grad_norm):
            # a NaN or inf gradient on any rank: the norm is global, so every rank skips this step alike
            self.optimizer.zero_grad(set_to_none=True)
            return grad_norm, True
        clip_gradients([p for _, p in named], max_norm, grad_norm)
        if self.scaler is None:
            self.optimizer.step()
            return grad_norm, False
        scale_before = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return grad_norm, self.scaler.get_scale() < scale_before

    @torch.no_grad()
    def _agree_on_overflow(self) -> None:
        """After unscaling: every rank's GradScaler sees the overflow (inf/NaN gradient) that any rank found.

        A rank's scaler checks only the gradients it holds; under tensor parallelism those are different pieces of the
        model, so one rank would skip the step and halve its scale while the others step, and the replicated weights
        would part. One MAX all-reduce over all ranks (DDP replicas agree anyway) makes them skip and back off together.
        """
        if not self.topology.is_distributed:
            return
        per_optimizer = getattr(self.scaler, "_per_optimizer_states", None)
        if per_optimizer is None or "found_inf_per_device" not in per_optimizer.get(id(self.optimizer), {}):
            raise RuntimeError(f"torch {torch.__version__}: GradScaler no longer keeps found_inf_per_device after "
                               "unscale_; fp16 ranks cannot agree on overflow")
        found = per_optimizer[id(self.optimizer)]["found_inf_per_device"]
        flag = torch.zeros((), dtype=torch.float32, device=self.topology.device)
        for value in found.values():
            flag = torch.maximum(flag, value.to(flag.device, torch.float32).reshape(()))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        for value in found.values():
            value.copy_(flag.to(value.device).reshape(value.shape))

    def extra_state(self) -> dict[str, Any]:
        """The GradScaler's scale and growth tracker (fp16): without them a resumed run restarts at 2**16 and skips
        steps until it has backed off again. The same on every rank: the ranks agree on every overflow."""
        if self.scaler is None:
            return {}
        state = self.scaler.state_dict()
        return {"loss_scale": float(state["scale"]), "grad_scaler": state}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if self.scaler is None:
            return
        if "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])
        elif "loss_scale" in state:  # saved by another engine: carry the scale over, restart the growth count
            carried = {**self.scaler.state_dict(), "scale": state["loss_scale"], "_growth_tracker": 0}
            self.scaler.load_state_dict(carried)

    def _boxes(self) -> list[tuple[str, nn.Parameter, tuple, tuple, tuple]]:
        """(first name, parameter, full shape, offset, local shape) of every parameter on this rank: where its local
        tensor (an FSDP shard within a tensor-parallel shard, or the whole tensor) sits in the full one."""
        return [(self.aliases.get(name, name), p, *local_box(name, p, self.shards))
                for name, p in self.model.named_parameters()]

    @torch.no_grad()
    def gradient_pieces(self) -> list[GradientPiece]:
        """Each parameter's local gradient with its box in the full tensor; fp16 gradients unscaled. A parameter no
        microbatch reached has a zero gradient."""
        unscale = 1.0 / self.scaler.get_scale() if self.scaler is not None else 1.0
        pieces = []
        for name, p, full, offset, shape in self._boxes():
            grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            grad = torch.zeros(shape) if grad is None else grad.detach().to("cpu", torch.float32) * unscale
            pieces.append(GradientPiece(name, tuple(full), tuple(offset), grad.reshape(shape)))
        return pieces

    def reset_optimizer_state(self) -> None:
        self.optimizer.state.clear()  # torch AdamW creates it again, zero, at its next step

    def _held_params(self) -> list[tuple[str, int, int]]:
        return [(name, math.prod(full), math.prod(shape)) for name, _, full, _, shape in self._boxes()]

    def _optimizer_numel(self) -> int:
        return sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                   for group in self.optimizer.param_groups for p in group["params"])

    def logical_state(self) -> dict[str, torch.Tensor]:
        """Model and AdamW tensors under their logical names, tensor-parallel shards viewed as parts of full tensors."""
        state = {**model_state(self.model), **torch_optimizer_state(self.model, self.optimizer, self.aliases)}
        return {key: tensor_parallel_view(t, self.shards.get(param_name_of(key)), self.topology) for key, t in state.items()}

    def save(self, path: Path) -> None:
        write_logical(self.logical_state(), path)

    def load(self, path: Path) -> None:
        read_logical(self.logical_state(), path)
