"""Context parallelism: each sample's sequence split over the cp ranks, attention over all-gathered keys and values.

**Split with load balance.** A sequence of ``s`` tokens is cut into ``2 x cp`` chunks; cp rank ``i`` holds chunks ``i``
and ``2cp - 1 - i`` (``split_sequence``), so under a causal mask every rank does the same work: one chunk early in
the sequence (few keys to look at) and one late (many). Positions, document ids and padding masks describe the whole
sequence; they are computed before the split (the loader's, or 0..s-1) and split with the tokens, so rotary embeddings
and masks see each token's true place.

**Attention.** Each rank projects its own tokens; after the rotary embedding, the keys and values of all cp ranks are
all-gathered along the sequence (``all_gather``: its backward is the reduce-scatter that returns each rank the
gradient of its own keys and values, summed over every rank's queries), in rank order, chunk pairs side by side.
The mask is built for this rank's queries against every gathered key from their positions, document ids and padding
(a key may be attended when it is not after the query, is in the same document and is real), which is the whole
sequence's causal, document and padding mask, rows and columns permuted. With grouped-query attention the keys and
values are small, which is why gathering them (as Llama 3's training did) is cheap next to the queries' work.

The model offers the two points this needs and does nothing at them itself: ``Attention.gather_keys`` and
``DecoderLM.attention_mask``. ``apply_context_parallel`` gives those modules a class of their own (``extend.py``) that
fills them in, so the model code stays single-process and ``print(model)`` shows what changed. Mixture-of-experts
layers route each token alone, but take their balancing loss per whole sequence: their ``sequence_totals`` point sums
a sequence's expert choices and router probabilities over the cp ranks (``all_reduce_sum``, so each part's gradient
is what every rank's use of the totals asks of it).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megatron_lite.parallel.collectives import all_gather, all_reduce_sum
from megatron_lite.parallel.extend import extend
from megatron_lite.topology import Topology

SEQUENCE_DIM = 1  # [batch, sequence] inputs and [batch, sequence, hidden] activations
SPLIT_KEYS = ("input_ids", "labels", "position_ids", "document_ids", "padding_mask")


def chunk_indices(cp: int, rank: int) -> tuple[int, int]:
    """The two of the ``2 x cp`` chunks that cp rank ``rank`` holds: one from each end."""
    return rank, 2 * cp - 1 - rank


def split_sequence(mb: dict[str, torch.Tensor], cp: int, rank: int) -> dict[str, torch.Tensor]:
    """This cp rank's tokens of every [batch, sequence] tensor of a microbatch, positions made first if absent."""
    if cp == 1:
        return mb
    out = dict(mb)
    ids = mb["input_ids"]
    if "position_ids" not in out:
        out["position_ids"] = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
    first, second = chunk_indices(cp, rank)
    for key in SPLIT_KEYS:
        if key in out:
            t = out[key]
            chunks = t.reshape(t.shape[0], 2 * cp, t.shape[1] // (2 * cp), *t.shape[2:])
            out[key] = torch.cat((chunks[:, first], chunks[:, second]), dim=1)
    return out


def _gather_plain(x: torch.Tensor, group) -> torch.Tensor:
    """Every cp rank's ``x`` [b, s_local], concatenated along the sequence in rank order (no gradient)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=SEQUENCE_DIM)


class ContextParallelAttention:
    """Self-attention whose keys and values are every cp rank's (gathered after the rotary embedding)."""

    cp_group: object

    def gather_keys(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return all_gather(k, 2, self.cp_group), all_gather(v, 2, self.cp_group)  # [b, heads, t, d]


class ContextParallelDecoder:
    """A decoder whose attention mask is this rank's queries against every cp rank's keys."""

    cp_group: object

    def attention_mask(self, position_ids: torch.Tensor, document_ids: torch.Tensor | None,
                       padding_mask: torch.Tensor | None, device: torch.device):
        """A dense boolean mask [b, 1, s_local, s] on the CPU; on CUDA the same rule as a FlexAttention block mask,
        so that attention skips the masked blocks instead of falling back to a kernel that keeps every score."""
        if torch.device(device).type == "cuda":
            return _block_mask(position_ids, document_ids, padding_mask, self.cp_group, device)
        with torch.no_grad():
            q_pos = position_ids.to(device)
            k_pos = _gather_plain(q_pos, self.cp_group)
            allowed = k_pos[:, None, :] <= q_pos[:, :, None]  # [b, s_local, s]
            same = torch.ones_like(allowed)
            if document_ids is not None:
                docs = document_ids.to(device)
                same = _gather_plain(docs, self.cp_group)[:, None, :] == docs[:, :, None]
                allowed = allowed & same
            if padding_mask is not None:
                allowed = allowed & _gather_plain(padding_mask.to(device).bool(), self.cp_group)[:, None, :]
            # a query with no key left (padding at the start) attends to itself, as the unsplit mask lets it
            empty = ~allowed.any(dim=-1, keepdim=True)
            allowed = allowed | (empty & same & (k_pos[:, None, :] == q_pos[:, :, None]))
            return allowed[:, None]  # [b, 1, s_local, s]


class ContextParallelMoE:
    """A mixture layer whose per-sequence sums cover every cp rank's part of the sequence."""

    cp_group: object
    cp: int

    def sequence_totals(self, picked: torch.Tensor, prob_sums: torch.Tensor,
                        seq_len: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        with torch.no_grad():
            picked = picked.clone()
            dist.all_reduce(picked, group=self.cp_group)
        return picked, all_reduce_sum(prob_sums, self.cp_group), seq_len * self.cp


def _block_mask(position_ids: torch.Tensor, document_ids: torch.Tensor | None, padding_mask: torch.Tensor | None,
                group, device: torch.device):
    """``ContextParallelDecoder.attention_mask``'s rule as a FlexAttention block mask over the gathered keys."""
    from torch.nn.attention.flex_attention import create_block_mask

    with torch.no_grad():
        q_pos = position_ids.to(device)
        k_pos = _gather_plain(q_pos, group)
        q_doc = k_doc = real = None
        if document_ids is not None:
            q_doc = document_ids.to(device)
            k_doc = _gather_plain(q_doc, group)
        if padding_mask is not None:
            real = _gather_plain(padding_mask.to(device).bool(), group)

    def rule(b, h, q, kv):
        allowed = k_pos[b, kv] <= q_pos[b, q]
        if q_doc is not None:
            allowed = allowed & (k_doc[b, kv] == q_doc[b, q])
        if real is not None:
            allowed = allowed & (real[b, kv] | (k_pos[b, kv] == q_pos[b, q]))
        return allowed

    batch, s_local = q_pos.shape
    return create_block_mask(rule, batch, None, s_local, k_pos.shape[1], device=device)


def apply_context_parallel(model: nn.Module, topology: Topology) -> nn.Module:
    """Give the model and its self-attention layers their context-parallel classes; in place. The model must offer
    ``attention_mask`` and its attention layers ``gather_keys`` (the decoder family does)."""
    if topology.cp == 1:
        return model
    group = topology.group("cp")
    if not hasattr(model, "attention_mask"):
        raise TypeError(f"{type(model).__name__} has no attention_mask to build a context-parallel mask with")
    extend(model, ContextParallelDecoder, cp_group=group)
    for module in model.modules():
        if hasattr(module, "gather_keys"):
            extend(module, ContextParallelAttention, cp_group=group)
        if hasattr(module, "sequence_totals"):
            extend(module, ContextParallelMoE, cp_group=group, cp=topology.cp)
    return model
