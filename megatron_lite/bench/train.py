"""``tools/bench.py train``: training throughput and peak memory per parallel layout, through the real trainer.

Each layout trains the same config for a few steps in forked CPU ranks (``parity.run_layout``, gloo); the median
tokens/s after warm-up and the largest peak memory over the ranks are kept. For a pipeline layout the share of the
step a rank sits idle is measured against the single-process step and set beside the planner's bubble.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from megatron_lite.config import Config, load_config, microbatches_per_rank


@dataclass
class TrainRow:
    """One layout's throughput: median tokens/s after warm-up, the step time it implies, the largest peak memory over
    the ranks, and for a pipeline the idle share (measured, when a single-process step is known; planned)."""

    layout: str
    ranks: int
    tokens_per_s: float
    step_s: float
    memory_gib: float
    idle_measured: float | None = None
    idle_planned: float | None = None


def train_overrides(data: Path, steps: int, overrides: list[str]) -> list[str]:
    """What every layout trains with: the shard prefix, ``steps`` steps, no evaluation or checkpoints."""
    return [f"data.prefixes={data}", f"training.train_steps={steps}", "training.eval_interval=0",
            "checkpoint.interval=0", *overrides]


def tokens_per_step(config: str, overrides: list[str]) -> int:
    cfg = load_config(config, overrides)
    return cfg.global_batch_size * cfg.data.seq_len


def pipeline_idle(world_size: int, cfg: Config, step_s: float, single_s: float | None) -> tuple[float | None, float]:
    """(measured, planned) idle share of a pipeline rank: 1 - (single-process step / pp) / step, each rank on its own
    core (stage-to-stage traffic included; None without a single-process step or with other ranks than stages),
    beside ``planning.steptime.bubble_fraction``."""
    from megatron_lite.planning.steptime import bubble_fraction
    from megatron_lite.rules import virtual_stages

    pp = cfg.parallel.pp
    dp = world_size // (pp * cfg.parallel.tp)
    m = microbatches_per_rank(cfg.global_batch_size, cfg.training.micro_batch_size, dp)
    planned = bubble_fraction(pp, m, virtual_stages(cfg))
    measured = 1 - single_s / pp / step_s if single_s and world_size == pp else None
    return measured, planned


def measure_layouts(config: str, overrides: list[str], layouts: list[str], warmup: int,
                    timeout: float = 900.0) -> Iterator[TrainRow]:
    """Train ``config`` under each layout (names as ``parity.parse_layout`` reads them), one row as each ends; the
    first ``warmup`` steps are left out of the median. A ``single`` layout listed first gives the pipeline rows
    their measured idle share."""
    from megatron_lite.parity import parse_layout, run_layout

    per_step = tokens_per_step(config, overrides)
    single_s = None
    for name in layouts:
        layout = parse_layout(name)
        run = run_layout(layout, config, overrides, timeout=timeout)
        tps = statistics.median(run.tokens_per_s[warmup:])
        step_s = per_step / tps
        single_s = step_s if name == "single" else single_s
        row = TrainRow(name, layout.world_size, tps, step_s, max(run.memory_gib))
        cfg = load_config(config, [*overrides, *layout.overrides])
        if cfg.parallel.pp > 1:
            row.idle_measured, row.idle_planned = pipeline_idle(layout.world_size, cfg, step_s, single_s)
        yield row
