"""Hugging Face <-> megatron_lite for the decoder family's mixtures of experts: ``MixtralForCausalLM`` and
``Qwen2MoeForCausalLM``, configs and weights, both directions.

Both are Llama-style decoders (rotary, rmsnorm, SwiGLU, pre-norm) whose feed-forward layers are mixtures routed by a
softmax over all experts, top-k taken; ``convert/hf.py`` maps what they share with Llama and hands the rest here.

- **Mixtral**: every layer a mixture, the top-k weights always renormalized, no shared experts, no biases.
- **Qwen2-MoE**: layer i a mixture when ``(i + 1) % decoder_sparse_step == 0`` (our ``model.moe.every``), the others
  dense MLPs of ``intermediate_size``; biases on q, k, v only (our ``model.qkv_bias: true`` with ``bias: false``); one
  shared expert MLP of ``shared_expert_intermediate_size`` (ours: ``shared_experts`` experts of
  ``moe_intermediate_size``) scaled by ``sigmoid(shared_expert_gate(x))`` (our ``shared_expert_gate``).

Experts come in two layouts. Checkpoint files (what ``save_pretrained`` writes and the Hub holds, and transformers
4's modules) keep one tensor per expert: Mixtral's ``block_sparse_moe.experts.{e}.w1`` (gate), ``w3`` (up), ``w2``
(down) and ``block_sparse_moe.gate`` (the router), Qwen2-MoE's ``mlp.experts.{e}.{gate,up,down}_proj``. transformers
5's modules fuse them per layer: ``mlp.experts.gate_up_proj`` [E, 2f, h] (each expert's gate rows, then its up rows)
and ``mlp.experts.down_proj`` [E, h, f], with the router at ``mlp.gate``. Directories are written one tensor per
expert, so a conversion streams tensor by tensor; either layout is read (``hf.hf_fused_experts`` tells them apart).

Our DeepSeek-style balancing bias (``mlp.expert_bias``, a buffer the softmax router never reads) has no HF tensor: it
is dropped on export and starts at zero on import. HF's ``router_aux_loss_coef`` is our ``moe.aux_loss_coef``; our
router z-loss coefficient, which HF does not have, travels as an extra ``router_z_loss_coef`` key (written when not
zero; HF keeps unknown keys and ignores them).
"""

from __future__ import annotations

from typing import Callable

import torch

from megatron_lite.config import ModelConfig, MoEConfig
from megatron_lite.convert.hf_rules import Rule, head_rules, linear_rules, rotary_from_hf, rotary_to_hf

