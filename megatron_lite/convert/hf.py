"""Hugging Face <-> megatron_lite name mapping for the decoder family (GPT-2 and Llama; the mixtures of experts,
Mixtral and Qwen2-MoE, in ``convert/hf_moe.py``), both directions.

Pure functions on state dicts and config dicts: no model is built and neither ``transformers`` nor the training stack is
imported, so conversion tools stay light. Our decoder uses unfused, HF-Llama-style names and layouts, hence:

- Llama maps 1:1 (rotary uses the same rotate-half layout, so q/k need no permutation);
- GPT-2 stores ``Conv1D`` weights as [in, out] (transposed here) and fuses q, k, v into ``c_attn`` (in that order);
- our embedding and lm_head have ``padded_vocab_size`` rows: padding rows are added as zeros on the way in and dropped
  on the way out.

Each direction is a list of :class:`Rule` s (targets computed from a few sources), which ``to_hf``/``from_hf`` apply
to whole state dicts and ``convert/hf_dir.py`` applies one rule at a time, streaming.

Typical use::

    cfg = config_from_hf(hf_model.config.to_dict())
    model.load_state_dict(from_hf(hf_model.state_dict(), cfg))
    hf_sd = to_hf(model.state_dict(), cfg)
"""

from __future__ import annotations

from typing import Iterable, Literal

import torch

from megatron_lite.config import ModelConfig
from megatron_lite.convert.hf_rules import Rule, StateDict, head_rules, linear_rules, rotary_from_hf, rotary_to_hf
Arch = Literal["gpt2", "llama", "mixtral", "qwen2_moe"]

# ----------------------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------------------

_GPT2_ACT = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}


def hf_arch(cfg: ModelConfig) -> Arch:
    """Which HF architecture ``cfg`` corresponds to, or a ValueError naming the option that none can express."""
    if cfg.family != "decoder":
        raise ValueError(f"model.family={cfg.family!r}: GPT-2 and Llama are decoders (family decoder)")
    if cfg.scale_embeddings:
        raise ValueError("model.scale_embeddings=true has no HF equivalent: GPT-2 and Llama do not scale token "
                         "embeddings")
    common = cfg.norm_position == "pre"
    llama_style = common and cfg.position == "rotary" and cfg.norm == "rmsnorm" and cfg.activation == "swiglu"
    if llama_style or cfg.moe.enabled:
        name = "Mixtral and Qwen2-MoE have" if cfg.moe.enabled else "Llama has"
        for key in ("embedding_dropout", "residual_dropout"):
            if getattr(cfg, key):
                raise ValueError(f"model.{key}={getattr(cfg, key)} has no HF equivalent: {name} attention "
                                 "dropout only; set it to 0")
    if cfg.moe.enabled:
        from megatron_lite.convert import hf_moe

        if not llama_style:
            raise ValueError(
                "no HF equivalent: Mixtral and Qwen2-MoE need pre-norm + rotary + rmsnorm + swiglu (got "
                f"model.norm_position={cfg.norm_position}, position={cfg.position}, norm={cfg.norm}, "
                f"activation={cfg.activation})"
            )
        return hf_moe.moe_arch(cfg)
    if cfg.qkv_bias is not None and cfg.qkv_bias != cfg.bias:
        raise ValueError(f"model.qkv_bias={str(cfg.qkv_bias).lower()} with model.bias={str(cfg.bias).lower()} has no "
                         "HF equivalent here: GPT-2 and Llama have one bias switch for every projection (set "
                         "model.qkv_bias to null)")
    if common and cfg.position == "learned" and cfg.norm == "layernorm" and cfg.activation != "swiglu" and cfg.bias:
        if cfg.kv_heads != cfg.num_heads:
            raise ValueError(f"model.num_kv_heads={cfg.num_kv_heads} has no HF equivalent: GPT-2 has no grouped-query "
                             "attention; set it to null")
        return "gpt2"
    if llama_style:
        return "llama"
    raise ValueError(
        "no HF equivalent: GPT-2 needs pre-norm + learned positions + layernorm + biases + a non-gated MLP; "
        f"Llama needs pre-norm + rotary + rmsnorm + swiglu (got model.norm_position={cfg.norm_position}, "
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
        attn_bias, mlp_bias = hf.get("attention_bias", False), hf.get("mlp_bias", False)
        if attn_bias != mlp_bias:
            raise ValueError("attention_bias and mlp_bias must agree (ModelConfig has one bias switch)")
        return ModelConfig(**rotary_from_hf(hf), ffn_hidden_size=hf["intermediate_size"], bias=attn_bias)
    if kind in ("mixtral", "qwen2_moe"):
        from megatron_lite.convert import hf_moe

        return hf_moe.config_from_hf_moe(hf)
    raise ValueError(f"unsupported HF model_type {kind!r}; expected 'gpt2', 'llama', 'mixtral' or 'qwen2_moe'")


SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id")


def config_to_hf(cfg: ModelConfig, special_tokens: dict[str, int | None] | None = None) -> dict:
    """HF ``config.json`` dict for ``cfg`` (GPT2LMHeadModel or LlamaForCausalLM), with the unpadded vocabulary.

    ``special_tokens`` (``bos_token_id``, ``eos_token_id``, ``pad_token_id``, from the tokenizer) are written when
    given; left out, HF fills in its own defaults (GPT-2's 50256), which may lie outside a smaller vocabulary.
    """
    config = _config_to_hf(cfg)
    for key, value in (special_tokens or {}).items():
        if key not in SPECIAL_TOKENS:
            raise ValueError(f"special token {key!r}: expected one of {', '.join(SPECIAL_TOKENS)}")
        if value is not None and not 0 <= value < cfg.vocab_size:
            raise ValueError(f"{key}={value} lies outside the model's vocabulary of {cfg.vocab_size}")
        config[key] = value
    return config


def _config_to_hf(cfg: ModelConfig) -> dict:
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
    if arch != "llama":
        from megatron_lite.convert import hf_moe

        return hf_moe.config_to_hf_moe(cfg, arch)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **rotary_to_hf(cfg),
        "intermediate_size": cfg.ffn_size,
        "attention_bias": cfg.bias,
        "mlp_bias": cfg.bias,
    }


