"""Closed-form parameter shapes and counts for both model families.

The shapes are listed tensor by tensor, under the names the model code uses, so that the counts can be checked against a
meta-device model name by name, and so that the memory estimate can reproduce per-tensor sharding and padding exactly.
A tied output head is listed once (as ``embed.weight``), as ``nn.Module.parameters()`` does.

Conventions:
- *embedding* parameters are the token table and the learned position table (lookups, no matmul);
- an untied ``lm_head`` is *non-embedding* (it is a real matmul), as in ``DecoderLM.num_params``;
- the decoder's token table has ``padded_vocab_size`` rows; published counts use the unpadded vocabulary, so the vocab
  padding is reported separately (``vocab_padding_params``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_lite.config import ModelConfig
from megatron_lite.planning.encdec import EncDecSpec

Shape = tuple[int, ...]
ModelSpec = ModelConfig | EncDecSpec


@dataclass(frozen=True)
class ParamCounts:
    """Counts for one model; ``per_layer`` maps a stack name ("decoder", or "encoder" and "decoder") to one layer."""

    total: int
    embedding: int
    non_embedding: int
    per_layer: dict[str, int]
    vocab_padding: int
    breakdown: dict[str, int] = field(default_factory=dict)


def _linear(name: str, d_in: int, d_out: int, bias: bool) -> list[tuple[str, Shape]]:
    out = [(f"{name}.weight", (d_out, d_in))]
    if bias:
        out.append((f"{name}.bias", (d_out,)))
    return out


def _norm(name: str, dim: int, kind: str, bias: bool) -> list[tuple[str, Shape]]:
    out = [(f"{name}.weight", (dim,))]
    if kind == "layernorm" and bias:
        out.append((f"{name}.bias", (dim,)))
    return out


def decoder_layer_shapes(cfg: ModelConfig, prefix: str = "") -> list[tuple[str, Shape]]:
    """One decoder block, in the order ``Block.named_parameters()`` yields them."""
    h, d, b = cfg.hidden_size, cfg.head_dim, cfg.bias
    q, kv, f = cfg.num_heads * d, cfg.kv_heads * d, cfg.ffn_size
    shapes = _norm("attn_norm", h, cfg.norm, b)
    shapes += _linear("attn.q_proj", h, q, b) + _linear("attn.k_proj", h, kv, b)
    shapes += _linear("attn.v_proj", h, kv, b) + _linear("attn.o_proj", q, h, b)
    shapes += _norm("mlp_norm", h, cfg.norm, b)
    shapes += _linear("mlp.up_proj", h, f, b)
    if cfg.activation == "swiglu":
        shapes += _linear("mlp.gate_proj", h, f, b)
    shapes += _linear("mlp.down_proj", f, h, b)
    return [(prefix + n, s) for n, s in shapes]


def decoder_shapes(cfg: ModelConfig) -> list[tuple[str, Shape]]:
    """Every distinct parameter of ``DecoderLM(cfg)`` with its shape (tied head listed once, as the embedding)."""
    h, v = cfg.hidden_size, cfg.padded_vocab_size
    shapes: list[tuple[str, Shape]] = [("embed.weight", (v, h))]
    if cfg.position == "learned":
        shapes.append(("pos_embed.weight", (cfg.max_seq_len, h)))
    for i in range(cfg.num_layers):
        shapes += decoder_layer_shapes(cfg, f"layers.{i}.")
    if cfg.norm_position == "pre":
        shapes += _norm("final_norm", h, cfg.norm, cfg.bias)
    if not cfg.tie_embeddings:
        shapes.append(("lm_head.weight", (v, h)))
    return shapes


def model_shapes(spec: ModelSpec) -> list[tuple[str, Shape]]:
    """Named parameter shapes for either family."""
    if isinstance(spec, EncDecSpec):
        return spec.shapes()
    return decoder_shapes(spec)


def _numel(shape: Shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


EMBEDDING_NAMES = ("embed.weight", "pos_embed.weight", "shared.weight")


def count_params(spec: ModelSpec) -> ParamCounts:
    """Total, embedding, non-embedding and per-layer counts from the closed form."""
    shapes = model_shapes(spec)
    total = sum(_numel(s) for _, s in shapes)
    embedding = sum(_numel(s) for n, s in shapes if n in EMBEDDING_NAMES)
    if isinstance(spec, EncDecSpec):
        per_layer = {"encoder": spec.encoder_layer_params(), "decoder": spec.decoder_layer_params()}
        padding = 0
        heads = 0 if spec.tie_embeddings else spec.vocab_size * spec.d_model
        breakdown = {"embedding": embedding, "encoder": spec.encoder_params(), "decoder": spec.decoder_params(),
                     "lm_head": heads}
    else:
        per_layer = {"decoder": sum(_numel(s) for _, s in decoder_layer_shapes(spec))}
        rows = spec.padded_vocab_size - spec.vocab_size
        padding = rows * spec.hidden_size * (1 if spec.tie_embeddings else 2)
        h = spec.hidden_size
        final = h * (2 if spec.norm == "layernorm" and spec.bias else 1) if spec.norm_position == "pre" else 0
        breakdown = {
            "embedding": embedding,
            "layers": per_layer["decoder"] * spec.num_layers,
            "final_norm": final,
            "lm_head": 0 if spec.tie_embeddings else spec.padded_vocab_size * h,
        }
    return ParamCounts(total, embedding, total - embedding, per_layer, padding, breakdown)


def matmul_params(spec: ModelSpec) -> int:
    """The N of the 6N FLOPs rule: every parameter that multiplies an activation.

    That is all non-embedding parameters (norm scales and biases included, they are negligible) plus the output
    projection counted once even when it shares storage with the token embedding. Token and learned-position tables are
    lookups and are left out.
    """
    counts = count_params(spec)
    if isinstance(spec, EncDecSpec):
        return counts.non_embedding + (spec.vocab_size * spec.d_model if spec.tie_embeddings else 0)
    head = spec.padded_vocab_size * spec.hidden_size if spec.tie_embeddings else 0
    return counts.non_embedding + head
