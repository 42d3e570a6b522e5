"""Learning-rate schedules at the steps where they change shape, against values worked out by hand.

Steps are 0-based optimizer steps: step s uses lr_at(s). Peak 1.0 and floor 0.1 keep the arithmetic readable.
"""

from __future__ import annotations

import math

import pytest

from megatron_lite.config import OptimizerConfig, ScheduleConfig
from megatron_lite.step.schedules import lr_at

OPT = OptimizerConfig(lr=1.0, min_lr=0.1)


def lr(kind: str, step: int, train_steps: int = 110, **kw) -> float:
    return lr_at(step, ScheduleConfig(kind=kind, **kw), OPT, train_steps)


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant", "wsd"])
def test_linear_warmup_reaches_peak_on_its_last_step(kind: str) -> None:
    # warmup 10: step 0 runs at 1/10 of the peak, step 9 at the peak, never at zero
    assert lr(kind, 0, warmup_steps=10) == pytest.approx(0.1)
    assert lr(kind, 4, warmup_steps=10) == pytest.approx(0.5)
    assert lr(kind, 9, warmup_steps=10) == pytest.approx(1.0)
    assert lr(kind, 10, warmup_steps=10) == pytest.approx(1.0)


def test_cosine() -> None:
    # warmup 10, decay over the remaining 100 steps (train_steps 110)
    assert lr("cosine", 10, warmup_steps=10) == pytest.approx(1.0)
    assert lr("cosine", 35, warmup_steps=10) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr("cosine", 60, warmup_steps=10) == pytest.approx(0.55)  # half way: the mean of peak and floor
    assert lr("cosine", 110, warmup_steps=10) == pytest.approx(0.1)
    assert lr("cosine", 500, warmup_steps=10) == pytest.approx(0.1)  # after the end: the floor


def test_cosine_with_explicit_decay_steps() -> None:
    # decay_steps 40 overrides train_steps - warmup
    assert lr("cosine", 30, warmup_steps=10, decay_steps=40) == pytest.approx(0.55)
    assert lr("cosine", 50, warmup_steps=10, decay_steps=40) == pytest.approx(0.1)
    assert lr("cosine", 90, warmup_steps=10, decay_steps=40) == pytest.approx(0.1)


def test_linear() -> None:
    assert lr("linear", 10, warmup_steps=10) == pytest.approx(1.0)
    assert lr("linear", 35, warmup_steps=10) == pytest.approx(1.0 - 0.9 * 0.25)
    assert lr("linear", 60, warmup_steps=10) == pytest.approx(0.55)
    assert lr("linear", 110, warmup_steps=10) == pytest.approx(0.1)
    assert lr("linear", 200, warmup_steps=10) == pytest.approx(0.1)


def test_constant() -> None:
    for step in (10, 60, 109, 110, 1000):
        assert lr("constant", step, warmup_steps=10) == 1.0
    assert lr("constant", 0) == 1.0  # no warmup: the peak from the first step


def test_inverse_sqrt() -> None:
    # the original Transformer's shape, peak-normalized: min(t / w, sqrt(w / t)) with t = step + 1
    assert lr("inverse_sqrt", 0, warmup_steps=16) == pytest.approx(1 / 16)
    assert lr("inverse_sqrt", 7, warmup_steps=16) == pytest.approx(0.5)
    assert lr("inverse_sqrt", 15, warmup_steps=16) == pytest.approx(1.0)  # t = 16: the peak
    assert lr("inverse_sqrt", 63, warmup_steps=16) == pytest.approx(0.5)  # t = 64: sqrt(16 / 64)
    assert lr("inverse_sqrt", 1023, warmup_steps=16) == pytest.approx(0.125)  # t = 1024
    # the schedule ignores train_steps: it keeps decaying after the run's nominal end
    assert lr("inverse_sqrt", 1023, train_steps=10, warmup_steps=16) == pytest.approx(0.125)
    # without warmup: 1 / sqrt(t)
    assert lr("inverse_sqrt", 0) == pytest.approx(1.0)
    assert lr("inverse_sqrt", 3) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "shape, mid",
    [("linear", 1.0 - 0.9 * 0.5), ("cosine", 1.0 - 0.9 * 0.5), ("sqrt", 1.0 - 0.9 * math.sqrt(0.5))],
)
def test_wsd(shape: str, mid: float) -> None:
    # warmup 10, then 100 steps: stable for 80, decaying over the last 20 (fraction 0.2)
    kw = dict(warmup_steps=10, wsd_decay_fraction=0.2, wsd_decay_shape=shape)
    assert lr("wsd", 10, **kw) == 1.0
    assert lr("wsd", 89, **kw) == 1.0  # last stable step
    assert lr("wsd", 90, **kw) == pytest.approx(1.0)  # decay starts from the peak
    assert lr("wsd", 100, **kw) == pytest.approx(mid)  # half way through the decay
    assert lr("wsd", 110, **kw) == pytest.approx(0.1)
    assert lr("wsd", 300, **kw) == pytest.approx(0.1)


def test_wsd_quarter_way_through_linear_decay() -> None:
    assert lr("wsd", 95, warmup_steps=10, wsd_decay_fraction=0.2) == pytest.approx(1.0 - 0.9 * 0.25)


def test_schedule_used_by_trainer_matches_lr_at(make_run) -> None:
    """The trainer hands lr_at(step - 1) to step ``step``: the logged LR of each step follows the schedule."""
    import json

    res = make_run("sched", "schedule.kind=linear", "schedule.warmup_steps=2", "training.train_steps=5")
    records = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if "lr" in r]
    sched = ScheduleConfig(kind="linear", warmup_steps=2)
    opt = OptimizerConfig(lr=1e-3, min_lr=1e-4)
    assert lrs == pytest.approx([lr_at(s, sched, opt, 5) for s in range(5)])
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3 - 9e-4 / 3, 1e-3 - 2 * 9e-4 / 3])
