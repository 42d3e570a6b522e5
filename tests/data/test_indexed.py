import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from megatron_lite.data import DataError, DType, IndexedDataset, IndexedDatasetWriter, merge_shards


def read_idx_from_spec(path):
    """An independent reader written from the format description alone."""
    raw = open(path, "rb").read()
    magic = raw[:9]
    version, code, s, d1 = struct.unpack("<QBQQ", raw[9:34])
    off = 34
    lengths = struct.unpack(f"<{s}i", raw[off:off + 4 * s]); off += 4 * s
    pointers = struct.unpack(f"<{s}q", raw[off:off + 8 * s]); off += 8 * s
    docs = struct.unpack(f"<{d1}q", raw[off:off + 8 * d1]); off += 8 * d1
    assert off == len(raw)
    return magic, version, code, lengths, pointers, docs


def test_round_trip_and_header_bytes(tmp_path):
    docs = [[5, 6, 7], [1], [65000, 2, 3, 4]]
    with IndexedDatasetWriter(tmp_path / "a", np.uint16) as w:
        for d in docs:
            w.add_document(d)
    r = IndexedDataset(tmp_path / "a")
    assert [r[i].tolist() for i in range(len(r))] == docs
    assert r.num_documents == 3 and r.num_tokens == 8 and r.dtype == np.uint16
    magic, version, code, lengths, pointers, doc_index = read_idx_from_spec(tmp_path / "a.idx")
    assert magic == b"MMIDIDX\x00\x00" and version == 1 and code == 8
    assert lengths == (3, 1, 4) and pointers == (0, 6, 8) and doc_index == (0, 1, 2, 3)
    assert open(tmp_path / "a.bin", "rb").read() == np.array(sum(docs, []), "<u2").tobytes()


def test_reader_is_zero_copy(shard):
    prefix, docs = shard
    r = IndexedDataset(prefix)
    v = r.get(3, 1, 2)
    assert isinstance(v.base, np.memmap) or isinstance(v, np.memmap)
    assert v.tolist() == docs[3][1:3].tolist()


