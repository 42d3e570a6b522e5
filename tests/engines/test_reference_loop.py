"""The single engine against a training loop written here in plain PyTorch, sharing nothing with ``engines/``.

Every parity test compares a layout with ``single``, which runs the same shared step, the same norm, the same clipping
and the same optimizer groups as every layout: a bug there would pass all of them. This loop writes each part out
again from its definition: the summed cross-entropy over valid labels (the real vocabulary's columns only) divided
by the global batch's valid-token count, backward per microbatch, ``clip_grads_with_norm_`` on the fp64 norm,
``torch.optim.AdamW`` with the weight-decay groups listed below, and the warmup-cosine learning rate. Three steps of ``single`` must give the same
losses, gradient norms (before clipping) and final weights within 1e-6, for packed and padded data, with label
smoothing and with accumulation over 8 microbatches. The clipping bound is low enough that every step clips.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from megatron_lite.config import load_config
from megatron_lite.data import GlobalBatchLoader, build_datasets
from megatron_lite.models import build_model
from megatron_lite.parity import run_layout

STEPS = 3
CLIP = 0.2  # below every step's gradient norm here, so clipping acts


def warmup_cosine(step: int, peak: float, floor: float, warmup: int, decay: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min((step - warmup) / decay, 1.0)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def reference_loop(config: str, overrides: list[str]) -> tuple[list[float], list[float], dict[str, torch.Tensor]]:
    cfg = load_config(config, overrides)
    opt, sched, vocab = cfg.optimizer, cfg.schedule, cfg.model.vocab_size
    assert sched.kind == "cosine"
    model = build_model(cfg.model, seed=cfg.training.seed)
    # weight decay on the matrices of attention and MLPs only: not on embeddings (the tied head is the embedding),
    # norm scales or biases
    no_decay = [p for n, p in model.named_parameters() if n.startswith("embed.") or p.dim() < 2]
    decay = [p for n, p in model.named_parameters() if not (n.startswith("embed.") or p.dim() < 2)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": opt.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps)
    data = build_datasets(cfg.data, {"train": STEPS * cfg.global_batch_size}, log=lambda *_: None)["train"]
    loader = iter(GlobalBatchLoader(data, cfg.global_batch_size, cfg.training.micro_batch_size, 0, 1, prefetch=0))
    losses, norms = [], []
    for step in range(STEPS):
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine(step, opt.lr, opt.min_lr, sched.warmup_steps, sched.decay_steps)
        optimizer.zero_grad()
        microbatches = next(loader)
        tokens = sum(int((mb["labels"] != -100).sum()) for mb in microbatches)
        total = 0.0
        for mb in microbatches:
            inputs = {k: v for k, v in mb.items() if k != "labels"}
            logits = model(**inputs)[..., :vocab]
            loss = F.cross_entropy(logits.float().flatten(0, 1), mb["labels"].flatten(), ignore_index=-100,
                                   label_smoothing=cfg.training.label_smoothing, reduction="sum")
            (loss / tokens).backward()
            total += loss.item()
        # clip_grad_norm_'s own norm is summed in fp32 (4e-4 off for a large CPU tensor): the exact one, then its clip
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads]))
        torch.nn.utils.clip_grads_with_norm_(model.parameters(), CLIP, norm)
        norms.append(float(norm))
        optimizer.step()
        losses.append(total / tokens)
    return losses, norms, {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "variant, config, extra",
    [
        ("packed", "tiny_config", []),
        ("padded", "padded_config", []),
        ("label smoothing", "tiny_config", ["training.label_smoothing=0.1"]),
        ("8 microbatches", "padded_config", ["training.micro_batch_size=2", "training.global_batch_size=16"]),
    ],
)
def test_single_equals_a_plain_pytorch_loop(request, tmp_path, variant, config, extra):
    config = request.getfixturevalue(config)
    overrides = [*extra, f"training.grad_clip={CLIP}", f"training.train_steps={STEPS}", "training.eval_interval=0",
                 "schedule.kind=cosine", "schedule.warmup_steps=1", "schedule.decay_steps=8"]
    losses, norms, weights = reference_loop(config, overrides)
    run = run_layout("single", config, [*overrides, f"checkpoint.interval={STEPS}"], checkpoint_dir=tmp_path)
    assert max(abs(a - b) for a, b in zip(run.losses, losses)) < 1e-6, (run.losses, losses)
    assert max(abs(a - b) for a, b in zip(run.grad_norms, norms)) < 1e-6, (run.grad_norms, norms)
    assert all(n > CLIP for n in norms)  # every step clipped
    checkpoint = tmp_path / f"step_{STEPS:08d}"
    assert json.loads((checkpoint / "meta.json").read_text())["step"] == STEPS
    saved = {}
    for f in checkpoint.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as handle:
            saved.update({k[len("model."):]: handle.get_tensor(k) for k in handle.keys() if k.startswith("model.")})
    assert set(saved) >= set(weights)
    worst = max((saved[n] - w).abs().max().item() for n, w in weights.items())
    assert worst < 1e-6, f"{variant}: final weights differ by {worst:.2e}"
