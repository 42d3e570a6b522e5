"""The ``model`` report: closed-form counts cross-checked against a model built on the meta device, and FLOPs."""

from __future__ import annotations

from megatron_lite.config import ModelConfig
from megatron_lite.planning.encdec import EncDecSpec, as_spec
from megatron_lite.planning.flops import flops_per_processed_token
from megatron_lite.planning.params import EMBEDDING_NAMES, count_params, matmul_params, moe_of

ModelSpec = ModelConfig | EncDecSpec


def meta_counts(spec: ModelSpec) -> dict[str, int] | None:
    """Total and embedding counts of the real model class on the meta device (no memory, no init).

    The model is built by ``models.construct``, the constructor training uses; an encoder-decoder spec from the
    ``ModelConfig`` that builds its shape.
    """
    import torch

    from megatron_lite.models import construct

    cfg = spec.to_model_config() if isinstance(spec, EncDecSpec) else spec
    with torch.device("meta"):
        model = construct(cfg)
    named = dict(model.named_parameters())  # deduplicates tied tensors, keeping the first name
    total = sum(p.numel() for p in named.values())
    embedding = sum(p.numel() for n, p in named.items() if n in EMBEDDING_NAMES)
    return {"total": total, "embedding": embedding}


DECODER_CONVENTION = "PaLM: 6N + 12*L*H*Q*T (causal: 6N + 6*L*H*Q*T); N = params_flops"
MOE_CONVENTION = DECODER_CONVENTION + " (active: router, top_k routed and shared experts of each mixture layer)"
# Input and target of T tokens each: 6N*T for the linear layers (encoder weights on inputs, decoder weights on
# targets, cross-attention K/V on the encoder outputs) plus 12*H*Q*T^2 per encoder self-, decoder self- and
# cross-attention layer, divided by the 2T processed tokens.
ENCDEC_CONVENTION = ("encoder-decoder, per processed token (T input + T target tokens): 3N + 6*H*Q*T*(L_enc + 2*L_dec) "
                     "(causal decoder: 3N + 6*H*Q*T*(L_enc + 1.5*L_dec)); N = params_flops")
# Input of S and target of T tokens: encoder weights act on S tokens, decoder weights and the head on T, the
# cross-attention K/V projections on the S encoder outputs.
ENCDEC_CONVENTION_ST = ("encoder-decoder, per processed token (S input + T target tokens): [6*N_S*S + 6*N_T*T + "
                        "12*H*Q*(L_enc*S^2 + L_dec*T^2 + L_dec*T*S)] / (S + T) (causal decoder: 6*H*Q*L_dec*T^2); "
                        "N_S: encoder and cross-attention K/V, N_T: the rest of the decoder and the head")


def flops_convention(spec: ModelSpec, seq_len: int | None = None, target_len: int | None = None) -> str:
    """The formula behind ``flops_per_token``, for the family: PaLM's per-token rule, or its encoder-decoder form
    (the short one when input and target have the same length)."""
    if not isinstance(spec, EncDecSpec):
        return DECODER_CONVENTION if moe_of(spec) is None else MOE_CONVENTION
    return ENCDEC_CONVENTION if target_len in (None, seq_len) else ENCDEC_CONVENTION_ST


def _moe_summary(spec: ModelSpec) -> dict | None:
    """A mixture-of-experts decoder's routing shape (None for a dense model)."""
    moe = moe_of(spec)
    if moe is None:
        return None
    return {"num_experts": moe.num_experts, "top_k": moe.top_k, "every": moe.every,
            "expert_ffn_size": spec.expert_ffn_size, "shared_experts": moe.shared_experts,
            "mixture_layers": sum(1 for i in range(spec.num_layers) if moe.is_moe_layer(i)),
            "num_layers": spec.num_layers}


def model_report(spec: ModelSpec, seq_len: int, name: str = "", meta: bool = True,
                 target_len: int | None = None) -> dict:
    """Everything ``plan.py model`` prints, as a JSON-ready dict. ``target_len``: an encoder-decoder's target
    tokens per sample (default ``seq_len``); FLOPs are then per processed (input or target) token."""
    spec = as_spec(spec)
    counts = count_params(spec)
    out: dict = {
        "name": name,
        "family": "encoder_decoder" if isinstance(spec, EncDecSpec) else "decoder",
        "params_total": counts.total,
        "params_embedding": counts.embedding,
        "params_non_embedding": counts.non_embedding,
        "params_per_layer": counts.per_layer,
        "params_breakdown": counts.breakdown,
        "params_active": counts.active,
        "params_routed_experts": counts.routed_experts,
        "moe": _moe_summary(spec),
        "params_flops": matmul_params(spec),
        "seq_len": seq_len,
        "flops_per_token": flops_per_processed_token(spec, seq_len, target_len, causal=False),
        "flops_per_token_causal": flops_per_processed_token(spec, seq_len, target_len, causal=True),
        "flops_convention": flops_convention(spec, seq_len, target_len),
    }
    if isinstance(spec, EncDecSpec):
        out["target_len"] = target_len or seq_len
    out.update(vocab_size=spec.vocab_size, padded_vocab_size=spec.padded_vocab_size,
               vocab_padding_params=counts.vocab_padding, params_total_unpadded=counts.total - counts.vocab_padding)
    if meta:
        found = meta_counts(spec)
        out["params_meta"] = None if found is None else found["total"]
        out["params_meta_embedding"] = None if found is None else found["embedding"]
        out["counts_agree"] = None if found is None else (found["total"] == counts.total
                                                           and found["embedding"] == counts.embedding)
    return out
