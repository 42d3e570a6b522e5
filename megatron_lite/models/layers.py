"""Building blocks shared by the model families: norms, positions, attention, MLPs and masks.

Everything here is plain single-process PyTorch. Tensor parallelism shards the ``nn.Linear`` modules afterwards, so
attention reads its local head counts from tensor shapes rather than from the config.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask

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
    kernel: str = "auto",
) -> torch.Tensor | BlockMask | None:
    """The mask that keeps attention causal, within one document and over real keys only; None when only causality is
    needed, so attention can take SDPA's fast ``is_causal`` path.

    ``kernel`` picks its form for the attention kernel that will read it (``attention_kernel``): ``"sdpa"`` a dense
    boolean mask [b, 1, s, s] (True = may attend); ``"flex"`` a FlexAttention ``BlockMask``, which skips the blocks
    nobody attends to and never holds s x s scores; ``"auto"`` the one this device runs fast. A query whose whole row
    would be masked (a left-padded position) is allowed to see itself: its output is junk but finite, and no real
    token ever attends to it. (The block mask lets every padded query see itself; real queries see exactly the same
    keys in both forms.)
    """
    if document_ids is None and padding_mask is None:
        return None
    ref = document_ids if document_ids is not None else padding_mask
    device = torch.device(device or ref.device)
    if kernel == "auto":
        kernel = attention_kernel(device)
    if kernel == "flex":
        return _block_mask(seq_len, document_ids, padding_mask, device)
    if kernel != "sdpa":
        raise ValueError(f"attention kernel {kernel!r}: expected 'auto', 'sdpa' or 'flex'")
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


def attention_kernel(device: torch.device) -> str:
    """The kernel masked attention uses on ``device``: FlexAttention on CUDA (with a dense mask and GQA, SDPA would
    fall back to its math kernel, which materializes every head's s x s scores), dense-mask SDPA elsewhere
    (FlexAttention has no CPU backward)."""
    return "flex" if torch.device(device).type == "cuda" else "sdpa"


def _block_mask(seq_len: int, document_ids: torch.Tensor | None, padding_mask: torch.Tensor | None,
                device: torch.device) -> BlockMask:
    """``build_attention_mask``'s rule as a FlexAttention block mask (one for all heads)."""
    from torch.nn.attention.flex_attention import create_block_mask

    docs = None if document_ids is None else document_ids.to(device)
    real = None if padding_mask is None else padding_mask.to(device).bool()

    def causal_same_document_real_key(b, h, q, kv):
        allowed = kv <= q
        if docs is not None:
            allowed = allowed & (docs[b, q] == docs[b, kv])
        if real is not None:
            allowed = allowed & (real[b, kv] | (q == kv))
        return allowed

    batch = (docs if docs is not None else real).shape[0]
    return create_block_mask(causal_same_document_real_key, batch, None, seq_len, seq_len, device=device)


def dense_mask(mask: BlockMask) -> torch.Tensor:
    """A block mask's rule as the dense boolean mask [b, 1, q, k], for what FlexAttention does not take (an additive
    bias, attention dropout, cached keys)."""
    from torch.nn.attention.flex_attention import create_mask

    b, _, q, k = mask.shape
    return create_mask(mask.mask_mod, b, 1, q, k, device=mask.kv_num_blocks.device)


# Head sizes FlexAttention's kernels are sure to take; others run dense-mask SDPA.
FLEX_HEAD_DIMS = (16, 32, 64, 128, 256)


@functools.cache
def _compiled_flex_attention():
    """FlexAttention compiled once per process: uncompiled, it runs a reference implementation that materializes the
    scores."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask, scale: float | None,
                   enable_gqa: bool) -> torch.Tensor:
    """FlexAttention, compiled on CUDA; inside a compiled block the block's compilation covers it, and elsewhere (the
    CPU, which runs its forward only) it runs eagerly."""
    if q.device.type == "cuda" and not torch.compiler.is_compiling():
        run = _compiled_flex_attention()
    else:
        from torch.nn.attention.flex_attention import flex_attention as run
    return run(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)


# ----------------------------------------------------------------------------------------------------------------------
# Attention and MLPs
# ----------------------------------------------------------------------------------------------------------------------


class KVCache:
    """Keys and values of one attention layer kept between generation steps, so each step projects only new tokens.

    Self-attention appends the new tokens' keys and values; cross-attention (``static``) keeps the encoder's, projected
    once on the first step.
    """

    def __init__(self, static: bool = False) -> None:
        self.static = static
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is not None and not self.static:
            k, v = torch.cat((self.k, k), dim=2), torch.cat((self.v, v), dim=2)
        self.k, self.v = k, v
        return k, v

    @property
    def length(self) -> int:
        """Positions held so far (0 before the first step)."""
        return 0 if self.k is None else self.k.shape[2]


class Attention(nn.Module):
    """Multi-head, grouped-query or multi-query attention through ``F.scaled_dot_product_attention``, or FlexAttention
    when given a block mask (``build_attention_mask`` makes one on CUDA).

    Self-attention by default; with ``kv`` the keys and values come from another sequence (cross-attention).
    ``scale`` multiplies the logits (None: 1/sqrt(head_dim); T5 uses 1.0, having folded the factor into its init).
    """

    def __init__(
        self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool, dropout: float,
        scale: float | None = None, qkv_bias: bool | None = None,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.dropout = dropout
        self.scale = scale
        qkv_bias = bias if qkv_bias is None else qkv_bias
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias)

    def gather_keys(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The self-attention keys and values [b, heads, t, d] the queries see: those just projected. A point to
        extend where the sequence is split over processes and the other parts' keys must join (they come after the
        rotary embedding, in the order the mask's columns follow)."""
        return k, v

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        *,
        causal: bool = False,
        kv: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """``x`` [b, s, h] attends to itself, or to ``kv`` [b, t, h] when given.

        ``mask`` (bool, True = may attend, broadcast to [b, heads, s, t], or a FlexAttention ``BlockMask``) is used as
        given, so it must hold causality itself where needed (``build_attention_mask`` builds it so); ``causal`` asks
        for causality when there is no mask. A block mask runs FlexAttention, unless the call needs what it lacks (a
        bias, dropout, cached keys, an unusual head size): then its rule runs as a dense mask through SDPA. ``bias`` (float, broadcast to [b, heads, s, t]) is added to the logits: T5's relative positions.
        ``cache`` keeps keys and values between generation steps; the new queries are the last ``s`` positions.
        """
        q = self.q_proj(x)
        # Sizes come from the projections' outputs, not from ``x``: column-sharded projections give the local head
        # counts, and under sequence parallelism they see the whole sequence where ``x`` holds a slice of it.
        b, s = q.shape[:2]
        n_q = q.shape[-1] // self.head_dim
        q = q.view(b, s, n_q, self.head_dim).transpose(1, 2)  # [b, heads, s, d]
        if cache is not None and cache.static and cache.k is not None:
            k, v = cache.k, cache.v  # cross-attention during generation: the encoder's keys, projected once
        else:
            source = x if kv is None else kv
            k, v = self.k_proj(source), self.v_proj(source)
            t, n_kv = k.shape[1], k.shape[-1] // self.head_dim
            k = k.view(b, t, n_kv, self.head_dim).transpose(1, 2)
            v = v.view(b, t, n_kv, self.head_dim).transpose(1, 2)
            if rope is not None:
                q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
            if cache is not None:
                k, v = cache.update(k, v)
            elif kv is None:
                k, v = self.gather_keys(k, v)
        n_kv, t = k.shape[1], k.shape[2]
        dropout = self.dropout if self.training else 0.0
        if isinstance(mask, BlockMask):
            if bias is None and cache is None and dropout == 0.0 and tuple(mask.shape[-2:]) == (s, t) \
                    and self.head_dim in FLEX_HEAD_DIMS:
                # FlexAttention groups the query heads of each kv head itself (enable_gqa), block mask and all
                out = flex_attention(q, k, v, mask, self.scale, enable_gqa=n_kv != n_q)
                return self.o_proj(out.transpose(1, 2).reshape(b, s, n_q * self.head_dim))
            mask = dense_mask(mask)
        if causal and mask is None and (t != s or bias is not None):
            # SDPA's causal path takes neither a bias nor queries that are the last s of t (cached) positions
            mask = torch.ones(s, t, dtype=torch.bool, device=q.device).tril(t - s)
        attn_mask = mask
        if bias is not None:
            bias = bias.to(q.dtype)
            attn_mask = bias if mask is None else bias.masked_fill(~mask, torch.finfo(q.dtype).min)
        # GQA / MQA: each kv head serves n_q / n_kv query heads. SDPA does the grouping itself (enable_gqa) rather
        # than copying the kv heads out, which saves the copy and its backward (a sum over the copies). On CUDA a mask
        # with enable_gqa leaves SDPA only its math kernel, so there the kv heads are copied out for the
        # memory-efficient kernel, which takes masks.
        gqa = n_kv != n_q
        if gqa and attn_mask is not None and q.device.type == "cuda":
            k, v = k.repeat_interleave(n_q // n_kv, dim=1), v.repeat_interleave(n_q // n_kv, dim=1)
            gqa = False
        out = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=attn_mask,
            is_causal=causal and attn_mask is None,
            dropout_p=dropout,
            scale=self.scale,
            enable_gqa=gqa,
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, s, n_q * self.head_dim))


