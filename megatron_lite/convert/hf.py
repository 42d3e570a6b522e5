"""Hugging Face <-> megatron_lite name mapping for the decoder family (GPT-2 and Llama), both directions.

Pure functions on state dicts and config dicts: no model is built and neither ``transformers`` nor the training stack is
imported, so conversion tools stay light. Our decoder uses unfused, HF-Llama-style names and layouts, hence:

- Llama maps 1:1 (rotary uses the same rotate-half layout, so q/k need no permutation);
- GPT-2 stores ``Conv1D`` weights as [in, out] (transposed here) and fuses q, k, v into ``c_attn`` (in that order);
- our embedding and lm_head have ``padded_vocab_size`` rows: padding rows are added as zeros on the way in and dropped
  on the way out.

Typical use::

    cfg = config_from_hf(hf_model.config.to_dict())
    model.load_state_dict(from_hf(hf_model.state_dict(), cfg))
    hf_sd = to_hf(model.state_dict(), cfg)
"""

from __future__ import annotations

from typing import Literal

import torch

from megatron_lite.config import ModelConfig

StateDict = dict[str, torch.Tensor]
Arch = Literal["gpt2", "llama"]

# ----------------------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------------------

_GPT2_ACT = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}


def hf_arch(cfg: ModelConfig) -> Arch:
    """Which HF architecture ``cfg`` corresponds to, or a ValueError saying what does not fit either."""
    if cfg.scale_embeddings:
        raise ValueError("no HF equivalent: GPT-2 and Llama do not scale token embeddings; set scale_embeddings to false")
    common = cfg.norm_position == "pre"
    if common and cfg.position == "learned" and cfg.norm == "layernorm" and cfg.activation != "swiglu" and cfg.bias:
        if cfg.kv_heads != cfg.num_heads:
            raise ValueError("GPT-2 has no grouped-query attention; set num_kv_heads to null")
        return "gpt2"
    if common and cfg.position == "rotary" and cfg.norm == "rmsnorm" and cfg.activation == "swiglu":
        return "llama"
    raise ValueError(
        "no HF equivalent: GPT-2 needs pre-norm + learned positions + layernorm + biases + a non-gated MLP; "
        f"Llama needs pre-norm + rotary + rmsnorm + swiglu (got norm_position={cfg.norm_position}, "
        f"position={cfg.position}, norm={cfg.norm}, activation={cfg.activation}, bias={cfg.bias})"
    )


def config_from_hf(hf: dict) -> ModelConfig:
    """ModelConfig from an HF ``config.json`` dict of a ``GPT2LMHeadModel`` or ``LlamaForCausalLM``."""
    kind = hf.get("model_type")
    if kind == "gpt2":
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False:
            raise ValueError("GPT-2 attention-scaling variants are not supported")
        act = hf.get("activation_function", "gelu_new")
        if act not in _GPT2_ACT:
            raise ValueError(f"unsupported GPT-2 activation_function {act!r}")
        return ModelConfig(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["n_embd"],
            num_layers=hf["n_layer"],
            num_heads=hf["n_head"],
            ffn_hidden_size=hf.get("n_inner"),
            max_seq_len=hf["n_positions"],
            position="learned",
            norm="layernorm",
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            norm_position="pre",
            activation=_GPT2_ACT[act],
            bias=True,
            tie_embeddings=hf.get("tie_word_embeddings", True),
            embedding_dropout=hf.get("embd_pdrop", 0.0),
            attention_dropout=hf.get("attn_pdrop", 0.0),
            residual_dropout=hf.get("resid_pdrop", 0.0),
            init_std=hf.get("initializer_range", 0.02),
        )
    if kind == "llama":
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"rope scaling {rope!r} is not supported (only unscaled rotary and rope_type llama3)")
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = None
        if rope_type == "llama3":
            keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            missing = [k for k in keys if k not in rope]
            if missing:
                raise ValueError(f"rope scaling {rope!r} (llama3) lacks {', '.join(missing)}")
            scaling = {"rope_type": "llama3", **{k: rope[k] for k in keys}}
        heads = hf["num_attention_heads"]
        if hf.get("head_dim") not in (None, hf["hidden_size"] // heads):
            raise ValueError(f"head_dim={hf['head_dim']} differs from hidden_size/num_attention_heads")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported Llama hidden_act {hf['hidden_act']!r}")
        attn_bias, mlp_bias = hf.get("attention_bias", False), hf.get("mlp_bias", False)
        if attn_bias != mlp_bias:
            raise ValueError("attention_bias and mlp_bias must agree (ModelConfig has one bias switch)")
        return ModelConfig(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            ffn_hidden_size=hf["intermediate_size"],
            max_seq_len=hf["max_position_embeddings"],
            position="rotary",
            rope_theta=float(theta),
            rope_scaling=scaling,
            norm="rmsnorm",
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            norm_position="pre",
            activation="swiglu",
            bias=attn_bias,
            tie_embeddings=hf.get("tie_word_embeddings", False),
            attention_dropout=hf.get("attention_dropout", 0.0),
            init_std=hf.get("initializer_range", 0.02),
        )
    raise ValueError(f"unsupported HF model_type {kind!r}; expected 'gpt2' or 'llama'")


def config_to_hf(cfg: ModelConfig) -> dict:
    """HF ``config.json`` dict for ``cfg`` (GPT2LMHeadModel or LlamaForCausalLM), with the unpadded vocabulary."""
    arch = hf_arch(cfg)
    if arch == "gpt2":
        act = {v: k for k, v in _GPT2_ACT.items() if k != "gelu_pytorch_tanh"}[cfg.activation]
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": cfg.vocab_size,
            "n_embd": cfg.hidden_size,
            "n_layer": cfg.num_layers,
            "n_head": cfg.num_heads,
            "n_inner": cfg.ffn_hidden_size,
            "n_positions": cfg.max_seq_len,
            "layer_norm_epsilon": cfg.norm_eps,
            "activation_function": act,
            "tie_word_embeddings": cfg.tie_embeddings,
            "embd_pdrop": cfg.embedding_dropout,
            "attn_pdrop": cfg.attention_dropout,
            "resid_pdrop": cfg.residual_dropout,
            "initializer_range": cfg.init_std,
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.ffn_size,
        "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", **(cfg.rope_scaling or {}), "rope_theta": cfg.rope_theta},
        "rms_norm_eps": cfg.norm_eps,
        "hidden_act": "silu",
        "attention_bias": cfg.bias,
        "mlp_bias": cfg.bias,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": cfg.attention_dropout,
        "initializer_range": cfg.init_std,
    }


