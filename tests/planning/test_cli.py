"""tools/plan.py end to end: JSON keys, readable tables, one-line errors with exit status 2.

The answers are ``megatron_lite.planning.commands``'; the command line is loaded from its file to run its ``main``.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_lite.planning.units import parse_bytes

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("plan_cli", ROOT / "tools" / "plan.py")
plan = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plan)


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


def test_memory_plans_a_configs_hsdp_groups(capsys: pytest.CaptureFixture) -> None:
    """A config's parallel.dp_replicate plans HSDP: each replica group shards over dp / dp_replicate ranks, so the
    weights a rank holds grow by dp_replicate (the dry run counts the same, tests/test_dry_run.py)."""
    args = ["memory", "--config", str(ROOT / "configs" / "llama-8b.yaml"), "--gpus", "64", "--json"]
    _, full, _ = run(capsys, *args)
    _, hsdp, _ = run(capsys, *args, "--override", "parallel.dp_replicate=8")
    weights = [json.loads(out)["breakdown"]["weights"] for out in (full, hsdp)]
    assert weights[1] == pytest.approx(8 * weights[0], rel=1e-3)


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
    assert set(r["breakdown"]) == {"weights", "gradients", "fp32_gradients", "optimizer", "activations", "overhead"}
    assert sum(r["breakdown"].values()) == r["per_gpu_bytes"]
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
    (["memory", "--preset", "llama2-7b", "--gpus", "12", "--tp", "3"],
     "num_heads=32 is not divisible by parallel.tp=3"),
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
    assert code == 0 and "1,024 x 1,024" in out and len(out.strip().splitlines()) == 4 + 3  # with a defaults line


@pytest.mark.parametrize("name,total", [("t5-v1_1-small", 76_961_152), ("t5-v1_1-base", 247_577_856),
                                        ("t5-v1_1-large", 783_150_080), ("transformer-base", 63_143_936)])
def test_encdec_configs_plan(capsys: pytest.CaptureFixture, name: str, total: int) -> None:
    """configs/models/<t5 or transformer>.yaml: model counts what the model builds (the closed form agreeing with
    the meta-device model, which used to fail the command), on the lengths the config's data section makes."""
    config = str(ROOT / "configs" / "models" / f"{name}.yaml")
    code, out, err = run(capsys, "model", "--config", config, "--json")
    r = json.loads(out)
    assert code == 0, err
    assert r["family"] == "encoder_decoder" and r["params_total"] == r["params_meta"] == total and r["counts_agree"]
    span = name.startswith("t5")  # span corruption of 512 inputs; the Transformer's pairs default to seq_len
    assert (r["seq_len"], r["target_len"]) == ((512, 114) if span else (1024, 1024))


def test_encdec_config_memory_and_search(capsys: pytest.CaptureFixture) -> None:
    config = str(ROOT / "configs" / "models" / "t5-v1_1-small.yaml")
    code, out, _ = run(capsys, "model", "--config", config)
    assert code == 0 and "FLOPs/token @ input 512 + target 114" in out and "(S input + T target tokens)" in out
    code, out, err = run(capsys, "memory", "--config", config, "--gpus", "2", "--tp", "2", "--json")
    r = json.loads(out)
    assert code == 0, err
    assert r["layout"]["tp"] == 2 and r["fits"] is True
    code, out, err = run(capsys, "memory", "--config", config, "--gpus", "2", "--tp", "2", "--sequence-parallel")
    assert code == 2 and "parallel.sequence_parallel is not supported for model.family=encoder_decoder" in err
    code, out, err = run(capsys, "memory", "--config", config, "--gpus", "4", "--tp", "4")
    assert code == 2 and "model.num_heads=6 is not divisible by parallel.tp=4" in err
    code, out, err = run(capsys, "memory", "--config", config, "--gpus", "2", "--target-len", "200", "--json")
    assert code == 0 and (json.loads(out)["layout"]["seq_len"], json.loads(out)["layout"]["target_len"]) == (512, 200)
    code, out, err = run(capsys, "model", "--preset", "gpt2-124m", "--target-len", "8")
    assert code == 2 and "--target-len is for encoder-decoder models" in err
    code, out, err = run(capsys, "search", "--config", config, "--gpus", "8", "--gpu-memory", "16GiB", "--top", "3")
    assert code == 0, err
    assert "input 512 + target 114: global batch 1,672 x 626" in out  # ~1M tokens of 512 + 114 per sample
    code, out, err = run(capsys, "search", "--config", config, "--gpus", "8", "--gpu-memory", "16GiB", "--top", "500",
                         "--json")
    rows = json.loads(out)
    assert code == 0 and rows and {r["layout"]["tp"] for r in rows} <= {1, 2}  # tp 4 and 8 do not divide 6 heads


