"""``tools/bench.py pipeline-start``: the first steps of a pipeline with static stage shapes, against torch's start-up
exchange of shapes between stages (``PipelineRunner.static_shapes = False``), on forked CPU ranks.

Each rank times its steps between barriers on random token ids, so the first step holds the start-up cost (an exchange
of shapes and a trial forward between neighbouring stages in the baseline) and later steps the steady state.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path


def _timed_rank(rank: int, config: str | None, overrides: list[str], steps: int, static: bool, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from megatron_lite.config import load_config, microbatches_per_rank
    from megatron_lite.engines import build_engine
    from megatron_lite.families import get_family
    from megatron_lite.parallel.pipeline import PipelineRunner
    from megatron_lite.topology import Topology

    PipelineRunner.static_shapes = static
    cfg = load_config(config, overrides)
    topology = Topology.from_env(cfg.parallel, "cpu")
    family = get_family(cfg.model.family)
    engine = build_engine(cfg, family.factory(cfg, topology), topology, family.task(cfg, topology))
    b, s, vocab = cfg.training.micro_batch_size, cfg.data.seq_len, cfg.model.vocab_size
    n = microbatches_per_rank(cfg.global_batch_size, b, topology.dp)
    generator = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps):
        batch = []
        for _ in range(n):
            ids = torch.randint(0, vocab, (b, s + 1), generator=generator)
            batch.append({"input_ids": ids[:, :-1], "labels": ids[:, 1:]})
        dist.barrier()
        start = time.perf_counter()
        engine.train_step(batch, lr=1e-3)
        dist.barrier()
        times.append(time.perf_counter() - start)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(times))


def pipeline_start(config: str | None, layout: str, overrides: list[str], steps: int, static: bool,
                   timeout: float = 600.0) -> list[float]:
    """Seconds of each of ``steps`` training steps of ``config`` under ``layout`` (rank 0's, between barriers)."""
    from megatron_lite.parity import parse_layout, preload, run_ranks

    parsed = parse_layout(layout)
    preload([parsed])
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-start-") as out:
        run_ranks(_timed_rank, parsed.world_size, (config, [*overrides, *parsed.overrides], steps, static, out), timeout)
        return json.loads(Path(out, "rank0.json").read_text())
