"""AdamW with weight decay kept off norms, biases and embeddings (each configurable)."""

from __future__ import annotations

import torch
from torch import nn

from megatron_lite.config import OptimizerConfig


def no_decay_names(model: nn.Module, cfg: OptimizerConfig) -> set[str]:
    """Names (every name of a tied tensor) of parameters that get no weight decay (``OptimizerConfig.skips_weight_decay``).

    Embeddings are found by module type (``nn.Embedding``), so the rule holds for any architecture, and a matrix tied
    to an embedding is one under each of its names. Ask the plain model (engines do, on the meta device, before any
    parallel layer replaces a module); dimensions are those of the full tensor (ZeRO-3 keeps them in ``ds_shape``).
    """
    embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
    names: set[str] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if cfg.skips_weight_decay(name, len(getattr(p, "ds_shape", p.shape)), id(p) in embeddings):
            names.add(name)
    return names


def param_groups(model: nn.Module, cfg: OptimizerConfig, skip: set[str] | None = None) -> list[dict]:
    """Two AdamW groups (decay, no decay); tied parameters appear once, under their first name.

    ``skip`` (the names that get no decay) defaults to ``no_decay_names(model)``. Engines pass the names they took from
    the plain model before tensor parallelism swapped its modules (an embedding split over the vocabulary is no
    longer an ``nn.Embedding``); names do not change, so the rule still applies by name.
    """
    skip = no_decay_names(model, cfg) if skip is None else skip
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name in skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_adamw(model: nn.Module, cfg: OptimizerConfig, device: torch.device,
                skip: set[str] | None = None) -> torch.optim.AdamW:
    """torch AdamW; fused kernels on GPU unless ``optimizer.fused`` says otherwise; ``skip`` as in ``param_groups``."""
    fused = cfg.fused if cfg.fused is not None else device.type == "cuda"
    return torch.optim.AdamW(
        param_groups(model, cfg, skip),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=fused or None,
    )
