"""The README's quickstart, end to end through the real deepspeed launcher, with a few steps instead of hundreds."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "qs"
    cmd = [
        sys.executable, "tools/quickstart.py", "--out", str(out), "--vocab-size", "1024",
        "training.train_steps=6", "training.eval_interval=3", "logging.log_interval=2", "checkpoint.interval=3",
        "logging.wandb_mode=disabled", "model.num_layers=1", "model.hidden_size=64", "model.num_heads=2",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    assert "training with 2 rank(s)" in text
    assert "world=2 pp=1 dp=2 tp=1" in text  # two data-parallel ranks really ran
    assert "tok/s" in text and "validation loss" in text
    ckpt = out / "run" / "checkpoints" / "step_00000006"
    assert (ckpt / "meta.json").is_file()
    assert f"checkpoint: {ckpt}" in text
    assert (out / "data" / "stdlib_docstrings.bin").stat().st_size > 100_000