def test_model_only_config_plans_with_the_model_not_training_defaults(capsys: pytest.CaptureFixture) -> None:
    """configs/models/*.yaml set only model:. The trainer's defaults (fp32, seq 1024, global batch 8) are not the
    plan: the planner uses bf16 and the model's own context, and says so."""
    code, out, err = run(capsys, "memory", "--config", str(ROOT / "configs/models/llama2-7b.yaml"), "--gpus", "16",
                         "--zero", "1", "--json")
    r = json.loads(out)
    assert code == 0, err  # was: "--global-batch 8 must be a positive multiple ..." with no --global-batch given
    assert (r["layout"]["dtype"], r["layout"]["seq_len"], r["layout"]["global_batch"]) == ("bf16", 4096, 16)
    assert "seq 4096 (the model's max_seq_len)" in r["defaults"] and "dtype bf16" in r["defaults"]
    code, out, _ = run(capsys, "search", "--config", str(ROOT / "configs/models/llama2-7b.yaml"), "--gpus", "8",
                       "--top", "2")
    assert code == 0 and "bf16, seq 4096" in out.splitlines()[0] and "defaults: seq 4096" in out  # was fp32
    code, out, _ = run(capsys, "model", "--config", str(ROOT / "configs/models/llama2-70b.yaml"), "--json")
    assert code == 0 and json.loads(out)["seq_len"] == 4096  # was 1024


def test_config_settings_win_over_planner_defaults(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"base: {ROOT / 'configs/models/llama2-7b.yaml'}\ndata:\n  seq_len: 2048\n"
                   "training:\n  precision: fp32\n  global_batch_size: 64\n")
    code, out, _ = run(capsys, "memory", "--config", str(cfg), "--gpus", "8", "--zero", "1", "--json")
    r = json.loads(out)
    assert code == 0 and (r["layout"]["dtype"], r["layout"]["seq_len"], r["layout"]["global_batch"]) == \
        ("fp32", 2048, 64)
    assert r["defaults"] == ["micro-batch 1"]


def test_compute_counts_attention_like_mfu(capsys: pytest.CaptureFixture) -> None:
    """With a model, time is tokens x (6N + 12 L H Q T) / (gpus x peak x MFU), the convention MFU is quoted in;
    6PD is kept as the labelled Chinchilla view. For Llama-3 8B at 8192 tokens 6PD is ~17% short."""
    from megatron_lite.planning.flops import training_flops_per_token
    from megatron_lite.planning.presets import get_preset

    code, out, _ = run(capsys, "compute", "--preset", "llama3-8b", "--tokens", "1T", "--gpus", "64", "--mfu", "0.4",
                       "--json")
    r = json.loads(out)
    fpt = training_flops_per_token(get_preset("llama3-8b"), 8192)
    assert code == 0 and r["flops_per_token"] == fpt and r["flops_model"] == pytest.approx(1e12 * fpt)
    assert r["days"] == pytest.approx(1e12 * fpt / (64 * 989e12 * 0.4) / 86400)
    assert r["flops"] == pytest.approx(6 * r["params"] * 1e12)  # the Chinchilla view
    assert r["flops_model"] / r["flops"] - 1 > 0.15  # what 6PD left out
    code, out, _ = run(capsys, "compute", "--params", "8B", "--tokens", "1T", "--gpus", "64")
    assert code == 0 and "6PD: no attention term" in out


def test_compute_deadline(capsys: pytest.CaptureFixture) -> None:
    """--gpus N --days D: the budget is N x peak x MFU x D; without a model, its compute-optimal model and tokens;
    with one, the tokens it trains by then and the days its compute-optimal tokens take."""
    budget = 1024 * 989e12 * 0.4 * 30 * 86400
    code, out, _ = run(capsys, "compute", "--gpus", "1024", "--days", "30", "--json")
    r = json.loads(out)
    assert code == 0 and r["budget_flops"] == pytest.approx(budget) and r["flops"] == pytest.approx(budget)
    assert r["compute_optimal"] and r["days"] == pytest.approx(30)
    code, out, _ = run(capsys, "compute", "--gpus", "1024", "--hours", "720", "--json")
    assert json.loads(out)["params"] == pytest.approx(r["params"])
    code, out, _ = run(capsys, "compute", "--gpus", "1024", "--days", "30", "--preset", "llama3-8b", "--json")
    m = json.loads(out)
    assert code == 0 and m["flops_model"] == pytest.approx(budget) and m["days"] == pytest.approx(30)
    assert m["tokens"] == pytest.approx(budget / m["flops_per_token"])
    assert m["days_for_optimal_tokens"] == pytest.approx(30 * m["optimal_tokens"] / m["tokens"])
    assert m["optimum_for_budget"]["params"] == pytest.approx(r["params"])
    code, out, _ = run(capsys, "compute", "--gpus", "1024", "--days", "30")
    assert code == 0 and "deadline" in out and "30.00 days" in out


