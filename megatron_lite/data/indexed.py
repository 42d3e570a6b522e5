"""Tokenized corpora on disk: the ``.bin``/``.idx`` pair (Megatron-LM's MMIDIDX layout, byte for byte).

``PREFIX.bin`` holds the token ids of every sequence, concatenated, with no header. ``PREFIX.idx`` is little-endian:

======  ==========================  =================================================================
offset  field                       meaning
======  ==========================  =================================================================
0       9 bytes ``MMIDIDX\\0\\0``     magic
9       uint64 version              always 1
17      uint8 dtype code            see :class:`DType`
18      uint64 S                    number of sequences
26      uint64 D+1                  length of the document index
34      int32 lengths[S]            tokens per sequence
..      int64 pointers[S]           byte offset of each sequence in ``.bin``
..      int64 document_index[D+1]   sequence index where each document starts, then S
======  ==========================  =================================================================

We write one sequence per document; files with several sequences per document (as some Megatron tools write) read too.
See ``docs/formats.md`` for worked examples.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
from array import array
from pathlib import Path
from typing import Iterable

import numpy as np

from .errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, S, D+1 (34 bytes)


class DType:
    """The dtype codes of the ``.idx`` header (Megatron's numbering; NeoX swaps 6 and 7, we do not)."""

    CODES: dict[int, type] = {
        1: np.uint8,
        2: np.int8,
        3: np.int16,
        4: np.int32,
        5: np.int64,
        6: np.float64,
        7: np.float32,
        8: np.uint16,
    }

    @classmethod
    def code_of(cls, dtype: np.dtype | type) -> int:
        dt = np.dtype(dtype)
        for code, t in cls.CODES.items():
            if np.dtype(t) == dt:
                return code
        raise DataError(f"dtype {dt} has no MMIDIDX code (expected one of {[np.dtype(t).name for t in cls.CODES.values()]})")

    @classmethod
    def dtype_of(cls, code: int, where: str = "") -> np.dtype:
        if code not in cls.CODES:
            raise DataError(f"{where}: unknown dtype code {code} (expected 1..8)")
        return np.dtype(cls.CODES[code])

    @staticmethod
    def for_vocab(vocab_size: int) -> np.dtype:
        """uint16 while every id fits with room to spare (largest id + 1 under 65,500), else int32.

        ``vocab_size`` is the id range, largest id + 1 (not the number of entries, which ids with gaps exceed).
        """
        if vocab_size < 65_500:
            return np.dtype(np.uint16)
        if vocab_size - 1 <= np.iinfo(np.int32).max:
            return np.dtype(np.int32)
        raise DataError(f"vocabulary size {vocab_size} is too large for int32 token ids")


def bin_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.bin")


def idx_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(prefix)}.idx")


def check_can_write(prefix: str | os.PathLike, overwrite: bool) -> None:
    """Refuse to replace existing output unless asked to, before any work is done."""
    if overwrite:
        return
    for p in (bin_path(prefix), idx_path(prefix)):
        if p.exists():
            raise DataError(f"{p} already exists (pass --overwrite to replace it)")


