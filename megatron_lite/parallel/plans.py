"""Tensor-parallel plans: which module of a model becomes which parallel layer, and the function that applies a plan.

A model states its plan as data (``TP_PLAN`` beside its code, ``models/``), so nothing here names a family. A plan
names modules by pattern (``fnmatch``, ``*`` matching any part of a name) and says what each becomes:

    column   ColumnParallelLinear: output features split over the group (q, gate, up, and the LM head)
    row      RowParallelLinear: input features split, partial outputs summed (o, down)
    vocab    VocabParallelEmbedding: the table split by token ids
    kv       a key/value projection: column-parallel when the group divides the kv heads, else replicated with each
             rank keeping the kv head its query heads use (HeadSliceLinear)

and which modules need more than a swap: ``sharded_rng`` modules draw random numbers on split activations (attention
dropout acts on split heads), so their masks must differ across ranks; under sequence parallelism ``sequence_params``
modules (norms) run on sequence shards, so their parameters' gradients are summed over the group,
``sequence_dropout`` modules drop on sequence shards (sharded RNG), and ``sequence_split`` modules (positions) return
only this rank's part of the sequence. ``head_split`` modules (T5's relative position bias, [1, heads, q, k]) keep
their small table whole and return only this rank's heads; the split's backward gathers the heads' gradients, so
every rank computes the same gradient for the table.

``apply_plan`` runs on the plain model on the meta device, right after it is built and before activation
checkpointing, compile and the engine: the new layers are created on meta with this rank's shapes, so each rank
later materializes only its shards, from the same layout-free initial values. Parameter names do not change. The
modules that need more than a swap get their behaviour by a class of their own (``ShardedRNG``,
``SequenceShardedParams``, ``SequenceSplit``, ``HeadSplit`` mixed into their class, as FSDP2 does), so ``print(model)``
shows it.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from megatron_lite.config import Config, ConfigError
from megatron_lite.parallel.collectives import copy_to_group, split_to_group
from megatron_lite.parallel.extend import extend
from megatron_lite.parallel.random import sharded_rng
from megatron_lite.parallel.tensor import (
    SEQUENCE_DIM,
    ColumnParallelLinear,
    HeadSliceLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from megatron_lite.topology import Topology


@dataclass(frozen=True)
class TPPlan:
    layers: dict[str, str]
    sharded_rng: tuple[str, ...] = ()
    sequence_params: tuple[str, ...] = ()
    sequence_dropout: tuple[str, ...] = ()
    sequence_split: tuple[str, ...] = ()
    head_split: tuple[str, ...] = ()

    def placement(self, module_name: str) -> str | None:
        """The layer kind of ``module_name`` (``column``, ``row``, ``vocab``, ``kv``), or None: left whole."""
        for pattern, kind in self.layers.items():
            if fnmatch.fnmatchcase(module_name, pattern):
                return kind
        return None


def plan_of(model: nn.Module | type) -> TPPlan:
    """The plan a model (or model class) states as ``TP_PLAN``."""
    spec = getattr(model, "TP_PLAN", None)
    if spec is None:
        raise ConfigError(f"{getattr(model, '__name__', type(model).__name__)} states no tensor-parallel plan "
                          "(TP_PLAN): it cannot run with parallel.tp > 1")
    return TPPlan(**spec)


def apply_plan(model: nn.Module, cfg: Config, topology: Topology) -> nn.Module:
    """Swap the modules of the model's plan for tensor-parallel layers (on meta) and extend the modules that need
    more; in place."""
    if topology.tp == 1:
        return model
    plan = plan_of(model)
    group, sp = topology.group("tp"), cfg.parallel.sequence_parallel
    ties = _ties(model)
    for name, module in list(model.named_modules()):
        kind = plan.placement(name)
        if kind is not None:
            _replace(model, name, _parallel_layer(kind, name, module, cfg, topology, group, sp))
    _retie(model, ties)
    for name, module in list(model.named_modules()):
        if _matches(name, plan.sharded_rng) or (sp and _matches(name, plan.sequence_dropout)):
            extend(module, ShardedRNG, tp_rank=topology.tp_rank, rng_device=topology.device)
        if sp and _matches(name, plan.sequence_params):
            extend(module, SequenceShardedParams, tp_group=group)
        if sp and _matches(name, plan.sequence_split):
            extend(module, SequenceSplit, tp_group=group)
        if _matches(name, plan.head_split):
            extend(module, HeadSplit, tp_group=group)
    return model


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _parallel_layer(kind: str, name: str, module: nn.Module, cfg: Config, topology: Topology, group,
                    sp: bool) -> nn.Module:
    with torch.device("meta"):
        if kind == "vocab":
            if not isinstance(module, nn.Embedding):
                raise TypeError(f"plan: {name} is a {type(module).__name__}, expected nn.Embedding for 'vocab'")
            return VocabParallelEmbedding(module.num_embeddings, module.embedding_dim, group, sp)
        if not isinstance(module, nn.Linear):
            raise TypeError(f"plan: {name} is a {type(module).__name__}, expected nn.Linear for '{kind}'")
        args = (module.in_features, module.out_features, module.bias is not None, group, sp)
        if kind == "column" or (kind == "kv" and cfg.model.kv_heads % topology.tp == 0):
            return ColumnParallelLinear(*args)
        if kind == "row":
            return RowParallelLinear(*args)
        if kind == "kv":
            m = cfg.model
            per_rank, per_kv = m.num_heads // topology.tp, m.num_heads // m.kv_heads
            head = topology.tp_rank * per_rank // per_kv
            return HeadSliceLinear(module.in_features, module.out_features, module.bias is not None, m.head_dim,
                                   head, group, sp)
    raise ValueError(f"plan: unknown placement {kind!r} for {name}")


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


def _ties(model: nn.Module) -> list[list[tuple[str, str]]]:
    """Groups of (module name, parameter name) that share one tensor."""
    groups: dict[int, list[tuple[str, str]]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for p_name, p in module._parameters.items():
            if p is not None:
                groups.setdefault(id(p), []).append((mod_name, p_name))
    return [g for g in groups.values() if len(g) > 1]


def _retie(model: nn.Module, ties: list[list[tuple[str, str]]]) -> None:
    """Point every member of a tie at its first member's (new) parameter; shapes must agree (the same placement)."""
    for (first_mod, first_name), *others in ties:
        shared = getattr(model.get_submodule(first_mod), first_name)
        for mod_name, p_name in others:
            module = model.get_submodule(mod_name)
            if getattr(module, p_name).shape != shared.shape:
                raise ValueError(f"plan: {mod_name}.{p_name} is tied to {first_mod}.{first_name} but split differently")
            setattr(module, p_name, shared)


