"""Real launches: the same config under the deepspeed launcher and torchrun, 2 CPU ranks each (15-60 s apiece)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _launch(launcher: list[str], tiny_config: str, run_dir: Path, *overrides: str) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    cmd = [*launcher, str(REPO / "launch" / "pretrain.py"), "--config", tiny_config, "training.train_steps=2",
           f"logging.run_dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("done: step 2") == 1, proc.stdout[-3000:]  # rank 0 alone prints
    assert proc.stdout.count("step      1/2 | loss") == 1, proc.stdout[-3000:]
    assert (run_dir / "checkpoints" / "step_00000002" / "meta.json").is_file()
    meta = json.loads((run_dir / "checkpoints" / "step_00000002" / "meta.json").read_text())
    assert meta["saved_layout"]["world_size"] == 2
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="the deepspeed launcher is not on PATH")
def test_deepspeed_launcher_two_ranks(tiny_config, tmp_path):
    records = _launch(["deepspeed", "--num_gpus", "2"], tiny_config, tmp_path / "ds",
                      "parallel.engine=deepspeed", "parallel.zero_stage=2")
    assert [r["step"] for r in records] == [1, 2]


@pytest.mark.slow
def test_torchrun_two_ranks(tiny_config, tmp_path):
    found = shutil.which("torchrun")
    torchrun = [found] if found else [sys.executable, "-m", "torch.distributed.run"]
    records = _launch([*torchrun, "--nproc_per_node", "2"], tiny_config,
                      tmp_path / "fsdp", "parallel.engine=fsdp")
    assert [r["step"] for r in records] == [1, 2]
