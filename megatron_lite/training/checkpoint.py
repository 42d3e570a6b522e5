"""Checkpoint directories: atomic writes, a ``latest`` pointer, keep-last-K pruning, and resume.

The format (directory layout, tensor names, ``meta.json``) is ``step/checkpoint_format.py``'s; see docs/formats.md.
A checkpoint is written into ``.tmp-step_XXXXXXXX`` and renamed when every rank has finished, so a crash leaves either
the previous checkpoint or the new one, never half of one; :func:`recover` removes what a crash left at the next start.
A write that fails (a full disk, an I/O error) fails on every rank together, with one line naming the checkpoint and the
cause, and leaves the previous checkpoint and ``latest`` untouched. Nothing is loaded with pickle: tensors come from
safetensors, everything else from JSON or YAML through the safe loader, and a file that is not what it should be is
refused with :class:`CheckpointError` naming it.
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
from megatron_lite.errors import CheckpointError, CheckpointWriteError
from megatron_lite.step.checkpoint_format import (
    LATEST,
    TMP_PREFIX,
    new_meta,
    read_json,
    read_meta,
    step_dir_name,
)
from megatron_lite.topology import Topology
from megatron_lite.training.pause_points import pause_point



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
    """Write a complete checkpoint for ``step`` under ``root`` (all ranks call this) and return its path.

    Raises :class:`CheckpointWriteError` on every rank when any rank fails to write its part.
    """
    topo = engine.topology
    final = root / step_dir_name(step)
    tmp = root / f"{TMP_PREFIX}{step_dir_name(step)}"
    if _any_rank(topo, topo.is_main and final.exists()):
        raise FileExistsError(f"checkpoint {final} already exists; refusing to overwrite it")
    failure = _on_every_rank(topo, lambda: _make_tmp(root, tmp) if topo.is_main else None)
    if failure is None:
        failure = _on_every_rank(topo, lambda: _write_rank_part(tmp, engine))
    if failure is None:
        pause_point("save", step, topo.is_main)
        engine_state = engine.extra_state()
        failure = _on_every_rank(
            topo, lambda: _finish(root, tmp, final, step, config, trainer_state, engine_state, keep_last, topo)
            if topo.is_main else None
        )
    if failure is not None:
        if topo.is_main:  # free what the partial save took; recover() would remove it at the next start anyway
            shutil.rmtree(tmp, ignore_errors=True)
        previous = root / LATEST
        kept = f"{previous} still names {previous.read_text().strip()}" if previous.is_file() else "no earlier one"
        raise CheckpointWriteError(f"could not write checkpoint {final}: {failure}; {kept}")
    return final


def _make_tmp(root: Path, tmp: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    if tmp.exists():  # left by a crashed save: never a complete checkpoint
        shutil.rmtree(tmp)
    tmp.mkdir()


def _write_rank_part(tmp: Path, engine: Engine) -> None:
    engine.save(tmp)
    (tmp / "rng").mkdir(exist_ok=True)
    (tmp / "rng" / f"rank_{engine.topology.rank:05d}.json").write_text(json.dumps(rng_state()))


def _finish(root: Path, tmp: Path, final: Path, step: int, config: Config, trainer_state: dict[str, Any],
            engine_state: dict[str, Any], keep_last: int, topo: Topology) -> None:
    """Rank 0, once every rank wrote its part: meta.json and config.yaml, the rename, then ``latest``."""
    layout = {"world_size": topo.world_size, "pp": topo.pp, "dp": topo.dp, "tp": topo.tp}
    meta = new_meta(step, int(trainer_state["consumed_samples"]), layout, trainer_state, engine_state)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    (tmp / "config.yaml").write_text(config.to_yaml())
    os.replace(tmp, final)
    _write_text_atomic(root / LATEST, final.name + "\n")
    prune(root, keep_last, current=final)


def _on_every_rank(topology: Topology, work) -> str | None:
    """Run ``work`` on this rank and agree on the outcome: None when every rank succeeded, else this rank's failure
    in one line ("another rank failed ..." on the ranks that did not fail). Ends with every rank past the same point,
    as a barrier would, so no rank waits forever for one that gave up."""
    error: str | None = None
    try:
        work()
    except BaseException as e:  # DCP wraps a rank's write error in a CheckpointException, a BaseException
        if not _is_error(e):
            raise
        error = _describe_write_error(e)
    if _any_rank(topology, error is not None) and error is None:
        error = "another rank failed to write its part"
    return error


def _any_rank(topology: Topology, flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (one all-reduce of one number; also a barrier)."""
    if not topology.is_distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=topology.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _describe_write_error(e: BaseException) -> str:
    import errno

    for cause in _chain(e):
        if isinstance(cause, OSError) and cause.errno is not None:
            where = f" ({cause.filename})" if cause.filename else ""
            reason = "no space left on the device" if cause.errno == errno.ENOSPC else (cause.strerror or str(cause))
            return f"{reason}{where}"
    return _root_message(e)


