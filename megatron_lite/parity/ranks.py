"""Forked ranks on this machine: the cheap way to run a small distributed job in tests, benchmarks and the parity
harness (milliseconds per start, where a launcher costs seconds)."""

from __future__ import annotations

import os
import socket
import time
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from megatron_lite.parity.layouts import Layout


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def preload(layouts: list[Layout]) -> None:
    """Import what the ranks need once, in this process: forked children inherit it instead of each paying seconds.

    (Building the model on the meta device imports torch._dynamo, ~3 s; DeepSpeed takes ~2 s.)
    """
    import torch._dynamo  # noqa: F401

    import megatron_lite.training.trainer  # noqa: F401

    if any(layout.engine == "deepspeed" for layout in layouts):
        import torch

        from megatron_lite.engines.deepspeed import import_deepspeed

        import_deepspeed(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def _rank_main(rank: int, world: int, port: int, target: Callable, args: tuple, log_dir: str | None) -> None:
    """One forked rank: the launcher's environment variables, then ``target(rank, *args)``, then a clean exit."""
    import torch

    torch.set_num_threads(1)  # forked after the parent ran torch ops: OpenMP with >1 thread would hang
    if log_dir:  # each rank's output goes to a file; errors still reach the parent
        log = os.open(os.path.join(log_dir, f"rank{rank}.log"), os.O_WRONLY | os.O_CREAT, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world),
            "OMP_NUM_THREADS": "1",
        }
    )
    import torch.distributed as dist

    try:
        target(rank, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(target: Callable, world: int, args: tuple = (), timeout: float = 600.0, log_dir: str | None = None) -> None:
    """Run ``target(rank, *args)`` in ``world`` forked processes set up as a launcher would (rank variables and a
    free rendezvous port on this machine), and wait for all of them; a rank's failure raises here.

    Forking costs milliseconds where a launcher costs seconds, so tests and benchmarks run many small layouts this way.
    """
    import torch.multiprocessing as mp

    ctx = mp.start_processes(
        _rank_main, args=(world, free_port(), target, args, log_dir), nprocs=world, join=False, start_method="fork"
    )
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world} rank(s) did not finish within {timeout:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
