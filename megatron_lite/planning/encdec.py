"""The encoder-decoder shape the planner counts: T5 (v1.1 and the original) and the original Transformer.

A training config describes the family as a ``ModelConfig`` with ``family: encoder_decoder``
(``models/encoder_decoder.py``); the planner reads it as an :class:`EncDecSpec`, in T5's vocabulary (d_model, d_kv,
d_ff), through :meth:`EncDecSpec.from_model_config`, and turns a spec back into the config training would be given
with :meth:`EncDecSpec.to_model_config` (so that the engines' own checks judge a planned layout). The parameter
shapes, under the model's own names, are in ``params.encdec_shapes``.

The lengths a run trains on come from its data section (:func:`encdec_lengths`): span corruption turns a raw window
into inputs of ``data.seq_len`` tokens and shorter targets (T5's formula, ``data/span_corruption.py``); seq2seq pairs
have ``data.seq_len`` source and ``data.target_seq_len`` target tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_lite.config import DataConfig, ModelConfig


@dataclass(frozen=True)
class EncDecSpec:
    """Shape of an encoder-decoder. The defaults are the original T5's: relative buckets, pre-norm RMS norms
    without biases, a ReLU feed-forward and a tied head."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    num_heads: int = 8
    d_ff: int = 2048
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    gated: bool = False  # v1.1: gated-GELU feed-forward with two input matrices
    tie_embeddings: bool = True  # the original T5 and Transformer tie the output head to the shared embedding
    max_seq_len: int = 512
    family: str = "encoder_decoder"
    pad_vocab_multiple: int = 1  # embedding rows are the vocabulary rounded up to this (model.pad_vocab_multiple)
    position: str = "relative"  # relative (T5's buckets), sinusoidal (no parameters) or learned (a table)
    norm: str = "rmsnorm"  # rmsnorm (a scale only) or layernorm (with a bias when ``bias``)
    norm_position: str = "pre"  # post: each block ends in its norm, and the stacks have no final norm
    bias: bool = False  # biases on every projection and LayerNorm (the original Transformer)

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def kv_heads(self) -> int:
        return self.num_heads  # multi-head attention only

    @property
    def num_layers(self) -> int:
        return self.num_encoder_layers + self.num_decoder_layers

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return (self.vocab_size + m - 1) // m * m

    def validate(self) -> None:
        for name in ("vocab_size", "d_model", "d_kv", "num_heads", "d_ff", "num_encoder_layers", "num_decoder_layers",
                     "pad_vocab_multiple"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")

    @classmethod
    def from_model_config(cls, cfg: ModelConfig) -> "EncDecSpec":
        """The spec of ``cfg`` (``family: encoder_decoder``): ``num_layers`` is the encoder's, ``head_dim`` (that is
        ``kv_channels`` or hidden / heads) is d_kv, and ``activation: geglu`` is the gated feed-forward."""
        if cfg.family != "encoder_decoder":
            raise ValueError(f"model.family={cfg.family!r} is not an encoder-decoder")
        return cls(
            vocab_size=cfg.vocab_size, d_model=cfg.hidden_size, d_kv=cfg.head_dim, num_heads=cfg.num_heads,
            d_ff=cfg.ffn_size, num_encoder_layers=cfg.num_layers, num_decoder_layers=cfg.decoder_layers,
            relative_attention_num_buckets=cfg.relative_attention_num_buckets,
            relative_attention_max_distance=cfg.relative_attention_max_distance, gated=cfg.activation == "geglu",
            tie_embeddings=cfg.tie_embeddings, max_seq_len=cfg.max_seq_len, pad_vocab_multiple=cfg.pad_vocab_multiple,
            position=cfg.position, norm=cfg.norm, norm_position=cfg.norm_position, bias=cfg.bias,
        )

    def to_model_config(self) -> ModelConfig:
        """A ``ModelConfig`` that builds this shape. Only the shape is carried: an ungated feed-forward becomes ReLU,
        and the scaling options keep their defaults (neither the counts nor the engine checks depend on them)."""
        return ModelConfig(
            family="encoder_decoder", vocab_size=self.vocab_size, pad_vocab_multiple=self.pad_vocab_multiple,
            hidden_size=self.d_model, num_layers=self.num_encoder_layers, num_decoder_layers=self.num_decoder_layers,
            num_heads=self.num_heads, kv_channels=self.d_kv, ffn_hidden_size=self.d_ff, max_seq_len=self.max_seq_len,
            position=self.position, relative_attention_num_buckets=self.relative_attention_num_buckets,
            relative_attention_max_distance=self.relative_attention_max_distance, norm=self.norm,
            norm_position=self.norm_position, activation="geglu" if self.gated else "relu", bias=self.bias,
            tie_embeddings=self.tie_embeddings,
        )

    def to_hf_config(self) -> dict:
        """Keyword arguments for ``transformers.T5Config`` (T5 shapes: relative buckets, RMS norms, no biases)."""
        return dict(
            vocab_size=self.padded_vocab_size, d_model=self.d_model, d_kv=self.d_kv, d_ff=self.d_ff,
            num_layers=self.num_encoder_layers, num_decoder_layers=self.num_decoder_layers, num_heads=self.num_heads,
            relative_attention_num_buckets=self.relative_attention_num_buckets,
            relative_attention_max_distance=self.relative_attention_max_distance,
            feed_forward_proj="gated-gelu" if self.gated else "relu", tie_word_embeddings=self.tie_embeddings,
        )


def as_spec(model):
    """``model`` as the planner counts it: an encoder-decoder ``ModelConfig`` becomes its :class:`EncDecSpec`;
    anything else (a decoder ``ModelConfig``, a spec) is returned as it is."""
    if isinstance(model, ModelConfig) and model.family == "encoder_decoder":
        return EncDecSpec.from_model_config(model)
    return model


def encdec_lengths(data: DataConfig) -> tuple[int, int]:
    """(encoder input tokens, target tokens) of the samples ``data`` makes.

    Span corruption: the largest raw window whose corrupted input fits ``data.seq_len`` and the lengths it
    corrupts into (inputs of 512 tokens and targets of 114 at T5's defaults). Seq2seq pairs: ``data.seq_len`` and
    ``data.target_seq_len`` (default ``data.seq_len``), padded to those lengths.
    """
    if data.objective == "span_corruption":
        from megatron_lite.data.span_corruption import raw_length_for, span_lengths

        raw = raw_length_for(data.seq_len, data.noise_density, data.mean_noise_span_length)
        return span_lengths(raw, data.noise_density, data.mean_noise_span_length)
    return data.seq_len, data.target_seq_len or data.seq_len
