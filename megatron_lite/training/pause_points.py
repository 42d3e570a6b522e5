"""A test hook: stop a run at a chosen point so a test can kill it there with SIGKILL.

Set ``MEGATRON_LITE_PAUSE_AT=<point>:<step>:<marker file>`` with ``point`` one of ``step`` (after the optimizer step
of step ``<step>``, before anything is logged or saved), ``eval`` (inside the evaluation after step ``<step>``) or
``save`` (inside the checkpoint of step ``<step>``, after every rank wrote its tensors and before ``meta.json``, the
rename and ``latest``). When the run reaches that point, rank 0 creates the marker file and every rank sleeps, so the
test can wait for the file and kill the whole process group. It is read on every call (a cheap dictionary lookup)
and does nothing when unset; it exists for the crash-safety tests and is not meant for production runs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ENV = "MEGATRON_LITE_PAUSE_AT"
POINTS = ("step", "eval", "save")
PAUSE_SECONDS = 120.0


def pause_point(point: str, step: int, is_main: bool = True) -> None:
    """Sleep here when the hook names this ``point`` and ``step`` (see the module docstring)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    where, at, marker = spec.split(":", 2)
    if where != point or int(at) != step:
        return
    if is_main:
        tmp = Path(marker + ".tmp")
        tmp.write_text(f"{os.getpid()}\n")
        os.replace(tmp, marker)
    time.sleep(PAUSE_SECONDS)
