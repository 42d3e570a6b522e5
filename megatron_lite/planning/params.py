"""Closed-form parameter shapes and counts for both model families.

The shapes are listed tensor by tensor, under the names the model code uses, so that the counts can be checked against a
meta-device model name by name, and so that the memory estimate can reproduce per-tensor sharding and padding exactly.
A tied output head is listed once (as ``embed.weight``), as ``nn.Module.parameters()`` does.

Conventions:
- *embedding* parameters are the token table and the learned position table (lookups, no matmul);
- an untied ``lm_head`` is *non-embedding* (it is a real matmul), as in ``DecoderLM.num_params``;
- the token table has ``padded_vocab_size`` rows; published counts use the unpadded vocabulary, so the vocab
  padding is reported separately (``vocab_padding_params``);
- an encoder-decoder's relative-position tables are counted with their stack (non-embedding), as T5 reports them;
- a decoder's mixture-of-experts layers (``model.moe``) list the router, every routed expert (``mlp.experts.<e>``,
  keyed by global index as the model names them), the shared experts' MLP and its gate; *active* parameters are those a
  token meets: everything but the ``num_experts - top_k`` routed experts it does not choose in each mixture layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_lite.config import ModelConfig
from megatron_lite.planning.encdec import EncDecSpec, as_spec

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
    active: int = 0  # parameters one token meets (the total for a dense model); embeddings and head included
    routed_experts: int = 0  # parameters of all routed experts (0 for a dense model)


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


def _attention(name: str, h: int, q: int, kv: int, bias: bool, qkv_bias: bool | None = None) -> list[tuple[str, Shape]]:
    qkv = bias if qkv_bias is None else qkv_bias
    return (_linear(f"{name}.q_proj", h, q, qkv) + _linear(f"{name}.k_proj", h, kv, qkv)
            + _linear(f"{name}.v_proj", h, kv, qkv) + _linear(f"{name}.o_proj", q, h, bias))


def _mlp(h: int, f: int, gated: bool, bias: bool, name: str = "mlp") -> list[tuple[str, Shape]]:
    shapes = _linear(f"{name}.up_proj", h, f, bias)
    if gated:
        shapes += _linear(f"{name}.gate_proj", h, f, bias)
    return shapes + _linear(f"{name}.down_proj", f, h, bias)


EXPERT_MARK = ".experts."  # in the name of every routed expert's parameter: layers.<i>.mlp.experts.<e>.up_proj.weight


def is_expert(name: str) -> bool:
    """Whether parameter ``name`` belongs to a routed expert: the weights expert parallelism splits and whose
    states shard over the ranks that replicate the expert."""
    return EXPERT_MARK in name


def moe_of(spec: "ModelSpec"):
    """The mixture-of-experts settings of a decoder that has mixture layers (``model.moe``), else None."""
    moe = getattr(spec, "moe", None)
    return moe if moe is not None and moe.enabled else None


def is_moe_layer(spec: "ModelSpec", index: int) -> bool:
    """Whether decoder block ``index`` is a mixture of experts."""
    moe = moe_of(spec)
    return moe is not None and moe.is_moe_layer(index)


def expert_shapes(cfg: ModelConfig) -> list[tuple[str, Shape]]:
    """One routed expert (a SwiGLU MLP of ``expert_ffn_size``, no bias), named within it."""
    return _mlp(cfg.hidden_size, cfg.expert_ffn_size, True, False, "")


def moe_shapes(cfg: ModelConfig, experts: range | None = None) -> list[tuple[str, Shape]]:
    """A mixture layer's parameters in ``MoE.named_parameters()`` order: the router [E, h], the routed experts
    (``experts``: which global indices to list, default all), the shared experts' MLP (width shared_experts x
    expert_ffn_size) and its gate [1, h]."""
    h, m, f = cfg.hidden_size, cfg.moe, cfg.expert_ffn_size
    shapes = _linear("mlp.router", h, m.num_experts, False)
    for e in range(m.num_experts) if experts is None else experts:
        shapes += [(f"mlp.experts.{e}{n}", s) for n, s in expert_shapes(cfg)]
    if m.shared_experts:
        shapes += _mlp(h, m.shared_experts * f, True, False, "mlp.shared")
        if m.shared_expert_gate:
            shapes += _linear("mlp.shared_gate", h, 1, False)
    return shapes


def decoder_layer_shapes(cfg: ModelConfig, prefix: str = "", index: int = 0,
                         experts: range | None = None) -> list[tuple[str, Shape]]:
    """Decoder block ``index``, in the order ``Block.named_parameters()`` yields them; a mixture layer lists the
    routed experts ``experts`` (default all of them)."""
    h, d, b = cfg.hidden_size, cfg.head_dim, cfg.bias
    shapes = _norm("attn_norm", h, cfg.norm, b)
    shapes += _attention("attn", h, cfg.num_heads * d, cfg.kv_heads * d, b, cfg.qkv_bias)
    shapes += _norm("mlp_norm", h, cfg.norm, b)
    if cfg.moe.is_moe_layer(index):
        shapes += moe_shapes(cfg, experts)
    else:
        shapes += _mlp(h, cfg.ffn_size, cfg.activation == "swiglu", b)
    return [(prefix + n, s) for n, s in shapes]


def decoder_block_params(cfg: ModelConfig) -> list[int]:
    """Parameters of each decoder block (all experts of a mixture layer), in order."""
    sizes: dict[bool, int] = {}
    out = []
    for i in range(cfg.num_layers):
        kind = cfg.moe.is_moe_layer(i)
        if kind not in sizes:
            sizes[kind] = sum(_numel(s) for _, s in decoder_layer_shapes(cfg, index=i))
        out.append(sizes[kind])
    return out


def decoder_shapes(cfg: ModelConfig) -> list[tuple[str, Shape]]:
    """Every distinct parameter of ``DecoderLM(cfg)`` with its shape (tied head listed once, as the embedding)."""
    h, v = cfg.hidden_size, cfg.padded_vocab_size
    shapes: list[tuple[str, Shape]] = [("embed.weight", (v, h))]
    if cfg.position == "learned":
        shapes.append(("pos_embed.weight", (cfg.max_seq_len, h)))
    for i in range(cfg.num_layers):
        shapes += decoder_layer_shapes(cfg, f"layers.{i}.", i)
    if cfg.norm_position == "pre":
        shapes += _norm("final_norm", h, cfg.norm, cfg.bias)
    if not cfg.tie_embeddings:
        shapes.append(("lm_head.weight", (v, h)))
    return shapes


def encdec_layer_shapes(spec: EncDecSpec, i: int) -> list[tuple[str, Shape]]:
    """Block ``i`` of ``EncoderDecoderLM`` (encoder blocks first, then decoder blocks), in parameter order: self-
    attention and MLP, with cross-attention between them in a decoder block."""
    h, inner, b, norm = spec.d_model, spec.inner_dim, spec.bias, spec.norm
    shapes = _norm("attn_norm", h, norm, b) + _attention("attn", h, inner, inner, b)
    if i >= spec.num_encoder_layers:
        shapes += _norm("cross_norm", h, norm, b) + _attention("cross_attn", h, inner, inner, b)
    shapes += _norm("mlp_norm", h, norm, b) + _mlp(h, spec.d_ff, spec.gated, b)
    return [(f"layers.{i}.{n}", s) for n, s in shapes]


def encdec_part_shapes(spec: EncDecSpec, part: str) -> list[tuple[str, Shape]]:
    """The parameters outside the blocks: ``embed`` (token and learned position tables), ``encoder_top`` and
    ``decoder_top`` (a stack's relative-position table, computed once and shared by its blocks), ``encoder_end``
    and ``decoder_end`` (a pre-norm stack's final norm), ``head`` (an untied output head)."""
    h, buckets = spec.d_model, (spec.relative_attention_num_buckets, spec.num_heads)
    relative, pre = spec.position == "relative", spec.norm_position == "pre"
    parts = {
        "embed": [("embed.weight", (spec.padded_vocab_size, h))]
        + ([("pos_embed.weight", (spec.max_seq_len, h))] if spec.position == "learned" else []),
        "encoder_top": [("encoder_pos_bias.weight", buckets)] if relative else [],
        "decoder_top": [("decoder_pos_bias.weight", buckets)] if relative else [],
        "encoder_end": _norm("encoder_norm", h, spec.norm, spec.bias) if pre else [],
        "decoder_end": _norm("final_norm", h, spec.norm, spec.bias) if pre else [],
        "head": [] if spec.tie_embeddings else [("lm_head.weight", (spec.padded_vocab_size, h))],
    }
    return parts[part]


def encdec_shapes(spec: EncDecSpec) -> list[tuple[str, Shape]]:
    """Every distinct parameter of ``EncoderDecoderLM`` with its shape, in ``named_parameters()`` order."""
    shapes = [x for part in ("embed", "encoder_top", "decoder_top") for x in encdec_part_shapes(spec, part)]
    for i in range(spec.num_layers):
        shapes += encdec_layer_shapes(spec, i)
    return shapes + [x for part in ("encoder_end", "decoder_end", "head") for x in encdec_part_shapes(spec, part)]


def encdec_stack_params(spec: EncDecSpec) -> dict[str, int]:
    """Parameters of each stack apart from the embedding and the head: its blocks, its relative-position table and
    its final norm; ``cross_kv``: the decoder's cross-attention key and value projections (they act on the encoder's
    output, so their FLOPs scale with the input length)."""
    ne = spec.num_encoder_layers
    blocks = [sum(_numel(s) for _, s in encdec_layer_shapes(spec, i)) for i in range(spec.num_layers)]
    top = {part: sum(_numel(s) for _, s in encdec_part_shapes(spec, part))
           for part in ("encoder_top", "decoder_top", "encoder_end", "decoder_end")}
    cross = sum(_numel(s) for i in range(ne, spec.num_layers) for n, s in encdec_layer_shapes(spec, i)
                if ".cross_attn.k_proj." in n or ".cross_attn.v_proj." in n)
    return {"encoder": sum(blocks[:ne]) + top["encoder_top"] + top["encoder_end"],
            "decoder": sum(blocks[ne:]) + top["decoder_top"] + top["decoder_end"], "cross_kv": cross,
            "encoder_layer": blocks[0], "decoder_layer": blocks[ne]}


def model_shapes(spec: ModelSpec) -> list[tuple[str, Shape]]:
    """Named parameter shapes for either family."""
    spec = as_spec(spec)
    if isinstance(spec, EncDecSpec):
        return encdec_shapes(spec)
    return decoder_shapes(spec)


def _numel(shape: Shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


EMBEDDING_NAMES = ("embed.weight", "pos_embed.weight")


def count_params(spec: ModelSpec) -> ParamCounts:
    """Total, embedding, non-embedding and per-layer counts from the closed form."""
    spec = as_spec(spec)
    shapes = model_shapes(spec)
    total = sum(_numel(s) for _, s in shapes)
    embedding = sum(_numel(s) for n, s in shapes if n in EMBEDDING_NAMES)
    if isinstance(spec, EncDecSpec):
        stacks = encdec_stack_params(spec)
        per_layer = {"encoder": stacks["encoder_layer"], "decoder": stacks["decoder_layer"]}
        rows = spec.padded_vocab_size - spec.vocab_size
        padding = rows * spec.d_model * (1 if spec.tie_embeddings else 2)
        heads = sum(_numel(s) for _, s in encdec_part_shapes(spec, "head"))
        breakdown = {"embedding": embedding, "encoder": stacks["encoder"], "decoder": stacks["decoder"],
                     "lm_head": heads}
        return ParamCounts(total, embedding, total - embedding, per_layer, padding, breakdown, total, 0)
    blocks = decoder_block_params(spec)
    moe = moe_of(spec)
    # one entry per kind of block present: "decoder" (a dense block), "decoder_moe" (a mixture block)
    per_layer = {("decoder_moe" if is_moe_layer(spec, i) else "decoder"): n for i, n in enumerate(blocks)}
    per_layer = {k: per_layer[k] for k in ("decoder", "decoder_moe") if k in per_layer}
    rows = spec.padded_vocab_size - spec.vocab_size
    padding = rows * spec.hidden_size * (1 if spec.tie_embeddings else 2)
    h = spec.hidden_size
    final = h * (2 if spec.norm == "layernorm" and spec.bias else 1) if spec.norm_position == "pre" else 0
    breakdown = {
        "embedding": embedding,
        "layers": sum(blocks),
        "final_norm": final,
        "lm_head": 0 if spec.tie_embeddings else spec.padded_vocab_size * h,
    }
    routed = active = 0
    if moe is not None:
        mixtures = sum(1 for i in range(spec.num_layers) if moe.is_moe_layer(i))
        expert = sum(_numel(s) for _, s in expert_shapes(spec))
        routed = mixtures * moe.num_experts * expert
        active = -mixtures * (moe.num_experts - moe.top_k) * expert  # the experts a token does not choose
    return ParamCounts(total, embedding, total - embedding, per_layer, padding, breakdown, total + active, routed)


def matmul_params(spec: ModelSpec) -> int:
    """The N of the 6N FLOPs rule: every parameter that multiplies an activation of a token.

    That is all non-embedding parameters (norm scales and biases included, they are negligible) plus the output
    projection counted once even when it shares storage with the token embedding. Token and learned-position tables are
    lookups and are left out. In a mixture-of-experts model only the *active* parameters count: the router, the
    ``top_k`` routed experts a token is sent to, and the shared experts of each mixture layer.
    """
    spec = as_spec(spec)
    counts = count_params(spec)
    if isinstance(spec, EncDecSpec):
        return counts.non_embedding + (spec.padded_vocab_size * spec.d_model if spec.tie_embeddings else 0)
    head = spec.padded_vocab_size * spec.hidden_size if spec.tie_embeddings else 0
    return counts.active - counts.embedding + head
