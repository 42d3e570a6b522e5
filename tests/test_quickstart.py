"""The README's quickstart, exactly as a user runs it: corpus, tokenizer, shards, then 2 ranks under DeepSpeed ZeRO-1.

It is the project's main job, so it runs at full length (300 steps of 8 x 128 tokens, ~2 minutes on 2 cores) and must deliver what the
README promises: the validation loss ends at least 30% below its value at step 0, and the output says where the
checkpoint and the metrics went.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_trains_on_two_ranks_and_cuts_validation_loss_by_30_percent(tmp_path: Path) -> None:
    out = tmp_path / "qs"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env["WANDB_DIR"] = str(tmp_path / "wandb")  # offline wandb, as in the README, kept out of the repository
    proc = subprocess.run([sys.executable, "tools/quickstart.py", "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=1200, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    assert "training with 2 rank(s)" in text and "world 2 = pp 1 x dp 2 x tp 1" in text  # two data-parallel ranks ran
    assert "engine deepspeed" in text and "tok/s" in text

    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    valid = [(r["step"], r["valid_loss"]) for r in records if "valid_loss" in r]
    assert valid[0][0] == 0 and valid[-1][0] == 300
    drop = 1 - valid[-1][1] / valid[0][1]
    assert drop >= 0.30, f"validation loss {valid[0][1]:.3f} -> {valid[-1][1]:.3f} fell only {drop:.1%}"
    assert f"validation loss {valid[0][1]:.3f} -> {valid[-1][1]:.3f}" in text

    ckpt = out / "run" / "checkpoints" / "step_00000300"
    assert (ckpt / "meta.json").is_file() and json.loads((ckpt / "meta.json").read_text())["step"] == 300
    assert f"checkpoint: {ckpt}" in text and f"metrics: {out / 'run' / 'metrics.jsonl'}" in text
