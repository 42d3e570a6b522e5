"""Hugging Face T5 <-> megatron_lite name mapping for the encoder-decoder family (T5 v1.1 and the original T5).

The same kind of adapter as ``convert/hf.py`` for the decoder family: pure functions on config dicts, and a list of
:class:`~megatron_lite.convert.hf.Rule` s per direction (:func:`conversion_rules`), which :func:`to_hf` and
:func:`from_hf` apply to whole state dicts and ``convert/hf_dir.py`` streams one rule at a time; only :func:`save_hf`
writes files. Our blocks sit in one ``layers`` dict, encoder first: our layer ``i`` is HF's ``encoder.block.i`` for
``i < E`` and ``decoder.block.(i - E)`` after. The relative-position tables, which HF keeps in block 0 of each stack,
are our ``encoder_pos_bias`` and ``decoder_pos_bias``. The original Transformer style has no HF T5 equivalent.

An untied head (T5 v1.1) needs care with transformers 5: ``T5Config`` turns ``tie_word_embeddings`` into
``scale_decoder_outputs`` and then forces ``tie_word_embeddings=True``, so a model built from the config has its head
tied to ``shared``, and ``from_pretrained`` unties it only when the checkpoint holds its own ``lm_head.weight``. The
export therefore writes ``tie_word_embeddings: false`` into ``config.json`` (so the decoder output is not rescaled)
and writes ``lm_head.weight`` whenever the head is untied. Reading, ``scale_decoder_outputs`` (which transformers 5
saves beside a ``tie_word_embeddings`` that is always true) decides: T5 ties its head exactly when it scales.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable

import torch

from megatron_lite.config import ModelConfig
from megatron_lite.convert.hf import SPECIAL_TOKENS, apply_rules
from megatron_lite.convert.hf_rules import Rule, head_rules, unchanged

StateDict = dict[str, torch.Tensor]
_FFN = {"geglu": "gated-gelu", "relu": "relu"}
_ATTN = ("q", "k", "v", "o")


def check_t5(cfg: ModelConfig) -> None:
    """A ValueError naming what keeps ``cfg`` from being an HF T5 model."""
    wanted = {
        "family": ("encoder_decoder", cfg.family), "position": ("relative", cfg.position),
        "norm": ("rmsnorm", cfg.norm), "norm_position": ("pre", cfg.norm_position), "bias": (False, cfg.bias),
        "scale_attn_logits": (False, cfg.scale_attn_logits), "scale_embeddings": (False, cfg.scale_embeddings),
        # transformers 5 scales the decoder output exactly when the head is tied
        "scale_decoder_output": (cfg.tie_embeddings, cfg.scale_decoder_output),
    }
    wrong = [f"model.{k}={got!r} (T5: {want!r})" for k, (want, got) in wanted.items() if want != got]
    if cfg.activation not in _FFN:
        wrong.append(f"model.activation={cfg.activation!r} (T5: {' or '.join(_FFN)})")
    if wrong:
        raise ValueError("no HF T5 equivalent: " + ", ".join(wrong))


def _decoder_start(hf: dict) -> int:
    """``decoder_start_token_id``; a config that leaves it unset (transformers 5 writes null) gets T5's convention,
    the pad token, which is what HF's own error for it asks for."""
    start = hf.get("decoder_start_token_id")
    if start is None:
        start = hf.get("pad_token_id")
    return 0 if start is None else int(start)