# ----------------------------------------------------------------------------------------------------------------------
# State dicts
# ----------------------------------------------------------------------------------------------------------------------

# Per-layer module names that differ only in spelling: ours -> HF (the GPT-2 Conv1D weights also need a transpose).
_LLAMA_LAYER = {
    "attn_norm": "input_layernorm",
    "attn.q_proj": "self_attn.q_proj",
    "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj",
    "attn.o_proj": "self_attn.o_proj",
    "mlp_norm": "post_attention_layernorm",
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

def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Our q, k, v [h, h] weights (or [h] biases) -> GPT-2's c_attn: [h, 3h] (Conv1D layout) or [3h]."""
    fused = torch.cat([q, k, v])
    return (fused.t().contiguous() if fused.dim() == 2 else fused,)


def _split_qkv(fused: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """GPT-2's c_attn weight [h, 3h] (or bias [3h]) -> our q, k, v."""
    parts = fused.chunk(3, dim=-1)
    return tuple(p.t().contiguous() if p.dim() == 2 else p.clone() for p in parts)


def _llama_pairs(cfg: ModelConfig) -> list[tuple[str, str, bool]]:
    """(our module, HF module, has bias) for every module but the embedding and head."""
    pairs = []
    for i in range(cfg.num_layers):
        for ours, theirs in _LLAMA_LAYER.items():
            is_norm = ours.endswith("norm")
            pairs.append((f"layers.{i}.{ours}", f"model.layers.{i}.{theirs}", cfg.bias and not is_norm))
    pairs.append(("final_norm", "model.norm", False))
    return pairs


def llama_rules(cfg: ModelConfig, to_hf: bool) -> list[Rule]:
    """Rules between our names and ``LlamaForCausalLM``'s (``model.`` prefix), in either direction."""
    rules = head_rules(cfg, "embed.weight", "model.embed_tokens.weight", to_hf)
    for ours, theirs, bias in _llama_pairs(cfg):
        rules += linear_rules(ours, theirs, bias, transpose=False, to_hf=to_hf)
    return rules


def gpt2_rules(cfg: ModelConfig, to_hf: bool) -> list[Rule]:
    """Rules between our names and ``GPT2LMHeadModel``'s (``transformer.`` prefix): Conv1D weights are [in, out],
    and q, k, v are fused into ``c_attn`` in that order."""
    rules = head_rules(cfg, "embed.weight", "transformer.wte.weight", to_hf)
    rules += linear_rules("pos_embed", "transformer.wpe", bias=False, transpose=False, to_hf=to_hf)
    for i in range(cfg.num_layers):
        ours, theirs = f"layers.{i}", f"transformer.h.{i}"
        for kind in ("weight", "bias"):
            qkv = tuple(f"{ours}.attn.{n}.{kind}" for n in ("q_proj", "k_proj", "v_proj"))
            fused = (f"{theirs}.attn.c_attn.{kind}",)
            rules.append(Rule(fused, qkv, _fuse_qkv) if to_hf else Rule(qkv, fused, _split_qkv))
        for o, t in _GPT2_LAYER.items():
            rules += linear_rules(f"{ours}.{o}", f"{theirs}.{t}", True, transpose=not o.endswith("norm"), to_hf=to_hf)
    rules += linear_rules("final_norm", "transformer.ln_f", bias=True, transpose=False, to_hf=to_hf)
    return rules


def conversion_rules(cfg: ModelConfig, to_hf: bool, arch: Arch | None = None,
                     fused_experts: bool = False) -> list[Rule]:
    """The rules from our names to HF's (``to_hf``) or back, for the architecture ``cfg`` describes.

    ``fused_experts`` (mixtures only): HF's experts as transformers 5 modules hold them, one 3-D ``gate_up_proj`` and
    ``down_proj`` per layer, rather than one tensor per expert as checkpoint files (and transformers 4) do.
    """
    arch = arch or hf_arch(cfg)
    if arch in ("mixtral", "qwen2_moe"):
        from megatron_lite.convert import hf_moe

        return hf_moe.moe_rules(cfg, to_hf, arch, fused_experts)
    return {"gpt2": gpt2_rules, "llama": llama_rules}[arch](cfg, to_hf)


def hf_fused_experts(keys: Iterable[str]) -> bool:
    """Whether HF names hold each layer's experts fused (transformers 5 modules), not one tensor per expert."""
    return any(k.endswith(".experts.gate_up_proj") for k in keys)


def hf_key_prefix(keys: Iterable[str], arch: Arch) -> str:
    """HF checkpoints exist with and without the base model's prefix (``LlamaModel`` vs ``LlamaForCausalLM``): the
    prefix to add to a stored name to get the one the rules use ("" when the names already carry it)."""
    base = "transformer." if arch == "gpt2" else "model."
    return "" if any(k.startswith(base) for k in keys) else base


def is_ignored_hf_key(key: str, cfg: ModelConfig) -> bool:
    """HF tensors that are no weights of ours: causal-mask and rotary caches of older checkpoints, and a tied head
    (``save_pretrained`` leaves it out; where it is stored, it is the embedding)."""
    return key.endswith(_IGNORED_SUFFIXES) or (cfg.tie_embeddings and key.endswith("lm_head.weight"))


def apply_rules(rules: list[Rule], sd: StateDict, direction: str) -> StateDict:
    """Run ``rules`` over a whole state dict; every source tensor must be used (an unused one is reported)."""
    out: StateDict = {}
    used: set[str] = set()
    for rule in rules:
        missing = [s for s in rule.sources if s not in sd]
        if missing:
            raise ValueError(f"{direction}: missing keys {missing[:4]}")
        out.update(zip(rule.targets, rule.fn(*(sd[s] for s in rule.sources))))
        used.update(rule.sources)
    left = sorted(set(sd) - used)
    if left:
        raise ValueError(f"{direction}: unexpected keys {left[:8]}{' ...' if len(left) > 8 else ''}")
    return out


def _from_hf_dict(sd: StateDict, cfg: ModelConfig, arch: Arch) -> StateDict:
    prefix = hf_key_prefix(sd, arch)
    src = {prefix + k: v for k, v in sd.items() if not is_ignored_hf_key(k, cfg)}
    rules = conversion_rules(cfg, to_hf=False, arch=arch, fused_experts=hf_fused_experts(src))
    return apply_rules(rules, src, f"{arch}_from_hf")


def llama_from_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    """``LlamaForCausalLM`` (or ``LlamaModel``) state dict -> ours."""
    return _from_hf_dict(sd, cfg, "llama")


def llama_to_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    """Our state dict -> ``LlamaForCausalLM`` names (``model.`` prefix), vocabulary unpadded."""
    return apply_rules(llama_rules(cfg, to_hf=True), sd, "llama_to_hf")


def gpt2_from_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    """``GPT2LMHeadModel`` (or ``GPT2Model``) state dict -> ours. Conv1D [in, out] weights are transposed."""
    return _from_hf_dict(sd, cfg, "gpt2")


def gpt2_to_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    """Our state dict -> ``GPT2LMHeadModel`` names (``transformer.`` prefix), with fused c_attn and Conv1D layout."""
    return apply_rules(gpt2_rules(cfg, to_hf=True), sd, "gpt2_to_hf")


def from_hf(sd: StateDict, cfg: ModelConfig, arch: Arch | None = None) -> StateDict:
    """HF state dict -> ours; ``arch`` defaults to the one ``cfg`` describes (see ``hf_arch``). Experts may be fused
    (a transformers 5 model's ``state_dict()``) or one tensor per expert (checkpoint files)."""
    return _from_hf_dict(sd, cfg, arch or hf_arch(cfg))


def to_hf(sd: StateDict, cfg: ModelConfig, arch: Arch | None = None, fused_experts: bool = True) -> StateDict:
    """Our state dict -> HF names and layouts; ``arch`` defaults to the one ``cfg`` describes. Experts come fused, as
    a transformers 5 model's ``load_state_dict`` takes them; ``fused_experts=False`` gives the checkpoint files'
    one tensor per expert."""
    return apply_rules(conversion_rules(cfg, to_hf=True, arch=arch, fused_experts=fused_experts), sd, "to_hf")
