"""Building blocks shared by the model families: norms, positions, attention, MLPs and masks.

Everything here is plain single-process PyTorch. Tensor parallelism shards the ``nn.Linear`` modules afterwards, so
attention reads its local head counts from tensor shapes rather than from the config.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------------------------------------------------
# Norms
# ----------------------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale. Statistics are taken in fp32 so bf16 activations stay stable."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def make_norm(kind: str, dim: int, eps: float, bias: bool) -> nn.Module:
    """LayerNorm (with a bias only when ``bias``) or RMSNorm (never a bias)."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm {kind!r}; expected 'layernorm' or 'rmsnorm'")


NORM_TYPES = (nn.LayerNorm, RMSNorm)

# ----------------------------------------------------------------------------------------------------------------------
# Positions
# ----------------------------------------------------------------------------------------------------------------------


class SinusoidalPositions(nn.Module):
    """Fixed sin/cos position signal of the original Transformer: even dims sin(p / 10000^(2i/d)), odd dims cos.

    It has no parameters and no buffers: the signal is computed from ``position_ids`` on every call, so it works on
    the meta device, for any position, and never appears in a state dict.
    """

    def __init__(self, dim: int, base: float = 10000.0) -> None:
        super().__init__()
        self.dim = dim
        self.base = base

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        half = torch.arange(0, self.dim, 2, device=position_ids.device, dtype=torch.float32)
        angles = position_ids[..., None].float() / self.base ** (half / self.dim)  # [b, s, ceil(d/2)]
        out = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)  # interleave: sin, cos, sin, cos, ...
        return out[..., : self.dim]

    def extra_repr(self) -> str:
        return f"{self.dim}, base={self.base}"


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None, device=None) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d) of rotary embeddings, optionally with Llama-3's long-context rescaling.

    ``scaling`` follows HF's ``rope_scaling`` dict with ``rope_type: llama3`` (factor, low_freq_factor,
    high_freq_factor, original_max_position_embeddings): long wavelengths are slowed by ``factor``, short ones kept,
    and the band between is interpolated smoothly.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind in ("default", None):
        return inv_freq
    if kind != "llama3":
        raise ValueError(f"unsupported rope scaling {kind!r}; only 'llama3' is implemented")
    factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old_len / wavelen) - lo) / (hi - lo)
    scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
    mid = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)


def rotary_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, scaling: dict | None = None, dtype=torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [b, s, head_dim] for ``position_ids`` [b, s], in HF-Llama's rotate-half layout.

    Computed per forward from the ids (no cached buffer), so any positions work, including ones reset per document.
    """
    inv_freq = rope_inv_freq(head_dim, theta, scaling, device=position_ids.device)
    freqs = position_ids[..., None].float() * inv_freq  # [b, s, d/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [b, heads, s, d] by the angles in cos/sin [b, s, d]: pairs are (i, i + d/2), as in HF Llama.

    The product is taken in the wider of the two dtypes (fp32 tables under autocast) and returned in ``x``'s dtype.
    """
    cos, sin = cos[:, None], sin[:, None]
    return (x * cos + rotate_half(x) * sin).type_as(x)


# ----------------------------------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------------------------------


def build_attention_mask(
    seq_len: int,
    document_ids: torch.Tensor | None = None,
    padding_mask: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """Boolean mask [b, 1, s, s] (True = may attend) that is causal, within one document and over real keys only.

    Returns None when only causality is needed, so attention can take SDPA's fast ``is_causal`` path. A query whose
    whole row would be masked (a left-padded position) is allowed to see itself: its output is junk but finite, and
    no real token ever attends to it.
    """
    if document_ids is None and padding_mask is None:
        return None
    ref = document_ids if document_ids is not None else padding_mask
    device = device or ref.device
    mask = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()[None, None]  # [1, 1, s, s]
    if document_ids is not None:
        mask = mask & (document_ids[:, None, :, None] == document_ids[:, None, None, :])
    if padding_mask is not None:
        mask = mask & padding_mask.bool()[:, None, None, :]
    empty_rows = ~mask.any(dim=-1, keepdim=True)
    if empty_rows.any():
        eye = torch.eye(seq_len, dtype=torch.bool, device=device)[None, None]
        mask = mask | (empty_rows & eye)
    return mask


# ----------------------------------------------------------------------------------------------------------------------
# Attention and MLPs
# ----------------------------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head, grouped-query or multi-query self-attention through ``F.scaled_dot_product_attention``."""

    def __init__(
        self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool, dropout: float
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.dropout = dropout
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        # Sizes come from the projections' outputs, not from ``x``: column-sharded projections give the local head
        # counts, and under sequence parallelism they see the whole sequence where ``x`` holds a slice of it.
        b, s = q.shape[:2]
        n_q, n_kv = q.shape[-1] // self.head_dim, k.shape[-1] // self.head_dim
        q = q.view(b, s, n_q, self.head_dim).transpose(1, 2)  # [b, heads, s, d]
        k = k.view(b, s, n_kv, self.head_dim).transpose(1, 2)
        v = v.view(b, s, n_kv, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        # GQA / MQA: each kv head serves n_q / n_kv query heads. SDPA does the grouping itself (enable_gqa) rather
        # than copying the kv heads out, which saves the copy and its backward (a sum over the copies).
        out = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=mask,
            is_causal=mask is None,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=n_kv != n_q,
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, s, n_q * self.head_dim))


ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class MLP(nn.Module):
    """Position-wise feed-forward: ``down(act(up(x)))``, or ``down(silu(gate(x)) * up(x))`` for SwiGLU."""

    def __init__(self, hidden_size: int, ffn_size: int, activation: str, bias: bool) -> None:
        super().__init__()
        if activation != "swiglu" and activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}")
        self.activation = activation
        self.up_proj = nn.Linear(hidden_size, ffn_size, bias=bias)
        self.gate_proj = nn.Linear(hidden_size, ffn_size, bias=bias) if activation == "swiglu" else None
        self.down_proj = nn.Linear(ffn_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is not None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(ACTIVATIONS[self.activation](self.up_proj(x)))

    def extra_repr(self) -> str:
        return f"activation={self.activation}"