class ShardedRNG:
    """Draws its random numbers (dropout) from a stream of its own on each rank of the tensor-parallel group: it acts
    on activations split over the group, where one mask for every rank would be wrong (``parallel/random.py``). A
    module that draws none (no dropout, or evaluation) runs as it is: no generator is forked or advanced."""

    tp_rank: int
    rng_device: torch.device

    def forward(self, *args, **kwargs):
        if not (self.training and _draws_random(self)):
            return super().forward(*args, **kwargs)
        with sharded_rng(self.tp_rank, self.rng_device):
            return super().forward(*args, **kwargs)


def _draws_random(module: nn.Module) -> bool:
    """Whether ``module`` drops anything in training: an ``nn.Dropout`` in it with p > 0, or a dropout probability
    it applies itself (attention's ``dropout``)."""
    if isinstance(getattr(module, "dropout", None), float) and module.dropout > 0:
        return True
    return any(isinstance(m, nn.Dropout) and m.p > 0 for m in module.modules())


class SequenceShardedParams:
    """Runs on sequence shards, so each rank holds part of its parameters' gradients: the parameters pass through
    ``copy_to_group``, whose backward sums the parts over the group.

    torch has no hook through which a module's parameters enter one call's autograd graph as other tensors, so they
    are substituted in ``_parameters`` for the call and put back after it (as ``torch.func.functional_call`` does);
    names do not change. Under FSDP2 the substituted tensors are the gathered parameters FSDP installed for the call.
    """

    tp_group: object

    def forward(self, *args, **kwargs):
        saved = dict(self._parameters)
        try:
            for key, p in saved.items():
                if p is not None:
                    self._parameters[key] = copy_to_group(p, self.tp_group)
            return super().forward(*args, **kwargs)
        finally:
            self._parameters.update(saved)


class SequenceSplit:
    """Computes for the whole sequence (positions) and returns only this rank's part of it (dimension 1)."""

    tp_group: object

    def forward(self, *args, **kwargs):
        return split_to_group(super().forward(*args, **kwargs), SEQUENCE_DIM, self.tp_group)


class HeadSplit:
    """Keeps its small table whole and returns only this rank's heads (dimension 1 of a [1, heads, q, k] bias); the
    split's backward gathers the heads' gradients, so every rank computes the whole table's gradient."""

    tp_group: object

    def forward(self, *args, **kwargs):
        return split_to_group(super().forward(*args, **kwargs), 1, self.tp_group)
