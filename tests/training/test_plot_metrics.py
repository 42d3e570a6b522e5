"""tools/plot_metrics.py: a PNG from a run's metrics.jsonl, and one-line errors for missing or empty files."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from .conftest import REPO, run_tiny

sys.path.insert(0, str(REPO / "tools"))
from plot_metrics import main, read_metrics  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_metrics(run_dir: Path, steps: int = 50) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for s in range(1, steps + 1):
            lr = 1e-3 * min(s / 5, 0.5 * (1 + math.cos(math.pi * s / steps)))
            record = {"step": s, "loss": 6 * math.exp(-s / 20) + 1, "lr": lr, "grad_norm": 1.0,
                      "tokens_per_s": 5000 + 10 * s, "mfu": None, "memory_gib": 0.4, "data_wait": 0.01}
            f.write(json.dumps(record) + "\n")
            if s % 10 == 0:
                f.write(json.dumps({"step": s, "valid_loss": 6 * math.exp(-s / 20) + 1.2, "valid_ppl": 10.0}) + "\n")


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 20_000, len(data)  # three panels of curves, not an empty canvas


def test_writes_a_png_into_the_run_dir(tmp_path, capsys) -> None:
    write_metrics(tmp_path / "run")
    assert main([str(tmp_path / "run")]) == 0
    assert_png(tmp_path / "run" / "metrics.png")
    assert "metrics.png" in capsys.readouterr().out


def test_output_option(tmp_path) -> None:
    write_metrics(tmp_path / "run")
    out = tmp_path / "plots" / "curves.png"
    assert main([str(tmp_path / "run"), "--output", str(out)]) == 0
    assert_png(out)
    assert not (tmp_path / "run" / "metrics.png").exists()


def test_plots_a_real_run(tmp_path, corpus) -> None:
    res = run_tiny(tmp_path / "run", corpus, "training.train_steps=4", "training.eval_interval=2")
    assert main([str(res.run_dir)]) == 0
    assert_png(res.run_dir / "metrics.png")


def test_a_resumed_run_keeps_the_last_record_of_each_step(tmp_path) -> None:
    write_metrics(tmp_path / "run", steps=6)
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:  # a resumed run logs steps 5 and 6 again
        for s in (5, 6):
            f.write(json.dumps({"step": s, "loss": 0.5, "lr": 1e-4, "tokens_per_s": 1.0}) + "\n")
    train, evals = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert sorted(train) == [1, 2, 3, 4, 5, 6] and train[6]["loss"] == 0.5 and not evals


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "metrics.jsonl not found"),
        ("", "metrics.jsonl holds no metrics records"),
        ("\n\n", "metrics.jsonl holds no metrics records"),
        ('{"step": 1, "loss": 2.0}\n{"step": 2, "lo', "metrics.jsonl:2: not a JSON record"),
        ('[1, 2]\n', "metrics.jsonl:1: expected a JSON object with an integer 'step'"),
    ],
)
def test_clear_one_line_errors(tmp_path, capsys, content, message) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if content is not None:
        (run_dir / "metrics.jsonl").write_text(content)
    assert main([str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (run_dir / "metrics.png").exists()
