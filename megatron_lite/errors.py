"""The errors a user can cause or meet while training, and how command-line tools report them.

Each carries a one-line message naming the file, key or value and what was expected. Tools print it as
``error: ...`` on stderr, without a traceback unless asked (``--debug``), and exit with :func:`exit_status`: 2 for
bad input (config, data, checkpoint files, a run directory in use), 1 when a run cannot go on (too many non-finite
steps, a checkpoint that could not be written). This module imports no torch and nothing of the package: every
layer raises these types, so they sit below all of them (``config`` and ``data`` re-export their own).
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "CheckpointMissing",
    "CheckpointWriteError",
    "ConfigError",
    "DataError",
    "NonFiniteError",
    "PeerLostError",
    "RunDirLocked",
    "exit_status",
    "first_line",
]


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the file or dotted key and what was expected."""


class DataError(ValueError):
    """Bad input to the data pipeline: a one-line message naming the file, key or value and what was expected.

    Command-line tools print it as ``error: ...`` and exit with status 2, without a traceback.
    """


def first_line(e: BaseException) -> str:
    """An exception's first message line (library messages can run to pages), or its type name when it has none."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as one (a missing or malformed file, another model's tensors)."""


class CheckpointMissing(CheckpointError, FileNotFoundError):
    """A checkpoint (or a file it must hold) that is not there."""


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed (disk full, I/O error); the previous checkpoint is intact and the run stops."""


class NonFiniteError(RuntimeError):
    """Too many non-finite (skipped) steps in a row: the run stops, keeping the last checkpoint."""


class PeerLostError(RuntimeError):
    """A collective failed because a peer rank died or hung (training/cluster.py names it); the run stops."""


class RunDirLocked(ConfigError):
    """Another live run holds the run directory."""


def exit_status(error: BaseException) -> int | None:
    """The exit status a tool returns for ``error``, or None when it is a bug (let the traceback show)."""
    if isinstance(error, (ConfigError, DataError, CheckpointError, FileExistsError)):
        return 2
    if isinstance(error, (CheckpointWriteError, NonFiniteError, PeerLostError)):
        return 1
    return None
