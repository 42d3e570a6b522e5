import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_lite.data import DataError, IndexedDataset, load_tokenizer
from megatron_lite.data.preprocess import preprocess

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def tool(name, *args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / name), *map(str, args)], capture_output=True,
                          text=True, env=ENV, timeout=120)


def test_cli_end_to_end(tmp_path, corpus):
    r = tool("train_tokenizer.py", "--input", corpus, "--vocab-size", "320", "--output", tmp_path / "tok",
             "--sentinels", "3")
    assert r.returncode == 0, r.stderr
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.eod_id == 0 and tok.pad_id == 1 and len(tok.sentinel_ids) == 3
    for i, n in enumerate((1, 2)):
        r = tool("preprocess_data.py", "--input", corpus, "--tokenizer", tmp_path / "tok", "--output-prefix",
                 tmp_path / f"w{n}", "--workers", n, "--append-eod")
        assert r.returncode == 0, r.stderr
        assert "300 documents" in r.stdout and "tokens/s" in r.stdout
    assert (tmp_path / "w1.bin").read_bytes() == (tmp_path / "w2.bin").read_bytes()
    assert (tmp_path / "w1.idx").read_bytes() == (tmp_path / "w2.idx").read_bytes()
    ds = IndexedDataset(tmp_path / "w1")
    first = json.loads(corpus.read_text().splitlines()[0])["text"]
    assert ds.dtype == np.uint16 and ds[0].tolist() == tok.encode(first) + [tok.eod_id]
    r = tool("merge_shards.py", "--inputs", tmp_path / "w1", tmp_path / "w2", "--output-prefix", tmp_path / "m")
    assert r.returncode == 0, r.stderr
    assert IndexedDataset(tmp_path / "m").num_documents == 600
    r = tool("preprocess_data.py", "--input", corpus, "--tokenizer", tmp_path / "tok", "--output-prefix", tmp_path / "w1")
    assert r.returncode == 2 and r.stderr.strip().startswith("error: ") and "already exists" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_workers_give_identical_bytes_in_process(tmp_path, corpus, tokenizer_dir, monkeypatch):
    import megatron_lite.data.preprocess as pp

    monkeypatch.setattr(pp, "CHUNK_DOCS", 7)  # many small chunks, so ordering across workers is exercised
    for n in (1, 2):
        preprocess([str(corpus)], str(tokenizer_dir), str(tmp_path / f"o{n}"), workers=n, progress=False,
                   log=lambda s: None)
    assert (tmp_path / "o1.bin").read_bytes() == (tmp_path / "o2.bin").read_bytes()
    assert (tmp_path / "o1.idx").read_bytes() == (tmp_path / "o2.idx").read_bytes()


def test_text_and_parquet_inputs(tmp_path, tokenizer_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("first block\nstill first\n\n\nsecond block\n")
    pq.write_table(pa.table({"content": ["x y", "z"]}), tmp_path / "b.parquet")
    s = preprocess([str(tmp_path / "a.txt")], str(tokenizer_dir), str(tmp_path / "t"), progress=False, log=print)
    assert s.documents == 2
    s = preprocess([str(tmp_path / "a.txt")], str(tokenizer_dir), str(tmp_path / "f"), text_mode="file",
                   progress=False, log=print)
    assert s.documents == 1
    s = preprocess([str(tmp_path / "b.parquet")], str(tokenizer_dir), str(tmp_path / "p"), json_key="content",
                   progress=False, log=print)
    assert s.documents == 2
    with pytest.raises(DataError, match=r"b.parquet: parquet file has no column 'text'"):
        preprocess([str(tmp_path / "b.parquet")], str(tokenizer_dir), str(tmp_path / "q"), progress=False)


def run_bad(tmp_path, tokenizer_dir, inputs, **kw):
    args = dict(progress=False, log=lambda s: None)
    args.update(kw)
    out = str(tmp_path / "bad")
    with pytest.raises(DataError) as e:
        preprocess([str(p) for p in inputs], str(kw.pop("tokenizer", tokenizer_dir)), out,
                   **{k: v for k, v in args.items() if k != "tokenizer"})
    assert not any(p.name.startswith("bad.") for p in tmp_path.iterdir()), "partial output left behind"
    return str(e.value)


def test_bad_inputs(tmp_path, tokenizer_dir):
    assert "missing.jsonl: input file not found" in run_bad(tmp_path, tokenizer_dir, [tmp_path / "missing.jsonl"])
    (tmp_path / "empty.jsonl").write_text("")
    assert "empty.jsonl: input file is empty" in run_bad(tmp_path, tokenizer_dir, [tmp_path / "empty.jsonl"])
    lines = [{"text": "ok"}, {"body": "no text key"}, {"text": "ok again"}]
    (tmp_path / "nokey.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    msg = run_bad(tmp_path, tokenizer_dir, [tmp_path / "nokey.jsonl"])
    assert "nokey.jsonl:2: record has no key 'text'" in msg and "body" in msg
    s = preprocess([str(tmp_path / "nokey.jsonl")], str(tokenizer_dir), str(tmp_path / "skipped"),
                   skip_bad_records=True, progress=False, log=lambda s: None)
    assert s.documents == 2 and s.skipped == 1
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{"text": \n')
    assert "broken.jsonl:2: invalid JSON" in run_bad(tmp_path, tokenizer_dir, [tmp_path / "broken.jsonl"])
    (tmp_path / "tok.json").write_text("{not a tokenizer")
    msg = run_bad(tmp_path, tokenizer_dir, [tmp_path / "nokey.jsonl"], tokenizer=tmp_path / "tok.json")
    assert "tok.json: unreadable tokenizer" in msg
    assert "tokenizer not found" in run_bad(tmp_path, tokenizer_dir, [tmp_path / "nokey.jsonl"],
                                            tokenizer=tmp_path / "nope")
    (tmp_path / "blank.txt").write_text("\n\n\n")
    assert "no documents found" in run_bad(tmp_path, tokenizer_dir, [tmp_path / "blank.txt"])


def test_vocabulary_too_large_for_dtype(tmp_path):
    from megatron_lite.data import DType

    with pytest.raises(DataError, match="vocabulary size 3000000000 is too large"):
        DType.for_vocab(3_000_000_000)


def test_cli_bad_input_exits_2(tmp_path, tokenizer_dir):
    r = tool("preprocess_data.py", "--input", tmp_path / "nothing.jsonl", "--tokenizer", tokenizer_dir,
             "--output-prefix", tmp_path / "o")
    assert r.returncode == 2 and r.stderr == f"error: {tmp_path / 'nothing.jsonl'}: input file not found\n"
