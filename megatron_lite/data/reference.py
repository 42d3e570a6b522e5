"""The reference encoder (``tokenizers``) loaded and run once in a forked process, for the fast encoder's corpus check.

Why: preprocessing checks tiktoken against ``tokenizers`` on the start of the corpus before it writes anything, and
loading a large ``tokenizer.json`` costs ``tokenizers`` more than that check (0.5 s for Llama 3's 128k tokens and
280k merges, against 0.15 s to encode the sample), all of it holding the GIL. Started in its own process as the
command starts, before the main process imports the pipeline and loads the fast encoder's table, the load runs on a
core the main process is not using. Linux only (it relies on ``fork``); elsewhere the check loads ``tokenizers`` in
the main process. This module imports nothing heavy, so that the command can start it first.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
from pathlib import Path
from typing import Any

from .errors import DataError, first_line


def load_reference(file: str) -> Any:
    """``tokenizers.Tokenizer`` for ``file``, or a DataError saying why it cannot be read."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(file)
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise DataError(f"{file}: unreadable tokenizer ({first_line(e)}); expected a tokenizers JSON file") from None


def encode_reference(tok: Any, texts: list[str]) -> list[list[int]]:
    """Ids from ``tokenizers`` itself. ``encode_batch_fast`` gives the same ids as ``encode_batch`` without computing
    character offsets, which preprocessing never uses (measured gains here ranged from none to about a quarter,
    docs/benchmarks.md)."""
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    return [e.ids for e in encode(texts, add_special_tokens=False)]


def _serve_once(file: str, conn: Any) -> None:
    """In the forked process: load, wait for one batch of texts, answer with their ids (or the load's error)."""
    try:
        tok = load_reference(file)
    except DataError as e:
        tok, error = None, str(e)
    try:
        texts = conn.recv()
    except EOFError:  # closed unused
        return
    conn.send(("error", error) if tok is None else ("ids", encode_reference(tok, texts)))
    conn.close()


class BackgroundReference:
    """``tokenizers`` loading ``file`` in a forked process from construction on; :meth:`encode_batch` answers once."""

    def __init__(self, file: str) -> None:
        ctx = mp.get_context("fork")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve_once, args=(file, child), daemon=True, name="reference-encoder")
        self._proc.start()
        child.close()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """The reference ids of ``texts``; the process exits after answering."""
        try:
            self._conn.send(texts)
            kind, payload = self._conn.recv()
        except (EOFError, OSError) as e:
            raise DataError(f"the reference encoder's process ended before answering ({e!r}, exit code "
                            f"{self._proc.exitcode})") from None
        finally:
            self.close()
        if kind == "error":
            raise DataError(payload)
        return payload

    def close(self) -> None:
        """End the process: it has exited after answering, or is stopped unused."""
        self._conn.close()
        if self._proc.is_alive():
            self._proc.terminate()
        self._proc.join()


def prefetch_reference(tokenizer: str, encoder: str) -> BackgroundReference | None:
    """Start loading the reference encoder for the fast encoder's corpus check now, where one will be needed:
    ``encoder`` is not ``tokenizers``, and ``tokenizer`` names a file or a directory holding ``tokenizer.json`` (what
    else it may name fails later, with the loader's own error)."""
    if encoder == "tokenizers" or not sys.platform.startswith("linux"):
        return None
    path = Path(tokenizer)
    file = path / "tokenizer.json" if path.is_dir() else path
    return BackgroundReference(str(file)) if file.is_file() else None