def _is_error(e: BaseException) -> bool:
    return not isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit))


def _root_message(e: BaseException) -> str:
    """The first line of the error itself, or of the first rank failure a DCP exception carries (its own message
    only says which ranks failed)."""
    causes = [c for c in _chain(e) if type(c).__name__ != "CheckpointException"]
    cause = causes[0] if causes else e
    return _first_line(cause)


def _chain(e: BaseException):
    """``e``, its causes and contexts, and the per-rank failures a DCP CheckpointException carries."""
    seen: set[int] = set()
    todo = [e]
    while todo:
        cur = todo.pop(0)
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        yield cur
        todo += [cur.__cause__, cur.__context__]
        failures = getattr(cur, "failures", None)
        if isinstance(failures, dict):
            for value in failures.values():
                if isinstance(value, BaseException):
                    todo.append(value)
                elif isinstance(value, tuple) and value and isinstance(value[0], BaseException):
                    todo.append(value[0])


def prune(root: Path, keep_last: int, current: Path | None = None) -> None:
    """Delete checkpoints beyond the newest ``keep_last``, never ``current`` (the one ``latest`` names).

    ``current`` counts as one of the kept: a fresh run in a directory that holds later steps of an older run must not
    delete the checkpoint it has just written and left ``latest`` pointing to.
    """
    others = sorted(p for p in root.glob("step_*") if p.is_dir() and p != current)
    keep = keep_last - 1 if current is not None else keep_last
    for old in others[: max(len(others) - keep, 0)]:
        shutil.rmtree(old, ignore_errors=True)


def recover(root: Path, log=print) -> None:
    """Clean up after a crash, at start, on rank 0, while the run's lock is held (nothing else writes here).

    Removes the ``.tmp-*`` directories of interrupted saves (never complete checkpoints) and the temporary file of
    an interrupted ``latest`` update. A save killed between its rename and the update of ``latest`` leaves a
    complete checkpoint newer than the one ``latest`` names: ``latest`` is moved to it, so the run resumes from the
    newest complete state and never tries to write that step again.
    """
    if not root.is_dir():
        return
    for partial in sorted(root.glob(f"{TMP_PREFIX}step_*")):
        log(f"removing {partial}: an interrupted save, never a complete checkpoint")
        shutil.rmtree(partial, ignore_errors=True)
    (root / f".{LATEST}.tmp").unlink(missing_ok=True)
    pointer = root / LATEST
    current = pointer.read_text().strip() if pointer.is_file() else ""
    if current and not (root / current / "meta.json").is_file():
        return  # a dangling pointer: find_latest reports it rather than guess
    complete = sorted(p.name for p in root.glob("step_*") if (p / "meta.json").is_file())
    if complete and complete[-1] > current:
        log(f"{pointer} named {current or 'nothing'}, but {complete[-1]} is complete and newer: resuming from it")
        _write_text_atomic(pointer, complete[-1] + "\n")


def load_checkpoint(path: Path, engine: Engine) -> dict[str, Any]:
    """Load tensors (any saved layout) and this rank's RNG state; return the checkpoint's meta."""
    meta = read_meta(path)
    try:
        engine.load(path)
    except CheckpointError:
        raise
    except BaseException as e:  # DCP's CheckpointException is a BaseException; safetensors raises its own type
        if not _is_error(e):
            raise
        raise CheckpointError(f"checkpoint {path}: cannot load its tensors: {_root_message(e)}") from e
    engine.load_extra_state(meta.get("engine_state", {}))  # absent in checkpoints written before it existed
    rng_file = path / "rng" / f"rank_{engine.topology.rank:05d}.json"
    if rng_file.is_file():
        state = read_json(rng_file, "a rank's RNG state (JSON)")
        try:
            set_rng_state(state)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{rng_file}: not an RNG state written by this program ({e})") from None
    return meta


def _first_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__
