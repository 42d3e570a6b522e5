"""Learning-rate schedules as pure functions of the optimizer step (0-based), so resume needs only the step.

Every schedule warms up linearly from lr/warmup to lr over ``warmup_steps``, then:

- ``cosine``: cosine from lr to min_lr over ``decay_steps``, then min_lr;
- ``linear``: straight line from lr to min_lr over ``decay_steps``, then min_lr;
- ``constant``: lr;
- ``inverse_sqrt``: lr * sqrt(warmup / t) with t = step + 1 (the original Transformer's schedule, peak-normalized);
- ``wsd``: warmup-stable-decay: lr until the last ``wsd_decay_fraction`` of ``decay_steps``, then down to min_lr
  (linear, cosine or 1-sqrt shape).
"""

from __future__ import annotations

import math

from megatron_lite.config import OptimizerConfig, ScheduleConfig


def lr_at(step: int, sched: ScheduleConfig, opt: OptimizerConfig, train_steps: int) -> float:
    peak, floor, warmup = opt.lr, opt.min_lr, sched.warmup_steps
    if sched.kind == "inverse_sqrt":
        t = step + 1
        if warmup == 0:
            return peak / math.sqrt(t)
        return peak * min(t / warmup, math.sqrt(warmup / t))
    if step < warmup:
        return peak * (step + 1) / warmup
    if sched.kind == "constant":
        return peak
    decay = sched.decay_steps if sched.decay_steps is not None else max(train_steps - warmup, 1)
    since = step - warmup
    if sched.kind == "wsd":
        decay_len = max(int(round(decay * sched.wsd_decay_fraction)), 1)
        stable_len = decay - decay_len
        if since < stable_len:
            return peak
        progress = min((since - stable_len) / decay_len, 1.0)
        shape = {
            "linear": progress,
            "cosine": 0.5 * (1 - math.cos(math.pi * progress)),
            "sqrt": math.sqrt(progress),
        }[sched.wsd_decay_shape]
        return peak - (peak - floor) * shape
    progress = min(since / decay, 1.0)
    if sched.kind == "cosine":
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if sched.kind == "linear":
        return peak - (peak - floor) * progress
    raise ValueError(f"unknown schedule.kind {sched.kind!r}")
