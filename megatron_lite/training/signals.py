"""SIGTERM and SIGINT stop a run at the next step boundary, after a checkpoint, with exit status 0.

Schedulers (Slurm, Kubernetes) send SIGTERM some time before they kill a job, and a user presses Ctrl-C. Stopping in
the middle of a step, an evaluation or a save would lose the work since the last checkpoint, so the handler only
records the signal; the loop asks :meth:`StopRequest.agreed` after each step. With several ranks the signal may reach
some of them only (or at different steps), so the ranks agree with one all-reduce of a single number per step: all
of them stop after the same step and write one checkpoint together. A second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import signal
from types import FrameType

import torch
import torch.distributed as dist

from megatron_lite.topology import Topology

HANDLED = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Installed for the duration of a run (a context manager); remembers the first signal it received."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait for the step to end
        self.signal = signum

    def __enter__(self) -> "StopRequest":
        for sig in HANDLED:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave the signals to whoever owns them
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else "a signal on another rank"

    def agreed(self) -> bool:
        """Whether any rank has received a stop signal (a collective: every rank calls it after every step)."""
        if not self.topology.is_distributed:
            return self.signal is not None
        flag = torch.tensor([0.0 if self.signal is None else 1.0], device=self.topology.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
