"""``tools/bench.py startup``: peak host memory per rank while the engine builds the model, on forked CPU ranks.

A rank should build only its share: the growth of its peak resident memory once the model is built (for DeepSpeed,
before ``deepspeed.initialize`` adds its own buffers) is compared with the parameter bytes it holds and the whole
model in fp32. ``tests/engines/test_startup_memory.py`` holds the bound for the 400M shape.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

STARTUP_SIZES = {  # Llama-style shapes (untied 32k vocabulary), named by their parameter count
    "125m": ["model.hidden_size=768", "model.num_layers=12", "model.num_heads=12", "model.ffn_hidden_size=2048"],
    "400m": ["model.hidden_size=1024", "model.num_layers=26", "model.num_heads=16", "model.ffn_hidden_size=2816"],
    "1b": ["model.hidden_size=2048", "model.num_layers=16", "model.num_heads=16", "model.ffn_hidden_size=5632"],
}
STARTUP_BASE = ["model.vocab_size=32000", "model.max_seq_len=256", "model.position=rotary", "model.norm=rmsnorm",
                "model.activation=swiglu", "model.bias=false", "model.tie_embeddings=false", "data.seq_len=256",
                "training.global_batch_size=4", "training.micro_batch_size=1", "training.device=cpu"]
GiB = 2**30


@dataclass
class StartupRow:
    """One model size under one layout; memory in GiB, the largest over the ranks."""

    size: str
    params: int
    layout: str
    model_gib: float  # peak growth once the model is built
    engine_gib: float  # peak growth once the engine is ready
    held_gib: float  # parameter bytes the rank holds


def _startup_rank(rank: int, overrides: list[str], out_dir: str) -> None:
    """Build the engine on this rank; record the peak growth of its resident memory when the model was built (for
    DeepSpeed: before ``deepspeed.initialize`` adds its own buffers) and when the engine was ready, and what it holds."""
    from megatron_lite.config import load_config
    from megatron_lite.engines import build_engine
    from megatron_lite.families import get_family
    from megatron_lite.topology import Topology
    from megatron_lite.training.metrics import host_peak_bytes, reset_host_peak

    cfg = load_config(None, overrides)
    topology = Topology.from_env(cfg.parallel, "cpu")
    family = get_family(cfg.model.family)
    factory, task = family.factory(cfg, topology), family.task(cfg, topology)
    peaks: dict[str, int] = {}
    before = reset_host_peak()
    if cfg.parallel.engine == "deepspeed":  # the peak once the model is materialized, before deepspeed.initialize
        from megatron_lite.engines.deepspeed import DeepSpeedEngine

        class MeasuredDeepSpeedEngine(DeepSpeedEngine):
            def materialize(self, *args) -> None:
                super().materialize(*args)
                peaks["model"] = host_peak_bytes()

        engine = MeasuredDeepSpeedEngine(cfg, factory, topology, task)
    else:
        engine = build_engine(cfg, factory, topology, task)
    peaks["engine"] = host_peak_bytes()
    held = 0
    for p in engine.model.parameters():
        local = p.ds_tensor if hasattr(p, "ds_tensor") else (p.to_local() if hasattr(p, "to_local") else p)
        held += local.numel() * local.element_size()
    largest = max(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.model.parameters())
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({
        "model": peaks.get("model", peaks["engine"]) - before, "engine": peaks["engine"] - before, "held": held,
        "largest": 4 * largest,
    }))


def startup_memory(layout: str, overrides: list[str], timeout: float = 600.0) -> list[dict]:
    """Per rank, in bytes: peak resident-memory growth once the model is built (``model``) and once the engine is
    ready (``engine``), the parameter bytes the rank holds (``held``) and the largest tensor in fp32 (``largest``)."""
    from megatron_lite.parity import parse_layout, preload, run_ranks

    parsed = parse_layout(layout)
    preload([parsed])  # imports (DeepSpeed's included) happen before the measurement, as in a real start
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as out:
        run_ranks(_startup_rank, parsed.world_size, ([*overrides, *parsed.overrides], out), timeout)
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(parsed.world_size)]


def size_params(size: str) -> int:
    """Parameters of the model ``size`` (a key of ``STARTUP_SIZES``), counted on the meta device."""
    import torch

    from megatron_lite.config import load_config
    from megatron_lite.families import get_family

    cfg = load_config(None, [*STARTUP_BASE, *STARTUP_SIZES[size]])
    with torch.device("meta"):
        return sum(p.numel() for p in get_family(cfg.model.family).construct(cfg.model).parameters())


def measure_startup(sizes: list[str], layouts: list[str], timeout: float = 900.0) -> Iterator[StartupRow]:
    """Each size under each layout, in that order, one row as each measurement ends."""
    for size in sizes:
        overrides = [*STARTUP_BASE, *STARTUP_SIZES[size]]
        n = size_params(size)
        for layout in layouts:
            ranks = startup_memory(layout, overrides, timeout)
            model, engine, held = (max(r[k] for r in ranks) / GiB for k in ("model", "engine", "held"))
            yield StartupRow(size, n, layout, model, engine, held)
