"""Stream raw documents out of corpus files or an HF dataset, one string at a time, with errors that name the file.

Formats, chosen by file extension (see ``docs/formats.md``, "Input formats"):

* ``.jsonl`` / ``.ndjson`` / ``.json``: JSON lines (a file starting with ``[`` is one JSON array); the value under
  ``json_key`` of each record is one document. Errors name the line.
* ``.parquet``, ``.csv`` (with a header row), ``.arrow`` (Arrow IPC, as HF ``datasets`` writes): column ``json_key``.
* anything else is UTF-8 text. ``text_mode="block"`` (the default) makes each block of lines separated by one or
  more blank lines a document; ``text_mode="file"`` makes the whole file one document.
* ``dataset=NAME`` (with ``split``) reads a dataset through HF ``datasets`` instead of files.

A ``.gz`` suffix on a text, JSON-lines or CSV file is decompressed on the fly. A file that cannot be read as its name
says becomes one :class:`DataError` line naming the file and what was expected, never a traceback.
"""

from __future__ import annotations

import sys
import zlib
from pathlib import Path
from typing import Callable, Iterator

from .errors import DataError, first_line
from .fileio import is_gzip_name
from .hf_datasets import dataset_documents, open_dataset
from .readers import arrow_docs, csv_docs, json_docs, parquet_docs, text_docs
from .records import RecordPolicy, SourceStats

__all__ = ["SourceStats", "expand_inputs", "iter_documents"]

JSON_SUFFIXES = {".jsonl", ".ndjson", ".json"}
COLUMNAR = {".parquet": (parquet_docs, "a parquet file"), ".csv": (csv_docs, "a CSV file with a header row"),
            ".arrow": (arrow_docs, "an Arrow IPC stream or file")}
NOT_GZIPPED = {".parquet", ".arrow"}  # compressed inside already; a .gz around them is refused up front


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files named, or the files inside directories named (sorted), checked to exist and be non-empty."""
    if not inputs:
        raise DataError("no input files given (expected --input FILE...)")
    files: list[Path] = []
    for name in inputs:
        p = Path(name)
        if p.is_dir():
            inner = sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith("."))
            if not inner:
                raise DataError(f"{p}: input directory is empty (expected corpus files in it)")
            files.extend(inner)
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p}: input file not found")
    for p in files:
        if p.stat().st_size == 0:
            raise DataError(f"{p}: input file is empty (expected at least one document)")
        if is_gzip_name(p) and _suffix(p) in NOT_GZIPPED:
            raise DataError(f"{p}: a gzip-compressed {_suffix(p)} file is not read (expected it uncompressed; the "
                            f"format compresses internally)")
    return files


def _suffix(p: Path) -> str:
    """The format suffix, looking through a trailing ``.gz``."""
    s = p.suffixes
    if s and s[-1].lower() == ".gz" and len(s) > 1:
        return s[-2].lower()
    return p.suffix.lower()


def _read_errors() -> tuple[type[BaseException], ...]:
    """What a reader raises when a file's content is not what its name says. pyarrow's exception base is added only
    once pyarrow is loaded, since nothing else can raise it (and a JSON-lines run should not pay for the import)."""
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, ValueError, zlib.error)
    pa = sys.modules.get("pyarrow")
    return (errors + (pa.ArrowException,)) if pa is not None else errors


def _guarded(p: Path, expected: str, docs: Iterator[str]) -> Iterator[str]:
    """``docs``, with any read failure turned into one line naming the file and the format expected."""
    try:
        yield from docs
    except DataError:
        raise
    except Exception as e:
        if not isinstance(e, _read_errors()):
            raise
        raise DataError(f"{p}: unreadable ({first_line(e)}); expected {expected}") from None


def _file_reader(p: Path, rec: RecordPolicy, text_mode: str) -> tuple[Callable, str]:
    """The reader for ``p`` (called with ``at``) and a description of what the file must be."""
    suf, gz = _suffix(p), ("gzip-compressed " if is_gzip_name(p) else "")
    if suf in JSON_SUFFIXES:
        return (lambda at: json_docs(p, rec, at)), f"{gz}JSON lines (one object per line) or a JSON array"
    if suf in COLUMNAR:
        read, what = COLUMNAR[suf]
        return (lambda at: read(p, rec, at)), f"{gz}{what} with a string column '{rec.key}'"
    return (lambda at: text_docs(p, text_mode, at)), f"{gz}UTF-8 text"


def _file_documents(files: list[Path], rec: RecordPolicy, text_mode: str, stats: SourceStats) -> Iterator[str]:
    for p in files:
        base, size = stats.done, p.stat().st_size

        def at(n: int, base: int = base) -> None:
            stats.done = base + n

        read, expected = _file_reader(p, rec, text_mode)
        yield from _guarded(p, expected, read(at))
        stats.done = base + size


def _counted(docs: Iterator[str], stats: SourceStats) -> Iterator[str]:
    for doc in docs:
        stats.documents += 1
        yield doc


def iter_documents(inputs: list[str] | None, json_key: str = "text", text_mode: str = "block",
                   skip_bad_records: bool = False, stats: SourceStats | None = None,
                   dataset: str | None = None, split: str = "train") -> Iterator[str]:
    """Every document of the inputs in order (files in the order given, records in file order).

    Inputs are checked, and a dataset loaded, before this returns; ``stats.total`` and ``stats.unit`` are set then, so
    a progress bar can be sized before the first document is read.
    """
    stats = stats if stats is not None else SourceStats()
    rec = RecordPolicy(json_key, skip_bad_records, stats)
    if text_mode not in ("block", "file"):
        raise DataError(f"text mode '{text_mode}' is not known (expected 'block' or 'file')")
    if dataset:
        where = f"dataset '{dataset}' (split '{split}')"
        ds, rows = open_dataset(dataset, split, where)
        stats.unit, stats.total = "doc", rows

        def at(n: int) -> None:
            stats.done = n

        return _counted(dataset_documents(ds, where, rec, at), stats)
    files = expand_inputs(inputs or [])
    stats.unit, stats.total = "B", sum(p.stat().st_size for p in files)
    return _counted(_file_documents(files, rec, text_mode, stats), stats)
