"""Training FLOPs per token, in PaLM's convention (Chowdhery et al. 2022, Appendix B).

    flops_per_token = 6 N + 12 L H Q T

- N: parameters that multiply an activation (``params.matmul_params``): every non-embedding parameter, plus the output
  projection (V_padded x h) counted once even when tied to the token embedding; the token and learned-position tables
  are lookups and are left out. Each such parameter costs 2 FLOPs per token forward and 4 backward. In a
  mixture-of-experts decoder N counts the *active* parameters (``ParamCounts.active``): a token meets the router, its
  ``top_k`` routed experts and the shared experts of each mixture layer, not the other ``num_experts - top_k``
  experts (Mixtral-8x7B: N = 12.75B of its 46.7B parameters; the 131M-row token table is a lookup).
- 12 L H Q T: attention scores (Q K^T) and their weighted sum (A V): 2 matmuls x 2 FLOPs x T keys x H heads x Q head
  dims per token and layer, forward (4 L H Q T) plus backward (twice that).
- ``causal=True`` halves the attention term (only the lower triangle of scores is needed, as a causal flash kernel
  computes). The default (False) is PaLM's number, which MFU figures are usually quoted against.

Not counted: norms, softmax, activations, rotary, the loss (all O(h) per token). Activation recomputation is *not* part
of model FLOPs: MFU counts the model's work, not the extra forward.

An encoder-decoder (``encdec_training_flops``) applies the same rule per stack: encoder parameters act on the input
tokens, decoder parameters and the head on the target tokens, the cross-attention keys and values on the encoder's
outputs, and the attention term counts encoder self-, decoder self- and cross-attention. The trainer's MFU takes its
FLOPs per token from ``training_flops_per_token(model, data.seq_len, data=cfg.data)``, the one home of this rule
for both families.
"""

from __future__ import annotations

from megatron_lite.config import DataConfig, ModelConfig
from megatron_lite.planning.encdec import EncDecSpec, as_spec, encdec_lengths
from megatron_lite.planning.params import encdec_stack_params, matmul_params


def attention_flops_per_token(layers: int, heads: int, head_dim: int, keys: int, causal: bool) -> float:
    """12 L H Q T, halved when causal."""
    term = 12.0 * layers * heads * head_dim * keys
    return term / 2 if causal else term


def encdec_training_flops(spec: EncDecSpec, enc_len: int, dec_len: int, causal: bool = False) -> float:
    """Training FLOPs of one (input, target) pair of an encoder-decoder.

    Encoder parameters act on ``enc_len`` tokens; decoder parameters on ``dec_len`` tokens, except the cross-attention
    key/value projections, which act on the ``enc_len`` encoder outputs; the output head acts on ``dec_len``.
    ``causal`` halves only the decoder's self-attention term.
    """
    stacks = encdec_stack_params(spec)
    cross_kv = stacks["cross_kv"]
    dec_n = stacks["decoder"] - cross_kv + spec.padded_vocab_size * spec.d_model
    linear = 6.0 * (stacks["encoder"] * enc_len + dec_n * dec_len + cross_kv * enc_len)
    return linear + encdec_attention_flops(spec, enc_len, dec_len, causal)


def encdec_attention_flops(spec: EncDecSpec, enc_len: int, dec_len: int, causal: bool = False) -> float:
    """The attention part of ``encdec_training_flops``: encoder self-, decoder self- (halved when causal) and
    cross-attention, 12 L H Q T per query token each."""
    h, q = spec.num_heads, spec.d_kv
    attn = enc_len * attention_flops_per_token(spec.num_encoder_layers, h, q, enc_len, False)
    attn += dec_len * attention_flops_per_token(spec.num_decoder_layers, h, q, dec_len, causal)
    attn += dec_len * attention_flops_per_token(spec.num_decoder_layers, h, q, enc_len, False)  # cross-attention
    return attn


def sequence_flops(model_cfg: ModelConfig | EncDecSpec, seq_len: int, target_len: int | None = None,
                   causal: bool = False) -> tuple[float, float]:
    """(training FLOPs, of which attention) of one sequence: ``seq_len`` tokens, or for an encoder-decoder
    ``seq_len`` input and ``target_len`` (default ``seq_len``) target tokens."""
    model_cfg = as_spec(model_cfg)
    if isinstance(model_cfg, EncDecSpec):
        dec = target_len or seq_len
        return (encdec_training_flops(model_cfg, seq_len, dec, causal),
                encdec_attention_flops(model_cfg, seq_len, dec, causal))
    attn = attention_flops_per_token(model_cfg.num_layers, model_cfg.num_heads, model_cfg.head_dim, seq_len, causal)
    return training_flops_per_token(model_cfg, seq_len, causal) * seq_len, attn * seq_len


def flops_per_processed_token(model_cfg: ModelConfig | EncDecSpec, seq_len: int, target_len: int | None = None,
                              causal: bool = False) -> float:
    """Training FLOPs per token: a decoder's ``training_flops_per_token``; an encoder-decoder's FLOPs of a
    ``seq_len``-input, ``target_len``-target pair (default ``seq_len``) per input or target token."""
    model_cfg = as_spec(model_cfg)
    if isinstance(model_cfg, EncDecSpec) and target_len not in (None, seq_len):
        return encdec_training_flops(model_cfg, seq_len, target_len, causal) / (seq_len + target_len)
    return training_flops_per_token(model_cfg, seq_len, causal)


def training_flops_per_token(model_cfg: ModelConfig | EncDecSpec, seq_len: int, causal: bool = False,
                             data: DataConfig | None = None) -> float:
    """Forward + backward FLOPs per token: 6N + 12 L H Q T (see the module docstring for what N counts: the active
    parameters of a mixture-of-experts model).

    For an encoder-decoder, ``seq_len`` is both the input and the target length and the result is per processed token
    (input and target tokens together); use ``encdec_training_flops`` for other lengths. With ``data`` (a training
    run's data section) an encoder-decoder trains on the lengths that data makes (``encdec.encdec_lengths``), and the
    result is the FLOPs of one such sample per ``seq_len`` token: the trainer counts ``data.seq_len`` tokens per
    sample, so its tokens per step times this are the step's FLOPs. A decoder's figure does not depend on ``data``.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len={seq_len} must be positive")
    model_cfg = as_spec(model_cfg)
    if isinstance(model_cfg, EncDecSpec):
        if data is not None:
            enc_len, dec_len = encdec_lengths(data)
            return encdec_training_flops(model_cfg, enc_len, dec_len, causal) / seq_len
        return encdec_training_flops(model_cfg, seq_len, seq_len, causal) / (2 * seq_len)
    n = matmul_params(model_cfg)
    attn = attention_flops_per_token(model_cfg.num_layers, model_cfg.num_heads, model_cfg.head_dim, seq_len, causal)
    return 6.0 * n + attn
