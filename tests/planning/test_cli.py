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
    # search: rates, bandwidths, sizes
    (["search", "--preset", "gpt2-124m", "--gpus", "8", "--gpu-memory", "80GiB", "--mfu", "0"],
     "--mfu: must be in (0, 1]"),
    (["search", "--preset", "gpt2-124m", "--gpus", "8", "--gpu-memory", "80GiB", "--mfu", "1.5"], "--mfu: must be in"),
    (["search", "--preset", "gpt2-124m", "--gpus", "8", "--gpu-memory", "80GiB", "--mfu=-0.5"], "--mfu: must be in"),
    (["search", "--preset", "gpt2-124m", "--gpus", "8", "--gpu-memory", "80GiB", "--inter-node-bandwidth", "0"],
     "--inter-node-bandwidth: must be a positive number"),
    (["search", "--preset", "gpt2-124m", "--gpus", "8", "--gpu-memory", "80GiB", "--intra-node-bandwidth=-1"],
     "--intra-node-bandwidth: must be a positive number"),
    (["search", "--preset", "gpt2-124m", "--gpus", "0", "--gpu-memory", "80GiB"], "--gpus: must be a positive integer"),
    (["search", "--preset", "gpt2-124m", "--gpus", "8", "--gpu-memory", "80GiB", "--top", "0"],
     "--top: must be a positive integer"),
    (["search", "--preset", "gpt2-124m", "--gpus", "8", "--gpu-memory", "80GiB", "--tp", "3"],
     "no valid layout on 8 GPUs with --tp 3"),
    (["search", "--preset", "gpt2-124m", "--gpus", "8", "--gpu-memory", "80GiB", "--zero", "1", "--fsdp"],
     "give --zero 1 (DeepSpeed) or --fsdp, not both"),
    (["search", "--preset", "gpt2-124m", "--gpus", "8", "--gpu-memory", "80GiB", "--offload", "optimizer"],
     "search neither enumerates nor times offloading"),
    (["search", "--preset", "gpt2-124m", "--gpus", "8", "--gpu", "tpu9"], "unknown --gpu 'tpu9'; known: A10"),
    # the other subcommands
    (["compute", "--flops", "1e22", "--gpus", "8", "--mfu", "2"], "--mfu: must be in (0, 1]"),
    (["compute", "--flops", "1e22", "--price-per-gpu-hour", "2"], "--price-per-gpu-hour needs --gpus"),
    (["compute", "--flops", "1e22", "--gpus", "0"], "--gpus: must be a positive integer"),
    (["model", "--preset", "gpt2-124m", "--seq-len", "0"], "--seq-len: must be a positive integer, got 0"),
    (["memory", "--preset", "gpt2-124m", "--seq-len=-5"], "--seq-len: must be a positive integer"),
    (["memory", "--preset", "gpt2-124m", "--overhead-gib=-1"], "--overhead-gib: must be >= 0"),
    (["memory", "--preset", "gpt2-124m", "--gpu", "tpu9"], "unknown --gpu 'tpu9'; known: A10"),
    (["model", "--preset", "gpt2-124m", "--override", "model.num_layers=2"],
     "--override edits a --config file and cannot change --preset gpt2-124m"),
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


