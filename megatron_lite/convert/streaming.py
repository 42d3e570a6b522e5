"""Tensor-by-tensor I/O for checkpoint conversion: read and write safetensors directories in bounded memory.

A converted checkpoint is never held whole. :class:`TensorDir` reads one tensor at a time from a directory of
safetensors files with plain file reads (no memory map, so pages read do not stay resident), assembling tensors that
PyTorch DCP wrote in pieces (the ``DCP_SHARDING_INFO`` offsets our checkpoints carry when several ranks wrote them).
:class:`ShardedWriter` knows every output tensor's name, shape and dtype in advance, so it writes each file's header
first and then the tensors as they are produced; zero tensors are left as holes of a sparse file. Output goes to a
temporary directory renamed into place at the end (:func:`atomic_output_dir`).

safetensors layout, for reference: an 8-byte little-endian header length ``N``, ``N`` bytes of JSON mapping each name
to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the end of the header) plus an optional
``"__metadata__"`` of strings, then the tensors' bytes.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import shutil
import struct
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from megatron_lite.convert.errors import ConvertError

INDEX_FILE = "model.safetensors.index.json"
DCP_SHARDING_KEY = "DCP_SHARDING_INFO"

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ----------------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Piece:
    file: Path
    start: int  # absolute byte offset in the file
    shape: tuple[int, ...]
    offsets: tuple[int, ...]  # where this piece sits in the full tensor


def read_header(file: Path) -> tuple[dict, int]:
    """A safetensors file's JSON header and the byte offset where its data starts; ConvertError if it is not one."""
    try:
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a header")
            (n,) = struct.unpack("<Q", head)
            if n > min(os.path.getsize(file), 100 * 2**20):
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise ConvertError(f"{file}: not a safetensors file ({e})") from None
    return header, 8 + n


class TensorDir:
    """The tensors of a directory of safetensors files, read one at a time.

    Handles single files, HF-style sharded files with ``model.safetensors.index.json`` (every file it names must
    exist), and the per-rank files DCP writes, whose pieces of one tensor are put back together by offset.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise ConvertError(f"{self.path}: no such checkpoint directory")
        files = sorted(self.path.glob("*.safetensors"))
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text()).get("weight_map", {})
            except ValueError as e:
                raise ConvertError(f"{index}: unreadable index ({e})") from None
            for name in sorted(set(weight_map.values())):
                if not (self.path / name).is_file():
                    raise ConvertError(f"{index} names {name}, which is missing from {self.path} (a shard of a "
                                       "sharded checkpoint is missing)")
        if not files:
            raise ConvertError(f"{self.path}: no .safetensors files (expected a checkpoint directory)")
        self._pieces: dict[str, list[_Piece]] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        for file in files:
            header, data_start = read_header(file)
            meta = header.pop("__metadata__", None) or {}
            sharding = json.loads(meta[DCP_SHARDING_KEY]) if DCP_SHARDING_KEY in meta else {}
            for key, info in header.items():
                dtype = DTYPES.get(info["dtype"])
                if dtype is None:
                    raise ConvertError(f"{file}: tensor {key} has dtype {info['dtype']}, which is not supported")
                if self._dtypes.setdefault(key, dtype) != dtype:
                    raise ConvertError(f"{file}: pieces of {key} disagree on the dtype")
                shape = tuple(info["shape"])
                offsets = tuple(sharding.get(key, {}).get("saved_offsets", [0] * len(shape)))
                self._pieces.setdefault(key, []).append(_Piece(file, data_start + info["data_offsets"][0], shape,
                                                               offsets))
        self._shapes = {k: self._full_shape(k, p) for k, p in self._pieces.items()}

    def _full_shape(self, key: str, pieces: list[_Piece]) -> tuple[int, ...]:
        dims = len(pieces[0].shape)
        shape = tuple(max(p.offsets[d] + p.shape[d] for p in pieces) for d in range(dims))
        held = sum(math.prod(p.shape) for p in pieces)
        if held != math.prod(shape):
            files = sorted({p.file.name for p in pieces})
            raise ConvertError(f"{self.path}: tensor {key} is incomplete ({held:,} of {math.prod(shape):,} elements "
                               f"in {', '.join(files)}); a shard of this checkpoint is missing")
        return shape

    def shard_note(self) -> str:
        """For per-rank files (``shard-0000R-...``, one per writing rank), which are present: a missing last shard
        leaves tensors that merely look smaller, so errors about shapes add this."""
        ranks = sorted(int(m.group(1)) for f in self.path.glob("shard-*.safetensors")
                       if (m := re.match(r"shard-(\d+)-", f.name)))
        if not ranks:
            return ""
        return (f"; it is stored in per-rank shard files and holds shards {', '.join(map(str, ranks))}: a shard of "
                "this checkpoint may be missing")

    def keys(self) -> list[str]:
        return sorted(self._pieces)

    def __contains__(self, key: str) -> bool:
        return key in self._pieces

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def dtype(self, key: str) -> torch.dtype:
        return self._dtypes[key]

    def nbytes(self, key: str) -> int:
        return math.prod(self._shapes[key]) * _element_size(self._dtypes[key])

    def meta(self, key: str) -> torch.Tensor:
        """A meta tensor of ``key``'s shape and dtype (to plan outputs without reading anything)."""
        return torch.empty(self._shapes[key], dtype=self._dtypes[key], device="meta")

    def read(self, key: str) -> torch.Tensor:
        """The full tensor ``key``, read with plain file reads; only the tensor itself is held in memory."""
        if key not in self._pieces:
            raise ConvertError(f"{self.path}: no tensor {key}")
        pieces, dtype, shape = self._pieces[key], self._dtypes[key], self._shapes[key]
        if len(pieces) == 1:
            return _read_into(torch.empty(shape, dtype=dtype), pieces[0])
        out = torch.empty(shape, dtype=dtype)
        for piece in pieces:
            part = _read_into(torch.empty(piece.shape, dtype=dtype), piece)
            out[tuple(slice(o, o + s) for o, s in zip(piece.offsets, piece.shape))] = part
        return out


