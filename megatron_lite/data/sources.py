"""Stream raw documents out of corpus files, one string at a time, with errors that name the file and line.

Formats, chosen by file extension:

* ``.jsonl`` / ``.ndjson`` / ``.json`` (JSON lines; a ``.json`` file starting with ``[`` is read as one array): the
  value under ``json_key`` of each record is one document.
* ``.parquet``: the column ``json_key`` is read in record batches; each row is one document.
* ``.csv`` / ``.arrow``: read through HF ``datasets`` in streaming mode, column ``json_key``.
* anything else is plain UTF-8 text. ``text_mode="block"`` (the default) makes each block of lines separated by one or
  more blank lines a document; ``text_mode="file"`` makes the whole file one document.
* ``dataset=NAME`` (with ``split``) streams any dataset HF ``datasets`` can load instead of files.

A ``.gz`` suffix on a text or JSON-lines file is decompressed on the fly. Nothing is read whole except a ``.json`` array.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import DataError

JSON_SUFFIXES = {".jsonl", ".ndjson", ".json"}
DATASETS_SUFFIXES = {".csv": "csv", ".arrow": "arrow"}


@dataclass
class SourceStats:
    """Counts a caller can report: documents yielded and bad records skipped."""

    documents: int = 0
    skipped: int = 0


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
    return files


def _suffix(p: Path) -> str:
    s = p.suffixes
    if s and s[-1] == ".gz" and len(s) > 1:
        return s[-2].lower()
    return p.suffix.lower()


def _open_text(p: Path) -> io.TextIOBase:
    if p.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(p, "rb"), encoding="utf-8", errors="replace")
    return open(p, encoding="utf-8", errors="replace")


class _Records:
    """Shared bad-record policy: raise with file and position, or count and skip."""

    def __init__(self, key: str, skip_bad: bool, stats: SourceStats) -> None:
        self.key, self.skip_bad, self.stats = key, skip_bad, stats

    def value(self, record, where: str) -> str | None:
        if isinstance(record, dict) and isinstance(record.get(self.key), str):
            return record[self.key]
        if self.skip_bad:
            self.stats.skipped += 1
            return None
        if not isinstance(record, dict):
            raise DataError(f"{where}: record is a JSON {type(record).__name__}, expected an object with key "
                            f"'{self.key}' (pass --skip-bad-records to skip such records)")
        if self.key not in record:
            keys = ", ".join(list(record)[:8]) or "none"
            raise DataError(f"{where}: record has no key '{self.key}' (its keys: {keys}; choose one with --json-key, "
                            f"or pass --skip-bad-records)")
        raise DataError(f"{where}: key '{self.key}' holds {type(record[self.key]).__name__} "
                        f"{str(record[self.key])[:40]!r}, expected a string (pass --skip-bad-records to skip)")


def _json_docs(p: Path, rec: _Records) -> Iterator[str]:
    with _open_text(p) as f:
        head = f.read(1)
        while head and head.isspace():
            head = f.read(1)
        if head == "[":  # one JSON array
            try:
                records = json.loads(head + f.read())
            except ValueError as e:
                raise DataError(f"{p}: invalid JSON array ({e})") from None
            for i, r in enumerate(records):
                v = rec.value(r, f"{p}: record {i}")
                if v is not None:
                    yield v
            return
        f.seek(0)
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except ValueError as e:
                if rec.skip_bad:
                    rec.stats.skipped += 1
                    continue
                raise DataError(f"{p}:{lineno}: invalid JSON ({e}); expected one object per line "
                                f"(pass --skip-bad-records to skip)") from None
            v = rec.value(r, f"{p}:{lineno}")
            if v is not None:
                yield v


def _parquet_docs(p: Path, rec: _Records) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(p)
    except Exception as e:
        raise DataError(f"{p}: unreadable parquet file ({e})") from None
    names = pf.schema_arrow.names
    if rec.key not in names:
        raise DataError(f"{p}: parquet file has no column '{rec.key}' (its columns: {', '.join(names[:8])}; "
                        f"choose one with --json-key)")
    row = 0
    for batch in pf.iter_batches(columns=[rec.key], batch_size=4096):
        for v in batch.column(0).to_pylist():
            if isinstance(v, str):
                yield v
            elif rec.skip_bad:
                rec.stats.skipped += 1
            else:
                raise DataError(f"{p}: row {row}: column '{rec.key}' holds {type(v).__name__}, expected a string "
                                f"(pass --skip-bad-records to skip)")
            row += 1


def _text_docs(p: Path, mode: str) -> Iterator[str]:
    with _open_text(p) as f:
        if mode == "file":
            text = f.read()
            if text.strip():
                yield text
            return
        block: list[str] = []
        for line in f:
            if line.strip():
                block.append(line)
            elif block:
                yield "".join(block).rstrip("\n")
                block = []
        if block:
            yield "".join(block).rstrip("\n")


def _hf_docs(records, where: str, rec: _Records) -> Iterator[str]:
    for i, r in enumerate(records):
        v = rec.value(r, f"{where}: record {i}")
        if v is not None:
            yield v


def iter_documents(inputs: list[str] | None, json_key: str = "text", text_mode: str = "block",
                   skip_bad_records: bool = False, stats: SourceStats | None = None,
                   dataset: str | None = None, split: str = "train") -> Iterator[str]:
    """Yield every document of the inputs in order (files in the order given, records in file order)."""
    stats = stats if stats is not None else SourceStats()
    rec = _Records(json_key, skip_bad_records, stats)
    if text_mode not in ("block", "file"):
        raise DataError(f"text mode '{text_mode}' is not known (expected 'block' or 'file')")
    if dataset:
        import datasets

        try:
            ds = datasets.load_dataset(dataset, split=split, streaming=True)
        except Exception as e:
            raise DataError(f"dataset '{dataset}' (split '{split}') could not be loaded: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        sources = [_hf_docs(ds, f"dataset '{dataset}'", rec)]
    else:
        sources = []
        for p in expand_inputs(inputs or []):
            suf = _suffix(p)
            if suf in JSON_SUFFIXES:
                sources.append(_json_docs(p, rec))
            elif suf == ".parquet":
                sources.append(_parquet_docs(p, rec))
            elif suf in DATASETS_SUFFIXES:
                sources.append(_datasets_file_docs(p, DATASETS_SUFFIXES[suf], rec))
            else:
                sources.append(_text_docs(p, text_mode))
    for src in sources:
        for doc in src:
            stats.documents += 1
            yield doc


def _datasets_file_docs(p: Path, builder: str, rec: _Records) -> Iterator[str]:
    import datasets

    ds = datasets.load_dataset(builder, data_files=[os.fspath(p)], split="train", streaming=True)
    yield from _hf_docs(ds, str(p), rec)