def test_unknown_gpu_is_fine_with_gpu_memory(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run(capsys, "memory", "--preset", "gpt2-124m", "--gpu", "tpu9", "--gpu-memory", "16GiB")
    assert code == 0 and "fits" in out and "16.00 GiB" in out


def test_count_mismatch_fails(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from megatron_lite.planning import report

    monkeypatch.setattr(report, "meta_counts", lambda spec: {"total": 1, "embedding": 1})
    code, out, err = run(capsys, "model", "--preset", "gpt2-124m")
    assert code == 1 and "DISAGREES" in out
    assert len(err.strip().splitlines()) == 1 and "disagrees with the meta-device model (total 1," in err


def test_compute_names_its_constants(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run(capsys, "compute", "--flops", "1e23", "--approach", "replication")
    assert code == 0
    assert "predicted loss   " in out and "[besiroglu] constants" in out and "Hoffmann" not in out.split("\n")[4]
    assert "Table 3" in out and "arXiv:2203.15556" in out and "arXiv:2404.10102" in out
    code, out, _ = run(capsys, "compute", "--flops", "1e23", "--json")
    r = json.loads(out)
    assert r["constants"]["loss_fits"]["hoffmann"]["alpha"] == 0.34 and r["loss_fit"] == "hoffmann"


def test_search_ranks_one_global_batch(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run(capsys, "search", "--preset", "gpt2-124m", "--gpus", "8", "--gpu-memory", "80GiB", "--json")
    rows = json.loads(out)
    assert code == 0 and len(rows) == 10
    assert {r["tokens_per_step"] for r in rows} == {1024 * 1024} and {r["global_batch"] for r in rows} == {1024}
    assert rows[0]["global_batch_source"].startswith("default")
    assert [r["tokens_per_s"] for r in rows] == sorted((r["tokens_per_s"] for r in rows), reverse=True)
    code, out, _ = run(capsys, "search", "--preset", "gpt2-124m", "--gpus", "8", "--gpu-memory", "80GiB", "--top", "3")
    assert code == 0 and "1,048,576 tokens per step" in out and " ms " in out and "0.000" not in out


def test_search_treats_fixed_flags_as_constraints(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run(capsys, "search", "--preset", "gpt2-355m", "--gpus", "8", "--gpu-memory", "80GiB", "--tp", "2",
                       "--fsdp", "--micro-batch", "4", "--recompute", "selective", "--global-batch", "64", "--json")
    rows = json.loads(out)
    assert code == 0 and rows
    for r in rows:
        lay = r["layout"]
        assert (lay["tp"], lay["engine"], lay["micro_batch"], lay["recompute"]) == (2, "fsdp", 4, "selective")
        assert r["global_batch"] == 64 and r["global_batch_source"] == "--global-batch"


def test_search_from_config_uses_its_batch(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "m.yaml"
    cfg.write_text("model:\n  hidden_size: 64\n  num_layers: 4\n  num_heads: 4\n  max_seq_len: 128\n"
                   "data:\n  seq_len: 128\ntraining:\n  global_batch_size: 32\n  precision: bf16\n"
                   "parallel:\n  tp: 2\n")
    code, out, _ = run(capsys, "search", "--config", str(cfg), "--gpus", "4", "--gpu-memory", "8GiB", "--json")
    rows = json.loads(out)
    assert code == 0 and {r["global_batch"] for r in rows} == {32}
    assert rows[0]["global_batch_source"] == "the config's training batch"
    assert {r["layout"]["tp"] for r in rows} != {2}  # the config's parallel section is not a constraint


def test_t5_preset_end_to_end(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run(capsys, "model", "--preset", "t5-small", "--json")
    r = json.loads(out)
    assert code == 0 and r["family"] == "encoder_decoder" and r["params_total"] == 60_506_624
    assert set(r["params_per_layer"]) == {"encoder", "decoder"} and r["counts_agree"] in (True, None)
    assert r["flops_convention"].startswith("encoder-decoder, per processed token")
    code, out, _ = run(capsys, "model", "--preset", "t5-small")
    assert code == 0 and "per encoder layer" in out and "3N + 6*H*Q*T" in out
    code, out, _ = run(capsys, "memory", "--preset", "t5-small", "--gpus", "2", "--tp", "2", "--pp", "2",
                       "--gpu-memory", "16GiB")
    assert code != 0  # 2 GPUs cannot hold tp2 x pp2
    code, out, _ = run(capsys, "memory", "--preset", "t5-small", "--gpus", "4", "--tp", "2", "--pp", "2",
                       "--global-batch", "8", "--gpu-memory", "16GiB", "--json")
    r = json.loads(out)
    assert code == 0 and r["fits"] is True and len(r["stages"]) == 2
    code, out, _ = run(capsys, "search", "--preset", "t5-small", "--gpus", "8", "--gpu-memory", "16GiB", "--top", "3")
    assert code == 0 and "1,024 x 1,024" in out and len(out.strip().splitlines()) == 3 + 3
