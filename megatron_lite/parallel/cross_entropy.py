"""Cross-entropy over logits sharded along the vocabulary, never gathering them, exact with label smoothing.

Each tensor-parallel rank holds the logits of a contiguous slice of the (padded) vocabulary. With ``z`` the logits of
one token, ``V`` the real vocabulary size (padding columns ``>= V`` are left out wherever they fall) and ``y`` the
label, the smoothed loss is

    loss = logZ - (1 - eps) * z_y - eps * mean_{c < V} z_c,        logZ = log sum_{c < V} exp(z_c)

which is ``F.cross_entropy(z[:V], y, label_smoothing=eps)`` written so that every term is a sum over the vocabulary:
five steps, each a local reduction followed by one all-reduce over the group (max, sum of exp, target logit, sum of
logits). The mean runs over the real vocabulary ``V``, not over one shard: Megatron-LM's version divides by the local
vocabulary size, which is wrong at TP > 1. The gradient is ``softmax - (1 - eps) * onehot(y) - eps / V`` on the real
columns and zero on the padding. Tokens labelled -100 contribute neither loss nor gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_lite.constants import IGNORE_INDEX


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, vocab_start, vocab_size, smoothing, group):
        z = logits.float()
        local = z.shape[-1]
        columns = torch.arange(vocab_start, vocab_start + local, device=z.device)
        real = columns < vocab_size  # padding columns are not part of the softmax
        z = z.masked_fill(~real, float("-inf"))
        zmax = z.max(dim=-1).values
        dist.all_reduce(zmax, op=dist.ReduceOp.MAX, group=group)
        exp = (z - zmax.unsqueeze(-1)).exp()
        sum_exp = exp.sum(dim=-1)
        valid = labels != IGNORE_INDEX
        local_label = labels - vocab_start
        mine = valid & (local_label >= 0) & (local_label < local)
        picked = z.gather(-1, local_label.clamp(0, local - 1).unsqueeze(-1)).squeeze(-1)
        target = torch.where(mine, picked, torch.zeros_like(picked))
        sum_z = z.masked_fill(~real, 0.0).sum(dim=-1)
        stats = torch.stack([sum_exp, target, sum_z])
        dist.all_reduce(stats, group=group)
        sum_exp, target, sum_z = stats
        log_z = zmax + sum_exp.log()
        loss = log_z - (1.0 - smoothing) * target - smoothing * sum_z / vocab_size
        loss = torch.where(valid, loss, torch.zeros_like(loss))
        softmax = exp / sum_exp.unsqueeze(-1)
        ctx.save_for_backward(softmax, local_label, mine, valid, real)
        ctx.smoothing, ctx.vocab_size, ctx.dtype = smoothing, vocab_size, logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_label, mine, valid, real = ctx.saved_tensors
        grad = softmax - ctx.smoothing / ctx.vocab_size * real.to(softmax.dtype)
        onehot = torch.zeros_like(grad).scatter_(-1, local_label.clamp(0, grad.shape[-1] - 1).unsqueeze(-1), 1.0)
        grad = grad - (1.0 - ctx.smoothing) * onehot * mine.unsqueeze(-1)
        grad = grad * (grad_loss * valid).unsqueeze(-1)
        return grad.to(ctx.dtype), None, None, None, None, None


def vocab_parallel_loss_sum(
    logits: torch.Tensor, labels: torch.Tensor, vocab_start: int, vocab_size: int, label_smoothing: float, group
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed token loss, number of valid labels) for ``logits`` [..., local vocab] that hold the columns
    ``[vocab_start, vocab_start + local)`` of the full logits; the same values ``token_loss_sum`` gives at TP = 1."""
    loss = _VocabParallelCrossEntropy.apply(logits, labels, vocab_start, vocab_size, label_smoothing, group)
    return loss.sum(), (labels != IGNORE_INDEX).sum()
