"""Activation checkpointing and compilation, applied to a plain model from outside and in a fixed order.

The order is tensor parallelism, then activation checkpointing, then compile, then the engine's own wrapping (FSDP or
DeepSpeed), as in torchtitan: checkpointing must see the sharded modules, compile must see the checkpointed forward,
and FSDP's all-gather hooks go outermost so that each block gathers its weights once per forward (and again for the
recomputation in backward).

Both act on each block *in place*: checkpointing gives the block a class of its own (``Checkpointed``, see
``extend.py``), and ``nn.Module.compile`` compiles the block's call, so parameter names (and with them checkpoints and
the initial-value rules) do not change, unlike ``checkpoint_wrapper``, which inserts a ``_checkpoint_wrapped_module``
level into every name.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_lite.config import Config
from megatron_lite.parallel.context import apply_context_parallel
from megatron_lite.parallel.experts import apply_expert_parallel
from megatron_lite.parallel.extend import extend
from megatron_lite.parallel.plans import apply_plan
from megatron_lite.topology import Topology


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks of a model: the values of its ``layers`` ModuleDict."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleDict):
        raise TypeError(f"{type(model).__name__} has no ``layers`` ModuleDict of blocks to wrap")
    return list(layers.values())


class Checkpointed:
    """Recomputes its activations in backward instead of keeping them (``torch.utils.checkpoint``, non-reentrant);
    evaluation, which keeps none, runs plainly."""

    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return super().forward(*args, **kwargs)
        return checkpoint(super().forward, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each block's activations in backward instead of keeping them (full recomputation per block)."""
    for block in blocks(model):
        extend(block, Checkpointed)
    return model


def apply_compile(model: nn.Module) -> nn.Module:
    """``torch.compile`` each block separately: blocks share one graph, and compile time stays that of one block."""
    for block in blocks(model):
        block.compile()
    return model


def prepare_model(model: nn.Module, cfg: Config, topology: Topology) -> nn.Module:
    """Apply what the config asks for between the plain model and the engine, in the documented order: the model's
    tensor-parallel plan, context parallelism, expert parallelism, activation checkpointing, compile."""
    if topology.tp > 1:
        model = apply_plan(model, cfg, topology)
    if topology.cp > 1:
        model = apply_context_parallel(model, topology)
    if topology.ep > 1:
        model = apply_expert_parallel(model, topology)
    if cfg.model.activation_checkpointing:
        model = apply_activation_checkpointing(model)
    if cfg.training.compile:
        model = apply_compile(model)
    return model