def config_from_hf(hf: dict) -> ModelConfig:
    """ModelConfig from a ``T5ForConditionalGeneration`` ``config.json`` dict (T5 v1.1 or the original T5)."""
    if hf.get("model_type") not in ("t5", None):
        raise ValueError(f"model_type={hf.get('model_type')!r}: expected 't5'")
    proj = hf.get("feed_forward_proj", "relu")
    act = {v: k for k, v in _FFN.items()}.get(proj)
    if act is None:
        raise ValueError(f"feed_forward_proj={proj!r} is not supported; expected one of {', '.join(_FFN.values())}")
    # transformers 5 saves scale_decoder_outputs (and tie_word_embeddings always true); older configs the tie alone
    tied = bool(hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False))
    return ModelConfig(
        family="encoder_decoder", vocab_size=hf["vocab_size"], hidden_size=hf["d_model"], num_layers=hf["num_layers"],
        num_decoder_layers=hf.get("num_decoder_layers") or hf["num_layers"], num_heads=hf["num_heads"],
        kv_channels=hf["d_kv"], ffn_hidden_size=hf["d_ff"], max_seq_len=hf.get("n_positions", 512),
        position="relative", relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128), norm="rmsnorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-6), norm_position="pre", activation=act, bias=False,
        tie_embeddings=tied, scale_attn_logits=False, scale_decoder_output=tied,
        decoder_start_token_id=_decoder_start(hf), residual_dropout=hf.get("dropout_rate", 0.0),
        attention_dropout=hf.get("dropout_rate", 0.0), embedding_dropout=hf.get("dropout_rate", 0.0),
        init_std=hf.get("initializer_factor", 1.0),
    )  # fmt: skip


def hf_arch(cfg: ModelConfig) -> str:
    """The HF architecture ``cfg`` corresponds to (``t5``), or a ValueError naming what T5 cannot express."""
    check_t5(cfg)
    return "t5"


# What T5 reads from the tokenizer: it has no beginning-of-sequence token (the decoder starts with
# decoder_start_token_id, conventionally the pad token).
T5_SPECIAL_TOKENS = ("eos_token_id", "pad_token_id")


def config_to_hf(cfg: ModelConfig, special_tokens: dict[str, int | None] | None = None) -> dict:
    """An HF ``config.json`` dict for ``cfg``; ``tie_word_embeddings`` is written as it is (module docstring).

    ``special_tokens`` (from the tokenizer) give ``eos_token_id`` and ``pad_token_id``; left out (or None), HF's T5
    defaults apply (pad 0, eos 1). ``bos_token_id`` is accepted and dropped: T5 has none.
    """
    check_t5(cfg)
    config = {
        "architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "vocab_size": cfg.vocab_size,
        "d_model": cfg.hidden_size, "d_kv": cfg.head_dim, "d_ff": cfg.ffn_size, "num_layers": cfg.num_layers,
        "num_decoder_layers": cfg.decoder_layers, "num_heads": cfg.num_heads,
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance, "layer_norm_epsilon": cfg.norm_eps,
        "feed_forward_proj": _FFN[cfg.activation], "tie_word_embeddings": cfg.tie_embeddings,
        "scale_decoder_outputs": cfg.scale_decoder_output, "dropout_rate": cfg.residual_dropout,
        "is_encoder_decoder": True, "decoder_start_token_id": cfg.decoder_start_token_id,
        "n_positions": cfg.max_seq_len,
    }  # fmt: skip
    for key, value in (special_tokens or {}).items():
        if key not in SPECIAL_TOKENS:
            raise ValueError(f"special token {key!r}: expected one of {', '.join(SPECIAL_TOKENS)}")
        if value is not None and not 0 <= value < cfg.vocab_size:
            raise ValueError(f"{key}={value} lies outside the model's vocabulary of {cfg.vocab_size}")
        if key in T5_SPECIAL_TOKENS and value is not None:
            config[key] = value
    return config