# ----------------------------------------------------------------------------------------------------------------------
# State dicts
# ----------------------------------------------------------------------------------------------------------------------

# Per-layer names that differ only in spelling: ours -> HF (the GPT-2 Conv1D weights also need a transpose).
_LLAMA_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q_proj": "self_attn.q_proj",
    "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj",
    "attn.o_proj": "self_attn.o_proj",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate_proj": "mlp.gate_proj",
    "mlp.up_proj": "mlp.up_proj",
    "mlp.down_proj": "mlp.down_proj",
}
_GPT2_LAYER = {  # q/k/v are handled separately (fused c_attn)
    "attn_norm": "ln_1",
    "attn.o_proj": "attn.c_proj",
    "mlp_norm": "ln_2",
    "mlp.up_proj": "mlp.c_fc",
    "mlp.down_proj": "mlp.c_proj",
}
# HF buffers that are not weights (causal-mask and rotary caches in older checkpoints).
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def _strip(sd: StateDict, prefix: str) -> StateDict:
    """Drop ``prefix`` where present (HF checkpoints exist with and without it) and the non-weight buffers."""
    out = {}
    for k, v in sd.items():
        if k.endswith(_IGNORED_SUFFIXES):
            continue
        out[k[len(prefix):] if k.startswith(prefix) else k] = v
    return out


def _check_consumed(left: StateDict, direction: str) -> None:
    if left:
        raise ValueError(f"{direction}: unexpected keys {sorted(left)[:8]}{' ...' if len(left) > 8 else ''}")


def _final_norm_keys(cfg: ModelConfig) -> tuple[str, ...]:
    """The final norm's tensors: a weight, and a bias for LayerNorm with biases (GPT-2)."""
    return ("weight", "bias") if cfg.norm == "layernorm" and cfg.bias else ("weight",)


def _finish_from_hf(src: StateDict, out: StateDict, cfg: ModelConfig, hf_norm: str, direction: str) -> StateDict:
    """The tail every ``*_from_hf`` shares: final norm, the head (the embedding when tied, else padded to the padded
    vocabulary), and a check that no HF tensor was left unused."""
    for key in _final_norm_keys(cfg):
        out[f"final_norm.{key}"] = src.pop(f"{hf_norm}.{key}")
    head = src.pop("lm_head.weight", None)
    out["lm_head.weight"] = out["embed.weight"] if cfg.tie_embeddings else _pad_rows(head, cfg.padded_vocab_size)
    _check_consumed(src, direction)
    return out


def _finish_to_hf(src: StateDict, out: StateDict, cfg: ModelConfig, hf_norm: str, hf_embed: str,
                  direction: str) -> StateDict:
    """The tail every ``*_to_hf`` shares: final norm, the head (HF's embedding when tied, else unpadded), and a check
    that none of our tensors was left unused."""
    for key in _final_norm_keys(cfg):
        out[f"{hf_norm}.{key}"] = src.pop(f"final_norm.{key}")
    head = src.pop("lm_head.weight", None)
    out["lm_head.weight"] = out[hf_embed] if cfg.tie_embeddings else head[: cfg.vocab_size].contiguous()
    _check_consumed(src, direction)
    return out


def _linear_from(src: StateDict, src_name: str, dst: StateDict, dst_name: str, bias: bool, transpose: bool) -> None:
    w = src.pop(f"{src_name}.weight")
    dst[f"{dst_name}.weight"] = w.t().contiguous() if transpose else w
    if bias:
        dst[f"{dst_name}.bias"] = src.pop(f"{src_name}.bias")


