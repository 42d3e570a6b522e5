"""``checkpoint.init_from``, conversion's half: another checkpoint's weights (one of ours, any layout, its optimizer
state ignored; or a Hugging Face model directory) written beside zero AdamW moments and step counts (exactly the
state a fresh AdamW starts from) as a logical checkpoint, which any engine then loads as it loads any checkpoint
(``training/init_from.py``). The zero moments are holes in a sparse file, so they cost neither time nor, on most
filesystems, disk.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_lite.config import Config
from megatron_lite.convert.checkpoint_io import check_model_tensors, expected_model_tensors
from megatron_lite.convert.errors import ConvertError
from megatron_lite.convert.streaming import Entry, ShardedWriter, TensorDir
from megatron_lite.step.checkpoint_format import MODEL, OPTIM, OPTIM_STATE_KEYS

_SHARD_BYTES = 2**40  # one file: nothing reads it but DCP


def _optimizer_entries(config: Config) -> list[Entry]:
    """Zero AdamW state for every trainable parameter, under its first name (as every engine keeps it)."""
    from megatron_lite.models import construct

    with torch.device("meta"):
        model = construct(config.model)
    entries = []
    for name, p in model.named_parameters():
        for key in OPTIM_STATE_KEYS:
            entries.append(Entry(f"{OPTIM}{name}.{key}", () if key == "step" else tuple(p.shape), torch.float32))
    return entries


def write_weights_with_fresh_optimizer(source: Path, out: Path, config: Config) -> None:
    """``source``'s weights (our checkpoint, or an HF directory converted on the way) and zero AdamW state, as a
    logical checkpoint in ``out``; refused in one line when the weights do not fit ``config.model``."""
    from megatron_lite.convert.checkpoint_io import resolve_checkpoint
    from megatron_lite.convert.hf_dir import hf_model_config, hf_weight_rules

    expected = expected_model_tensors(config.model)
    if (source / "config.json").is_file() and not (source / "meta.json").is_file():
        hf_cfg = hf_model_config(source)
        _check_conventions(source, hf_cfg, config)
        tensors = TensorDir(source)
        rules, prefix = hf_weight_rules(source, hf_cfg, tensors)
        planned = {MODEL + t: tuple(o.shape) for r in rules
                   for t, o in zip(r.targets, r.fn(*(tensors.meta(s[len(prefix):]) for s in r.sources)))}
        check_model_tensors(planned, config.model, f"checkpoint.init_from={source}")
        order = list(planned)

        def produce():
            for rule in rules:
                yield from zip(rule.targets, rule.fn(*(tensors.read(s[len(prefix):]) for s in rule.sources)))
    else:
        ckpt = resolve_checkpoint(source)
        tensors = TensorDir(ckpt)
        check_model_tensors({k: tensors.shape(k) for k in tensors.keys() if k.startswith(MODEL)}, config.model,
                            f"checkpoint.init_from={ckpt}", tensors.shard_note())
        order = list(expected)

        def produce():
            for key in order:
                yield key[len(MODEL):], tensors.read(key)

    # entries in the order the tensors are produced, so each is written as soon as it exists
    model_entries = [Entry(k, tuple(expected[k].shape), expected[k].dtype) for k in order]
    writer = ShardedWriter(out, model_entries + _optimizer_entries(config), _SHARD_BYTES)
    for name, tensor in produce():
        writer.write(MODEL + name, tensor)
        del tensor  # before the next one is read
    for entry in writer.entries[len(model_entries):]:
        writer.write_zeros(entry.name)
    writer.close()


_CONVENTIONS = ("position", "norm", "norm_eps", "activation", "bias", "tie_embeddings", "rope_theta", "rope_scaling")
# how a mixture routes: the weights' shapes cannot tell a softmax router from a sigmoid one, or top-1 from top-2
_ROUTING = ("num_experts", "top_k", "every", "router", "normalize_top_k", "shared_expert_gate")


def _check_conventions(source: Path, hf_cfg, config: Config) -> None:
    """Same shapes are not enough: the HF model's norm, positions and activation must be the run's too."""
    diff = [f"{k}={getattr(hf_cfg, k)!r} there, {getattr(config.model, k)!r} here" for k in _CONVENTIONS
            if getattr(hf_cfg, k) != getattr(config.model, k)]
    if hf_cfg.moe.enabled or config.model.moe.enabled:
        diff += [f"moe.{k}={getattr(hf_cfg.moe, k)!r} there, {getattr(config.model.moe, k)!r} here" for k in _ROUTING
                 if getattr(hf_cfg.moe, k) != getattr(config.model.moe, k)]
    if diff:
        raise ConvertError(f"checkpoint.init_from={source}: config.json describes another model than the run's "
                           f"model section ({'; '.join(diff)})")
