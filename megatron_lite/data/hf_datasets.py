"""Documents from a dataset HF ``datasets`` can load (``--dataset NAME --split S``), streamed in bounded memory.

``NAME`` is a Hub name, a local directory of data files (``datasets`` infers the format and splits from the file names),
or a directory written by ``save_to_disk``. The last is memory-mapped, not streamed, and knows its row count; a
streamed dataset knows it only when its metadata records the split's size. Loading is done up front so that a bad name
fails before any work; errors from ``datasets`` are folded into one line naming the dataset and split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

from .errors import DataError, first_line
from .records import RecordPolicy

BATCH_ROWS = 1024


def quiet_datasets_logs() -> None:
    """Keep ``datasets``' own error logs off the console: its failures reach the user as our one-line error."""
    import datasets

    datasets.logging.set_verbosity(datasets.logging.CRITICAL)


def _saved_to_disk(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def open_dataset(name: str, split: str, where: str):
    """``(dataset, rows)``: a ``Dataset`` or ``IterableDataset`` for the split, and its row count when known."""
    import datasets

    try:
        if _saved_to_disk(Path(name)):
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{where}: no such split (its splits: {', '.join(ds)}); expected one of them "
                                    f"as --split")
                ds = ds[split]
            return ds, ds.num_rows
        ds = datasets.load_dataset(name, split=split, streaming=True)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types (hub, builder, file and split errors); all mean "cannot load"
        raise DataError(f"{where}: could not be loaded ({first_line(e)}); expected a dataset name HF datasets can "
                        f"load, a local directory of data files, or a directory written by save_to_disk") from None
    splits = ds.info.splits
    known = splits.get(split) if splits else None
    return ds, (known.num_examples or None) if known is not None else None


def dataset_documents(ds, where: str, rec: RecordPolicy, at: Callable[[int], None]) -> Iterator[str]:
    """The strings in column ``rec.key``, in order; ``at(rows read)`` after each batch."""
    columns = ds.column_names
    if columns is not None and rec.key not in columns:
        raise DataError(f"{where}: no column '{rec.key}' (its columns: {', '.join(columns[:8]) or 'none'}); expected "
                        f"the text in column '{rec.key}', or choose another with --json-key")
    if columns is not None:
        ds = ds.select_columns([rec.key])
    row = 0
    batches = iter(ds.iter(batch_size=BATCH_ROWS))
    while True:
        try:
            batch = next(batches, None)
        except Exception as e:  # a malformed file inside the dataset, a network error, ...: name the dataset
            raise DataError(f"{where}: reading failed at row {row} ({first_line(e)}); expected records with a "
                            f"string column '{rec.key}'") from None
        if batch is None:
            return
        values = batch.get(rec.key)
        if values is None:
            raise DataError(f"{where}: row {row}: no column '{rec.key}' (its columns: {', '.join(batch)}); expected "
                            f"the text in column '{rec.key}', or choose another with --json-key")
        at(row + len(values))
        yield from rec.cells(values, where, row)
        row += len(values)
