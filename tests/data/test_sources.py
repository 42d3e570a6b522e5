"""Corpus readers: every format reads, every malformed file is one DataError naming it, progress is in file bytes."""

import gzip
import json

import numpy as np
import pytest

from megatron_lite.data import DataError
from megatron_lite.data.sources import SourceStats, iter_documents

TEXTS = ["naïve café ☕ número", "second, with a comma", "third\nspans two lines"]


def read(inputs, **kw):
    stats = SourceStats()
    docs = list(iter_documents([str(p) for p in inputs], stats=stats, **kw))
    return docs, stats


def bad(inputs, **kw) -> str:
    with pytest.raises(DataError) as e:
        read(inputs, **kw)
    msg = str(e.value)
    assert "\n" not in msg and "expected" in msg
    return msg


def test_gzip_inputs(tmp_path):
    raw = "".join(json.dumps({"text": t}) + "\n" for t in TEXTS).encode()
    (tmp_path / "ok.jsonl.gz").write_bytes(gzip.compress(raw))
    docs, stats = read([tmp_path / "ok.jsonl.gz"])
    assert docs == TEXTS and stats.done == stats.total == (tmp_path / "ok.jsonl.gz").stat().st_size
    (tmp_path / "plain.jsonl.gz").write_bytes(raw)
    assert "plain.jsonl.gz: not gzip data (starts with b'{\"'" in bad([tmp_path / "plain.jsonl.gz"])
    (tmp_path / "cut.txt.gz").write_bytes(gzip.compress(raw * 200)[:-50])
    msg = bad([tmp_path / "cut.txt.gz"])
    assert "cut.txt.gz: unreadable (" in msg and "expected gzip-compressed UTF-8 text" in msg
    (tmp_path / "t.parquet.gz").write_bytes(gzip.compress(b"x"))
    assert "t.parquet.gz: a gzip-compressed .parquet file is not read" in bad([tmp_path / "t.parquet.gz"])


def test_json_lines_and_arrays(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"text": t} for t in TEXTS], indent=1))
    assert read([tmp_path / "a.json"])[0] == TEXTS
    (tmp_path / "bad.json").write_text('[{"text": "a"},')
    assert "bad.json: invalid JSON array (" in bad([tmp_path / "bad.json"])
    (tmp_path / "mixed.jsonl").write_text('{"text": "a"}\n\n[1, 2]\n{"text": 5}\nnot json\n{"text": "b"}\n')
    assert "mixed.jsonl:3: record is a JSON list, expected an object with key 'text'" in bad([tmp_path / "mixed.jsonl"])
    docs, stats = read([tmp_path / "mixed.jsonl"], skip_bad_records=True)
    assert docs == ["a", "b"] and stats.skipped == 3 and stats.done == stats.total


def test_csv(tmp_path):
    import pyarrow as pa
    import pyarrow.csv as pacsv

    pacsv.write_csv(pa.table({"id": [1, 2, 3], "text": TEXTS}), tmp_path / "ok.csv")
    docs, stats = read([tmp_path / "ok.csv"])
    assert docs == TEXTS and stats.done == stats.total
    (tmp_path / "ok.csv.gz").write_bytes(gzip.compress((tmp_path / "ok.csv").read_bytes()))
    assert read([tmp_path / "ok.csv.gz"])[0] == TEXTS
    (tmp_path / "rows.csv").write_text("text,id\na,1\nb,2,3\n")
    msg = bad([tmp_path / "rows.csv"])
    assert "rows.csv: unreadable (CSV parse error: Row #3: Expected 2 columns, got 3" in msg
    assert "expected a CSV file with a header row with a string column 'text'" in msg
    (tmp_path / "cols.csv").write_text("body,id\na,1\n")
    assert "cols.csv: CSV file has no column 'text' (its columns: body, id" in bad([tmp_path / "cols.csv"])


