"""Engines behind one interface: single device, DDP, PyTorch FSDP2 and DeepSpeed ZeRO."""

from __future__ import annotations

import importlib

from megatron_lite.config import Config, ConfigError
from megatron_lite.engines.base import Engine, ModelFactory, StepMetrics
from megatron_lite.parallel.pipeline import check_pipeline
from megatron_lite.parallel.plans import check_tensor_parallel
from megatron_lite.topology import Topology
from megatron_lite.training.tasks import Task

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
    check_engine_config(cfg, name, topology)
    return name


def check_engine_config(cfg: Config, name: str, topology: Topology) -> None:
    """Refuse parallel settings the chosen engine would ignore or reject, before any data or model is built."""
    par = cfg.parallel
    if par.zero_stage > 0 and name != "deepspeed":
        raise ConfigError(
            f"parallel.zero_stage={par.zero_stage} needs parallel.engine=deepspeed (got {name}); "
            "for ZeRO-3-style sharding with PyTorch use parallel.engine=fsdp"
        )
    for flag in ("offload_optimizer", "offload_params"):
        if getattr(par, flag) and name != "deepspeed":
            raise ConfigError(
                f"parallel.{flag} is a DeepSpeed ZeRO setting (got parallel.engine={name}); "
                "with fsdp use parallel.fsdp_cpu_offload"
            )
    if par.offload_params and par.zero_stage != 3:
        raise ConfigError(f"parallel.offload_params needs parallel.zero_stage=3 (got {par.zero_stage})")
    if par.offload_optimizer and par.zero_stage == 0:
        raise ConfigError("parallel.offload_optimizer needs parallel.zero_stage >= 1")
    if name == "deepspeed" and par.pp > 1 and par.zero_stage >= 2:
        raise ConfigError(
            f"parallel.zero_stage={par.zero_stage} with parallel.pp={par.pp}: DeepSpeed's pipeline engine supports "
            "ZeRO stage 0 or 1 only; use zero_stage<=1, or parallel.engine=fsdp for sharded data parallelism with "
            "pipeline parallelism"
        )
    if par.pp > 1 and cfg.training.precision == "fp16":
        raise ConfigError(
            f"training.precision=fp16 with parallel.pp={par.pp}: the pipeline schedules run without a loss scaler; "
            "use bf16"
        )
    check_pipeline(cfg, topology.dp)
    if par.tp > 1 and name == "deepspeed" and par.zero_stage == 3:
        raise ConfigError(
            f"parallel.zero_stage=3 with parallel.tp={par.tp} is not supported: ZeRO-3 would partition the "
            "tensor-parallel shards again; use zero_stage 1 or 2, or parallel.engine=fsdp (FSDP2 over the data axis)"
        )
    if par.sequence_parallel and par.tp == 1:
        raise ConfigError("parallel.sequence_parallel needs parallel.tp > 1 (it splits the sequence over the tp group)")
    check_tensor_parallel(cfg, par.tp)
    if par.fsdp_cpu_offload and name != "fsdp":
        raise ConfigError(
            f"parallel.fsdp_cpu_offload needs parallel.engine=fsdp (got {name}); "
            "with deepspeed use parallel.offload_optimizer / offload_params"
        )
    if par.dp_replicate > 1 and name != "fsdp":
        raise ConfigError(f"parallel.dp_replicate={par.dp_replicate} (HSDP) needs parallel.engine=fsdp (got {name})")
    if name == "fsdp":
        from megatron_lite.engines.fsdp import check_fsdp_config

        check_fsdp_config(cfg, topology.device)


def build_engine(cfg: Config, factory: ModelFactory, topology: Topology, task: Task) -> Engine:
    """The engine the config names, which builds the model from ``factory`` (only this rank's part of it)."""
    name = engine_name(cfg, topology)
    module_name, cls_name = _ENGINES[name].split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(cfg, factory, topology, task)


__all__ = ["Engine", "ModelFactory", "StepMetrics", "build_engine", "check_engine_config", "engine_name"]
