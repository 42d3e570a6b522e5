"""Peak GPU memory of five bf16 training configs on one GPU against ``tools/plan.py memory`` (target: within 10%).

Each config trains three steps on random token ids through the real trainer (``run_layout``); the peak is the
trainer's ``memory_gib`` (``torch.cuda.max_memory_allocated``). The planner is asked through its command line with
the same config and overrides, ``--overhead-gib 0`` (allocated memory holds no CUDA context or allocator slack).
The table goes to stdout and, when ``GPU_CHECK_DIR`` is set (``tools/gpu_check.sh`` sets it), to ``memory.md`` there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_lite.data import IndexedDatasetWriter
from megatron_lite.parity import parse_layout, run_layout
from tests.gpu.conftest import needs_deepspeed

REPO = Path(__file__).resolve().parents[2]
TARGET = 0.10
STEPS = 3

# name: (model preset file, layout, sequence length, microbatch, extra overrides)
CONFIGS = {
    "gpt2-124m fsdp": ("gpt2-124m", "fsdp1", 1024, 8, []),
    "gpt2-124m zero1": ("gpt2-124m", "zero1-dp1", 1024, 8, []),
    "llama-1b fsdp": ("llama-1b", "fsdp1", 2048, 2, []),
    "llama-1b fsdp, full recompute": ("llama-1b", "fsdp1", 2048, 4, ["model.activation_checkpointing=true"]),
    "llama-1b zero1": ("llama-1b", "zero1-dp1", 2048, 2, []),
}


def _config(root: Path, preset: str, seq: int, micro: int) -> Path:
    """A training config over the preset, on 64 documents of random ids below its vocabulary."""
    vocab = int(next(line.split(":")[1] for line in (REPO / "configs" / "models" / f"{preset}.yaml").read_text()
                     .splitlines() if line.strip().startswith("vocab_size:")))
    prefix = root / f"{preset}-tokens"
    if not prefix.with_suffix(".idx").is_file():
        rng = np.random.default_rng(0)
        with IndexedDatasetWriter(prefix, dtype=np.int32, vocab_size=vocab) as writer:
            for _ in range(64):
                writer.add_document(rng.integers(0, vocab, size=4 * seq))
    path = root / f"{preset}-{seq}-{micro}.yaml"
    path.write_text(
        f"base: {REPO / 'configs' / 'models' / f'{preset}.yaml'}\n"
        f"data:\n  prefixes: {prefix}\n  cache_dir: {root / 'index-cache'}\n  seq_len: {seq}\n  split: \"100,0,0\"\n"
        "  prefetch: 0\n"
        f"training:\n  train_steps: {STEPS}\n  global_batch_size: {micro}\n  micro_batch_size: {micro}\n"
        f"  eval_samples: {micro}\n  eval_interval: 0\n  precision: bf16\n  device: cuda\n"
        "checkpoint:\n  interval: 0\nlogging:\n  wandb_mode: disabled\n  log_interval: 1\n"
    )
    return path


def _planned_gib(config: Path, overrides: list[str]) -> float:
    cmd = [sys.executable, str(REPO / "tools" / "plan.py"), "memory", "--config", str(config), "--gpus", "1",
           "--overhead-gib", "0", "--json", *(f"--override={o}" for o in overrides)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["per_gpu_bytes"] / 2**30


def test_peak_memory_of_five_configs_against_the_planner(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    rows, misses = [], []
    for name, (preset, layout, seq, micro, extra) in CONFIGS.items():
        try:
            needs_deepspeed(layout)
        except pytest.skip.Exception as skipped:
            rows.append(f"| {name} | {layout} | - | - | skipped: {skipped} |")
            continue
        config = _config(root, preset, seq, micro)
        overrides = [*parse_layout(layout).overrides, *extra]
        measured = max(run_layout(layout, str(config), extra, timeout=600).memory_gib)
        planned = _planned_gib(config, overrides)
        ratio = planned / measured - 1
        rows.append(f"| {name} | {layout} | {measured:.2f} | {planned:.2f} | {100 * ratio:+.1f}% |")
        if abs(ratio) > TARGET:
            misses.append(name)
    table = "\n".join(["| config | layout | measured GiB | planned GiB | planned vs measured |",
                       "| --- | --- | ---: | ---: | ---: |", *rows])
    print("\n" + table)
    if os.environ.get("GPU_CHECK_DIR"):
        Path(os.environ["GPU_CHECK_DIR"], "memory.md").write_text(table + "\n")
    assert not misses, f"planner off by more than {TARGET:.0%} for {misses}\n{table}"