def test_arrow_stream_and_file(tmp_path):
    import pyarrow as pa
    import pyarrow.feather as feather

    table = pa.table({"text": TEXTS, "n": [1, 2, 3]})
    with pa.ipc.new_stream(tmp_path / "s.arrow", table.schema) as w:  # the format HF datasets writes
        w.write_table(table, max_chunksize=2)
    feather.write_feather(table, tmp_path / "f.arrow")
    for name in ("s.arrow", "f.arrow"):
        docs, stats = read([tmp_path / name])
        assert docs == TEXTS and stats.done == stats.total, name
    (tmp_path / "g.arrow").write_bytes(b"not arrow at all")
    assert "g.arrow: unreadable (" in bad([tmp_path / "g.arrow"])
    assert "s.arrow: Arrow stream has no column 'body'" in bad([tmp_path / "s.arrow"], json_key="body")


def test_parquet_garbage_and_corruption(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "g.parquet").write_bytes(b"garbage, not parquet")
    assert "g.parquet: unreadable (Parquet magic bytes not found" in bad([tmp_path / "g.parquet"])
    pq.write_table(pa.table({"text": [f"row {i} " * 30 for i in range(3000)]}), tmp_path / "c.parquet",
                   row_group_size=500, compression="snappy")
    data = bytearray((tmp_path / "c.parquet").read_bytes())
    data[4000:8000] = b"\xab" * 4000  # inside the data pages; the footer still opens
    (tmp_path / "c.parquet").write_bytes(bytes(data))
    msg = bad([tmp_path / "c.parquet"])
    assert msg.startswith(f"{tmp_path / 'c.parquet'}: unreadable (") and "expected a parquet file" in msg
    pq.write_table(pa.table({"text": ["a", None, "b"]}), tmp_path / "null.parquet")
    assert "null.parquet: row 1: column 'text' holds NoneType, expected a string" in bad([tmp_path / "null.parquet"])


def test_progress_is_bytes_of_the_file(tmp_path):
    """Bytes as stored, not characters: multi-byte text and JSON syntax would leave a character count short."""
    path = tmp_path / "big.jsonl"
    rng = np.random.default_rng(0)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(12000):
            text = f"документ {i} " * int(rng.integers(1, 30))
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    stats = SourceStats()
    seen = [stats.done for _ in iter_documents([str(path)], stats=stats)]
    assert stats.total == path.stat().st_size and stats.unit == "B"
    assert seen == sorted(seen) and stats.done == stats.total
    assert 0 < seen[len(seen) // 2] < stats.total  # moves through the file, not in one jump at the end
    chars = sum(len(json.loads(line)["text"]) for line in path.read_text("utf-8").splitlines())
    assert chars < 0.7 * stats.total  # what the old character-based bar would have reached


def test_dataset_inputs(tmp_path):
    datasets = pytest.importorskip("datasets")

    datasets.disable_progress_bars()
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": TEXTS}),
                          "validation": datasets.Dataset.from_dict({"text": TEXTS[:1]})}).save_to_disk(saved)
    stats = SourceStats()
    assert list(iter_documents(None, dataset=str(saved), split="validation", stats=stats)) == TEXTS[:1]
    assert (stats.unit, stats.total, stats.done) == ("doc", 1, 1)
    with pytest.raises(DataError, match=r"split 'test'\): no such split \(its splits: train, validation"):
        iter_documents(None, dataset=str(saved), split="test")
    files = tmp_path / "files"
    files.mkdir()
    (files / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    stats = SourceStats()
    assert list(iter_documents(None, dataset=str(files), split="train", stats=stats)) == TEXTS
    assert stats.total is None and stats.done == 3  # streamed, size unknown: no ETA
    with pytest.raises(DataError, match=r"files' \(split 'train'\): no column 'body' \(its columns: text\); expected"):
        list(iter_documents(None, dataset=str(files), json_key="body"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "train.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(DataError, match=r"broken' \(split 'train'\): reading failed at row 0 \(.*\); expected"):
        list(iter_documents(None, dataset=str(broken)))
    with pytest.raises(DataError, match=r"could not be loaded \(.*\); expected a dataset name"):
        iter_documents(None, dataset=str(tmp_path / "no-such-dataset"))