@pytest.mark.parametrize("argv,msg", [
    (["compute", "--days", "3"], "--days/--hours need --gpus N"),
    (["compute", "--gpus", "8", "--days", "3", "--hours", "2"], "give --days or --hours, not both"),
    (["compute", "--gpus", "8", "--days", "3", "--flops", "1e22"], "give --flops or a deadline"),
    (["compute", "--preset", "llama3-8b", "--params", "7B"], "give --params or a model"),
    (["compute", "--params", "7B", "--seq-len", "2048"], "--seq-len needs a model"),
])
def test_compute_bad_combinations(argv: list[str], msg: str, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == "" and msg in err and len(err.strip().splitlines()) == 1


def test_seq_len_past_the_position_table_warns(capsys: pytest.CaptureFixture) -> None:
    code, out, err = run(capsys, "memory", "--preset", "gpt2-124m", "--seq-len", "2048")
    assert code == 0 and "fits" in out
    assert err.strip() == ("plan.py: warning: --seq-len 2048 exceeds the model's position table of 1024 tokens: "
                           "training refuses data.seq_len > model.max_seq_len; raise model.max_seq_len to plan this "
                           "length")
    code, out, err = run(capsys, "memory", "--preset", "gpt2-124m", "--seq-len", "1024")
    assert code == 0 and err == ""


def test_memory_units_are_plain(capsys: pytest.CaptureFixture) -> None:
    assert parse_bytes("80GB") == 80 * 10**9 and parse_bytes("80G") == parse_bytes("80GiB") == 80 * 2**30
    text = plan.build_parser()._subparsers._group_actions[0].choices["memory"].format_help()
    assert "80GB is decimal" in " ".join(text.split()) and "80G or 80GiB binary" in " ".join(text.split())
    code, out, _ = run(capsys, "memory", "--preset", "gpt2-124m", "--gpu-memory", "80GB")
    assert code == 0 and "74.51 GiB" in out  # 80e9 bytes, printed in GiB


def test_readme_plan_commands_run(capsys: pytest.CaptureFixture) -> None:
    """Every ``python tools/plan.py ...`` command the README shows runs and prints a table."""
    commands = re.findall(r"`python tools/plan\.py ([^`]+)`", (ROOT / "README.md").read_text())
    assert commands
    for command in commands:
        code, out, err = run(capsys, *shlex.split(command))
        assert code == 0 and out.strip(), (command, err)


def test_model_only_config_with_a_short_context_loads(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A model: section alone with max_seq_len 512: the trainer's default data.seq_len (1024) is not applied (the
    load failed with "data.seq_len=1024 exceeds model.max_seq_len=512")."""
    cfg = tmp_path / "m.yaml"
    cfg.write_text("model:\n  hidden_size: 64\n  num_layers: 2\n  num_heads: 4\n  max_seq_len: 512\n")
    code, out, err = run(capsys, "model", "--config", str(cfg), "--json")
    assert code == 0, err
    assert json.loads(out)["seq_len"] == 512
    code, out, err = run(capsys, "model", "--config", str(cfg), "--override", "model.max_seq_len=256", "--json")
    assert code == 0 and json.loads(out)["seq_len"] == 256, err


def test_memory_with_torchtitans_op_policy(capsys: pytest.CaptureFixture) -> None:
    """``--recompute selective-op`` plans torchtitan's op-level checkpointing; search takes it as a constraint."""
    argv = ["--preset", "llama3-8b", "--gpus", "8", "--fsdp", "--micro-batch", "2", "--seq-len", "8192"]
    code, out, _ = run(capsys, "memory", *argv, "--recompute", "selective-op", "--json")
    assert code == 0
    r = json.loads(out)
    assert r["layout"]["recompute"] == "selective-op"
    code, out, _ = run(capsys, "memory", *argv, "--recompute", "selective", "--json")
    assert r["phases"]["activations"] < json.loads(out)["phases"]["activations"]
    code, out, _ = run(capsys, "search", *argv, "--recompute", "selective-op", "--gpu-memory", "80GiB", "--top", "1")
    assert code == 0 and "selective-op" in out


@pytest.mark.parametrize("engine,zero,offload", [("deepspeed", 1, None), ("deepspeed", 2, "optimizer"),
                                                 ("deepspeed", 3, "params"), ("fsdp", 0, "params")])
def test_a_config_plans_with_the_layout_it_was_written_from(tmp_path: Path, engine: str, zero: int,
                                                            offload: str | None) -> None:
    """``--config`` reads a config back through the keys ``engine_config`` writes a layout to: a layout's own
    config plans as that layout."""
    from megatron_lite.planning.inputs import ModelOptions, load_model
    from megatron_lite.planning.layout import Layout
    from megatron_lite.planning.presets import get_preset
    from megatron_lite.planning.runnable import engine_config

    layout = Layout(gpus=16, tp=2, pp=2, engine=engine, zero=zero, offload=offload, micro_batch=2, global_batch=64,
                    seq_len=2048, dtype="bf16", schedule="interleaved", virtual_stages=2)
    path = tmp_path / "run.yaml"
    path.write_text(engine_config(get_preset("llama2-7b"), layout).to_yaml())
    _, settings, _ = load_model(ModelOptions(config=str(path)))
    for name in ("tp", "pp", "engine", "micro_batch", "global_batch", "seq_len", "dtype", "schedule",
                 "virtual_stages", "offload"):
        assert settings.get(name) == getattr(layout, name), name
    assert settings["zero"] == zero
