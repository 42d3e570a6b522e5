"""Token losses as sums with their token counts, so that a step can weight every valid token equally.

A mean per microbatch is exact only when every microbatch holds the same number of valid tokens (packed data).
Padded batches do not, so the step adds up token losses over all microbatches and data-parallel ranks and divides by
the total number of valid tokens once (``engines/base.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_lite.constants import IGNORE_INDEX


def token_loss_sum(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0, vocab_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token cross-entropy in fp32 over labels other than -100, and the number of those labels.

    With ``vocab_size``, the columns past it (the padding that rounds the vocabulary up to a multiple of 128) are left
    out of the softmax, so they take no probability mass and label smoothing spreads only over real tokens.
    """
    if vocab_size is not None and logits.size(-1) > vocab_size:
        logits = logits[..., :vocab_size]
    total = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        label_smoothing=label_smoothing,
        reduction="sum",
    )
    return total, valid_tokens(labels)


def valid_tokens(labels: torch.Tensor) -> torch.Tensor:
    """How many labels count towards the loss (those other than -100), as a 0-d int64 tensor."""
    return (labels != IGNORE_INDEX).sum()
