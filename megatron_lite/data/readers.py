"""One streaming reader per corpus file format; each yields documents and reports how far into the file it is.

Every reader takes ``at``, called with the number of bytes of the file (as stored on disk) consumed so far, so a
progress bar sized by file sizes moves in the same unit. Columnar files whose bytes are not read in order (parquet, the
Arrow IPC *file* format) report rows read as a share of the file size instead. Nothing is read whole except a
``.json`` holding one JSON array and a text file in ``file`` mode.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .errors import DataError
from .fileio import open_input
from .records import RecordPolicy

At = Callable[[int], None]
ARROW_FILE_MAGIC = b"ARROW1"
BATCH_ROWS = 4096


def json_docs(p: Path, rec: RecordPolicy, at: At) -> Iterator[str]:
    """JSON lines (blank lines allowed; errors name the line), or one JSON array when the file starts with ``[``."""
    with open_input(p, text=True) as (f, raw):
        first = True
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if first and line.lstrip().startswith("["):
                content = line + f.read()
                at(raw.position)
                yield from _json_array(p, content, rec)
                return
            first = False
            try:
                record = json.loads(line)
            except ValueError as e:
                rec.skip_or_raise(f"{p}:{lineno}: invalid JSON ({e}); expected one object per line")
                continue
            text = rec.value(record, f"{p}:{lineno}")
            at(raw.position)
            if text is not None:
                yield text


def _json_array(p: Path, content: str, rec: RecordPolicy) -> Iterator[str]:
    try:
        records = json.loads(content)
    except ValueError as e:
        raise DataError(f"{p}: invalid JSON array ({e}); expected one JSON array of objects, or one object per "
                        f"line") from None
    for i, r in enumerate(records):
        text = rec.value(r, f"{p}: record {i}")
        if text is not None:
            yield text


def text_docs(p: Path, mode: str, at: At) -> Iterator[str]:
    """``block``: each run of non-blank lines is a document; ``file``: the whole file is one."""
    with open_input(p, text=True) as (f, raw):
        if mode == "file":
            text = f.read()
            at(raw.position)
            if text.strip():
                yield text
            return
        block: list[str] = []
        for line in f:
            if line.strip():
                block.append(line)
            elif block:
                at(raw.position)
                yield "".join(block).rstrip("\n")
                block = []
        if block:
            at(raw.position)
            yield "".join(block).rstrip("\n")


def parquet_docs(p: Path, rec: RecordPolicy, at: At) -> Iterator[str]:
    """Column ``rec.key``, read in record batches; progress is rows read as a share of the file size."""
    import pyarrow.parquet as pq

    with pq.ParquetFile(p) as pf:
        _require_column(p, "parquet file", rec.key, pf.schema_arrow.names)
        rows, size = max(1, pf.metadata.num_rows), p.stat().st_size

        def chunks() -> Iterator[tuple]:
            done = 0
            for batch in pf.iter_batches(columns=[rec.key], batch_size=BATCH_ROWS):
                done += batch.num_rows
                yield batch.column(0), size * done // rows

        yield from _column_docs(p, rec, chunks(), at)


def csv_docs(p: Path, rec: RecordPolicy, at: At) -> Iterator[str]:
    """Column ``rec.key`` of a CSV file with a header row (quoted fields may span lines); only that column is parsed,
    always as a string, so other columns cannot fail type conversion."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    parse = pacsv.ParseOptions(newlines_in_values=True)
    convert = pacsv.ConvertOptions(include_columns=[rec.key], column_types={rec.key: pa.string()})
    with open_input(p, text=False) as (f, raw):
        try:
            reader = pacsv.open_csv(f, parse_options=parse, convert_options=convert)
        except KeyError:  # pyarrow's ArrowKeyError: the header lacks the column
            _require_column(p, "CSV file", rec.key, pacsv.open_csv(p, parse_options=parse).schema.names)
            raise
        yield from _column_docs(p, rec, ((b.column(0), raw.position) for b in reader), at)


def arrow_docs(p: Path, rec: RecordPolicy, at: At) -> Iterator[str]:
    """Column ``rec.key`` of an Arrow IPC stream (what HF ``datasets`` writes) or IPC file (Feather v2)."""
    import pyarrow as pa

    with open(p, "rb") as f:
        is_file_format = f.read(len(ARROW_FILE_MAGIC)) == ARROW_FILE_MAGIC
    if is_file_format:
        with pa.memory_map(str(p)) as source:
            reader = pa.ipc.open_file(source)
            idx = _require_column(p, "Arrow file", rec.key, reader.schema.names)
            n, size = reader.num_record_batches, p.stat().st_size
            chunks = ((reader.get_batch(i).column(idx), size * (i + 1) // n) for i in range(n))
            yield from _column_docs(p, rec, chunks, at)
        return
    with open_input(p, text=False) as (f, raw):
        stream = pa.ipc.open_stream(f)
        idx = _require_column(p, "Arrow stream", rec.key, stream.schema.names)
        yield from _column_docs(p, rec, ((b.column(idx), raw.position) for b in stream), at)


def _require_column(p: Path, kind: str, key: str, names: list[str]) -> int:
    if key not in names:
        raise DataError(f"{p}: {kind} has no column '{key}' (its columns: {', '.join(names[:8]) or 'none'}); expected "
                        f"the text in column '{key}', or choose another with --json-key")
    return names.index(key)


def _column_docs(p: Path, rec: RecordPolicy, chunks: Iterable[tuple], at: At) -> Iterator[str]:
    """The strings of each ``(column chunk, file position after reading it)`` in order; errors name the row."""
    row = 0
    for column, position in chunks:
        values = column.to_pylist()
        at(position)
        yield from rec.cells(values, str(p), row)
        row += len(values)
