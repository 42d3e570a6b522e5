"""Trainer behaviour end to end: early stopping, batch size in tokens, deterministic mode, overfitting, compile."""

from __future__ import annotations

import json

import pytest
import torch

from .conftest import tiny_config
from megatron_lite.config import ConfigError
from megatron_lite.training.checkpoint import read_meta
from megatron_lite.training.trainer import train

QUIET = {"log": lambda _: None}
# an LR so small that no weight changes in fp32: validation loss can never improve
FROZEN = ("optimizer.lr=1e-30", "optimizer.min_lr=0")


def test_early_stopping_when_validation_loss_stops_improving(tmp_path, corpus) -> None:
    cfg = tiny_config(tmp_path / "run", corpus, *FROZEN, "training.train_steps=20", "training.eval_interval=2",
                      "training.early_stopping_patience=2")
    lines: list[str] = []
    res = train(cfg, log=lines.append)
    # evaluations at steps 0 (the best), 2 (no improvement: 1), 4 (no improvement: 2 = patience)
    assert [s for s, _ in res.valid_losses] == [0, 2, 4]
    assert len({v for _, v in res.valid_losses}) == 1
    assert res.stopped_early and res.final_step == 4 and res.steps == [1, 2, 3, 4]
    assert any(line.startswith("early stopping") for line in lines)
    assert res.checkpoint.name == "step_00000004"  # the stopping point is saved
    state = read_meta(res.checkpoint)["trainer_state"]
    assert state["evals_without_improvement"] == 2 and state["best_valid"] == pytest.approx(res.valid_losses[0][1])

    again = train(cfg, **QUIET)  # restarting the same command does not train past the stopping point
    assert again.stopped_early and again.steps == [] and again.final_step == 4


def test_without_a_validation_split(tmp_path, corpus) -> None:
    """Evaluations are skipped (no NaN records), and early stopping, which would fire on NaN, is refused up front."""
    with pytest.raises(ConfigError, match=r"early_stopping_patience=2 needs a validation split.*'100,0,0'"):
        train(tiny_config(tmp_path / "es", corpus, "data.split=100,0,0", "training.eval_interval=1",
                          "training.early_stopping_patience=2"), **QUIET)
    res = train(tiny_config(tmp_path / "run", corpus, "data.split=100,0,0", "training.eval_interval=1",
                            "training.train_steps=3"), **QUIET)
    assert res.steps == [1, 2, 3] and res.valid_losses == [] and not res.stopped_early
    records = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in records if "valid_loss" in r]


def test_global_batch_tokens_replaces_global_batch_size(tmp_path, corpus) -> None:
    by_samples = train(tiny_config(tmp_path / "samples", corpus, "training.train_steps=2"), **QUIET)
    by_tokens = train(tiny_config(tmp_path / "tokens", corpus, "training.train_steps=2",
                                  "training.global_batch_size=1", "training.global_batch_tokens=256"), **QUIET)
    assert by_tokens.losses == by_samples.losses  # 256 tokens / seq_len 32 = the same 8 samples per step
    assert read_meta(by_tokens.checkpoint)["consumed_samples"] == 16
    records = [json.loads(x) for x in (by_tokens.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["consumed_samples"] for r in records if "loss" in r] == [8, 16]


@pytest.fixture
def restore_determinism():
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def test_deterministic_mode_runs_and_repeats(tmp_path, corpus, restore_determinism) -> None:
    overrides = ("training.train_steps=2", "training.deterministic=true", "model.residual_dropout=0.1")
    a = train(tiny_config(tmp_path / "a", corpus, *overrides), **QUIET)
    assert torch.are_deterministic_algorithms_enabled()
    b = train(tiny_config(tmp_path / "b", corpus, *overrides), **QUIET)
    assert a.losses == b.losses and len(a.losses) == 2


def test_seed_changes_the_run(tmp_path, corpus) -> None:
    a = train(tiny_config(tmp_path / "a", corpus, "training.train_steps=1"), **QUIET)
    b = train(tiny_config(tmp_path / "b", corpus, "training.train_steps=1", "training.seed=99"), **QUIET)
    assert a.losses != b.losses


def test_tiny_model_overfits_one_document(tmp_path, one_document) -> None:
    """Through the real path (data, engine, schedule): a repeated document is memorized, and validation (the same
    document) improves at every evaluation, so early stopping with patience 1 never fires."""
    res = train(tiny_config(tmp_path / "run", one_document, "data.split=1,1,0", "training.train_steps=30",
                            "training.micro_batch_size=8", "optimizer.lr=5e-3", "optimizer.min_lr=5e-4",
                            "schedule.warmup_steps=5", "optimizer.weight_decay=0", "logging.log_interval=10",
                            "training.eval_interval=10", "training.early_stopping_patience=1"), **QUIET)
    start, end = res.losses[0], res.losses[-1]
    assert start > 5.5  # about ln(512)
    assert end < 0.2, res.losses
    valid = [v for _, v in res.valid_losses]
    assert len(valid) == 4 and all(b < a for a, b in zip(valid, valid[1:])), valid
    assert valid[-1] < 0.2 and not res.stopped_early and res.final_step == 30


@pytest.mark.slow
def test_compile_matches_eager(tmp_path, corpus) -> None:
    """torch.compile on the CPU takes tens of seconds the first time; one short run checks it changes nothing."""
    eager = train(tiny_config(tmp_path / "eager", corpus, "training.train_steps=3"), **QUIET)
    compiled = train(tiny_config(tmp_path / "compiled", corpus, "training.train_steps=3", "training.compile=true"),
                     **QUIET)
    assert compiled.losses == pytest.approx(eager.losses, abs=1e-4)
    assert compiled.valid_losses[-1][1] == pytest.approx(eager.valid_losses[-1][1], abs=1e-4)
