"""DeepSpeed ZeRO 0-3 (with optional CPU offload) behind the engine interface.

DeepSpeed owns loss scaling, gradient averaging, accumulation boundaries and clipping (from the generated JSON, see
``deepspeed_config.py``); this engine only feeds it microbatches and sets the learning rate of the client optimizer,
a plain ``torch.optim.AdamW``, so the update is the same arithmetic as in every other engine.

Checkpoints use the logical format: ``safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state`` assemble each
parameter's fp32 master weight and AdamW moments from whatever ZeRO partitioning is in place, and the ``safe_set_*``
counterparts scatter them back on load. A checkpoint saved under ZeRO-3 on two ranks therefore loads under FSDP on
one, and the other way round. DeepSpeed's native checkpoint files are not written: they cannot change world size.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from megatron_lite.config import Config, ConfigError
from megatron_lite.engines.base import (
    OPTIM_STATE_KEYS,
    Engine,
    ForwardLoss,
    Microbatch,
    StepMetrics,
    all_reduce_mean,
    ensure_adamw_state_for,
    param_names,
    read_logical,
    write_logical,
)
from megatron_lite.engines.deepspeed_config import deepspeed_config
from megatron_lite.topology import Topology, ensure_process_group
from megatron_lite.training.optim import build_adamw

MOMENT_KEYS = tuple(k for k in OPTIM_STATE_KEYS if k != "step")


def import_deepspeed(device: torch.device):
    """Import DeepSpeed with its CPU accelerator selected when training on the CPU (silences the detection warning)."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed's ZeRO calls collectives that newer torch marks deprecated, once per step and rank: not actionable here.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    import deepspeed

    return deepspeed


def check_precision(cfg: Config, device: torch.device) -> None:
    """DeepSpeed's CPU accelerator has no fp16 kernels; say so before DeepSpeed fails deep inside initialize."""
    if cfg.training.precision != "fp16":
        return
    from deepspeed.accelerator import get_accelerator

    if not get_accelerator().is_fp16_supported():
        raise ConfigError(
            f"training.precision=fp16 with parallel.engine=deepspeed needs a GPU (DeepSpeed's "
            f"{get_accelerator().device_name()} accelerator has no fp16); use bf16, or fp16 with the ddp engine"
        )