class IndexedDatasetWriter:
    """Append documents, then :meth:`finalize` writes the index and renames both files into place.

    Output goes to temporary names beside the target; until ``finalize`` succeeds the target prefix is untouched, and a
    failure (or leaving the ``with`` block by an exception) removes the temporaries. Memory grows by 16 bytes per
    document (an int64 length and an int64 document start) until ``finalize``.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: np.dtype | type = np.uint16, overwrite: bool = False,
                 vocab_size: int | None = None) -> None:
        self.prefix = os.fspath(prefix)
        self.dtype = np.dtype(dtype)
        self._code = DType.code_of(self.dtype)
        if vocab_size is not None and np.issubdtype(self.dtype, np.integer) and vocab_size - 1 > np.iinfo(self.dtype).max:
            raise DataError(f"vocabulary size {vocab_size} is too large for dtype {self.dtype.name} "
                            f"(max id {np.iinfo(self.dtype).max})")
        check_can_write(self.prefix, overwrite)
        self._overwrite = overwrite
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        tag = f".tmp-{os.getpid()}"
        self._tmp_bin = Path(f"{self.prefix}.bin{tag}")
        self._tmp_idx = Path(f"{self.prefix}.idx{tag}")
        self._old = f"{self.prefix}.old-{os.getpid()}"  # where replaced output waits until the new pair is in place
        self._bin = open(self._tmp_bin, "wb")
        self._lengths = array("q")  # per sequence
        self._doc_starts = array("q", [0])  # sequence index where each document starts
        self._closed = False

    @property
    def num_documents(self) -> int:
        return len(self._doc_starts) - 1

    @property
    def num_tokens(self) -> int:
        return int(np.frombuffer(self._lengths, np.int64).sum()) if len(self._lengths) else 0

    def add_document(self, token_ids: Iterable[int] | np.ndarray) -> None:
        """One document as one sequence."""
        arr = np.asarray(token_ids)
        self.add_packed(arr, np.array([arr.size]))

    def add_packed(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Several documents at once: ``tokens`` concatenated, ``lengths[i]`` tokens each (the fast path for workers)."""
        tokens = np.asarray(tokens)
        if tokens.size and tokens.dtype != self.dtype:
            if np.issubdtype(self.dtype, np.integer) and tokens.size:
                lo, hi = int(tokens.min()), int(tokens.max())
                info = np.iinfo(self.dtype)
                if lo < info.min or hi > info.max:
                    raise DataError(f"{self.prefix}: token id {hi if hi > info.max else lo} does not fit dtype "
                                    f"{self.dtype.name}")
            tokens = tokens.astype(self.dtype)
        self._bin.write(np.ascontiguousarray(tokens).tobytes())
        n0 = len(self._lengths)
        self._lengths.frombytes(np.asarray(lengths, dtype=np.int64).tobytes())
        self._doc_starts.frombytes(np.arange(n0 + 1, len(self._lengths) + 1, dtype=np.int64).tobytes())

    def add_index(self, other_prefix: str | os.PathLike) -> None:
        """Append another ``.bin/.idx`` pair (same dtype), keeping its document boundaries."""
        other = IndexedDataset(other_prefix)
        if other.dtype != self.dtype:
            raise DataError(f"{idx_path(other_prefix)}: dtype {other.dtype.name} differs from {self.dtype.name} "
                            f"of the shards before it")
        base = len(self._lengths)
        self._lengths.frombytes(other.sequence_lengths.astype(np.int64).tobytes())
        self._doc_starts.frombytes((other.document_indices[1:] + base).astype(np.int64).tobytes())
        with open(bin_path(other_prefix), "rb") as f:
            shutil.copyfileobj(f, self._bin, length=16 << 20)
        del other

    def finalize(self) -> None:
        """Write the index, then move ``.bin`` and ``.idx`` into place with :func:`publish_pair`."""
        self._bin.close()
        lengths = np.frombuffer(self._lengths, dtype=np.int64)
        if lengths.size and lengths.max() > np.iinfo(np.int32).max:
            self.abort()
            raise DataError(f"{self.prefix}: a sequence of {lengths.max()} tokens exceeds the int32 length field")
        pointers = np.zeros(lengths.size, dtype=np.int64)
        if lengths.size > 1:
            np.cumsum(lengths[:-1] * self.dtype.itemsize, out=pointers[1:])
        doc_index = np.frombuffer(self._doc_starts, dtype=np.int64)
        with open(self._tmp_idx, "wb") as f:
            f.write(HEADER.pack(MAGIC, VERSION, self._code, lengths.size, doc_index.size))
            f.write(lengths.astype("<i4").tobytes())
            f.write(pointers.astype("<i8").tobytes())
            f.write(doc_index.astype("<i8").tobytes())
        if not self._overwrite:  # something may have appeared while we worked
            try:
                check_can_write(self.prefix, overwrite=False)
            except DataError:
                self.abort()
                raise
        try:
            publish_pair(self._tmp_bin, self._tmp_idx, self.prefix, self._old)
        except OSError as e:
            self.abort()
            kept = self._old if idx_path(self._old).exists() or bin_path(self._old).exists() else self.prefix
            raise DataError(f"{self.prefix}: could not move the new .bin/.idx into place ({e}); no new output was "
                            f"written, the previous output (if any) is at {kept}.bin/.idx") from None
        self._closed = True

    def abort(self) -> None:
        """Drop everything written so far; the target prefix stays as it was."""
        if not self._bin.closed:
            self._bin.close()
        for p in (self._tmp_bin, self._tmp_idx):
            p.unlink(missing_ok=True)
        self._closed = True

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._closed:
            if exc_type is None:
                self.finalize()
            else:
                self.abort()


def publish_pair(new_bin: Path, new_idx: Path, prefix: str, old_prefix: str) -> None:
    """Rename a complete new pair onto ``prefix`` so that no reader sees a mismatched pair and no crash loses both.

    The old ``.idx`` moves aside first (to ``old_prefix.idx``), then the old ``.bin`` (to ``old_prefix.bin``): from
    then until the new ``.idx`` lands there is no ``PREFIX.idx``, so readers get "file not found", never an old index
    over new data. The new ``.bin`` goes in before the new ``.idx`` for the same reason. The old files are deleted
    only once the new pair is complete; if the process dies in between they are still there, under ``old_prefix``
    (the ``.bin`` possibly not yet moved from ``prefix``). On an error here the old pair is put back before re-raising.
    """
    targets = [(idx_path(prefix), idx_path(old_prefix)), (bin_path(prefix), bin_path(old_prefix))]
    moved: list[tuple[Path, Path]] = []
    placed: list[Path] = []
    try:
        for path, aside in targets:
            if path.exists():
                os.replace(path, aside)
                moved.append((path, aside))
        for new, final in ((new_bin, bin_path(prefix)), (new_idx, idx_path(prefix))):
            os.replace(new, final)
            placed.append(final)
    except OSError:
        if len(placed) < 2:  # the new pair is not complete: undo, so the old output is where it was
            for final in placed:
                final.unlink(missing_ok=True)
            for path, aside in reversed(moved):
                os.replace(aside, path)
        raise
    for _, aside in moved:  # best effort: the new pair is complete, a leftover old copy harms nothing
        with contextlib.suppress(OSError):
            aside.unlink()


