"""What a checkpoint holds, read from its meta, its config and its safetensors headers (no tensor data is read)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import yaml

from megatron_lite.convert.checkpoint_io import read_config, read_meta, resolve_checkpoint
from megatron_lite.convert.streaming import TensorDir, human_bytes
from megatron_lite.step.checkpoint_format import MODEL, OPTIM


def _layout(saved: dict | None) -> str:
    if not saved:
        return "none (imported)"
    return f"world_size={saved['world_size']} (pp={saved['pp']} dp={saved['dp']} tp={saved['tp']})"


def inspect_checkpoint(path: Path, log: Callable[[str], None] = print) -> dict:
    """Print the step, the layout it was saved from, the samples consumed, the model config and every tensor with
    its shape and dtype, then the totals; return the totals. Accepts an HF model directory too."""
    path = Path(path)
    if (path / "config.json").is_file() and not (path / "meta.json").is_file():
        return _inspect_hf(path, log)
    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    config = read_config(ckpt)
    log(f"checkpoint {ckpt}")
    layout = _layout(meta.get("saved_layout"))
    log(f"  step {meta['step']}, {meta['consumed_samples']:,} samples consumed, saved from {layout}")
    if meta.get("imported_from"):
        log(f"  imported from {meta['imported_from'].get('kind')} {meta['imported_from'].get('path')}")
    log("  model:")
    for line in yaml.safe_dump(config.to_dict()["model"], sort_keys=False).splitlines():
        log(f"    {line}")
    return _tensors(TensorDir(ckpt), log)


def _inspect_hf(path: Path, log: Callable[[str], None]) -> dict:
    config = json.loads((path / "config.json").read_text())
    log(f"Hugging Face model {path}: {', '.join(config.get('architectures') or [config.get('model_type', '?')])}")
    for key in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id", "dtype"):
        if key in config:
            log(f"  {key}: {config[key]}")
    return _tensors(TensorDir(path), log)


def _tensors(source: TensorDir, log: Callable[[str], None]) -> dict:
    keys = source.keys()
    width = max((len(k) for k in keys), default=0)
    totals = {"tensors": len(keys), "model_params": 0, "model_bytes": 0, "optim_bytes": 0, "other_bytes": 0}
    log("  tensors:")
    for key in keys:
        shape, nbytes = source.shape(key), source.nbytes(key)
        dtype = str(source.dtype(key)).replace("torch.", "")
        log(f"    {key:<{width}}  {str(list(shape)):<16} {dtype:<9} {nbytes:>14,} B")
        kind = "model" if key.startswith(MODEL) else "optim" if key.startswith(OPTIM) else "other"
        totals[f"{kind}_bytes"] += nbytes
        if kind == "model" or not key.startswith((MODEL, OPTIM)):
            totals["model_params"] += math.prod(shape)
    total = totals["model_bytes"] + totals["optim_bytes"] + totals["other_bytes"]
    log(f"  total: {len(keys)} tensors, {human_bytes(total)} ({totals['model_params']:,} weight elements, "
        f"{human_bytes(totals['model_bytes'] + totals['other_bytes'])} weights, "
        f"{human_bytes(totals['optim_bytes'])} optimizer state)")
    totals["bytes"] = total
    return totals
