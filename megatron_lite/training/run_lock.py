"""One live run per run directory: an advisory ``fcntl`` lock held by rank 0 for the whole run.

A launcher can die while its ranks live on (torchrun starts them in sessions of their own), and running the same
command again would then put two trainings into one directory: interleaved ``metrics.jsonl`` lines, and checkpoints
that collide. Rank 0 therefore takes an exclusive ``flock`` on ``<dir>/.run.lock`` before it touches anything, and
writes into the file who holds it (host, pid, start time). A second run is refused at start in one line naming that
holder. The kernel drops the lock with the process that held it (kill -9 included), so a lock left by a dead run is
simply taken over; no stale marker file ever has to be removed by hand.

The lock is advisory and per host: on a network filesystem it only excludes runs whose rank 0 uses the same
filesystem client (NFS forwards ``flock`` to the server as a POSIX lock; most cluster filesystems honour it).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from megatron_lite.errors import ConfigError, RunDirLocked
from megatron_lite.topology import Topology

LOCK_NAME = ".run.lock"


class RunLock:
    """An exclusive advisory lock on one directory; ``release`` (or the process's death) frees it."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`RunDirLocked` naming the live holder."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise ConfigError(
                f"{self.directory}: cannot write there ({e.strerror}); set logging.run_dir (or checkpoint.dir) to a "
                "writable directory"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read_holder(fd))
            os.close(fd)
            raise RunDirLocked(
                f"{self.directory} is in use by another run ({holder}); stop it first, or set logging.run_dir "
                "(and checkpoint.dir) to another directory"
            ) from None
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __del__(self) -> None:  # a trainer dropped without finishing must not keep its directory locked
        try:
            self.release()
        except OSError:
            pass


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):  # the holder is still writing it, or the file is not ours
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "holder unknown: it is starting"
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started', '?')}"


def _outermost(directories: list[Path]) -> list[Path]:
    """The distinct directories, leaving out those inside another one (its lock covers them)."""
    resolved = list(dict.fromkeys(Path(d).resolve() for d in directories))
    return [d for d in resolved if not any(o != d and d.is_relative_to(o) for o in resolved)]


def lock_run_dirs(
    directories: list[Path], topology: Topology, then: Callable[[], None] | None = None
) -> list[RunLock]:
    """Lock each distinct directory on rank 0, and run ``then`` there while holding the locks (cleaning up after a
    crash); every rank learns the outcome (one all-reduce at start) after ``then`` is done, so the other ranks of a
    refused run stop too instead of waiting in a collective, and no rank reads what rank 0 is still cleaning."""
    locks: list[RunLock] = []
    message = ""
    if topology.is_main:
        try:
            for d in _outermost(directories):
                lock = RunLock(d)
                lock.acquire()
                locks.append(lock)
        except ConfigError as e:  # held by another run, or not writable
            for lock in locks:
                lock.release()
            locks, message = [], str(e)
        if not message and then is not None:
            then()
    if topology.is_distributed:
        flag = torch.tensor([1.0 if message else 0.0], device=topology.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not message:
            message = "the run directory is in use by another run (rank 0 names the holder)"
    if message:
        raise RunDirLocked(message) if "in use by another run" in message else ConfigError(message)
    return locks
