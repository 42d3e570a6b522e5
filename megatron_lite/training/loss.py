"""The causal language-modelling loss, applied outside the model so that parallel plans can swap it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lite.engines.base import ForwardLoss, Microbatch

IGNORE_INDEX = -100


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0, vocab_size: int | None = None
) -> torch.Tensor:
    """Mean token cross-entropy in fp32; labels equal to -100 are ignored.

    With ``vocab_size``, the columns past it (the padding that rounds the vocabulary up to a multiple of 128) are left
    out of the softmax, so they take no probability mass and label smoothing spreads only over real tokens.
    """
    if vocab_size is not None and logits.size(-1) > vocab_size:
        logits = logits[..., :vocab_size]
    return F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        label_smoothing=label_smoothing,
    )


def make_forward_loss(label_smoothing: float = 0.0, vocab_size: int | None = None) -> ForwardLoss:
    """A ForwardLoss for decoder-only models fed by the data loader's microbatches (label smoothing in train mode)."""

    def forward_loss(model: nn.Module, mb: Microbatch) -> torch.Tensor:
        logits = model(
            mb["input_ids"],
            position_ids=mb.get("position_ids"),
            document_ids=mb.get("document_ids"),
            padding_mask=mb.get("padding_mask"),
        )
        # smoothing shapes the training target only: evaluation reports the plain cross-entropy, so that valid_ppl is a
        # perplexity and runs with different smoothing compare
        return causal_lm_loss(logits, mb["labels"], label_smoothing if model.training else 0.0, vocab_size)

    return forward_loss
