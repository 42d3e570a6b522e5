"""Open corpus files so that progress is measured in bytes of the file as stored, and ``.gz`` is checked up front.

Progress bars are sized by file sizes on disk, so they must advance by bytes read from disk, not by characters of
decoded (or decompressed) text; :class:`CountingFile` records exactly that.
"""

from __future__ import annotations

import gzip
import io
import os
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from .errors import DataError

GZIP_MAGIC = b"\x1f\x8b"
READ_SIZE = 1 << 20  # buffer size: large reads, and progress granularity of 1 MB


class CountingFile(io.RawIOBase):
    """A raw binary file whose ``position`` is how far it has been read, readable without a system call."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__()
        self._f = open(path, "rb", buffering=0)
        self.position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = self._f.readinto(buf) or 0
        self.position += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.position = self._f.seek(offset, whence)
        return self.position

    def tell(self) -> int:
        return self.position

    def close(self) -> None:
        self._f.close()
        super().close()


def is_gzip_name(p: Path) -> bool:
    return p.suffix.lower() == ".gz"


@contextmanager
def open_input(p: Path, text: bool) -> Iterator[tuple[IO, CountingFile]]:
    """The file's content (decompressed when the name ends in ``.gz``; UTF-8 text with invalid bytes replaced when
    ``text``) and the counter of bytes read from disk.

    A ``.gz`` file that is not gzip data is refused here with one line, instead of failing somewhere mid-read.
    """
    raw = CountingFile(p)
    with io.BufferedReader(raw, buffer_size=READ_SIZE) as buffered:
        stream: IO = buffered
        if is_gzip_name(p):
            head = buffered.peek(2)[:2]
            if head != GZIP_MAGIC:
                raise DataError(f"{p}: not gzip data (starts with {head!r}, expected {GZIP_MAGIC!r} because the name "
                                f"ends in .gz)")
            stream = gzip.GzipFile(fileobj=buffered, mode="rb")
        if text:
            stream = io.TextIOWrapper(stream, encoding="utf-8", errors="replace")
        with stream:
            yield stream, raw
