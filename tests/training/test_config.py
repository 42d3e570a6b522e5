"""Config errors name the file or override and the dotted key, and suggest the closest valid key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, TINY
from megatron_lite.config import Config, ConfigError, config_from_dict, load_config


def write(path: Path, data: dict | str) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_tiny_config_loads_through_its_base() -> None:
    cfg = load_config(TINY)
    assert cfg.model.hidden_size == 128 and cfg.model.position == "rotary"  # from models/tiny.yaml
    assert cfg.data.seq_len == 32 and cfg.training.micro_batch_size == 2  # from tiny.yaml itself


def test_overrides_are_typed_and_win_over_files() -> None:
    cfg = load_config(TINY, ["training.micro_batch_size=4", "optimizer.lr=3e-4", "training.compile=true",
                             "model.num_kv_heads=null", "data.prefixes=/some/where"])
    assert cfg.training.micro_batch_size == 4
    assert cfg.optimizer.lr == 3e-4 and isinstance(cfg.optimizer.lr, float)  # YAML reads 3e-4 as a string
    assert cfg.training.compile is True and cfg.model.num_kv_heads is None
    assert cfg.data.prefixes == "/some/where"


def test_unknown_key_suggests_the_closest(tmp_path) -> None:
    path = write(tmp_path / "c.yaml", {"training": {"micro_bach_size": 2}})
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown config key 'training.micro_bach_size'; "
                                          r"did you mean 'training.micro_batch_size'\?"):
        load_config(path)
    write(tmp_path / "s.yaml", {"optimiser": {"lr": 1.0}})
    with pytest.raises(ConfigError, match=r"unknown config key 'optimiser'; did you mean 'optimizer'\?"):
        load_config(tmp_path / "s.yaml")


def test_unknown_key_in_a_base_file_names_that_file(tmp_path) -> None:
    write(tmp_path / "base.yaml", {"model": {"hiden_size": 64}})
    child = write(tmp_path / "child.yaml", {"base": "base.yaml", "training": {"seed": 1}})
    with pytest.raises(ConfigError) as err:
        load_config(child)
    msg = str(err.value)
    assert "base.yaml" in msg and "child.yaml" not in msg, msg
    assert "unknown config key 'model.hiden_size'; did you mean 'model.hidden_size'?" in msg


def test_unknown_key_in_an_override_names_the_override() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["training.micro_bach_size=2"])
    msg = str(err.value)
    assert msg.startswith("override 'training.micro_bach_size=2'") and "tiny.yaml" not in msg, msg
    assert "did you mean 'training.micro_batch_size'?" in msg
    with pytest.raises(ConfigError, match=r"unknown config key 'trainin'; did you mean 'training'\?"):
        load_config(TINY, ["trainin.seed=1"])
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(TINY, ["training.seed"])
    with pytest.raises(ConfigError, match="'seed' is not a section"):
        load_config(TINY, ["training.seed.x=1"])


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("training.micro_batch_size=abc", r"training\.micro_batch_size='abc' must be an integer"),
        ("training.micro_batch_size=2.5", r"training\.micro_batch_size=2\.5 must be an integer"),
        ("model.hidden_size=true", r"model\.hidden_size=True must be an integer"),
        ("optimizer.lr=fast", r"optimizer\.lr='fast' must be a number"),
        ("training.compile=maybe", r"training\.compile='maybe' must be true or false"),
        ("training.precision=fp8", r"training\.precision='fp8' is not one of 'fp32', 'bf16', 'fp16'"),
        ("model=3", r"model must be a mapping"),
    ],
)
def test_type_errors_name_the_key(override: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config(TINY, [override])


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("training.micro_batch_size=0", r"training\.micro_batch_size=0 must be positive"),
        ("training.train_steps=-1", r"training\.train_steps=-1 must be positive"),
        ("optimizer.beta2=1.5", r"optimizer\.beta2=1\.5 must be in \[0, 1\)"),
        ("optimizer.lr=0", r"optimizer\.lr=0\.0 must be positive"),
        ("optimizer.min_lr=0.01", r"optimizer\.min_lr=0\.01 must not exceed optimizer\.lr=0\.001"),
        ("training.label_smoothing=1.0", r"training\.label_smoothing=1\.0 must be in \[0, 1\)"),
        ("model.attention_dropout=1", r"model\.attention_dropout=1\.0 must be in \[0, 1\)"),
        ("model.num_heads=3", r"model\.hidden_size=128 must be divisible by model\.num_heads=3"),
        ("checkpoint.keep_last=0", r"checkpoint\.keep_last=0 must be positive"),
        ("checkpoint.interval=-5", r"checkpoint\.interval=-5 must be >= 0"),
        ("optimizer.weight_decay=-0.1", r"optimizer\.weight_decay=-0\.1 must be >= 0"),
        ("training.early_stopping_patience=-1", r"training\.early_stopping_patience=-1 must be >= 0"),
        ("model.norm_eps=-1", r"model\.norm_eps=-1\.0 must be positive"),
        ("model.init_std=0", r"model\.init_std=0\.0 must be positive"),
        ("model.rope_theta=0", r"model\.rope_theta=0\.0 must be positive"),
        ("logging.peak_flops=-5", r"logging\.peak_flops=-5\.0 must be positive"),
        ("data.split=abc", r"data\.split: split 'abc': expected"),
        ("data.split=0,0,0", r"data\.split: split '0,0,0': expected one to three non-negative weights"),
        ("logging.log_interval=0", r"logging\.log_interval=0 must be positive"),
        ("schedule.wsd_decay_fraction=0", r"schedule\.wsd_decay_fraction=0\.0 must be in \(0, 1\]"),
        ("data.seq_len=2048", r"data\.seq_len=2048 exceeds model\.max_seq_len=1024"),
    ],
)
def test_range_errors_name_the_key(override: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config(TINY, [override])


def test_missing_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.yaml"):
        load_config(tmp_path / "nope.yaml")
    child = write(tmp_path / "child.yaml", {"base": "gone.yaml"})
    with pytest.raises(ConfigError, match=r"config file not found: .*gone\.yaml"):
        load_config(child)


def test_bad_yaml(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        load_config(write(tmp_path / "broken.yaml", "training: [1, 2\n"))
    with pytest.raises(ConfigError, match=r"list\.yaml: expected a mapping at the top level, got list"):
        load_config(write(tmp_path / "list.yaml", "- 1\n- 2\n"))


def test_base_loop(tmp_path) -> None:
    write(tmp_path / "a.yaml", {"base": "b.yaml"})
    write(tmp_path / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match="'base:' chain loops back to itself"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(write(tmp_path / "self.yaml", {"base": "self.yaml"}))


def test_global_batch_tokens_must_be_whole_samples() -> None:
    assert load_config(TINY, ["training.global_batch_tokens=512"]).global_batch_size == 16
    with pytest.raises(ConfigError, match=r"tiny\.yaml: training\.global_batch_tokens=100 is not a multiple of "
                                          r"data\.seq_len=32"):
        load_config(TINY, ["training.global_batch_tokens=100"])  # refused at load time, naming the file


def test_resolved_config_round_trips() -> None:
    cfg = load_config(TINY, ["training.micro_batch_size=4"])
    assert config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg
    assert config_from_dict({}) == Config()


def run_pretrain(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launch" / "pretrain.py"), *args], capture_output=True,
                          text=True, timeout=120, cwd=REPO)


def test_pretrain_reports_a_bad_override_in_one_line_and_exits_2() -> None:
    proc = run_pretrain("--config", str(TINY), "training.micro_bach_size=2")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "did you mean 'training.micro_batch_size'?" in lines[0]
    assert "Traceback" not in proc.stderr


def test_pretrain_reports_a_missing_config_file(tmp_path, capsys) -> None:
    sys.path.insert(0, str(REPO / "launch"))
    try:
        from pretrain import main
    finally:
        sys.path.remove(str(REPO / "launch"))
    assert main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: config file not found: {tmp_path / 'nope.yaml'}"]
