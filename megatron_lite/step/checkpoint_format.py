"""The logical checkpoint format, in one place: the directory layout, the tensor names, ``meta.json``, and how
tensors are written and read. Engines, training and conversion all read it from here.

One checkpoint::

    <checkpoint.dir>/
      latest                      the name of the newest complete checkpoint, e.g. "step_00000100"
      step_00000100/
        *.safetensors             logical tensors (below), sharded by writer rank
        meta.json                 format version, step, global samples consumed, layout it was saved from,
                                  trainer state, engine state (``Engine.extra_state``: e.g. the fp16 loss scale)
        config.yaml               the resolved config
        rng/rank_00000.json       each rank's RNG states as plain JSON

Logical tensors use the unsharded, layout-free names of the plain model:

    model.<fqn>              fp32 master weights, full shape (tied weights appear under each name)
    optim.<fqn>.exp_avg      AdamW first moment
    optim.<fqn>.exp_avg_sq   AdamW second moment
    optim.<fqn>.step         AdamW step count (a 0-d float32 tensor)

They are written through PyTorch DCP as safetensors shards (``HuggingFaceStorageWriter``): each rank writes the pieces
it holds, in parallel, and DCP reshards on load to whatever layout the loading engine has. Reading needs no pickle:
tensors come from safetensors, everything else from JSON.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_lite.errors import CheckpointError, CheckpointMissing

FORMAT_VERSION = 1
LATEST = "latest"
TMP_PREFIX = ".tmp-"  # a checkpoint being written: renamed when every rank is done
MODEL = "model."
OPTIM = "optim."
OPTIM_STATE_KEYS = ("exp_avg", "exp_avg_sq", "step")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def find_latest(root: Path) -> Path | None:
    """The checkpoint ``latest`` points to, or None when there is none yet."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text(errors="replace").strip()
    if not (path / "meta.json").is_file():
        raise CheckpointMissing(f"{pointer} names {path.name}, but {path}/meta.json is missing")
    return path


def read_json(path: Path, what: str) -> Any:
    """A JSON file of a checkpoint, or a :class:`CheckpointError` naming it (JSON never runs code)."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointMissing(f"{path} is missing: expected {what}") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path} is not {what}: {e}") from None


def read_meta(path: Path) -> dict[str, Any]:
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise CheckpointMissing(f"{path} is not a checkpoint: {meta_file} is missing")
    meta = read_json(meta_file, "a checkpoint's meta.json (JSON)")
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise CheckpointError(f"{meta_file}: format_version {version!r}, expected {FORMAT_VERSION}")
    return meta


def new_meta(step: int, consumed: int, saved_layout: dict | None, trainer_state: dict[str, Any],
             engine_state: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The content of ``meta.json``."""
    return {"format_version": FORMAT_VERSION, "step": step, "consumed_samples": consumed,
            "saved_layout": saved_layout, "trainer_state": trainer_state, "engine_state": engine_state, **extra}


def param_name_of(key: str) -> str:
    """The parameter a logical key belongs to: ``model.<fqn>`` and ``optim.<fqn>.<state>`` -> ``<fqn>``; AdamW's
    0-d step count belongs to no shard (``""``)."""
    if key.startswith("model."):
        return key[len("model."):]
    fqn, _, state = key[len("optim."):].rpartition(".")
    return "" if state == "step" else fqn


def write_logical(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write a flat dict of (possibly DTensor-sharded or replicated) tensors as safetensors shards under ``path``.

    Replicated entries are written once: DCP deduplicates identical keys across ranks and spreads the writes.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    path.mkdir(parents=True, exist_ok=True)
    state = _unshare(state)
    distributed = dist.is_available() and dist.is_initialized()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.save(state, storage_writer=HuggingFaceStorageWriter(str(path), save_distributed=distributed))


def _unshare(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy entries whose memory an earlier entry already uses (tied weights): safetensors refuses shared storage."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        local = value.to_local() if hasattr(value, "to_local") else value
        ptr = local.untyped_storage().data_ptr() if local.numel() else None
        if ptr is not None and ptr in seen:
            value = value.detach().clone()
        elif ptr is not None:
            seen.add(ptr)
        out[key] = value
    return out


def read_logical(state: dict[str, torch.Tensor], path: Path) -> None:
    """Fill ``state`` in place (full tensors or DTensor shards) from logical tensors under ``path``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    stored = logical_keys(path)
    missing = sorted(set(state) - stored)
    if missing:
        raise ValueError(
            f"checkpoint {path} lacks {len(missing)} tensors this model needs, e.g. {missing[:3]}; "
            f"it holds {len(stored)} tensors"
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(state, storage_reader=HuggingFaceStorageReader(str(path)))


def logical_keys(path: Path) -> set[str]:
    """Names of the tensors stored under ``path`` (read from the safetensors headers only)."""
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files under checkpoint directory {path}")
    keys: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            keys.update(handle.keys())
    return keys
