"""The one build sequence every engine runs, from a model factory to this rank's materialized part of the model.

    construct on meta                  the plain model, no memory; its initial-value rules and weight-decay names
    -> tensor parallelism              the model's plan swaps modules for this rank's shards (still meta)
    -> activation checkpointing        per block, in place
    -> compile                         per block
    -> pipeline split                  this rank's holder and stage views (``parallel/pipeline.py``)
    -> partition                       the engine's: FSDP2 shards on meta, ZeRO-3 partitions, or nothing
    -> materialize                     the engine's: each rank fills only what it holds, by tensor name and seed

after which the engine wraps what runs a forward (DDP, ``deepspeed.initialize``) and the pipeline runner takes the
stages. Checkpointing and compile come after the tensor-parallel swap so that they see the sharded modules, and
before FSDP so that its all-gather hooks are outermost (one gather per block per forward, as in torchtitan).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import nn

from megatron_lite.config import Config
from megatron_lite.parallel.pipeline import PipelineParts, split_model
from megatron_lite.parallel.tensor import TPShard, tensor_aliases, tensor_parallel_shards
from megatron_lite.step.optim import no_decay_names
from megatron_lite.topology import Topology



def _identity(model: nn.Module) -> nn.Module:
    return model


@dataclass
class ModelFactory:
    """How an engine builds its model, shard by shard.

    ``construct`` creates the plain model with its parameters on whatever device is current; the build calls it under
    ``torch.device("meta")`` and then materializes only what the rank holds (``materialize.py``). Initial values come
    from the model's ``init_rules`` and ``seed``, by name, so they do not depend on the layout. ``prepare`` applies
    what goes between the plain model and the engine's own wrapping, in order: tensor parallelism, activation
    checkpointing, compilation.
    """

    construct: Callable[[], nn.Module]
    seed: int
    prepare: Callable[[nn.Module], nn.Module] = field(default=_identity)


@dataclass
class Built:
    """This rank's part of the model, materialized, and what the engine needs to know about it."""

    model: nn.Module  # the plain model, or the pipeline holder (plain names, only this rank's stages' parts)
    roots: list[nn.Module]  # what runs a forward: the model, or each pipeline stage view
    parts: PipelineParts | None  # the pipeline split, with parallel.pp > 1
    shards: dict[str, TPShard]  # tensor-parallel shards by every parameter name (a name not in it is replicated)
    aliases: dict[str, str]  # every name of a parameter -> its first name (tied tensors)
    no_decay: set[str]  # names that take no weight decay, read off the plain model


class EngineSteps(Protocol):
    """The steps an engine supplies (``Engine.partition`` and ``Engine.materialize``)."""

    def partition(self, model: nn.Module, roots: list[nn.Module]) -> None: ...

    def materialize(self, model: nn.Module, rules: dict, seed: int, built: Built) -> None: ...


def build_model(factory: ModelFactory, cfg: Config, topology: Topology, engine: EngineSteps) -> Built:
    """Run the sequence above for this rank; ``engine`` supplies its ``partition`` and ``materialize`` steps."""
    with torch.device("meta"):
        model = factory.construct()
    rules, no_decay = model.init_rules(), no_decay_names(model, cfg.optimizer)  # from the plain model
    model = factory.prepare(model)  # tensor parallelism, activation checkpointing, compile
    shards, aliases = tensor_parallel_shards(model), tensor_aliases(model)
    parts = split_model(model, cfg, topology) if topology.pp > 1 else None
    holder = parts.holder if parts else model
    built = Built(holder, parts.stages if parts else [holder], parts, shards, aliases, no_decay)
    engine.partition(holder, built.roots)
    engine.materialize(holder, rules, factory.seed, built)
    return built
