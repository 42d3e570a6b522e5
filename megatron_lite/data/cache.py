"""On-disk cache of index arrays, built per node and published atomically.

Each entry is a directory ``NAME-KEY/`` holding ``.npy`` files and ``meta.json``. A builder writes a private temporary
directory and renames it into place with one ``os.replace``; if another builder won the race, its entry is used and ours
dropped, so concurrent builders (processes on one node, or nodes sharing the directory) never leave a partial entry.
No shared filesystem is assumed: each node builds or reads its own cache under the configured directory, and the
result is the same everywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

import numpy as np

CACHE_ENV = "MEGATRON_LITE_CACHE"


def default_cache_dir() -> Path:
    """``$MEGATRON_LITE_CACHE`` if set, else ``~/.cache/megatron_lite/index`` (``data.cache_dir`` overrides both)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "megatron_lite" / "index"


def cache_key(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]


def cached_arrays(cache_dir: str | os.PathLike | None, name: str, inputs: dict,
                  build: Callable[[], dict[str, np.ndarray]], log: Callable[[str], None] | None = None
                  ) -> dict[str, np.ndarray]:
    """Load the arrays cached under ``inputs`` (memory-mapped), or build, publish and return them."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    entry = root / f"{name}-{cache_key(inputs)}"
    loaded = _load(entry)
    if loaded is not None:
        return loaded
    arrays = build()
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{entry.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        for k, v in arrays.items():
            np.save(tmp / f"{k}.npy", v)
        (tmp / "meta.json").write_text(json.dumps({"inputs": inputs, "arrays": sorted(arrays)}, indent=1))
        try:
            os.replace(tmp, entry)
        except OSError:  # another builder published first; theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        if log:
            log(f"warning: could not write index cache under {root} ({e}); using the in-memory index")
        return arrays
    return _load(entry) or arrays


def _load(entry: Path) -> dict[str, np.ndarray] | None:
    meta = entry / "meta.json"
    if not meta.is_file():
        return None
    try:
        names = json.loads(meta.read_text())["arrays"]
        return {k: np.load(entry / f"{k}.npy", mmap_mode="r") for k in names}
    except (OSError, ValueError, KeyError):
        return None