class IndexedDataset:
    """Read-only view of a ``.bin/.idx`` pair through ``numpy.memmap``.

    Opening maps both files and checks sizes, so it costs the same for a kilobyte or a terabyte. ``ds[i]`` returns
    sequence ``i`` as a zero-copy view into the ``.bin`` map.
    """

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.prefix = os.fspath(prefix)
        ip, bp = idx_path(prefix), bin_path(prefix)
        for p in (ip, bp):
            if not p.is_file():
                raise DataError(f"{p}: file not found (expected the .bin/.idx pair of prefix {self.prefix})")
        idx_size = ip.stat().st_size
        if idx_size < HEADER.size:
            raise DataError(f"{ip}: truncated index ({idx_size} bytes, the header alone is {HEADER.size})")
        with open(ip, "rb") as f:
            magic, version, code, n_seq, n_doc = HEADER.unpack(f.read(HEADER.size))
        if magic != MAGIC:
            raise DataError(f"{ip}: bad magic {magic!r} (expected {MAGIC!r}; not an MMIDIDX index)")
        if version != VERSION:
            raise DataError(f"{ip}: unsupported index version {version} (expected {VERSION})")
        self.dtype = DType.dtype_of(code, str(ip))
        expected = HEADER.size + n_seq * 12 + n_doc * 8
        if idx_size < expected:
            raise DataError(f"{ip}: truncated index ({idx_size} bytes, header says {n_seq} sequences and {n_doc} "
                            f"document entries, which need {expected})")
        if n_doc < 1:
            raise DataError(f"{ip}: document index is empty (expected at least the leading 0)")
        self._idx = np.memmap(ip, mode="r", dtype=np.uint8)
        off = HEADER.size
        self.sequence_lengths = np.frombuffer(self._idx, dtype="<i4", count=n_seq, offset=off)
        off += n_seq * 4
        self.sequence_pointers = np.frombuffer(self._idx, dtype="<i8", count=n_seq, offset=off)
        off += n_seq * 8
        self.document_indices = np.frombuffer(self._idx, dtype="<i8", count=n_doc, offset=off)
        bin_size = bp.stat().st_size
        need = 0 if n_seq == 0 else int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize
        if bin_size < need:
            raise DataError(f"{bp}: data file is {bin_size} bytes but {ip} needs {need}")
        if int(self.document_indices[0]) != 0 or int(self.document_indices[-1]) != n_seq:
            raise DataError(f"{ip}: document index runs {int(self.document_indices[0])}..{int(self.document_indices[-1])}"
                            f" (expected 0..{n_seq})")
        if bin_size % self.dtype.itemsize:
            raise DataError(f"{bp}: size {bin_size} bytes is not a multiple of {self.dtype.itemsize}, the size of "
                            f"{self.dtype.name} given in {ip} (expected whole token ids; truncated, or a dtype "
                            f"mismatch)")
        self._bin = np.memmap(bp, mode="r", dtype=self.dtype) if bin_size else np.zeros(0, self.dtype)
        self._itemsize = self.dtype.itemsize

    def __len__(self) -> int:
        """Number of sequences."""
        return self.sequence_lengths.size

    @property
    def num_documents(self) -> int:
        return self.document_indices.size - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``[offset, offset+length)`` of sequence ``i``, as a view into the data file."""
        n = int(self.sequence_lengths[i])
        if length is None:
            length = n - offset
        start = int(self.sequence_pointers[i]) // self._itemsize + offset
        return self._bin[start:start + length]

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def document(self, d: int) -> np.ndarray:
        """All tokens of document ``d`` (its sequences joined; a view when they are adjacent in ``.bin``)."""
        a, b = int(self.document_indices[d]), int(self.document_indices[d + 1])
        if b - a == 1:
            return self.get(a)
        parts = [self.get(s) for s in range(a, b)]
        return np.concatenate(parts) if parts else np.zeros(0, self.dtype)

    def identity(self) -> dict:
        """What the index cache keys on: where the files are and their sizes and times."""
        out = {}
        for p in (idx_path(self.prefix), bin_path(self.prefix)):
            st = p.stat()
            out[p.suffix] = [str(p.resolve()), st.st_size, st.st_mtime_ns]
        return out


def merge_shards(prefixes: list[str], output_prefix: str, overwrite: bool = False) -> IndexedDataset:
    """Concatenate shards in the given order into one pair; all must share a dtype."""
    if not prefixes:
        raise DataError("no input shards given (expected at least one prefix)")
    first = IndexedDataset(prefixes[0])
    with IndexedDatasetWriter(output_prefix, first.dtype, overwrite=overwrite) as w:
        for p in prefixes:
            w.add_index(p)
    return IndexedDataset(output_prefix)
