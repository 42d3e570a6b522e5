"""``tools/bench.py convert``: peak host memory of converting a large random checkpoint to Hugging Face and back.

The checkpoint is written tensor by tensor in this process (the bench never holds the model); each conversion runs
``tools/convert_checkpoint.py`` in a child process, which prints its own peak resident size on its last line, so the
figure is the converter's alone. A child that imports what the converter imports gives the baseline.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

GiB = 2**30
_BASELINE = ("import megatron_lite.convert.hf_dir as h, megatron_lite.convert.deepspeed_native; "
             "from megatron_lite.convert.streaming import peak_rss_bytes; "
             "print('peak RSS', peak_rss_bytes() / 2**30, 'GiB')")


class ConversionFailed(RuntimeError):
    """A measured child process exited non-zero; the message names the command and its last error line."""


@dataclass
class ConversionRun:
    """One direction: the child's peak resident size in GiB and its wall time."""

    direction: str
    peak_gib: float
    wall_s: float


def write_random_checkpoint(out: Path, preset: str, seed: int = 0) -> tuple[int, int]:
    """A weights-only logical checkpoint of ``preset`` with random fp32 values, written tensor by tensor (the bench
    never holds the model); returns (bytes, largest tensor's bytes)."""
    import torch

    from megatron_lite.config import Config
    from megatron_lite.convert.checkpoint_io import expected_model_tensors, write_meta
    from megatron_lite.convert.streaming import Entry, ShardedWriter
    from megatron_lite.models.presets import get_preset

    config = Config()
    config.model = get_preset(preset)
    config.data.seq_len = min(config.data.seq_len, config.model.max_seq_len)
    expected = expected_model_tensors(config.model)
    entries = [Entry(k, tuple(t.shape), torch.float32) for k, t in expected.items()]
    out.mkdir(parents=True)
    writer = ShardedWriter(out, entries, 2 * 2**30)
    gen = torch.Generator().manual_seed(seed)
    for e in entries:
        writer.write(e.name, torch.randn(e.shape, generator=gen) * 0.02)
    writer.close()
    write_meta(out, config, {"kind": "random", "path": preset})
    return sum(e.nbytes for e in entries), max(e.nbytes for e in entries)


def peak_rss_of(cmd: list[str]) -> tuple[float, float, str]:
    """(peak RSS in GiB of the command, wall seconds, its last output line), one OpenMP thread."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise ConversionFailed(f"{' '.join(cmd)} failed: {proc.stderr.strip().splitlines()[-1:]}")
    last = proc.stdout.strip().splitlines()[-1]
    value, unit = last.rsplit("peak RSS ", 1)[1].split()[:2]
    return float(value) / (1024 if unit.startswith("MiB") else 1), wall, last


def baseline_rss_gib() -> float:
    """Peak RSS of a Python process that has imported torch and the converter's modules, in GiB."""
    return peak_rss_of([sys.executable, "-c", _BASELINE])[0]


def measure_conversions(root: Path, converter: list[str]) -> Iterator[ConversionRun]:
    """Convert ``root/ours`` to Hugging Face (``root/hf``) and back (``root/back``) with ``converter`` (the command
    that runs ``tools/convert_checkpoint.py``), one run as each ends."""
    for direction, args in (
        ("ours -> hf", ["--input", str(root / "ours"), "--to", "hf", "--output", str(root / "hf")]),
        ("hf -> ours", ["--from", "hf", str(root / "hf"), "--output", str(root / "back")]),
    ):
        peak, wall, _ = peak_rss_of([*converter, *args, "--no-progress"])
        yield ConversionRun(direction, peak, wall)
