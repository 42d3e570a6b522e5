"""What the corpus readers share: counters a caller can report, and the policy for records without usable text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from .errors import DataError


@dataclass
class SourceStats:
    """Documents yielded, bad records skipped, and how far reading has got, for a progress bar.

    ``done`` and ``total`` share ``unit``: ``"B"`` counts bytes of the input files as stored (compressed bytes for
    ``.gz``), so a bar over them ends exactly at the sum of the file sizes; ``"doc"`` counts records of a dataset.
    ``total`` is ``None`` when it cannot be known before reading (a streamed dataset without a recorded row count).
    """

    documents: int = 0
    skipped: int = 0
    done: int = 0
    total: int | None = None
    unit: str = "B"


class RecordPolicy:
    """Take the text out of one record, or say exactly what is wrong with it (file and line or row).

    With ``skip_bad`` a bad record is counted in ``stats.skipped`` and dropped instead, so one stray line does not
    cost a multi-hour run.
    """

    def __init__(self, key: str, skip_bad: bool, stats: SourceStats) -> None:
        self.key, self.skip_bad, self.stats = key, skip_bad, stats

    def skip_or_raise(self, message: str, fix: str = "") -> None:
        """Count and skip the record, or raise ``message`` followed by how to fix it or skip instead."""
        if not self.skip_bad:
            raise DataError(f"{message}; {fix}pass --skip-bad-records to skip such records")
        self.stats.skipped += 1

    def value(self, record: Any, where: str) -> str | None:
        """The string under ``key`` of a JSON record, or ``None`` when the record is skipped."""
        if isinstance(record, dict) and isinstance(record.get(self.key), str):
            return record[self.key]
        if not isinstance(record, dict):
            self.skip_or_raise(f"{where}: record is a JSON {type(record).__name__}, expected an object with key "
                               f"'{self.key}'")
        elif self.key not in record:
            keys = ", ".join(list(record)[:8]) or "none"
            self.skip_or_raise(f"{where}: record has no key '{self.key}' (its keys: {keys})",
                               "choose the key with --json-key, or ")
        else:
            self.skip_or_raise(f"{where}: key '{self.key}' holds {type(record[self.key]).__name__} "
                               f"{str(record[self.key])[:40]!r}, expected a string")
        return None

    def cell(self, value: Any, where: str) -> str | None:
        """The text of one row of a column (parquet, csv, arrow, HF datasets), or ``None`` when skipped."""
        if isinstance(value, str):
            return value
        self.skip_or_raise(f"{where}: column '{self.key}' holds {type(value).__name__}, expected a string")
        return None

    def cells(self, values: Iterable[Any], where: str, first_row: int) -> Iterator[str]:
        """The texts of consecutive rows ``first_row, first_row + 1, ...`` of a column; errors name the row."""
        for row, value in enumerate(values, first_row):
            if isinstance(value, str):  # the common case, without building a location string per row
                yield value
            elif (text := self.cell(value, f"{where}: row {row}")) is not None:
                yield text