MOE_ARCHS = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}
# Defaults the HF configs assume when config.json leaves a key out, where they differ from Llama's.
_DEFAULTS = {
    "mixtral": {"rope_theta": 1e6, "rms_norm_eps": 1e-5, "num_key_value_heads": 8, "num_local_experts": 8,
                "num_experts_per_tok": 2, "router_aux_loss_coef": 0.001},
    "qwen2_moe": {"qkv_bias": True, "norm_topk_prob": False, "decoder_sparse_step": 1, "router_aux_loss_coef": 0.001},
}
# Our expert MLP names -> each architecture's per-expert names (checkpoint files).
_EXPERT_NAMES = {
    "mixtral": {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"},
    "qwen2_moe": {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"},
}
_MLP = ("gate_proj", "up_proj", "down_proj")


def _qkv_bias(cfg: ModelConfig) -> bool:
    return cfg.bias if cfg.qkv_bias is None else cfg.qkv_bias


# ----------------------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------------------


def moe_arch(cfg: ModelConfig) -> str:
    """``mixtral`` or ``qwen2_moe`` for a Llama-style ``cfg`` with mixture layers, or a ValueError naming the option
    neither can express (``hf.hf_arch`` has checked the Llama-style parts)."""
    m = cfg.moe
    if m.router != "softmax":
        raise ValueError(f"model.moe.router={m.router} has no HF equivalent here: Mixtral and Qwen2-MoE route by "
                         "a softmax over all experts (router: softmax)")
    if cfg.bias:
        raise ValueError("model.bias=true has no HF equivalent: Mixtral and Qwen2-MoE have no biases on o_proj or the "
                         "MLPs (Qwen2-MoE's q, k, v biases are model.qkv_bias)")
    if m.shared_experts:
        if not m.shared_expert_gate:
            raise ValueError("model.moe.shared_experts without model.moe.shared_expert_gate has no HF equivalent: "
                             "Qwen2-MoE always gates its shared expert; set shared_expert_gate: true")
        return "qwen2_moe"
    if m.every != 1:
        raise ValueError(f"model.moe.every={m.every} with model.moe.shared_experts=0 has no HF equivalent: Mixtral "
                         "makes every layer a mixture, and Qwen2-MoE (decoder_sparse_step) has a gated shared expert")
    if not m.normalize_top_k:
        raise ValueError("model.moe.normalize_top_k=false has no HF equivalent without shared experts: Mixtral always "
                         "renormalizes the top-k weights")
    if _qkv_bias(cfg):
        raise ValueError("model.qkv_bias=true has no HF equivalent without shared experts: Mixtral has no attention "
                         "biases")
    return "mixtral"


def config_from_hf_moe(hf: dict) -> ModelConfig:
    """ModelConfig from the ``config.json`` dict of a ``MixtralForCausalLM`` or ``Qwen2MoeForCausalLM``."""
    kind = hf["model_type"]
    hf = {**_DEFAULTS[kind], **{k: v for k, v in hf.items() if v is not None}}
    common = rotary_from_hf(hf)
    aux, z = hf["router_aux_loss_coef"], hf.get("router_z_loss_coef", 0.0)
    if kind == "mixtral":
        if hf.get("router_jitter_noise"):
            raise ValueError(f"router_jitter_noise={hf['router_jitter_noise']} is not supported: our router takes "
                             "the hidden states as they are; set it to 0")
        window = hf.get("sliding_window")
        if window is not None and window < hf["max_position_embeddings"]:
            raise ValueError(f"sliding_window={window} is not supported: our attention sees the whole sequence "
                             "(null, or at least max_position_embeddings)")
        f = hf["intermediate_size"]
        moe = MoEConfig(num_experts=hf.get("num_local_experts", hf.get("num_experts")),
                        top_k=hf["num_experts_per_tok"], every=1, expert_ffn_size=f, router="softmax",
                        normalize_top_k=True, aux_loss_coef=aux, z_loss_coef=z)
        cfg = ModelConfig(**common, ffn_hidden_size=f, bias=False, qkv_bias=False, moe=moe)
    else:
        if hf.get("mlp_only_layers"):
            raise ValueError(f"mlp_only_layers={hf['mlp_only_layers']} is not supported: our mixture layers follow "
                             "decoder_sparse_step alone (model.moe.every); it must be empty")
        if hf.get("use_sliding_window"):
            raise ValueError("use_sliding_window=true is not supported: our attention sees the whole sequence")
        if not hf.get("num_experts"):
            raise ValueError(f"num_experts={hf.get('num_experts')}: a Qwen2-MoE without experts is not supported")
        f, shared = hf["moe_intermediate_size"], hf["shared_expert_intermediate_size"]
        if shared <= 0 or shared % f:
            raise ValueError(f"shared_expert_intermediate_size={shared} must be a positive multiple of "
                             f"moe_intermediate_size={f} (model.moe.shared_experts experts of that width)")
        moe = MoEConfig(num_experts=hf["num_experts"], top_k=hf["num_experts_per_tok"],
                        every=hf["decoder_sparse_step"], expert_ffn_size=f, shared_experts=shared // f,
                        shared_expert_gate=True, router="softmax", normalize_top_k=bool(hf["norm_topk_prob"]),
                        aux_loss_coef=aux, z_loss_coef=z)
        cfg = ModelConfig(**common, ffn_hidden_size=hf["intermediate_size"], bias=False,
                          qkv_bias=bool(hf["qkv_bias"]), moe=moe)
    cfg.validate()
    return cfg


def config_to_hf_moe(cfg: ModelConfig, arch: str) -> dict:
    """The ``config.json`` dict of ``cfg`` as ``arch`` (``moe_arch``), vocabulary unpadded."""
    m = cfg.moe
    out = {"architectures": [MOE_ARCHS[arch]], "model_type": arch, **rotary_to_hf(cfg),
           "num_experts_per_tok": m.top_k, "router_aux_loss_coef": m.aux_loss_coef, "output_router_logits": False}
    if arch == "mixtral":
        out.update(intermediate_size=cfg.expert_ffn_size, num_local_experts=m.num_experts, router_jitter_noise=0.0,
                   sliding_window=None)
    else:
        out.update(intermediate_size=cfg.ffn_size, moe_intermediate_size=cfg.expert_ffn_size,
                   shared_expert_intermediate_size=m.shared_experts * cfg.expert_ffn_size, num_experts=m.num_experts,
                   decoder_sparse_step=m.every, norm_topk_prob=m.normalize_top_k, mlp_only_layers=[],
                   qkv_bias=_qkv_bias(cfg), use_sliding_window=False)
    if m.z_loss_coef:
        out["router_z_loss_coef"] = m.z_loss_coef
    return out


# ----------------------------------------------------------------------------------------------------------------------
# State dicts
# ----------------------------------------------------------------------------------------------------------------------


def _fuse_gate_up(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Our experts' gate weights [f, h] (all of them), then their up weights -> HF's gate_up_proj [E, 2f, h]."""
    gates, ups = ts[: len(ts) // 2], ts[len(ts) // 2:]
    f = gates[0].shape[0]
    out = gates[0].new_empty((len(gates), 2 * f, *gates[0].shape[1:]))
    for e, (g, u) in enumerate(zip(gates, ups)):
        out[e, :f], out[e, f:] = g, u
    return (out,)


def _split_gate_up(experts: int) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]]:
    """HF's gate_up_proj [E, 2f, h] -> expert 0's gate and up weights, expert 1's, ..."""
    def split(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if t.dim() != 3 or t.shape[0] != experts or t.shape[1] % 2:
            raise ValueError(f"gate_up_proj of shape {list(t.shape)} does not hold {experts} experts' gate and up")
        f = t.shape[1] // 2
        return tuple(part.clone() for e in range(experts) for part in (t[e, :f], t[e, f:]))
    return split


def _stack(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (torch.stack(ts),)


def _unstack(experts: int) -> Callable[[torch.Tensor], tuple[torch.Tensor, ...]]:
    def unstack(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if t.dim() != 3 or t.shape[0] != experts:
            raise ValueError(f"down_proj of shape {list(t.shape)} does not hold {experts} experts")
        return tuple(t[e].clone() for e in range(experts))
    return unstack


def _linear(ours: str, theirs: str, to_hf: bool, bias: bool = False) -> list[Rule]:
    return linear_rules(ours, theirs, bias, transpose=False, to_hf=to_hf)


def _mixture_rules(cfg: ModelConfig, i: int, arch: str, to_hf: bool, fused: bool) -> list[Rule]:
    """Layer ``i``'s router, experts, shared expert and its gate; and our balancing bias, dropped or zeroed."""
    m, ours = cfg.moe, f"layers.{i}.mlp"
    block = f"model.layers.{i}.{'block_sparse_moe' if arch == 'mixtral' and not fused else 'mlp'}"
    rules = _linear(f"{ours}.router", f"{block}.gate", to_hf)
    experts = range(m.num_experts)
    if fused:
        gate, up, down = ([f"{ours}.experts.{e}.{p}.weight" for e in experts] for p in _MLP)
        gate_up, down_hf = (f"{block}.experts.gate_up_proj",), (f"{block}.experts.down_proj",)
        if to_hf:
            rules += [Rule(gate_up, (*gate, *up), _fuse_gate_up), Rule(down_hf, tuple(down), _stack)]
        else:
            pairs = tuple(name for e in experts for name in (gate[e], up[e]))
            rules += [Rule(pairs, gate_up, _split_gate_up(m.num_experts)), Rule(tuple(down), down_hf,
                                                                               _unstack(m.num_experts))]
    else:
        for e in experts:
            for p, theirs in _EXPERT_NAMES[arch].items():
                rules += _linear(f"{ours}.experts.{e}.{p}", f"{block}.experts.{e}.{theirs}", to_hf)
    if m.shared_experts:
        for p in _MLP:
            rules += _linear(f"{ours}.shared.{p}", f"{block}.shared_expert.{p}", to_hf)
        if m.shared_expert_gate:
            rules += _linear(f"{ours}.shared_gate", f"{block}.shared_expert_gate", to_hf)
    bias = (f"{ours}.expert_bias",)
    if to_hf:
        rules.append(Rule((), bias, lambda _: ()))
    else:
        rules.append(Rule(bias, (), lambda: (torch.zeros(m.num_experts),)))
    return rules


def moe_rules(cfg: ModelConfig, to_hf: bool, arch: str, fused_experts: bool = False) -> list[Rule]:
    """Rules between our names and ``MixtralForCausalLM``'s or ``Qwen2MoeForCausalLM``'s (``model.`` prefix), in
    either direction; ``fused_experts``: HF's experts as transformers 5 modules hold them."""
    rules = head_rules(cfg, "embed.weight", "model.embed_tokens.weight", to_hf)
    qkv_bias = _qkv_bias(cfg)
    for i in range(cfg.num_layers):
        ours, theirs = f"layers.{i}", f"model.layers.{i}"
        rules += _linear(f"{ours}.attn_norm", f"{theirs}.input_layernorm", to_hf)
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            rules += _linear(f"{ours}.attn.{p}", f"{theirs}.self_attn.{p}", to_hf, qkv_bias and p != "o_proj")
        rules += _linear(f"{ours}.mlp_norm", f"{theirs}.post_attention_layernorm", to_hf)
        if cfg.moe.is_moe_layer(i):
            rules += _mixture_rules(cfg, i, arch, to_hf, fused_experts)
        else:
            for p in _MLP:
                rules += _linear(f"{ours}.mlp.{p}", f"{theirs}.mlp.{p}", to_hf)
    rules += _linear("final_norm", "model.norm", to_hf)
    return rules