def relative_position_buckets(
    relative: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's bucket of each relative position ``key - query``: exact for small distances, logarithmic up to
    ``max_distance``, one bucket for everything beyond. Bidirectional (encoder) buckets spend half of the buckets on
    keys after the query; a causal decoder only ever sees keys before it.
    """
    buckets = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative > 0).long() * num_buckets
        distance = relative.abs()
    else:
        distance = (-relative).clamp(min=0)
    exact = num_buckets // 2
    # log-spaced buckets from ``exact`` to ``max_distance``, the last one open-ended
    far = exact + (
        torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact) * (num_buckets - exact)
    ).long()
    far = far.clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < exact, distance, far)


class RelativePositionBias(nn.Module):
    """One learned scalar per (bucket, head), added to the attention logits (T5). A stack computes it once, before
    its first layer, and every layer of the stack reuses it. ``weight`` is [buckets, heads]."""

    def __init__(self, num_heads: int, num_buckets: int, max_distance: int, bidirectional: bool) -> None:
        super().__init__()
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional
        self.weight = nn.Parameter(torch.zeros(num_buckets, num_heads))

    def forward(self, query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
        """Bias [1, heads, q, k] for 1-D ``query_positions`` [q] and ``key_positions`` [k]."""
        relative = key_positions[None, :] - query_positions[:, None]
        buckets = relative_position_buckets(relative, self.bidirectional, self.num_buckets, self.max_distance)
        return F.embedding(buckets, self.weight).permute(2, 0, 1)[None]

    def extra_repr(self) -> str:
        return f"buckets={self.num_buckets}, max_distance={self.max_distance}, bidirectional={self.bidirectional}"


ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


# Gated units: down(act(gate(x)) * up(x)). SwiGLU (Llama) and GEGLU with tanh-GELU (T5 v1.1's "gated-gelu").
GATED_ACTIVATIONS = {
    "swiglu": F.silu,
    "geglu": ACTIVATIONS["gelu_tanh"],
}


class MLP(nn.Module):
    """Position-wise feed-forward: ``down(act(up(x)))``, or ``down(act(gate(x)) * up(x))`` for a gated unit."""

    def __init__(self, hidden_size: int, ffn_size: int, activation: str, bias: bool) -> None:
        super().__init__()
        if activation not in GATED_ACTIVATIONS and activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}")
        self.activation = activation
        gated = activation in GATED_ACTIVATIONS
        self.up_proj = nn.Linear(hidden_size, ffn_size, bias=bias)
        self.gate_proj = nn.Linear(hidden_size, ffn_size, bias=bias) if gated else None
        self.down_proj = nn.Linear(ffn_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is not None:
            return self.down_proj(GATED_ACTIVATIONS[self.activation](self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(ACTIVATIONS[self.activation](self.up_proj(x)))

    def extra_repr(self) -> str:
        return f"activation={self.activation}"
