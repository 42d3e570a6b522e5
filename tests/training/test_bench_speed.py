"""``tools/bench.py speed`` runs our training step beside Hugging Face's for the same model; kept covered on a tiny
shape (the figures themselves are measured in docs/benchmarks.md, not asserted here)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from megatron_lite.bench.speed import SpeedOptions, mfu_peak, speed_compare, speed_config

pytest.importorskip("transformers")

_spec = importlib.util.spec_from_file_location("bench_cli", Path(__file__).resolve().parents[2] / "tools" / "bench.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

TINY = dict(vocab=256, hidden=64, layers=2, heads=4, seq_len=32, batch=2, precision="fp32", device="cpu",
            warmup=1, steps=2, overrides=[])


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_both_sides_are_the_same_model_and_are_timed(style):
    r = speed_compare(style, SpeedOptions(**TINY))
    assert r["first_loss_ours"] == pytest.approx(r["first_loss_hf"], abs=1e-5)  # same weights, same loss
    for side in ("ours", "hf"):
        assert r[side]["tokens_per_s"] > 0 and r[side]["step_s"] > 0 and r[side]["tflops"] > 0
    assert r["params"] > 0 and r["flops_per_token"] > 6 * r["params"] * 0.5


def test_the_command_prints_one_row_per_side(capsys):
    argv = ["speed", "--styles", "gpt2", "--vocab", "256", "--hidden", "64", "--layers", "2", "--heads", "4",
            "--seq-len", "32", "--batch", "2", "--warmup", "1", "--steps", "2"]
    assert bench.main(argv) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.split()[:1] == ["gpt2"]]
    assert [r[2] for r in rows] == ["ours", "hf"] and rows[0][-1].endswith("x")


def test_mfu_is_against_the_peak_training_uses():
    """The MFU denominator is the trainer's (``logging.peak_flops``, else the GPU's dense peak in
    ``planning/hardware.py``); a CPU has none, so MFU is not printed there."""
    assert mfu_peak(speed_config("gpt2", SpeedOptions(**TINY)))[0] is None
    peak, source = mfu_peak(speed_config("gpt2", SpeedOptions(**{**TINY, "overrides": ["logging.peak_flops=2e12"]})))
    assert (peak, source) == (2e12, "logging.peak_flops")
