"""Restarting the same command after a crash continues the run bit for bit (CPU, fp32)."""

from __future__ import annotations

import pytest
import torch

from .conftest import checkpoint_tensors, tiny_config
from megatron_lite.training.trainer import Trainer, train


class Crash(RuntimeError):
    """Stands in for a node failure right after a checkpoint is written."""


def crash_after_saving(step: int, lines: list[str]):
    def log(line: str) -> None:
        lines.append(line)
        if line.startswith("saved checkpoint") and line.rstrip().endswith(f"step_{step:08d}"):
            raise Crash(line)

    return log


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param((), id="plain"),
        # dropout needs the RNG state restored; prefetch runs the loader in a thread; evaluations feed early stopping
        pytest.param(("model.residual_dropout=0.1", "model.attention_dropout=0.1", "data.prefetch=2",
                      "training.eval_interval=2", "training.early_stopping_patience=5"), id="dropout-prefetch-eval"),
    ],
)
def test_resume_after_crash_is_bit_exact(tmp_path, corpus, extra) -> None:
    args = ("training.train_steps=7", "checkpoint.interval=3", *extra)
    full = train(tiny_config(tmp_path / "full", corpus, *args), log=lambda _: None)

    cfg = tiny_config(tmp_path / "crashy", corpus, *args)
    lines: list[str] = []
    with pytest.raises(Crash):
        train(cfg, log=crash_after_saving(3, lines))
    assert not any(line.startswith("resumed") for line in lines)
    lines.clear()
    resumed = train(cfg, log=lines.append)  # the same config, the same run dir: resumes from `latest`
    assert any(line.startswith("resumed from") and "step_00000003" in line for line in lines), lines

    assert resumed.steps == [4, 5, 6, 7]
    assert resumed.losses == full.losses[3:]  # exact, not approximate
    assert resumed.valid_losses == [v for v in full.valid_losses if v[0] > 3]
    a, b = checkpoint_tensors(full.checkpoint), checkpoint_tensors(resumed.checkpoint)
    assert full.checkpoint.name == resumed.checkpoint.name == "step_00000007"
    assert a.keys() == b.keys() and any(k.startswith("optim.") for k in a)
    for key in a:  # weights and optimizer moments
        assert torch.equal(a[key], b[key]), key


def test_restarting_a_finished_run_trains_no_further(tmp_path, corpus) -> None:
    cfg = tiny_config(tmp_path / "run", corpus, "training.train_steps=2")
    first = train(cfg, log=lambda _: None)
    again = train(cfg, log=lambda _: None)
    assert again.steps == [] and again.final_step == 2
    assert again.checkpoint == first.checkpoint


def test_checkpoint_load_starts_a_new_run_from_a_given_checkpoint(tmp_path, corpus) -> None:
    src = train(tiny_config(tmp_path / "src", corpus, "training.train_steps=2"), log=lambda _: None)
    # a fresh run dir that starts from src's weights, optimizer state and data position
    cfg = tiny_config(tmp_path / "dst", corpus, "training.train_steps=4", f"checkpoint.load={src.checkpoint}")
    lines: list[str] = []
    dst = train(cfg, log=lines.append)
    assert dst.steps == [3, 4]
    assert any(line.startswith("resumed from") and str(src.checkpoint) in line for line in lines)


def test_fp16_loss_scale_survives_resume(tmp_path, corpus) -> None:
    """The GradScaler's scale and growth tracker come back: a fresh scaler would restart at 2**16 and re-skip steps."""
    args = ("training.precision=fp16", "checkpoint.interval=2")
    trainer = Trainer(tiny_config(tmp_path / "run", corpus, "training.train_steps=2", *args), log=lambda _: None)
    # start far too high so that the scale backs off to a value no fresh scaler has
    trainer.engine.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, backoff_factor=2.0**-8)
    trainer.run()
    saved = trainer.engine.scaler.state_dict()
    assert saved["scale"] not in (2.0**16, 2.0**40)

    resumed = Trainer(tiny_config(tmp_path / "run", corpus, "training.train_steps=3", *args), log=lambda _: None)
    assert resumed.step == 2
    assert resumed.engine.scaler.state_dict() == saved
    assert resumed.run().steps == [3]
