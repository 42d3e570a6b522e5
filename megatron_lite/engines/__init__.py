"""Engines behind one interface: single device, DDP, PyTorch FSDP2 and DeepSpeed ZeRO."""

from __future__ import annotations

import importlib

from torch import nn

from megatron_lite.config import Config, ConfigError
from megatron_lite.engines.base import Engine, ForwardLoss, StepMetrics
from megatron_lite.topology import Topology

# engine name -> "module:Class", imported on demand so that DeepSpeed loads only when it is used
_ENGINES = {
    "single": "megatron_lite.engines.single:SingleEngine",
    "ddp": "megatron_lite.engines.ddp:DDPEngine",
    "fsdp": "megatron_lite.engines.fsdp:FSDPEngine",
    "deepspeed": "megatron_lite.engines.deepspeed:DeepSpeedEngine",
}


def engine_name(cfg: Config, topology: Topology) -> str:
    """Resolve ``parallel.engine: auto``: one process runs the single engine, several run DDP."""
    name = cfg.parallel.engine
    if name == "auto":
        name = "single" if topology.world_size == 1 else "ddp"
    if name == "single" and topology.world_size > 1:
        raise ConfigError(
            f"parallel.engine=single runs one process, but {topology.world_size} ranks were launched; "
            "use ddp, fsdp or deepspeed"
        )
    return name


def build_engine(cfg: Config, model: nn.Module, topology: Topology, forward_loss: ForwardLoss) -> Engine:
    """Wrap ``model`` (plain PyTorch, already parallelized by any TP/PP plan) in the engine the config names."""
    name = engine_name(cfg, topology)
    module_name, cls_name = _ENGINES[name].split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(cfg, model, topology, forward_loss)


__all__ = ["Engine", "StepMetrics", "ForwardLoss", "build_engine", "engine_name"]
