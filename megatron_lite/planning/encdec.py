"""The encoder-decoder (T5) shape spec, for planning before the family's model code exists.

T5 layers have no biases and RMS-style norms with a scale only; attention projects to ``num_heads * d_kv`` (not
necessarily ``d_model``); positions are learned relative-position buckets, one table of ``[buckets, heads]`` in the first
layer of each stack; the feed-forward is ``wi -> act -> wo`` (v1.0, ReLU) or gated ``wi_0, wi_1 -> wo`` (v1.1, GELU).
Parameter names follow HF ``T5ForConditionalGeneration`` so that a meta-device HF model checks the closed form.
"""

from __future__ import annotations

from dataclasses import dataclass

Shape = tuple[int, ...]


@dataclass(frozen=True)
class EncDecSpec:
    """Shape of a T5-style encoder-decoder."""

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
    tie_embeddings: bool = True  # v1.0 ties the output head to the shared embedding
    max_seq_len: int = 512
    family: str = "encoder_decoder"

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def num_layers(self) -> int:
        return self.num_encoder_layers + self.num_decoder_layers

    def validate(self) -> None:
        for name in ("vocab_size", "d_model", "d_kv", "num_heads", "d_ff", "num_encoder_layers", "num_decoder_layers"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")

    # -- shapes --------------------------------------------------------------------------------------------------------

    def _attention(self, prefix: str, relative: bool) -> list[tuple[str, Shape]]:
        d, inner = self.d_model, self.inner_dim
        out = [(f"{prefix}.{m}.weight", (inner, d)) for m in ("q", "k", "v")]
        out.append((f"{prefix}.o.weight", (d, inner)))
        if relative:
            out.append((f"{prefix}.relative_attention_bias.weight", (self.relative_attention_num_buckets, self.num_heads)))
        return out

    def _ffn(self, prefix: str) -> list[tuple[str, Shape]]:
        d, f = self.d_model, self.d_ff
        wi = [(f"{prefix}.wi_0.weight", (f, d)), (f"{prefix}.wi_1.weight", (f, d))] if self.gated else [
            (f"{prefix}.wi.weight", (f, d))
        ]
        return wi + [(f"{prefix}.wo.weight", (d, f))]

    def encoder_layer_shapes(self, i: int) -> list[tuple[str, Shape]]:
        p = f"encoder.block.{i}.layer"
        return (
            self._attention(f"{p}.0.SelfAttention", relative=i == 0)
            + [(f"{p}.0.layer_norm.weight", (self.d_model,))]
            + self._ffn(f"{p}.1.DenseReluDense")
            + [(f"{p}.1.layer_norm.weight", (self.d_model,))]
        )

    def decoder_layer_shapes(self, i: int) -> list[tuple[str, Shape]]:
        p = f"decoder.block.{i}.layer"
        return (
            self._attention(f"{p}.0.SelfAttention", relative=i == 0)
            + [(f"{p}.0.layer_norm.weight", (self.d_model,))]
            + self._attention(f"{p}.1.EncDecAttention", relative=False)
            + [(f"{p}.1.layer_norm.weight", (self.d_model,))]
            + self._ffn(f"{p}.2.DenseReluDense")
            + [(f"{p}.2.layer_norm.weight", (self.d_model,))]
        )

    def shapes(self) -> list[tuple[str, Shape]]:
        out: list[tuple[str, Shape]] = [("shared.weight", (self.vocab_size, self.d_model))]
        for i in range(self.num_encoder_layers):
            out += self.encoder_layer_shapes(i)
        out.append(("encoder.final_layer_norm.weight", (self.d_model,)))
        for i in range(self.num_decoder_layers):
            out += self.decoder_layer_shapes(i)
        out.append(("decoder.final_layer_norm.weight", (self.d_model,)))
        if not self.tie_embeddings:
            out.append(("lm_head.weight", (self.vocab_size, self.d_model)))
        return out

    # -- counts --------------------------------------------------------------------------------------------------------

    def _ffn_params(self) -> int:
        return (3 if self.gated else 2) * self.d_model * self.d_ff

    def encoder_layer_params(self) -> int:
        """A layer without the relative-position table (which only the first layer holds)."""
        return 4 * self.d_model * self.inner_dim + self._ffn_params() + 2 * self.d_model

    def decoder_layer_params(self) -> int:
        return 8 * self.d_model * self.inner_dim + self._ffn_params() + 3 * self.d_model

    def encoder_params(self) -> int:
        bias = self.relative_attention_num_buckets * self.num_heads
        return self.num_encoder_layers * self.encoder_layer_params() + bias + self.d_model

    def decoder_params(self) -> int:
        bias = self.relative_attention_num_buckets * self.num_heads
        return self.num_decoder_layers * self.decoder_layer_params() + bias + self.d_model

    def to_hf_config(self) -> dict:
        """Keyword arguments for ``transformers.T5Config``."""
        return dict(
            vocab_size=self.vocab_size, d_model=self.d_model, d_kv=self.d_kv, d_ff=self.d_ff,
            num_layers=self.num_encoder_layers, num_decoder_layers=self.num_decoder_layers, num_heads=self.num_heads,
            relative_attention_num_buckets=self.relative_attention_num_buckets,
            relative_attention_max_distance=self.relative_attention_max_distance,
            feed_forward_proj="gated-gelu" if self.gated else "relu", tie_word_embeddings=self.tie_embeddings,
        )