def llama_from_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    """``LlamaForCausalLM`` (or ``LlamaModel``) state dict -> ours."""
    src = _strip(sd, "model.")
    out: StateDict = {"embed.weight": _pad_rows(src.pop("embed_tokens.weight"), cfg.padded_vocab_size)}
    for i in range(cfg.num_layers):
        for ours, theirs in _LLAMA_LAYER.items():
            if ours.endswith(".weight"):
                out[f"layers.{i}.{ours}"] = src.pop(f"layers.{i}.{theirs}")
            else:
                _linear_from(src, f"layers.{i}.{theirs}", out, f"layers.{i}.{ours}", cfg.bias, transpose=False)
    return _finish_from_hf(src, out, cfg, "norm", "llama_from_hf")


def llama_to_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    """Our state dict -> ``LlamaForCausalLM`` names (``model.`` prefix), vocabulary unpadded."""
    src = dict(sd)
    v = cfg.vocab_size
    out: StateDict = {"model.embed_tokens.weight": src.pop("embed.weight")[:v].contiguous()}
    for i in range(cfg.num_layers):
        for ours, theirs in _LLAMA_LAYER.items():
            if ours.endswith(".weight"):
                out[f"model.layers.{i}.{theirs}"] = src.pop(f"layers.{i}.{ours}")
            else:
                _linear_from(src, f"layers.{i}.{ours}", out, f"model.layers.{i}.{theirs}", cfg.bias, transpose=False)
    return _finish_to_hf(src, out, cfg, "model.norm", "model.embed_tokens.weight", "llama_to_hf")


def gpt2_from_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    """``GPT2LMHeadModel`` (or ``GPT2Model``) state dict -> ours. Conv1D [in, out] weights are transposed."""
    src = _strip(sd, "transformer.")
    out: StateDict = {
        "embed.weight": _pad_rows(src.pop("wte.weight"), cfg.padded_vocab_size),
        "pos_embed.weight": src.pop("wpe.weight"),
    }
    h = cfg.hidden_size
    for i in range(cfg.num_layers):
        ours, theirs = f"layers.{i}", f"h.{i}"
        qkv_w = src.pop(f"{theirs}.attn.c_attn.weight")  # [h, 3h]
        qkv_b = src.pop(f"{theirs}.attn.c_attn.bias")
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[f"{ours}.attn.{name}.weight"] = qkv_w[:, j * h : (j + 1) * h].t().contiguous()
            out[f"{ours}.attn.{name}.bias"] = qkv_b[j * h : (j + 1) * h].clone()
        for o, t in _GPT2_LAYER.items():
            is_norm = o.endswith("norm")
            _linear_from(src, f"{theirs}.{t}", out, f"{ours}.{o}", bias=True, transpose=not is_norm)
    return _finish_from_hf(src, out, cfg, "ln_f", "gpt2_from_hf")


def gpt2_to_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    """Our state dict -> ``GPT2LMHeadModel`` names (``transformer.`` prefix), with fused c_attn and Conv1D layout."""
    src = dict(sd)
    v = cfg.vocab_size
    out: StateDict = {
        "transformer.wte.weight": src.pop("embed.weight")[:v].contiguous(),
        "transformer.wpe.weight": src.pop("pos_embed.weight"),
    }
    for i in range(cfg.num_layers):
        ours, theirs = f"layers.{i}", f"transformer.h.{i}"
        names = ("q_proj", "k_proj", "v_proj")
        qkv_w = torch.cat([src.pop(f"{ours}.attn.{n}.weight") for n in names])  # [3h, h]
        out[f"{theirs}.attn.c_attn.weight"] = qkv_w.t().contiguous()
        out[f"{theirs}.attn.c_attn.bias"] = torch.cat([src.pop(f"{ours}.attn.{n}.bias") for n in names])
        for o, t in _GPT2_LAYER.items():
            is_norm = o.endswith("norm")
            _linear_from(src, f"{ours}.{o}", out, f"{theirs}.{t}", bias=True, transpose=not is_norm)
    return _finish_to_hf(src, out, cfg, "transformer.ln_f", "transformer.wte.weight", "gpt2_to_hf")


def from_hf(sd: StateDict, cfg: ModelConfig, arch: Arch | None = None) -> StateDict:
    """HF state dict -> ours; ``arch`` defaults to the one ``cfg`` describes (see ``hf_arch``)."""
    arch = arch or hf_arch(cfg)
    return {"gpt2": gpt2_from_hf, "llama": llama_from_hf}[arch](sd, cfg)


def to_hf(sd: StateDict, cfg: ModelConfig, arch: Arch | None = None) -> StateDict:
    """Our state dict -> HF names and layouts; ``arch`` defaults to the one ``cfg`` describes."""
    arch = arch or hf_arch(cfg)
    return {"gpt2": gpt2_to_hf, "llama": llama_to_hf}[arch](sd, cfg)
