"""AdamW with weight decay kept off norms, biases and embeddings (each configurable)."""

from __future__ import annotations

import torch
from torch import nn

from megatron_lite.config import OptimizerConfig


def no_decay_names(model: nn.Module, cfg: OptimizerConfig) -> set[str]:
    """Names of parameters that get no weight decay.

    Decided by module type rather than by name patterns, so it holds for any architecture: embeddings are
    ``nn.Embedding`` weights, biases are parameters named ``bias``, norms are the 1-D weights of any other module.
    """
    names: set[str] = set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(module, nn.Embedding):
                skip = cfg.no_decay_embeddings
            elif p_name == "bias":
                skip = cfg.no_decay_biases
            elif p.ndim < 2:
                skip = cfg.no_decay_norms
            else:
                skip = False
            if skip:
                names.add(full)
    return names


def param_groups(model: nn.Module, cfg: OptimizerConfig) -> list[dict]:
    """Two AdamW groups (decay, no decay); tied parameters appear once, under their first name."""
    skip = no_decay_names(model, cfg)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name in skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_adamw(model: nn.Module, cfg: OptimizerConfig, device: torch.device) -> torch.optim.AdamW:
    """torch AdamW; fused kernels on GPU unless ``optimizer.fused`` says otherwise."""
    fused = cfg.fused if cfg.fused is not None else device.type == "cuda"
    return torch.optim.AdamW(
        param_groups(model, cfg),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=fused or None,
    )
