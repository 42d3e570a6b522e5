"""Engines behind one interface, built by one build sequence: single device, DDP, PyTorch FSDP2 and DeepSpeed ZeRO."""

from __future__ import annotations

import importlib

from megatron_lite import rules
from megatron_lite.config import Config
from megatron_lite.engines.base import Engine, StepMetrics
from megatron_lite.engines.build import ModelFactory
from megatron_lite.step.tasks import Task
from megatron_lite.topology import Topology

# engine name -> "module:Class", imported on demand so that DeepSpeed loads only when it is used
_ENGINES = {
    "single": "megatron_lite.engines.single:SingleEngine",
    "ddp": "megatron_lite.engines.ddp:DDPEngine",
    "fsdp": "megatron_lite.engines.fsdp:FSDPEngine",
    "deepspeed": "megatron_lite.engines.deepspeed:DeepSpeedEngine",
}


def build_engine(cfg: Config, factory: ModelFactory, topology: Topology, task: Task) -> Engine:
    """The engine the config names, which builds the model from ``factory`` (only this rank's part of it), once
    the layout passes every rule (``megatron_lite.rules``)."""
    name = rules.check_layout(cfg, topology.world_size, topology.device.type)
    module_name, cls_name = _ENGINES[name].split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(cfg, factory, topology, task)


__all__ = ["Engine", "ModelFactory", "StepMetrics", "build_engine"]
