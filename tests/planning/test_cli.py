"""tools/plan.py end to end: JSON keys, readable tables, one-line errors with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import plan  # noqa: E402


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = plan.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_model_json(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run(capsys, "model", "--preset", "gpt2-124m", "--json")
    r = json.loads(out)
    assert code == 0 and r["counts_agree"] is True
    for key in ("params_total", "params_embedding", "params_non_embedding", "flops_per_token"):
        assert isinstance(r[key], (int, float))
    assert r["params_total_unpadded"] == 124_439_808


def test_model_from_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "m.yaml"
    cfg.write_text("model:\n  hidden_size: 64\n  num_layers: 2\n  num_heads: 4\n  max_seq_len: 128\n"
                   "data:\n  seq_len: 128\n")
    code, out, _ = run(capsys, "model", "--config", str(cfg), "--override", "model.num_layers=3")
    assert code == 0 and "agrees" in out and "FLOPs/token @ seq 128" in out


def test_compute_json(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run(capsys, "compute", "--flops", "1e22", "--gpus", "64", "--gpu", "h100", "--mfu", "0.4",
                       "--price-per-gpu-hour", "2", "--json")
    r = json.loads(out)
    assert code == 0
    for key in ("flops", "params", "tokens", "loss", "days", "gpu_hours", "cost"):
        assert key in r


def test_memory_json_and_table(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run(capsys, "memory", "--preset", "llama2-7b", "--gpus", "8", "--tp", "2", "--zero", "1",
                       "--gpu-memory", "80GiB", "--json")
    r = json.loads(out)
    assert code == 0 and isinstance(r["per_gpu_bytes"], int) and isinstance(r["fits"], bool)
    assert set(r["breakdown"]) == {"weights", "gradients", "optimizer", "activations", "overhead"}
    assert all(isinstance(v, int) for v in r["breakdown"].values())
    code, out, _ = run(capsys, "memory", "--preset", "llama2-7b", "--gpus", "8", "--fsdp", "--gpu-memory", "80GiB")
    assert code == 0 and "GiB" in out and "fits" in out


def test_search(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run(capsys, "search", "--preset", "gpt2-355m", "--gpus", "8", "--gpu-memory", "24GiB",
                       "--global-batch", "64", "--seq-len", "1024", "--top", "3", "--json")
    rows = json.loads(out)
    assert code == 0 and 1 <= len(rows) <= 3
    assert rows == sorted(rows, key=lambda r: r["step_time_s"])
    assert all(r["per_gpu_bytes"] <= 24 * 2**30 for r in rows)


@pytest.mark.parametrize("argv,msg", [
    (["model", "--preset", "gpt5"], "unknown preset"),
    (["memory", "--preset", "llama2-7b", "--gpus", "8", "--tp", "3"], "not divisible"),
    (["memory", "--preset", "llama2-7b", "--gpus", "12", "--tp", "3"], "must divide"),
    (["compute", "--flops=-1e20"], "positive"),
    (["compute", "--tokens", "0"], "positive"),
    (["search", "--preset", "gpt2-124m", "--gpus", "8", "--gpu-memory", "0"], "positive"),
    (["memory", "--preset", "gpt2-124m", "--gpu-memory", "lots"], "not a memory size"),
])
def test_bad_input_is_one_line(argv: list[str], msg: str, capsys: pytest.CaptureFixture) -> None:
    try:
        code = plan.main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and out == ""
    assert len(lines) == 1 and msg in lines[0]


def test_bad_input_from_the_shell() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "plan.py"), "model", "--preset", "gpt5"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("plan.py: error: unknown preset 'gpt5'") and len(proc.stderr.splitlines()) == 1
