"""One process on one device: the reference every parallel layout is compared against.

Also the base of the DDP engine, which only wraps the module and skips gradient syncs between microbatches.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megatron_lite.config import Config
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
from megatron_lite.topology import Topology
from megatron_lite.training.optim import build_adamw

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class SingleEngine(Engine):
    """fp32 master weights, optional bf16/fp16 autocast (fp16 with dynamic loss scaling), torch AdamW."""

    def __init__(self, cfg: Config, model: nn.Module, topology: Topology, forward_loss: ForwardLoss) -> None:
        self.cfg = cfg
        self.topology = topology
        self.model = model.to(topology.device)
        self.forward_loss = forward_loss
        self.module = self.wrap(self.model)
        self.optimizer = build_adamw(self.model, cfg.optimizer, topology.device)
        precision = cfg.training.precision
        self.autocast_dtype = AUTOCAST_DTYPES.get(precision)
        self.scaler = torch.amp.GradScaler(topology.device.type) if precision == "fp16" else None

    def wrap(self, model: nn.Module) -> nn.Module:
        """Hook for engines that wrap the module (DDP)."""
        return model

    def no_sync(self, is_last_microbatch: bool) -> contextlib.AbstractContextManager:
        """Hook: skip gradient synchronization on all but the last microbatch."""
        return contextlib.nullcontext()

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.topology.device.type, dtype=self.autocast_dtype)

    def train_step(self, microbatches: list[Microbatch], lr: float) -> StepMetrics:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.topology.device)
        n = len(microbatches)
        for i, mb in enumerate(microbatches):
            mb = self.to_device(mb)
            with self.no_sync(i == n - 1):
                with self.autocast():
                    loss = self.forward_loss(self.module, mb)
                scaled = loss / n
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            total += loss.detach().float()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        clip = self.cfg.training.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else math.inf)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        skipped = False
        if self.scaler is not None:
            scale_before = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            skipped = self.scaler.get_scale() < scale_before
        else:
            self.optimizer.step()
        loss = all_reduce_mean(total.item() / n, self.topology, self.topology.device)
        return StepMetrics(loss=loss, grad_norm=grad_norm, lr=lr, skipped=skipped)

    @torch.no_grad()
    def eval_loss(self, microbatches: list[Microbatch]) -> float:
        self.module.eval()
        try:
            total = 0.0
            for mb in microbatches:
                with self.autocast():
                    total += self.forward_loss(self.module, self.to_device(mb)).float().item()
        finally:
            self.module.train()
        return all_reduce_mean(total / max(len(microbatches), 1), self.topology, self.topology.device)

    def extra_state(self) -> dict[str, Any]:
        """The GradScaler's scale and growth tracker (fp16): without them a resumed run restarts at 2**16 and skips
        steps until it has backed off again. The same on every rank, since it only sees all-reduced gradients."""
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

    def logical_state(self) -> dict[str, torch.Tensor]:
        return {**model_state(self.model), **torch_optimizer_state(self.model, self.optimizer)}

    def save(self, path: Path) -> None:
        write_logical(self.logical_state(), path)

    def load(self, path: Path) -> None:
        read_logical(self.logical_state(), path)
