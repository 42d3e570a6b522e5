"""Checkpoint directories: atomic writes, a ``latest`` pointer, keep-last-K pruning, and resume.

Layout of one checkpoint (see docs/formats.md)::

    <checkpoint.dir>/
      latest                      the name of the newest complete checkpoint, e.g. "step_00000100"
      step_00000100/
        *.safetensors             logical model and optimizer tensors (engines/base.py), sharded by writer rank
        meta.json                 format version, step, global samples consumed, layout it was saved from,
                                  trainer state, engine state (``Engine.extra_state``: e.g. the fp16 loss scale)
        config.yaml               the resolved config
        rng/rank_00000.json       each rank's RNG states (torch, CUDA, numpy, python) as plain JSON

A checkpoint is written into ``.tmp-step_XXXXXXXX`` and renamed when every rank has finished, so a crash leaves either
the previous checkpoint or the new one, never half of one. Nothing is loaded with pickle.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_lite.config import Config
from megatron_lite.engines.base import Engine
from megatron_lite.topology import Topology

FORMAT_VERSION = 1
LATEST = "latest"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _barrier(topology: Topology) -> None:
    if topology.is_distributed:
        dist.barrier()


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    """This process's RNG states as JSON-safe values."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state().tolist(),
        "numpy": {"keys": np_state[1].tolist(), "pos": int(np_state[2]), "gauss": [int(np_state[3]), float(np_state[4])]},
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    n = state["numpy"]
    np.random.set_state(("MT19937", np.array(n["keys"], dtype=np.uint32), n["pos"], n["gauss"][0], n["gauss"][1]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def save_checkpoint(
    root: Path,
    step: int,
    engine: Engine,
    config: Config,
    trainer_state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write a complete checkpoint for ``step`` under ``root`` (all ranks call this) and return its path."""
    topo = engine.topology
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}"
    if topo.is_main:
        if final.exists():
            raise FileExistsError(f"checkpoint {final} already exists; refusing to overwrite it")
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a crashed save: never a complete checkpoint
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier(topo)
    engine.save(tmp)
    engine_state = engine.extra_state()
    (tmp / "rng").mkdir(exist_ok=True)
    (tmp / "rng" / f"rank_{topo.rank:05d}.json").write_text(json.dumps(rng_state()))
    _barrier(topo)
    if topo.is_main:
        meta = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "consumed_samples": int(trainer_state["consumed_samples"]),
            "saved_layout": {"world_size": topo.world_size, "pp": topo.pp, "dp": topo.dp, "tp": topo.tp},
            "trainer_state": trainer_state,
            "engine_state": engine_state,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        (tmp / "config.yaml").write_text(config.to_yaml())
        os.replace(tmp, final)
        _write_text_atomic(root / LATEST, final.name + "\n")
        prune(root, keep_last, current=final)
    _barrier(topo)
    return final


def prune(root: Path, keep_last: int, current: Path | None = None) -> None:
    """Delete checkpoints beyond the newest ``keep_last``, never ``current`` (the one ``latest`` names).

    ``current`` counts as one of the kept: a fresh run in a directory that holds later steps of an older run must not
    delete the checkpoint it has just written and left ``latest`` pointing to.
    """
    others = sorted(p for p in root.glob("step_*") if p.is_dir() and p != current)
    keep = keep_last - 1 if current is not None else keep_last
    for old in others[: max(len(others) - keep, 0)]:
        shutil.rmtree(old, ignore_errors=True)


def find_latest(root: Path) -> Path | None:
    """The checkpoint ``latest`` points to, or None when there is none yet."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, but {path}/meta.json is missing")
    return path


def read_meta(path: Path) -> dict[str, Any]:
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint: {meta_file} is missing")
    meta = json.loads(meta_file.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_file}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    return meta


def load_checkpoint(path: Path, engine: Engine) -> dict[str, Any]:
    """Load tensors (any saved layout) and this rank's RNG state; return the checkpoint's meta."""
    meta = read_meta(path)
    engine.load(path)
    engine.load_extra_state(meta.get("engine_state", {}))  # absent in checkpoints written before it existed
    rng_file = path / "rng" / f"rank_{engine.topology.rank:05d}.json"
    if rng_file.is_file():
        set_rng_state(json.loads(rng_file.read_text()))
    return meta