class DeepSpeedEngine(Engine):
    """``deepspeed.initialize`` over the plain model with a client torch AdamW; logical checkpoints."""

    def __init__(self, cfg: Config, model: nn.Module, topology: Topology, forward_loss: ForwardLoss) -> None:
        if topology.tp > 1 or topology.pp > 1:
            raise ConfigError("parallel.engine=deepspeed runs data parallelism only here; set parallel.tp = pp = 1")
        self.cfg = cfg
        self.topology = topology
        self.forward_loss = forward_loss
        self.model = model.to(topology.device)
        deepspeed = import_deepspeed(topology.device)
        check_precision(cfg, topology.device)
        ensure_process_group(topology.device)
        # DeepSpeed asserts these exist, even for one plain-python process.
        os.environ.setdefault("RANK", str(topology.rank))
        os.environ.setdefault("WORLD_SIZE", str(topology.world_size))
        os.environ.setdefault("LOCAL_RANK", str(topology.local_rank))
        deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)
        self.ds_config, overrides = deepspeed_config(cfg, topology.dp)
        if overrides and topology.is_main:
            print(f"deepspeed_overrides merged into the generated DeepSpeed config: {overrides}", flush=True)
        self.optimizer = build_adamw(self.model, cfg.optimizer, topology.device)
        self.engine, _, _, _ = deepspeed.initialize(
            model=self.model, optimizer=self.optimizer, config=self.ds_config, dist_init_required=False
        )
        self.stage = int(self.ds_config["zero_optimization"].get("stage", 0))
        self.accumulation = int(self.ds_config["gradient_accumulation_steps"])
        self._masters = self._unfused_masters()

    def _unfused_masters(self) -> dict[nn.Parameter, torch.Tensor]:
        """ZeRO-0 in bf16/fp16 wraps torch AdamW in DeepSpeed's unfused optimizer: one fp32 copy per parameter."""
        opt = self.engine.optimizer
        if self.stage != 0 or not (hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups")):
            return {}
        return {lp: hp for lo, hi in zip(opt.fp16_groups, opt.fp32_groups) for lp, hp in zip(lo, hi)}

    # ------------------------------------------------------------------------------------------------------------------
    # Training
    # ------------------------------------------------------------------------------------------------------------------

    def train_step(self, microbatches: list[Microbatch], lr: float) -> StepMetrics:
        if len(microbatches) != self.accumulation:
            raise ValueError(
                f"got {len(microbatches)} microbatches, but the DeepSpeed config accumulates {self.accumulation}"
            )
        for group in self.optimizer.param_groups:  # the client optimizer is DeepSpeed's base optimizer
            group["lr"] = lr
        skipped_before = self.engine.skipped_steps
        total = torch.zeros((), device=self.topology.device)
        own_norm = None
        for i, mb in enumerate(microbatches):
            loss = self.forward_loss(self.engine, self.to_device(mb))
            self.engine.backward(loss)  # DeepSpeed divides by the accumulation steps
            if i == len(microbatches) - 1 and self.stage == 0 and not self._masters:
                # ZeRO-0 in fp32 clips but does not keep the norm; the averaged gradients are final here.
                grads = [p.grad for p in self.model.parameters() if p.grad is not None]
                own_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
            self.engine.step()  # steps the optimizer only at the accumulation boundary
            total += loss.detach().float()
        norm = self.engine.get_global_grad_norm() if own_norm is None else own_norm
        grad_norm = float(norm) if norm is not None else math.nan
        loss = all_reduce_mean(total.item() / len(microbatches), self.topology, self.topology.device)
        return StepMetrics(loss=loss, grad_norm=grad_norm, lr=lr, skipped=self.engine.skipped_steps > skipped_before)

    @torch.no_grad()
    def eval_loss(self, microbatches: list[Microbatch]) -> float:
        self.engine.eval()
        try:
            total = sum(self.forward_loss(self.engine, self.to_device(mb)).float().item() for mb in microbatches)
        finally:
            self.engine.train()
        return all_reduce_mean(total / max(len(microbatches), 1), self.topology, self.topology.device)

    # ------------------------------------------------------------------------------------------------------------------
    # Logical checkpoints
    # ------------------------------------------------------------------------------------------------------------------

    def _names(self) -> list[tuple[nn.Parameter, list[str]]]:
        """Each trainable parameter with all its names (a tied matrix has several)."""
        names: dict[nn.Parameter, list[str]] = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            names.setdefault(p, []).append(name)
        return list(names.items())

    def _managed(self, p: nn.Parameter) -> bool:
        """Whether ``p``'s fp32 master is partitioned by ZeRO (or DeepSpeed's bf16 optimizer): reach it via safe_*."""
        return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")  # the mapping is None where this rank holds none of p

    def _master(self, p: nn.Parameter) -> torch.Tensor:
        """The tensor AdamW steps for ``p`` under ZeRO-0: its fp32 copy in bf16/fp16, else ``p`` itself."""
        return self._masters.get(p, p)

    def _full(self, p: nn.Parameter, key: str | None) -> torch.Tensor:
        """The full fp32 master weight (``key`` None) or AdamW moment of ``p``, identical on every rank."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        if not self._managed(p):  # ZeRO-0: every rank holds the whole master
            master = self._master(p)
            return (master.detach() if key is None else self.optimizer.state[master][key]).float().clone()
        value = safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
        return value.detach().float().cpu().reshape(p.ds_shape if hasattr(p, "ds_id") else p.shape)

    def _flat_params(self) -> list[torch.Tensor]:
        """The tensors the client optimizer steps on: flat fp32 partitions under ZeRO, the parameters under ZeRO-0.

        ZeRO-3 puts its partitions into the optimizer's parameter groups only for the duration of ``step``.
        """
        if self.stage == 3:
            return list(self.engine.optimizer.fp32_partitioned_groups_flat)
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def _base_state(self) -> list[dict]:
        return [self.optimizer.state[p] for p in self._flat_params()]

    def _ensure_optimizer_state(self) -> None:
        """Create AdamW's state before the first step, so it can be written or overwritten in place.

        torch AdamW creates it lazily in its first step: a 0-d float32 step count and zero moments shaped like the
        tensor (here, like DeepSpeed's flat partition). Creating the same entries ahead of time changes nothing.
        """
        ensure_adamw_state_for(self.optimizer, self._flat_params())
        self._link_optimizer_state()

    def _link_optimizer_state(self) -> None:
        """Point every parameter's ZeRO-1/2 (or bf16) fragments at the optimizer state of its partition.

        DeepSpeed links them after stepping the first parameter group, when the state of later groups does not exist
        yet, and never again; with two groups (decay / no decay) the second stays unlinked. Linking again is cheap
        and idempotent.
        """
        opt = self.engine.optimizer
        if hasattr(opt, "_lazy_init_hp_params_optimizer_state") and hasattr(opt, "_hp_optimizer_states_linked"):
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()

    def _step_count(self) -> torch.Tensor:
        steps = [float(s["step"]) for s in self._base_state()]
        if len(set(steps)) > 1:
            raise RuntimeError(f"optimizer parameter groups disagree on the step count: {sorted(set(steps))}")
        return torch.tensor(steps[0] if steps else 0.0, dtype=torch.float32)

    def _set_step_count(self, value: float) -> None:
        for state in self._base_state():
            if torch.is_tensor(state["step"]):
                state["step"].fill_(value)
            else:
                state["step"] = value

    def logical_state(self) -> dict[str, torch.Tensor]:
        """Full fp32 tensors under logical names (assembled on every rank; DCP writes each once)."""
        self._ensure_optimizer_state()
        out: dict[str, torch.Tensor] = {}
        first = param_names(self.model)
        step = self._step_count()
        for p, names in self._names():
            weight = self._full(p, None)
            for name in names:
                out[f"model.{name}"] = weight
            for key in MOMENT_KEYS:
                out[f"optim.{first[p]}.{key}"] = self._full(p, key)
            out[f"optim.{first[p]}.step"] = step.clone()
        for name, buf in self.model.named_buffers():
            if name in self.model.state_dict():
                out[f"model.{name}"] = buf.detach().cpu().clone()
        return out

    def save(self, path: Path) -> None:
        write_logical(self.logical_state(), path)

    def load(self, path: Path) -> None:
        state = self.logical_state()  # buffers of the right shapes, filled in place
        read_logical(state, path)
        self._load_weights(state)
        first = param_names(self.model)
        from deepspeed.utils import safe_set_full_optimizer_state

        steps = set()
        for p, _ in self._names():
            for key in MOMENT_KEYS:
                value = state[f"optim.{first[p]}.{key}"]
                if self._managed(p):
                    safe_set_full_optimizer_state(p, value.to(self.topology.device), key)
                else:
                    self.optimizer.state[self._master(p)][key].copy_(value)
            steps.add(float(state[f"optim.{first[p]}.step"]))
        if len(steps) > 1:
            raise ValueError(f"checkpoint {path} holds different AdamW step counts per parameter: {sorted(steps)}")
        self._set_step_count(steps.pop() if steps else 0.0)

    def _load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Set the fp32 masters and the module's (possibly bf16, possibly partitioned) weights."""
        from deepspeed.utils import safe_set_full_fp32_param

        named = self._names()
        for p, names in named:
            value = state[f"model.{names[0]}"]
            if self._managed(p):
                safe_set_full_fp32_param(p, value.to(self.topology.device))
            elif p in self._masters:
                with torch.no_grad():
                    self._masters[p].copy_(value.reshape(self._masters[p].shape))
        if self.stage == 3:
            import deepspeed

            params = [p for p, _ in named]
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                self._copy_into_module(named, state)
        else:
            self._copy_into_module(named, state)
        for name, buf in self.model.named_buffers():
            if f"model.{name}" in state:
                buf.data.copy_(state[f"model.{name}"])

    @torch.no_grad()
    def _copy_into_module(self, named: list[tuple[nn.Parameter, list[str]]], state: dict[str, torch.Tensor]) -> None:
        for p, names in named:
            p.data.copy_(state[f"model.{names[0]}"].to(p.device, p.dtype).reshape(p.shape))
