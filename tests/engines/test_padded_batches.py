"""Padded batches: every engine weights each valid token equally across microbatches and data-parallel ranks.

Documents of uneven length, one per sample, right-padded (``data.packing=padded``), with 4 microbatches per step on
each of 2 data-parallel ranks (8 on one process). A mean of per-microbatch means would weight a short document's tokens more than a long one's; the step
must instead give the summed token loss of the global batch divided by its valid-token count, which this test also
computes by hand from the same initial weights.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_lite.config import load_config
from megatron_lite.data import GlobalBatchLoader, build_datasets
from megatron_lite.models import build_model
from megatron_lite.parity import compare_layouts


TOLERANCE = 1e-5
LAYOUTS = ["single", "ddp2", "zero1", "zero3", "fsdp2"]


def _first_batch_by_hand(config: str) -> tuple[float, float, list[int]]:
    """(summed token loss / valid tokens, mean of microbatch means, valid tokens per microbatch) of global batch 0."""
    cfg = load_config(config)
    model = build_model(cfg.model, seed=cfg.training.seed)  # the weights every engine starts from
    data = build_datasets(cfg.data, {"train": cfg.global_batch_size}, log=lambda *_: None)["train"]
    loader = GlobalBatchLoader(data, cfg.global_batch_size, cfg.training.micro_batch_size, 0, 1, prefetch=0)
    total, count, means, counts = 0.0, 0, [], []
    with torch.no_grad():
        for mb in next(iter(loader)):
            logits = model(mb["input_ids"], padding_mask=mb["padding_mask"])[..., : cfg.model.vocab_size]
            token_losses = F.cross_entropy(logits.double().flatten(0, 1), mb["labels"].flatten(), reduction="none")
            valid = mb["labels"].flatten() != -100
            total += token_losses[valid].sum().item()
            count += int(valid.sum())
            means.append(token_losses[valid].mean().item())
            counts.append(int(valid.sum()))
    return total / count, sum(means) / len(means), counts


def test_padded_batches_match_across_layouts_and_by_hand(padded_config):
    by_hand, mean_of_means, counts = _first_batch_by_hand(padded_config)
    assert len(counts) == 8 and len(set(counts)) > 1  # 8 microbatches on one process, of different token counts
    assert abs(by_hand - mean_of_means) > 100 * TOLERANCE  # the test tells the two normalizations apart

    report = compare_layouts(padded_config, LAYOUTS, steps=3, timeout=300)
    print("\n" + report.table())
    assert not report.errors, report.errors
    assert report.failures(TOLERANCE) == [], report.table()
    for name in LAYOUTS:
        assert report.losses[name][0] == pytest.approx(by_hand, abs=TOLERANCE), name
