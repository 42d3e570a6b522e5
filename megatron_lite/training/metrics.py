"""Training metrics: one console line per log interval, a JSONL file in the run directory, and wandb.

MFU = achieved model FLOP/s / peak FLOP/s, where achieved FLOP/s = tokens/s x FLOPs per token from
``megatron_lite.planning.flops.training_flops_per_token`` (PaLM's 6N + 12·L·H·Q·T, the same formula ``tools/plan.py``
prints) and the peak comes from ``logging.peak_flops`` or the per-device table in ``megatron_lite.planning.hardware``.

With several ranks, tokens/s, the data-wait share and peak memory use the maximum over ranks of the window time, the
time spent waiting for data and the peak memory (one all-reduce per log interval); the loss is already averaged over
data-parallel ranks by the engine. Rank 0 alone prints and writes.
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from megatron_lite.config import Config, LoggingConfig


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated bytes on the GPU, or the process's peak resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_host_peak() -> int:
    """Reset this process's peak resident set size to its current one and return that, in bytes (Linux only).

    Writing 5 to ``/proc/self/clear_refs`` resets ``VmHWM``; a forked process otherwise inherits its parent's peak.
    """
    Path("/proc/self/clear_refs").write_text("5")
    return _proc_status_bytes("VmRSS")


def host_peak_bytes() -> int:
    """This process's peak resident set size since start or the last ``reset_host_peak``, in bytes (Linux only)."""
    return _proc_status_bytes("VmHWM")


def _proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"/proc/self/status has no {field} line")


def max_over_ranks(values: list[float], device: torch.device, distributed: bool) -> list[float]:
    """Each value's maximum over all ranks (window time, data wait, peak memory), in one all-reduce.

    Rank 0's own numbers would hide a slower rank: the step is only as fast as the slowest one.
    """
    if not distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def device_peak_flops(cfg: LoggingConfig, device: torch.device, precision: str) -> float | None:
    if cfg.peak_flops is not None:
        return cfg.peak_flops
    if device.type != "cuda":
        return None
    from megatron_lite.planning.hardware import peak_flops

    return peak_flops(torch.cuda.get_device_name(device), "fp32" if precision == "fp32" else "bf16")


def resolve_wandb_mode(mode: str) -> str:
    """'auto' is online with an API key in the environment, offline otherwise (offline makes no network calls)."""
    if mode != "auto":
        return mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class MetricsLogger:
    """Writes metrics from rank 0 only; other ranks hold a logger that does nothing."""

    def __init__(self, cfg: Config, run_dir: Path, enabled: bool, echo: Callable[[str], None] | None = None) -> None:
        self.enabled = enabled
        self.echo = echo or (lambda line: print(line, flush=True))  # the trainer's log: console and rank log file
        self.jsonl = None
        self.wandb_run = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        mode = resolve_wandb_mode(cfg.logging.wandb_mode)
        if mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb_run = wandb.init(
                project=cfg.logging.wandb_project,
                name=cfg.logging.wandb_run_name,
                dir=str(run_dir),
                mode=mode,
                config=cfg.to_dict(),
                resume="allow",
            )

    def log(self, record: dict[str, Any], console: str | None = None) -> None:
        if not self.enabled:
            return
        record = {"time": time.time(), **record}
        if console:
            self.echo(console)
        self.jsonl.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record.get("step"))

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def format_train_line(m: dict[str, Any], train_steps: int) -> str:
    mfu = f"{100 * m['mfu']:.1f}%" if m.get("mfu") is not None else "n/a"
    # mixture models: the balancing loss, the busiest expert's load over the mean (1.00: even), dropped tokens
    moe = (f" | aux {m['moe_aux_loss']:.3f} | load {m['moe_load_max']:.2f} | dropped {m['moe_dropped_tokens']}"
           if "moe_aux_loss" in m else "")
    return (
        f"step {m['step']:>6}/{train_steps} | loss {m['loss']:.4f} | lr {m['lr']:.3e} | grad_norm {m['grad_norm']:.3f}"
        f" | tok/s {m['tokens_per_s']:,.0f} | mfu {mfu} | mem {m['memory_gib']:.2f} GiB | data {100 * m['data_wait']:.0f}%"
        + moe
    )