def _read_into(t: torch.Tensor, piece: _Piece) -> torch.Tensor:
    if t.numel():
        view = memoryview(t.view(-1).view(torch.uint8).numpy())
        with open(piece.file, "rb") as f:
            f.seek(piece.start)
            if f.readinto(view) != len(view):
                raise ConvertError(f"{piece.file}: truncated (tensor data ends early)")
    return t


# ----------------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One output tensor: its name, shape and dtype, known before anything is written."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _element_size(self.dtype)


class ShardedWriter:
    """Write ``entries`` (in that order) into safetensors files of at most ``max_shard_bytes`` each.

    One file is named ``model.safetensors``; several are ``model-0000i-of-0000n.safetensors`` with the HF index
    ``model.safetensors.index.json`` beside them. Each file's header is written when the file is opened, so the
    tensors can follow one at a time.
    """

    def __init__(self, out_dir: Path, entries: Sequence[Entry], max_shard_bytes: int,
                 metadata: dict[str, str] | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.entries = list(entries)
        groups: list[list[Entry]] = []
        used = 0
        for e in self.entries:
            if groups and used + e.nbytes <= max_shard_bytes:
                groups[-1].append(e)
                used += e.nbytes
            else:
                groups.append([e])
                used = e.nbytes
        n = len(groups)
        self.files = (["model.safetensors"] if n == 1
                      else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        self._groups = groups
        self._metadata = {"format": "pt", **(metadata or {})}
        self._next = 0  # index into entries
        self._group = -1
        self._handle = None
        self._left_in_group = 0

    def _open_next(self) -> None:
        self._close_file()
        self._group += 1
        entries = self._groups[self._group]
        header: dict = {"__metadata__": self._metadata}
        offset = 0
        for e in entries:
            header[e.name] = {"dtype": DTYPE_NAMES[e.dtype], "shape": list(e.shape),
                              "data_offsets": [offset, offset + e.nbytes]}
            offset += e.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        self._handle = open(self.out_dir / self.files[self._group], "wb")
        self._handle.write(struct.pack("<Q", len(raw)) + raw)
        self._end = 8 + len(raw) + offset
        self._left_in_group = len(entries)

    def _expect(self, name: str) -> Entry:
        if self._next >= len(self.entries) or self.entries[self._next].name != name:
            want = self.entries[self._next].name if self._next < len(self.entries) else "nothing"
            raise RuntimeError(f"writer: got {name}, expected {want}")
        if self._left_in_group == 0:
            self._open_next()
        entry = self.entries[self._next]
        self._next += 1
        self._left_in_group -= 1
        return entry

    def write(self, name: str, tensor: torch.Tensor) -> None:
        entry = self._expect(name)
        t = tensor.detach().to("cpu", entry.dtype).contiguous()
        if tuple(t.shape) != entry.shape:
            raise RuntimeError(f"writer: {name} has shape {tuple(t.shape)}, planned {entry.shape}")
        if t.numel():
            self._handle.write(memoryview(t.view(-1).view(torch.uint8).numpy()))

    def write_zeros(self, name: str) -> None:
        """A tensor of zeros, left as a hole: no bytes are written and, on most filesystems, no disk is used."""
        entry = self._expect(name)
        self._handle.seek(entry.nbytes, os.SEEK_CUR)

    def _close_file(self) -> None:
        if self._handle is not None:
            self._handle.truncate(self._end)  # a trailing hole needs the size set explicitly
            self._handle.close()
            self._handle = None

    def close(self) -> None:
        if self._next != len(self.entries):
            raise RuntimeError(f"writer: {len(self.entries) - self._next} planned tensors were not written")
        self._close_file()
        if len(self.files) > 1:
            weight_map = {e.name: self.files[i] for i, group in enumerate(self._groups) for e in group}
            index = {"metadata": {"total_size": sum(e.nbytes for e in self.entries)}, "weight_map": weight_map}
            (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------------------------
# Output directories, progress, memory
# ----------------------------------------------------------------------------------------------------------------------


def check_output(target: Path, overwrite: bool) -> None:
    """Refuse existing output before any work is done, unless ``overwrite``."""
    if target.exists() and not overwrite:
        raise ConvertError(f"{target} already exists; pass --overwrite to replace it")


@contextmanager
def atomic_output_dir(target: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory beside ``target`` and rename it to ``target`` once the body has finished.

    A failure removes the temporary directory and leaves ``target`` as it was. With ``overwrite``, an existing
    ``target`` is moved aside, the new one renamed in, and only then is the old one deleted.
    """
    target = Path(target)
    check_output(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, old)
        try:
            os.replace(tmp, target)
        except OSError:
            os.replace(old, target)
            raise
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        os.replace(tmp, target)


class Progress:
    """A tqdm bar over bytes, with the tensors done beside it (tqdm adds the rate and the ETA); a no-op when off."""

    def __init__(self, total_bytes: int, total_tensors: int, desc: str, enabled: bool = True) -> None:
        self.tensors, self.total_tensors = 0, total_tensors
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                             file=sys.stderr, dynamic_ncols=True)

    def update(self, nbytes: int, tensors: int = 1) -> None:
        self.tensors += tensors
        if self._bar is not None:
            self._bar.set_postfix_str(f"{self.tensors}/{self.total_tensors} tensors", refresh=False)
            self._bar.update(nbytes)

    def close(self, keep: bool = True) -> None:
        if self._bar is not None:
            self._bar.leave = keep
            self._bar.close()


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far.

    On Linux ``VmHWM`` of ``/proc/self/status``: ``getrusage``'s ``ru_maxrss`` would also count the parent's peak,
    which a child inherits across fork and exec. Elsewhere ``ru_maxrss`` (macOS reports bytes, others kilobytes).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def human_bytes(n: int | float) -> str:
    """Bytes in GiB, or MiB below one GiB."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
