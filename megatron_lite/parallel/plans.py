"""Tensor-parallel plans: which module of a family becomes which parallel layer, and the function that applies a plan.

A plan names modules by pattern (``fnmatch``, ``*`` matching any part of a name) and says what each becomes:

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
later materializes only its shards, from the same layout-free initial values. Parameter names do not change.
"""

from __future__ import annotations

import fnmatch
import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from megatron_lite.config import Config, ConfigError
from megatron_lite.parallel.collectives import copy_to_group, split_to_group
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


DECODER_PLAN = TPPlan(
    layers={
        "embed": "vocab",
        "layers.*.attn.q_proj": "column",
        "layers.*.attn.k_proj": "kv",
        "layers.*.attn.v_proj": "kv",
        "layers.*.attn.o_proj": "row",
        "layers.*.mlp.gate_proj": "column",
        "layers.*.mlp.up_proj": "column",
        "layers.*.mlp.down_proj": "row",
        "lm_head": "column",  # logits stay split over the vocabulary: the loss is vocab-parallel
    },
    sharded_rng=("layers.*.attn",),
    sequence_params=("layers.*.attn_norm", "layers.*.mlp_norm", "final_norm"),
    sequence_dropout=("dropout", "layers.*.dropout"),
    sequence_split=("pos_embed",),
)


_ENCDEC_ATTENTION = {
    f"layers.*.{attn}.{proj}": kind
    for attn in ("attn", "cross_attn")
    for proj, kind in (("q_proj", "column"), ("k_proj", "kv"), ("v_proj", "kv"), ("o_proj", "row"))
}

ENCODER_DECODER_PLAN = TPPlan(
    layers={
        "embed": "vocab",  # shared by the encoder, the decoder and a tied head
        **_ENCDEC_ATTENTION,  # self- and cross-attention split by heads alike
        "layers.*.mlp.gate_proj": "column",
        "layers.*.mlp.up_proj": "column",
        "layers.*.mlp.down_proj": "row",
        "lm_head": "column",
    },
    sharded_rng=("layers.*.attn", "layers.*.cross_attn"),
    head_split=("encoder_pos_bias", "decoder_pos_bias"),
)


def check_tensor_parallel(cfg: Config, tp: int) -> None:
    """Refuse shapes the group cannot split, naming the key (decoder family)."""
    if tp == 1:
        return
    m = cfg.model
    heads, kv = m.num_heads, m.kv_heads
    if heads % tp:
        raise ConfigError(f"model.num_heads={heads} is not divisible by parallel.tp={tp}")
    if kv % tp and (heads // kv) % (heads // tp):
        raise ConfigError(
            f"model.num_kv_heads={kv} with parallel.tp={tp}: the group must divide the kv heads, or each rank's "
            f"{heads // tp} query heads must share one kv head (they use {heads // kv} query heads per kv head)"
        )
    if m.ffn_size % tp:
        raise ConfigError(f"model.ffn_hidden_size={m.ffn_size} is not divisible by parallel.tp={tp}")
    if m.padded_vocab_size % tp:
        raise ConfigError(
            f"the padded vocabulary ({m.padded_vocab_size} = model.vocab_size={m.vocab_size} rounded up to "
            f"model.pad_vocab_multiple={m.pad_vocab_multiple}) is not divisible by parallel.tp={tp}"
        )
    if cfg.parallel.sequence_parallel and m.family == "encoder_decoder":
        raise ConfigError("parallel.sequence_parallel is not supported for model.family=encoder_decoder; use "
                          "parallel.tp alone")
    if cfg.parallel.sequence_parallel and cfg.data.seq_len % tp:
        raise ConfigError(
            f"parallel.sequence_parallel needs data.seq_len={cfg.data.seq_len} divisible by parallel.tp={tp}"
        )


def apply_plan(model: nn.Module, plan: TPPlan, cfg: Config, topology: Topology) -> nn.Module:
    """Swap the plan's modules for tensor-parallel layers (on meta) and wrap the modules that need it; in place."""
    if topology.tp == 1:
        return model
    group, sp = topology.group("tp"), cfg.parallel.sequence_parallel
    ties = _ties(model)
    for name, module in list(model.named_modules()):
        kind = plan.placement(name)
        if kind is not None:
            _replace(model, name, _parallel_layer(kind, name, module, cfg, topology, group, sp))
    _retie(model, ties)
    device = topology.device
    for name, module in model.named_modules():
        if _matches(name, plan.sharded_rng) or (sp and _matches(name, plan.sequence_dropout)):
            _wrap_forward(module, lambda f, rank=topology.tp_rank: _with_sharded_rng(f, rank, device))
        if sp and _matches(name, plan.sequence_params):
            _wrap_forward(module, lambda f, m=module: _with_summed_param_grads(f, m, group))
        if sp and _matches(name, plan.sequence_split):
            _wrap_forward(module, lambda f: _with_sequence_split(f, group))
        if _matches(name, plan.head_split):
            _wrap_forward(module, lambda f: _with_head_split(f, group))
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


def _wrap_forward(module: nn.Module, wrap: Callable[[Callable], Callable]) -> None:
    module.forward = wrap(module.forward)


def _with_sharded_rng(forward: Callable, tp_rank: int, device: torch.device) -> Callable:
    @functools.wraps(forward)
    def run(*args, **kwargs):
        with sharded_rng(tp_rank, device):
            return forward(*args, **kwargs)

    return run


def _with_summed_param_grads(forward: Callable, module: nn.Module, group) -> Callable:
    """Run ``module`` with each parameter passed through ``copy_to_group``: on sequence shards every rank holds part
    of the parameter's gradient, and the backward of ``copy_to_group`` sums the parts (names do not change)."""

    @functools.wraps(forward)
    def run(*args, **kwargs):
        saved = dict(module._parameters)
        try:
            for key, p in saved.items():
                if p is not None:
                    module._parameters[key] = copy_to_group(p, group)
            return forward(*args, **kwargs)
        finally:
            module._parameters.update(saved)

    return run


def _with_sequence_split(forward: Callable, group) -> Callable:
    @functools.wraps(forward)
    def run(*args, **kwargs):
        return split_to_group(forward(*args, **kwargs), SEQUENCE_DIM, group)

    return run


def _with_head_split(forward: Callable, group) -> Callable:
    @functools.wraps(forward)
    def run(*args, **kwargs):
        return split_to_group(forward(*args, **kwargs), 1, group)

    return run
