"""Behaviour added to a module of a built model by giving it a class of its own, so that ``print(model)`` names it.

Tensor parallelism (sharded dropout, sequence-sharded norms, split outputs) and activation checkpointing change what a
module's forward does without changing its parameters or their names. Replacing ``forward`` on the instance would hide
that; inserting a wrapper module would change every name below it (and with it checkpoints and initial values).
Switching the module's class to a subclass of a small mixin and its own class does neither, as FSDP2 does with
``fully_shard``.
"""

from __future__ import annotations

from torch import nn

_CLASSES: dict[tuple[type, type], type] = {}


def extend(module: nn.Module, mixin: type, **state) -> None:
    """Give ``module`` the behaviour of ``mixin`` (whose ``forward`` calls ``super().forward``), with ``state`` as
    attributes; the new class is named after both (``CheckpointedBlock``)."""
    key = (mixin, type(module))
    if key not in _CLASSES:
        _CLASSES[key] = type(f"{mixin.__name__}{type(module).__name__}", (mixin, type(module)), {})
    module.__class__ = _CLASSES[key]
    for name, value in state.items():
        setattr(module, name, value)
