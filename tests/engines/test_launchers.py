"""Real launches: the same config under the deepspeed launcher and torchrun on 4 CPU ranks, then resumed on 4 or 2,
each compared with one process on the same global batches: losses within 1e-5 and gradient norms before clipping
within 1e-5 relative (a sum where an average belongs scales the norm, not the losses). Two ranks under each launcher
run elsewhere too: the deepspeed launcher in the second leg below and in the quickstart, torchrun across two hosts
(``tests/multinode``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_lite.parity import run_layout

REPO = Path(__file__).resolve().parents[2]
TOL = 1e-5
DEEPSPEED = [str(Path(sys.executable).with_name("deepspeed"))]  # the launcher of this environment, activated or not
_references: dict[tuple, tuple[list[float], list[float]]] = {}


def assert_matches_single(records: list[dict], tiny_config: str, overrides: tuple[str, ...], steps: int) -> None:
    """``records`` (one per step, from the start) against one process with the same overrides."""
    key = (tiny_config, overrides, steps)
    if key not in _references:
        run = run_layout("single", tiny_config, [*overrides, f"training.train_steps={steps}"])
        _references[key] = (run.losses, run.grad_norms)
    losses, norms = _references[key]
    by_step = {r["step"]: r for r in records}  # a resumed run logs its steps after the ones before
    assert sorted(by_step) == list(range(1, steps + 1))
    for step, record in by_step.items():
        assert abs(record["loss"] - losses[step - 1]) < TOL, (step, record["loss"], losses[step - 1])
        assert abs(record["grad_norm"] - norms[step - 1]) < TOL * norms[step - 1], (step, record, norms[step - 1])


def _launch(launcher: list[str], tiny_config: str, run_dir: Path, *overrides: str, steps: int = 2,
            world: int = 2) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    cmd = [*launcher, str(REPO / "launch" / "pretrain.py"), "--config", tiny_config, f"training.train_steps={steps}",
           f"logging.run_dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count(f"done: step {steps}") == 1, proc.stdout[-3000:]  # rank 0 alone prints
    assert proc.stdout.count(f"step      {steps}/{steps} | loss") == 1, proc.stdout[-3000:]
    ckpt = run_dir / "checkpoints" / f"step_{steps:08d}"
    assert (ckpt / "meta.json").is_file()
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["saved_layout"]["world_size"] == world
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def _torchrun() -> list[str]:
    found = shutil.which("torchrun")
    return [found] if found else [sys.executable, "-m", "torch.distributed.run"]


PIPELINE = ["training.global_batch_size=16", "training.micro_batch_size=2", "parallel.pp=2"]


@pytest.mark.slow
def test_torchrun_four_ranks_with_pipeline_then_resume_with_tensor_parallelism(tiny_config, tmp_path):
    """FSDP2 x PP2 on 4 ranks trains 2 steps and saves; the same run resumes as TP2 x PP2 and reaches step 4."""
    run = tmp_path / "run"
    first = _launch([*_torchrun(), "--nproc_per_node", "4"], tiny_config, run, *PIPELINE, "parallel.engine=fsdp",
                    world=4)
    assert [r["step"] for r in first] == [1, 2]
    resumed = _launch([*_torchrun(), "--nproc_per_node", "4"], tiny_config, run, *PIPELINE, "parallel.engine=ddp",
                      "parallel.tp=2", steps=4, world=4)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]  # metrics.jsonl holds both launches' records
    assert_matches_single(resumed, tiny_config, tuple(PIPELINE[:2]), 4)


@pytest.mark.slow
def test_deepspeed_launcher_four_ranks_with_pipeline_then_resume_on_two(tiny_config, tmp_path):
    """ZeRO-1 x PP2 on 4 ranks through the deepspeed launcher, then the run resumes under ZeRO-2 on 2 ranks."""
    run = tmp_path / "run"
    first = _launch([*DEEPSPEED, "--num_gpus", "4"], tiny_config, run, *PIPELINE, "parallel.engine=deepspeed",
                    "parallel.zero_stage=1", "parallel.pp_schedule=interleaved", world=4)
    assert [r["step"] for r in first] == [1, 2]
    resumed = _launch([*DEEPSPEED, "--num_gpus", "2"], tiny_config, run, "training.global_batch_size=16",
                      "training.micro_batch_size=2", "parallel.engine=deepspeed", "parallel.zero_stage=2",
                      steps=4, world=2)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert_matches_single(resumed, tiny_config, tuple(PIPELINE[:2]), 4)
