"""The checkpoint directory: atomic layout, `latest`, pruning, what meta.json and config.yaml hold, and no pickle."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
import yaml

from .conftest import checkpoint_tensors, tiny_config
from megatron_lite.config import ConfigError, config_from_dict
from megatron_lite.step.checkpoint_format import find_latest, read_meta
from megatron_lite.training.checkpoint import load_checkpoint, save_checkpoint
from megatron_lite.training.trainer import Trainer, train

QUIET = {"log": lambda _: None}


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def finished(tmp_path_factory, corpus):
    """A 5-step run that saves every step and keeps the last 2."""
    run_dir = tmp_path_factory.mktemp("ckpt") / "run"
    cfg = tiny_config(run_dir, corpus, "training.train_steps=5", "checkpoint.interval=1", "checkpoint.keep_last=2")
    return cfg, train(cfg, **QUIET)


def test_layout_is_atomic_with_latest_pointer_and_keep_last_pruning(finished) -> None:
    cfg, res = finished
    root = res.run_dir / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000004", "step_00000005"]
    assert (root / "latest").read_text().strip() == "step_00000005"
    assert find_latest(root) == root / "step_00000005" == res.checkpoint
    assert not [p for p in res.run_dir.rglob("*") if ".tmp" in p.name]  # no temporary dirs or pointer files left


def test_meta_and_config_describe_the_run(finished) -> None:
    cfg, res = finished
    meta = read_meta(res.checkpoint)
    assert meta["step"] == 5
    assert meta["consumed_samples"] == 5 * 8 == meta["trainer_state"]["consumed_samples"]
    assert meta["saved_layout"] == {"world_size": 1, "pp": 1, "dp": 1, "tp": 1}
    assert "best_valid" in meta["trainer_state"] and "evals_without_improvement" in meta["trainer_state"]
    saved = yaml.safe_load((res.checkpoint / "config.yaml").read_text())
    assert saved == cfg.to_dict()  # the resolved config: every key, defaults included
    assert saved["data"]["seq_len"] == 32 and saved["optimizer"]["lr"] == 1e-3
    assert config_from_dict(saved).to_dict() == cfg.to_dict()  # and it loads back


def test_only_safetensors_and_json_no_pickles(finished) -> None:
    _, res = finished
    files = files_under(res.checkpoint)
    assert files, res.checkpoint
    allowed = (".safetensors", ".json", ".yaml")
    assert all(f.endswith(allowed) for f in files), files
    assert not [f for f in files if f.endswith((".pt", ".pth", ".bin", ".pkl", ".metadata"))]
    keys = checkpoint_tensors(res.checkpoint).keys()
    assert any(k.startswith("model.") for k in keys) and any(k.endswith(".exp_avg_sq") for k in keys)
    rng = json.loads((res.checkpoint / "rng" / "rank_00000.json").read_text())
    assert {"torch", "numpy", "python"} <= rng.keys()


def test_loading_executes_no_pickle(finished, tmp_path, corpus, monkeypatch) -> None:
    cfg, res = finished
    fresh = Trainer(tiny_config(tmp_path / "fresh", corpus, "training.train_steps=5"), **QUIET)

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint load tried to unpickle")

    class RefusingUnpickler:
        def __init__(self, *args, **kwargs):
            refuse()

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", RefusingUnpickler)
    monkeypatch.setattr(torch, "load", refuse)
    meta = load_checkpoint(res.checkpoint, fresh.engine)
    monkeypatch.undo()

    assert meta["step"] == 5
    saved = checkpoint_tensors(res.checkpoint)
    for name, value in fresh.engine.model.state_dict().items():
        assert torch.equal(value, saved[f"model.{name}"]), name


def test_refuses_to_overwrite_an_existing_step_dir(finished, tmp_path, corpus) -> None:
    cfg, res = finished
    trainer = Trainer(tiny_config(tmp_path / "other", corpus), **QUIET)
    root = res.run_dir / "checkpoints"
    before = {f: (res.checkpoint / f).read_bytes() for f in files_under(res.checkpoint)}
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        save_checkpoint(root, 5, trainer.engine, cfg, trainer.trainer_state(), keep_last=2)
    assert {f: (res.checkpoint / f).read_bytes() for f in files_under(res.checkpoint)} == before
    assert (root / "latest").read_text().strip() == "step_00000005"


def test_a_crashed_save_leaves_no_checkpoint_and_is_cleaned_up(tmp_path, corpus) -> None:
    trainer = Trainer(tiny_config(tmp_path / "run", corpus), **QUIET)
    root = tmp_path / "ckpts"
    (root / ".tmp-step_00000003").mkdir(parents=True)  # what a crash in the middle of a save leaves
    (root / ".tmp-step_00000003" / "half.safetensors").write_bytes(b"junk")
    assert find_latest(root) is None  # never taken for a checkpoint
    path = save_checkpoint(root, 3, trainer.engine, trainer.cfg, trainer.trainer_state(), keep_last=1)
    assert path == root / "step_00000003" and find_latest(root) == path
    assert not (root / ".tmp-step_00000003").exists()
    assert "half.safetensors" not in files_under(path)


def test_a_latest_pointer_to_a_missing_checkpoint_is_a_clear_error(tmp_path) -> None:
    (tmp_path / "latest").write_text("step_00000009\n")
    with pytest.raises(FileNotFoundError, match="step_00000009"):
        find_latest(tmp_path)


def test_a_fresh_run_refuses_a_checkpoint_dir_of_another_run_before_training(tmp_path, corpus) -> None:
    """resume=false in a dir that holds another run's checkpoints fails at start, and nothing on disk changes."""
    run_dir = tmp_path / "run"
    train(tiny_config(run_dir, corpus, "training.train_steps=4", "checkpoint.interval=2"), **QUIET)
    root = run_dir / "checkpoints"
    before = sorted(p.name for p in root.iterdir())
    with pytest.raises(ConfigError, match="checkpoint.resume=false.*already holds checkpoints"):
        train(tiny_config(run_dir, corpus, "training.train_steps=1", "checkpoint.resume=false",
                          "checkpoint.keep_last=1"), **QUIET)
    assert sorted(p.name for p in root.iterdir()) == before
    assert find_latest(root) == root / "step_00000004"
