"""Bad parallel settings fail early with one clear line naming the setting and what to do instead."""

from __future__ import annotations

import pytest

from megatron_lite.config import ConfigError, load_config
from megatron_lite.rules import check_layout
from megatron_lite.topology import Topology


def _check(overrides: list[str], world: int = 2) -> str:
    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError) as info:
        check_layout(cfg, world, "cpu")
    message = str(info.value)
    assert "\n" not in message
    return message


def test_world_size_not_divisible_by_tp_pp(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "6")
    monkeypatch.setenv("RANK", "0")
    cfg = load_config(None, ["parallel.tp=2", "parallel.pp=2"])
    with pytest.raises(ConfigError, match=r"world size 6 is not divisible by parallel.tp=2 x parallel.pp=2"):
        Topology.from_env(cfg.parallel, "cpu")


def test_hsdp_replicas_must_divide_dp(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    cfg = load_config(None, ["parallel.engine=fsdp", "parallel.dp_replicate=3"])
    with pytest.raises(ConfigError, match="not divisible by parallel.dp_replicate=3"):
        Topology.from_env(cfg.parallel, "cpu")


@pytest.mark.parametrize(
    "gbs, mbs, world, match",
    [(8, 3, 1, "micro_batch_size=3"), (8, 2, 3, "data-parallel size 3"), (6, 2, 2, "global_batch_size=6")],
)
def test_batch_that_does_not_divide(gbs, mbs, world, match):
    cfg = load_config(
        None, [f"training.global_batch_size={gbs}", f"training.micro_batch_size={mbs}", "training.eval_samples=12"]
    )
    with pytest.raises(ConfigError, match=match):
        check_layout(cfg, world, "cpu")


def test_zero_with_pipeline_points_to_fsdp():
    message = _check(["parallel.engine=deepspeed", "parallel.zero_stage=2", "parallel.pp=2"], 4)
    assert "ZeRO stage 0 or 1 only" in message and "parallel.engine=fsdp" in message
    _check(["parallel.engine=deepspeed", "parallel.zero_stage=3", "parallel.pp=2"], 4)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["parallel.pp=2", "model.num_layers=1", "training.global_batch_size=4"],
         "2 pipeline stages (parallel.pp=2 x 1 per rank) for model.num_layers=1: every stage needs at least one layer"),
        (["parallel.pp=2", "parallel.pp_schedule=interleaved", "model.num_layers=3", "training.global_batch_size=4"],
         "4 pipeline stages (parallel.pp=2 x 2 per rank) for model.num_layers=3"),
        (["parallel.pp=2", "parallel.pp_layers=[1,2]", "model.num_layers=4", "training.global_batch_size=4"],
         "parallel.pp_layers=[1, 2] must give 2 positive layer counts (parallel.pp=2 x 1 stages per rank) that add up "
         "to model.num_layers=4"),
        (["parallel.pp=4", "training.global_batch_size=8", "training.micro_batch_size=4"],
         "parallel.pp_schedule=1f1b needs at least parallel.pp=4 microbatches per step, got 2 "
         "(training.global_batch_size / (micro_batch_size x dp)); the bubble would be 60% of the step"),
        (["parallel.pp=2", "parallel.pp_schedule=interleaved", "training.global_batch_size=5"],
         "parallel.pp_schedule=interleaved cannot run 5 microbatches per step (training.global_batch_size / "
         "(micro_batch_size x dp)) in 2 equal rounds of about parallel.pp=2: use a multiple of 2, or fewer than 4"),
        (["parallel.pp=2", "training.precision=fp16", "training.global_batch_size=4"], "use bf16"),
    ],
)
def test_bad_pipeline_settings_are_refused_in_one_line(overrides, expected):
    cfg = load_config(None, [*overrides, "model.num_heads=2", "model.hidden_size=32", "parallel.engine=ddp"])
    pp = cfg.parallel.pp
    with pytest.raises(ConfigError) as info:
        check_layout(cfg, pp, "cpu")
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_fsdp_offload_on_cpu_is_refused():
    assert "not supported when training on cpu" in _check(["parallel.engine=fsdp", "parallel.fsdp_cpu_offload=true"])


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["parallel.engine=ddp", "parallel.zero_stage=1"], "zero_stage=1 needs parallel.engine=deepspeed"),
        (["parallel.engine=fsdp", "parallel.zero_stage=3"], "zero_stage=3 needs parallel.engine=deepspeed"),
        (["parallel.engine=fsdp", "parallel.offload_optimizer=true"], "offload_optimizer is a DeepSpeed ZeRO setting"),
        (["parallel.engine=deepspeed", "parallel.zero_stage=2", "parallel.offload_params=true"], "zero_stage=3"),
        (["parallel.engine=deepspeed", "parallel.offload_optimizer=true"], "zero_stage >= 1"),
        (["parallel.engine=deepspeed", "parallel.fsdp_cpu_offload=true"], "needs parallel.engine=fsdp (got deepspeed)"),
        (["parallel.engine=ddp", "parallel.dp_replicate=2"], "HSDP"),
        (["parallel.engine=fsdp", "training.precision=fp16"], "use bf16"),
        (["parallel.engine=single"], "single runs one process"),
    ],
)
def test_settings_the_engine_cannot_honour(overrides, match):
    assert match in _check(overrides)


def test_deepspeed_overrides_cannot_contradict_our_config():
    from megatron_lite.engines.deepspeed_config import deepspeed_config

    cfg = load_config(None, ["parallel.engine=deepspeed", "parallel.deepspeed_overrides={train_batch_size: 16}"])
    with pytest.raises(ConfigError, match="deepspeed_overrides.train_batch_size is set from our config"):
        deepspeed_config(cfg, 2)


def test_entry_point_prints_one_line(tmp_path, capsys):
    """The launcher turns a ConfigError into 'error: ...' and exit code 2, before any data is read."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("pretrain", Path(__file__).parents[2] / "launch" / "pretrain.py")
    pretrain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pretrain)
    config = tmp_path / "c.yaml"
    config.write_text(f"logging:\n  run_dir: {tmp_path}/run\n  wandb_mode: disabled\n")
    code = pretrain.main(["--config", str(config), "parallel.zero_stage=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: parallel.zero_stage=2 needs parallel.engine=deepspeed"), err


def test_entry_point_prints_config_errors_on_rank_0_only(tmp_path, capsys, monkeypatch):
    """Under a launcher every rank fails the same way: one copy of the line, exit code 2 on every rank."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("pretrain", Path(__file__).parents[2] / "launch" / "pretrain.py")
    pretrain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pretrain)
    config = tmp_path / "c.yaml"
    config.write_text(f"logging:\n  run_dir: {tmp_path}/run\n  wandb_mode: disabled\n")
    printed = {}
    for rank in ("0", "1", "3"):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("LOCAL_RANK", rank)
        assert pretrain.main(["--config", str(config), "parallel.zero_stage=2"]) == 2
        printed[rank] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(printed["0"]) == 1 and printed["1"] == printed["3"] == [], printed


def test_deepspeed_fp16_on_cpu_is_refused():
    assert "fp16 with parallel.engine=deepspeed needs a GPU (DeepSpeed's cpu accelerator has no fp16)" in _check(
        ["parallel.engine=deepspeed", "training.precision=fp16"])