def test_dtype_codes_and_choice():
    assert {c: np.dtype(t).name for c, t in DType.CODES.items()} == {
        1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float64", 7: "float32", 8: "uint16"}
    assert DType.for_vocab(32000) == np.uint16 and DType.for_vocab(65499) == np.uint16
    assert DType.for_vocab(65500) == np.int32 and DType.for_vocab(128256) == np.int32
    assert DType.for_vocab(2**31) == np.int32  # ids up to 2**31 - 1 fit int32
    with pytest.raises(DataError, match="too large"):
        DType.for_vocab(2**31 + 1)


def test_several_sequences_per_document(tmp_path):
    """A Megatron-style file where documents span several sequences (written here by hand, from the spec)."""
    seqs = [[1, 2], [3], [4, 5, 6], [7], [8, 9]]
    doc_index = [0, 2, 3, 5]  # documents: seqs 0-1, seq 2, seqs 3-4
    lengths = [len(s) for s in seqs]
    pointers = np.concatenate([[0], np.cumsum(lengths)[:-1]]) * 4
    with open(tmp_path / "m.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 4, len(seqs), len(doc_index)))
        f.write(struct.pack(f"<{len(seqs)}i", *lengths) + struct.pack(f"<{len(seqs)}q", *pointers))
        f.write(struct.pack(f"<{len(doc_index)}q", *doc_index))
    np.array(sum(seqs, []), "<i4").tofile(tmp_path / "m.bin")
    r = IndexedDataset(tmp_path / "m")
    assert len(r) == 5 and r.num_documents == 3
    assert [r.document(d).tolist() for d in range(3)] == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    from megatron_lite.data.gpt_dataset import GPTDataset

    ds = GPTDataset(r, (0, 3), seq_len=3, seed=0, num_samples=3, reset_at_document=True, cache_dir=tmp_path / "c")
    stream = np.concatenate([ds.unshuffled(j)["tokens"][:-1] for j in range(3)])
    assert sorted(stream.tolist()) == list(range(1, 10))
    for j in range(3):  # document ids change only where a document (not a sequence) starts
        s = ds.unshuffled(j)
        starts = [p for p in range(3) if s["position_ids"][p] == 0 and p > 0]
        assert all(int(s["tokens"][p]) in (4, 7) for p in starts)


def test_merge_keeps_order_and_boundaries(tmp_path, shard):
    prefix, docs = shard
    out = merge_shards([prefix, prefix], str(tmp_path / "merged"))
    assert out.num_documents == 2 * len(docs)
    assert out.document_indices.tolist() == list(range(2 * len(docs) + 1))
    assert out.document(len(docs) + 5).tolist() == docs[5].tolist()
    with pytest.raises(DataError, match="already exists"):
        merge_shards([prefix], str(tmp_path / "merged"))


def test_bad_magic_version_truncation_and_short_bin(tmp_path, shard):
    prefix, _ = shard
    good_idx = open(prefix + ".idx", "rb").read()
    good_bin = open(prefix + ".bin", "rb").read()
    cases = {
        "magic": (b"NOTANIDX!" + good_idx[9:], good_bin, "bad magic"),
        "version": (good_idx[:9] + struct.pack("<Q", 2) + good_idx[17:], good_bin, "version 2"),
        "trunc": (good_idx[:-5], good_bin, "truncated"),
        "header": (good_idx[:20], good_bin, "truncated"),
        "short": (good_idx, good_bin[:-2], "data file is"),
        "code": (good_idx[:17] + bytes([9]) + good_idx[18:], good_bin, "dtype code 9"),
        "ragged": (good_idx, good_bin + b"\x00", r"size \d+ bytes is not a multiple of 4, the size of int32"),
    }
    for name, (idx, binary, msg) in cases.items():
        p = tmp_path / name
        open(f"{p}.idx", "wb").write(idx)
        open(f"{p}.bin", "wb").write(binary)
        with pytest.raises(DataError, match=msg) as e:
            IndexedDataset(p)
        assert f"{name}." in str(e.value)
    with pytest.raises(DataError, match="not found"):
        IndexedDataset(tmp_path / "missing")


def test_writer_never_leaves_partial_output(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(tmp_path / "x", np.uint16) as w:
            w.add_document([1, 2])
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DataError, match="does not fit dtype uint8"):
        with IndexedDatasetWriter(tmp_path / "y", np.uint8) as w:
            w.add_document([1, 300])
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DataError, match="too large for dtype uint16"):
        IndexedDatasetWriter(tmp_path / "z", np.uint16, vocab_size=70000)


def _pair(prefix, docs):
    with IndexedDatasetWriter(prefix, np.uint16, overwrite=True) as w:
        for d in docs:
            w.add_document(d)


def _contents(prefix):
    """The documents of the pair at ``prefix``, or None where no complete pair can be opened."""
    try:
        r = IndexedDataset(prefix)
    except DataError:
        return None
    return [r.document(d).tolist() for d in range(r.num_documents)]


OLD_DOCS = [[1, 2, 3], [4, 5]]
NEW_DOCS = [[7, 8, 9, 10], [11, 12, 13]]  # larger .bin: the old index over it would still open, and read garbage


@pytest.mark.parametrize("recovers", [True, False], ids=["error", "crash"])
@pytest.mark.parametrize("fail_at", [1, 2, 3, 4])
def test_overwrite_never_exposes_a_mismatched_pair(tmp_path, monkeypatch, fail_at, recovers):
    """Fail the n-th rename of an overwrite. 'error': later renames work (an OSError the writer can undo); 'crash':
    every later rename fails too, as if the process had died there. Readers must never see the old index beside new
    data, and the old output must survive (in place or set aside whole) unless the new pair is complete."""
    prefix = str(tmp_path / "out")
    _pair(prefix, OLD_DOCS)
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == fail_at or (not recovers and len(calls) > fail_at):
            raise OSError("simulated failure")
        return real(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", replace)
        with pytest.raises(DataError, match="could not move the new .bin/.idx into place"):
            _pair(prefix, NEW_DOCS)
    now = _contents(prefix)
    assert now in (OLD_DOCS, NEW_DOCS, None), f"mismatched pair visible: {now}"
    if recovers:  # the writer put the old pair back and cleaned up after itself
        assert now == OLD_DOCS and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin", "out.idx"]
    elif now is None:  # mid-swap: the old files must all still exist, set aside or (the .bin) not yet moved
        aside = tmp_path / f"out.old-{os.getpid()}"
        old_bin = Path(f"{aside}.bin") if Path(f"{aside}.bin").exists() else tmp_path / "out.bin"
        (tmp_path / "check").mkdir()
        shutil.copy(f"{aside}.idx", tmp_path / "check" / "x.idx")
        shutil.copy(old_bin, tmp_path / "check" / "x.bin")
        assert _contents(tmp_path / "check" / "x") == OLD_DOCS


def test_overwrite_replaces_both_files(tmp_path):
    prefix = tmp_path / "out"
    _pair(prefix, OLD_DOCS)
    _pair(prefix, NEW_DOCS)
    assert _contents(prefix) == NEW_DOCS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin", "out.idx"]
