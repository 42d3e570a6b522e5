"""The ``model`` report: closed-form counts cross-checked against a model built on the meta device, and FLOPs."""

from __future__ import annotations

from megatron_lite.config import ModelConfig
from megatron_lite.planning.encdec import EncDecSpec
from megatron_lite.planning.flops import training_flops_per_token
from megatron_lite.planning.params import EMBEDDING_NAMES, count_params, matmul_params

ModelSpec = ModelConfig | EncDecSpec


def meta_counts(spec: ModelSpec) -> dict[str, int] | None:
    """Total and embedding counts of the real model class on the meta device (no memory, no init).

    A ``ModelConfig`` is built by its family's constructor from the registry (``megatron_lite/families.py``), the
    one the trainer uses. Encoder-decoder: HF ``T5ForConditionalGeneration`` when transformers is installed (the
    package's own encoder-decoder is not available yet); None otherwise.
    """
    import torch

    if isinstance(spec, EncDecSpec):
        try:
            from transformers import T5Config, T5ForConditionalGeneration
        except ImportError:
            return None
        with torch.device("meta"):
            model = T5ForConditionalGeneration(T5Config(**spec.to_hf_config()))
    else:
        from megatron_lite.families import get_family

        with torch.device("meta"):
            model = get_family(spec.family).construct(spec)
    named = dict(model.named_parameters())  # deduplicates tied tensors, keeping the first name
    total = sum(p.numel() for p in named.values())
    embedding = sum(p.numel() for n, p in named.items() if n in EMBEDDING_NAMES)
    return {"total": total, "embedding": embedding}


DECODER_CONVENTION = "PaLM: 6N + 12*L*H*Q*T (causal: 6N + 6*L*H*Q*T); N = params_flops"
# Input and target of T tokens each: 6N*T for the linear layers (encoder weights on inputs, decoder weights on
# targets, cross-attention K/V on the encoder outputs) plus 12*H*Q*T^2 per encoder self-, decoder self- and
# cross-attention layer, divided by the 2T processed tokens.
ENCDEC_CONVENTION = ("encoder-decoder, per processed token (T input + T target tokens): 3N + 6*H*Q*T*(L_enc + 2*L_dec) "
                     "(causal decoder: 3N + 6*H*Q*T*(L_enc + 1.5*L_dec)); N = params_flops")


def flops_convention(spec: ModelSpec) -> str:
    """The formula behind ``flops_per_token``, for the family: PaLM's per-token rule, or its encoder-decoder form."""
    return ENCDEC_CONVENTION if isinstance(spec, EncDecSpec) else DECODER_CONVENTION


def model_report(spec: ModelSpec, seq_len: int, name: str = "", meta: bool = True) -> dict:
    """Everything ``plan.py model`` prints, as a JSON-ready dict."""
    counts = count_params(spec)
    out: dict = {
        "name": name,
        "family": "encoder_decoder" if isinstance(spec, EncDecSpec) else "decoder",
        "params_total": counts.total,
        "params_embedding": counts.embedding,
        "params_non_embedding": counts.non_embedding,
        "params_per_layer": counts.per_layer,
        "params_breakdown": counts.breakdown,
        "params_flops": matmul_params(spec),
        "seq_len": seq_len,
        "flops_per_token": training_flops_per_token(spec, seq_len, causal=False),
        "flops_per_token_causal": training_flops_per_token(spec, seq_len, causal=True),
        "flops_convention": flops_convention(spec),
    }
    if isinstance(spec, ModelConfig):
        out.update(vocab_size=spec.vocab_size, padded_vocab_size=spec.padded_vocab_size,
                   vocab_padding_params=counts.vocab_padding,
                   params_total_unpadded=counts.total - counts.vocab_padding)
    else:
        out.update(vocab_size=spec.vocab_size, padded_vocab_size=spec.vocab_size, vocab_padding_params=0,
                   params_total_unpadded=counts.total)
    if meta:
        found = meta_counts(spec)
        out["params_meta"] = None if found is None else found["total"]
        out["params_meta_embedding"] = None if found is None else found["embedding"]
        out["counts_agree"] = None if found is None else (found["total"] == counts.total
                                                           and found["embedding"] == counts.embedding)
    return out
