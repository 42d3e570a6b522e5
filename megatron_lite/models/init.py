"""Initial weights that depend on the seed and each tensor's name only, never on how the model is laid out.

A tensor's initial value is drawn in blocks of ``BLOCK`` consecutive elements (of the flattened tensor); block ``b``
of the tensor named ``name`` comes from a generator seeded with a hash of ``(seed, name, b)``. So:

- one process, FSDP, ZeRO-3, and tensor- or pipeline-parallel shards all start from the same full weights;
- a rank that holds a slice of a tensor draws only the blocks that overlap its slice, never the whole tensor (a
  contiguous row range of a 1B-element embedding costs its own share, not 4 GB of draws);
- values are drawn on the CPU in fp32, so they are the same on every device type.

Models say *what* each tensor starts as (an ``InitRule`` per parameter name); code that knows the layout (the engines)
decides *which part* of it a rank materializes, through :func:`initial_values`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

BLOCK = 1 << 20  # elements per independently seeded block: small enough to waste little at a slice's edges


@dataclass(frozen=True)
class InitRule:
    """How one tensor starts: ``normal`` with mean 0 and ``std``, or constant ``ones`` / ``zeros``."""

    kind: Literal["normal", "ones", "zeros"]
    std: float = 0.0


def block_seed(seed: int, name: str, block: int) -> int:
    """A 63-bit generator seed for block ``block`` of tensor ``name``: a pure function of its three inputs."""
    digest = hashlib.sha256(f"{seed}\0{name}\0{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def initial_values(rule: InitRule, name: str, numel: int, seed: int, start: int = 0, end: int | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Elements ``[start, end)`` of the flattened initial value of tensor ``name`` (``numel`` elements).

    Written into ``out`` (1-D, ``end - start`` elements, any dtype and device) when given, so that filling a parameter
    needs no second copy of it; else returned as a new fp32 CPU tensor.
    """
    end = numel if end is None else end
    if not 0 <= start <= end <= numel:
        raise ValueError(f"{name}: element range [{start}, {end}) is outside a tensor of {numel} elements")
    if out is None:
        out = torch.empty(end - start)
    if rule.kind in ("ones", "zeros"):
        return out.fill_(1.0 if rule.kind == "ones" else 0.0)
    for b in range(start // BLOCK, math.ceil(end / BLOCK)):
        lo, hi = b * BLOCK, min((b + 1) * BLOCK, numel)
        block = torch.empty(hi - lo)
        block.normal_(0.0, rule.std, generator=torch.Generator().manual_seed(block_seed(seed, name, b)))
        a, z = max(lo, start), min(hi, end)
        out[a - start : z - start] = block[a - lo : z - lo]
    return out


def initial_box(rule: InitRule, name: str, shape: torch.Size, seed: int, offset: tuple[int, ...],
                local: tuple[int, ...]) -> torch.Tensor:
    """The box ``[offset, offset + local)`` (one range per dimension) of tensor ``name``'s initial value.

    Draws the rows the box spans along dimension 0 and cuts the other dimensions from them: exact for any box, and
    only the rank's share when the box is a row range (FSDP and column-parallel shards).
    """
    shape = torch.Size(shape)
    if len(shape) == 0:
        return initial_values(rule, name, 1, seed).reshape(())
    row = math.prod(shape[1:])
    r0, r1 = offset[0], offset[0] + local[0]
    rows = initial_values(rule, name, math.prod(shape), seed, r0 * row, r1 * row).view(r1 - r0, *shape[1:])
    index = tuple(slice(o, o + n) for o, n in zip(offset[1:], local[1:]))
    return rows[(slice(None), *index)]


def to_empty_keeping_ties(model: nn.Module, device: torch.device | str) -> None:
    """``model.to_empty(device)``, except that a parameter shared by several modules (tied weights) stays shared.

    ``nn.Module.to_empty`` replaces each module's parameters one module at a time and so unties them; here every
    distinct tensor gets one new parameter that all its modules point to. DTensor parameters (already sharded on the
    meta device) get storage for their local shard only. Buffers have no initial-value rule, so a model built this way
    must not keep any on the meta device (the decoder computes its position tables on the fly), except in a module
    that sets them itself (``init_buffers``: the mixture layers' balancing bias).
    """
    for module in model.modules():
        if hasattr(module, "init_buffers") and any(b.is_meta for b in module.buffers(recurse=False)):
            for key, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[key] = torch.empty_like(buf, device=device)
            module.init_buffers()
    for name, buf in model.named_buffers():
        if buf.is_meta:
            raise ValueError(f"buffer {name} is on the meta device and has no initial value; compute it in forward")
    new: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for key, p in module._parameters.items():
            if p is None:
                continue
            if id(p) not in new:
                new[id(p)] = nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
                # attributes set on the tensor (e.g. its partition) carry over; a tensor subclass's own state does not
                new[id(p)].__dict__.update({k: v for k, v in p.__dict__.items() if not k.startswith("_")})
            module._parameters[key] = new[id(p)]


@torch.no_grad()
def init_full_(model: nn.Module, rules: dict[str, InitRule], seed: int) -> None:
    """Fill every (whole, unsharded) parameter of ``model`` with its initial value."""
    for name, p in model.named_parameters():
        initial_values(rules[name], name, p.numel(), seed, out=p.view(-1))


def build_initialized(model_cls: type, family: str, cfg, device: str | torch.device = "cpu", seed: int = 0):
    """``model_cls(cfg)`` on ``device`` with its by-name initial values from ``seed``; on "meta" only shapes exist.

    Parameters are created on the meta device and then materialized once with their by-name initial values, the same
    values every parallel layout starts from for the same seed (engines build their own shards this way).
    """
    cfg.validate()
    if cfg.family != family:
        raise ValueError(f"{model_cls.__name__} is the {family} family, got model.family={cfg.family!r}")
    with torch.device("meta"):
        model = model_cls(cfg)
    device = torch.device(device)
    if device.type == "meta":
        return model
    to_empty_keeping_ties(model, device)
    init_full_(model, model.init_rules(), seed)
    return model


def distinct_numel(model: nn.Module, excluded: tuple[nn.Module | None, ...] = ()) -> int:
    """Elements of ``model``'s distinct parameters (a tied matrix counts once), leaving out those of ``excluded``."""
    seen = {id(p): p.numel() for p in model.parameters()}
    for module in excluded:
        for p in module.parameters() if module is not None else ():
            seen.pop(id(p), None)
    return sum(seen.values())


def child_numel(model: nn.Module, names: tuple[str, ...]) -> int:
    """Elements of the parameters of ``model``'s named children (those it has), e.g. a pipeline stage's parts."""
    return sum(p.numel() for name in names if getattr(model, name, None) is not None
               for p in getattr(model, name).parameters())