def _layer_names(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(our name, HF name) for every tensor of every block."""
    gated = cfg.activation == "geglu"
    mlp = [("mlp.gate_proj", "wi_0"), ("mlp.up_proj", "wi_1")] if gated else [("mlp.up_proj", "wi")]
    mlp.append(("mlp.down_proj", "wo"))
    pairs = []
    for i in range(cfg.num_layers + cfg.decoder_layers):
        decoder = i >= cfg.num_layers
        hf = f"decoder.block.{i - cfg.num_layers}" if decoder else f"encoder.block.{i}"
        parts = [("attn", "attn_norm", "SelfAttention")]
        if decoder:
            parts.append(("cross_attn", "cross_norm", "EncDecAttention"))
        for j, (attn, norm, theirs) in enumerate(parts):
            pairs += [(f"layers.{i}.{attn}.{m}_proj.weight", f"{hf}.layer.{j}.{theirs}.{m}.weight") for m in _ATTN]
            pairs.append((f"layers.{i}.{norm}.weight", f"{hf}.layer.{j}.layer_norm.weight"))
        j = len(parts)
        ffn = f"{hf}.layer.{j}.DenseReluDense"
        pairs += [(f"layers.{i}.{ours}.weight", f"{ffn}.{theirs}.weight") for ours, theirs in mlp]
        pairs.append((f"layers.{i}.mlp_norm.weight", f"{hf}.layer.{j}.layer_norm.weight"))
    return pairs


def _fixed_names() -> list[tuple[str, str]]:
    return [
        ("encoder_pos_bias.weight", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
        ("decoder_pos_bias.weight", "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
        ("encoder_norm.weight", "encoder.final_layer_norm.weight"),
        ("final_norm.weight", "decoder.final_layer_norm.weight"),
    ]


def conversion_rules(cfg: ModelConfig, to_hf: bool, arch: str | None = None) -> list[Rule]:
    """The rules from our names to ``T5ForConditionalGeneration``'s (``to_hf``) or back: the embedding (``shared``,
    unpadded in HF) and the head as the decoder family's, every other tensor renamed as it is."""
    check_t5(cfg)
    rules = head_rules(cfg, "embed.weight", "shared.weight", to_hf)
    for ours, theirs in _fixed_names() + _layer_names(cfg):
        rules.append(Rule((theirs,), (ours,), unchanged) if to_hf else Rule((ours,), (theirs,), unchanged))
    return rules


def hf_key_prefix(keys: Iterable[str], arch: str = "t5") -> str:
    """T5 checkpoints store the names the rules use (no base-model prefix to add)."""
    return ""


# Copies of ``shared`` that older checkpoints store beside it.
_EMBED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def is_ignored_hf_key(key: str, cfg: ModelConfig) -> bool:
    """HF tensors that are no weights of ours: the stacks' copies of ``shared``, and a tied head (the embedding)."""
    return key in _EMBED_COPIES or (cfg.tie_embeddings and key == "lm_head.weight")


def from_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    """``T5ForConditionalGeneration`` state dict -> ours (vocabulary padded to ``padded_vocab_size`` with zeros)."""
    src = {k: v for k, v in sd.items() if not is_ignored_hf_key(k, cfg)}
    return apply_rules(conversion_rules(cfg, to_hf=False), src, "t5.from_hf")


def to_hf(sd: StateDict, cfg: ModelConfig) -> StateDict:
    """Our state dict -> ``T5ForConditionalGeneration`` names, vocabulary unpadded; a tied head comes out as
    ``lm_head.weight`` too (the embedding's values), which :func:`save_hf` leaves out of the file as HF does."""
    return apply_rules(conversion_rules(cfg, to_hf=True), sd, "t5.to_hf")


def save_hf(sd: StateDict, cfg: ModelConfig, directory: str | Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` for ``T5ForConditionalGeneration.from_pretrained``; each file
    is written under a temporary name and renamed, so a crash leaves no half-written file."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tied = {t for rule in conversion_rules(cfg, to_hf=True) if rule.tied for t in rule.targets}
    tensors = {k: t.detach().to("cpu").contiguous() for k, t in to_hf(sd, cfg).items() if k not in tied}
    for name, write in (
        ("model.safetensors", lambda path: save_file(tensors, path, metadata={"format": "pt"})),
        ("config.json", lambda path: Path(path).write_text(json.dumps(config_to_hf(cfg), indent=2) + "\n")),
    ):
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.")
        os.close(fd)
        write(tmp)
        os.replace(tmp, directory / name)
    return directory


def load_hf(directory: str | Path) -> tuple[ModelConfig, StateDict]:
    """Our config and state dict from an HF T5 directory (``config.json`` + ``*.safetensors``); runs no pickle."""
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg = config_from_hf(json.loads((directory / "config.json").read_text()))
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{directory}: no *.safetensors file (pickled checkpoints are not read)")
    sd: StateDict = {}
    for f in files:
        sd.update(load_file(f))
    return cfg, from_hf(sd, cfg)


__all__ = ["check_t5", "config_from_hf", "config_to_hf", "conversion_rules", "from_hf", "hf_arch", "hf_key_prefix",
           "is_ignored_hf_key", "load_hf", "save_hf", "to_hf"]
