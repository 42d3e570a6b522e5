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


def run_main(*args) -> int:
    sys.path.insert(0, str(ROOT / "tools"))
    from preprocess_data import main

    return main([str(a) for a in args] + ["--no-progress"])


def wordlevel_tokenizer(path, vocab: dict) -> Path:
    """A tokenizers JSON written by hand: whitespace-separated words looked up in ``vocab`` (ids chosen freely)."""
    spec = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
            "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}}
    path.write_text(json.dumps(spec))
    return path


def test_cli_dtype_from_largest_id_not_entry_count(tmp_path):
    """Four entries, but one id above uint16's range: the dtype must come from the largest id."""
    tok = wordlevel_tokenizer(tmp_path / "tokenizer.json", {"[UNK]": 0, "<|endoftext|>": 1, "hello": 2, "world": 70000})
    (tmp_path / "c.jsonl").write_text('{"text": "hello world"}\n{"text": "world"}\n')
    r = tool("preprocess_data.py", "--input", tmp_path / "c.jsonl", "--tokenizer", tok, "--output-prefix",
             tmp_path / "o", "--append-eod", "--no-progress")
    assert r.returncode == 0, r.stderr
    ds = IndexedDataset(tmp_path / "o")
    assert ds.dtype == np.int32 and [ds[i].tolist() for i in range(2)] == [[2, 70000, 1], [70000, 1]]


def test_cli_id_beyond_int32_is_one_line(tmp_path):
    tok = wordlevel_tokenizer(tmp_path / "tokenizer.json", {"[UNK]": 0, "<|endoftext|>": 1, "world": 3_000_000_000})
    (tmp_path / "c.jsonl").write_text('{"text": "world"}\n')
    r = tool("preprocess_data.py", "--input", tmp_path / "c.jsonl", "--tokenizer", tok, "--output-prefix",
             tmp_path / "o", "--no-progress")
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"{tok}: token id 3000000000 ('world') does not fit int32" in r.stderr
    assert not list(tmp_path.glob("o.*"))


def test_encoded_id_outside_dtype_names_tokenizer_id_and_dtype():
    from megatron_lite.data.preprocess import _encode_chunk

    class Emits70000:
        file, eod_id = "/models/tok.json", 0

        def encode_packed(self, texts, append_eod):
            return np.array([1, 2, 70000]), np.array([2, 1])

    with pytest.raises(DataError, match=r"^/models/tok.json: token id 70000 does not fit the output dtype uint16 "
                                        r"\(expected ids 0..65535"):
        _encode_chunk(["a", "b"], Emits70000(), False, np.dtype(np.uint16))


def test_cli_bad_files_are_one_line(tmp_path, tokenizer_dir):
    (tmp_path / "fake.jsonl.gz").write_text('{"text": "not compressed"}\n')
    (tmp_path / "rows.csv").write_text("text,id\na,1\nb,2,3\n")
    for name, expected in (("fake.jsonl.gz", "not gzip data"), ("rows.csv", "expected a CSV file")):
        r = tool("preprocess_data.py", "--input", tmp_path / name, "--tokenizer", tokenizer_dir, "--output-prefix",
                 tmp_path / "o", "--no-progress")
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert r.stderr.startswith(f"error: {tmp_path / name}: ") and expected in r.stderr
    assert not list(tmp_path.glob("o.*"))


def test_cli_overwrite_keeps_old_output_on_failure_and_replaces_both_on_success(tmp_path, corpus, tokenizer_dir):
    out = tmp_path / "out"
    assert run_main("--input", corpus, "--tokenizer", tokenizer_dir, "--output-prefix", out) == 0
    old = (out.with_suffix(".bin").read_bytes(), out.with_suffix(".idx").read_bytes())
    old_sidecar = out.with_suffix(".json").read_text()
    lines = corpus.read_text().splitlines()
    lines[150] = json.dumps({"body": "no text key"})
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    r = tool("preprocess_data.py", "--input", tmp_path / "bad.jsonl", "--tokenizer", tokenizer_dir, "--output-prefix",
             out, "--overwrite", "--no-progress")
    assert r.returncode == 2 and "bad.jsonl:151: record has no key 'text'" in r.stderr
    assert (out.with_suffix(".bin").read_bytes(), out.with_suffix(".idx").read_bytes()) == old
    assert out.with_suffix(".json").read_text() == old_sidecar  # the sidecar still describes the kept shards
    assert sorted(p.name for p in tmp_path.glob("out*")) == ["out.bin", "out.idx", "out.json"]
    (tmp_path / "small.jsonl").write_text("\n".join(lines[:100]) + "\n")
    assert run_main("--input", tmp_path / "small.jsonl", "--tokenizer", tokenizer_dir, "--output-prefix", out,
                    "--overwrite") == 0
    assert run_main("--input", tmp_path / "small.jsonl", "--tokenizer", tokenizer_dir, "--output-prefix",
                    tmp_path / "fresh") == 0
    for suffix in (".bin", ".idx"):
        assert out.with_suffix(suffix).read_bytes() == (tmp_path / "fresh").with_suffix(suffix).read_bytes()
    assert IndexedDataset(out).num_documents == 100
    assert json.loads(out.with_suffix(".json").read_text())["documents"] == 100
    assert sorted(p.name for p in tmp_path.glob("out*")) == ["out.bin", "out.idx", "out.json"]


def test_cli_dataset_directory_matches_file_input(tmp_path, corpus, tokenizer_dir):
    """--dataset with a local directory of data files, which HF datasets loads offline."""
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.jsonl").write_text(corpus.read_text())
    r = tool("preprocess_data.py", "--dataset", tmp_path / "ds", "--split", "train", "--tokenizer", tokenizer_dir,
             "--output-prefix", tmp_path / "via_ds", "--append-eod", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "300 documents" in r.stdout
    assert run_main("--input", corpus, "--tokenizer", tokenizer_dir, "--output-prefix", tmp_path / "via_file",
                    "--append-eod") == 0
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"via_ds{suffix}").read_bytes() == (tmp_path / f"via_file{suffix}").read_bytes()


def test_dataset_saved_to_disk(tmp_path, corpus, tokenizer_dir):
    datasets = pytest.importorskip("datasets")

    datasets.disable_progress_bars()
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts}),
                          "validation": datasets.Dataset.from_dict({"text": texts[:7]})}).save_to_disk(tmp_path / "hf")
    assert run_main("--dataset", tmp_path / "hf", "--split", "validation", "--tokenizer", tokenizer_dir,
                    "--output-prefix", tmp_path / "v") == 0
    tok = load_tokenizer(tokenizer_dir)
    ds = IndexedDataset(tmp_path / "v")
    assert [ds[i].tolist() for i in range(len(ds))] == [tok.encode(t) for t in texts[:7]]


def test_hf_tokenizer_directory_from_save_pretrained(tmp_path):
    """An eos name none of our defaults knows: only tokenizer_config.json can say which token ends a document."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    base = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2, "<doc_end>": 3, "<blank>": 4},
                                      unk_token="[UNK]"))
    base.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=base, eos_token="<doc_end>", pad_token="<blank>")
    hf.save_pretrained(tmp_path / "hf")
    tok = load_tokenizer(tmp_path / "hf")
    assert (tok.eod_id, tok.pad_id) == (3, 4)
    (tmp_path / "c.jsonl").write_text('{"text": "hello world"}\n{"text": "world"}\n')
    assert run_main("--input", tmp_path / "c.jsonl", "--tokenizer", tmp_path / "hf", "--output-prefix",
                    tmp_path / "o", "--append-eod") == 0
    ds = IndexedDataset(tmp_path / "o")
    assert ds.dtype == np.uint16 and [ds[i].tolist() for i in range(2)] == [[1, 2, 3], [2, 3]]


def test_slow_tokenizer_directory_is_refused(tmp_path):
    (tmp_path / "slow").mkdir()
    (tmp_path / "slow" / "vocab.json").write_text("{}")
    (tmp_path / "slow" / "merges.txt").write_text("")
    with pytest.raises(DataError, match=r"slow: directory has only a slow tokenizer \(vocab.json, merges.txt\), no "
                                        r"tokenizer.json \(expected an HF fast-tokenizer directory"):
        load_tokenizer(tmp_path / "slow")


def test_progress_bar_moves_in_the_unit_of_its_total(tmp_path, tokenizer_dir, monkeypatch):
    """The bar's total is the input size in bytes, so it must advance by bytes read and end exactly there."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    import megatron_lite.data.preprocess as pp

    bars = []

    class Recorder:
        def __init__(self, total, unit, enabled=True):
            bars.append({"total": total, "unit": unit, "done": []})

        def update(self, done, documents, tokens):
            bars[-1]["done"].append(done)

        def close(self, keep=True):
            bars[-1]["kept"] = keep

    monkeypatch.setattr(pp, "PreprocessProgress", Recorder)
    monkeypatch.setattr(pp, "CHUNK_DOCS", 16)
    texts = [f"naïve café ☕ {i} " * (i % 7 + 1) for i in range(200)]
    raw = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts).encode()
    (tmp_path / "a.jsonl").write_bytes(raw)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(raw))
    pq.write_table(pa.table({"text": texts}), tmp_path / "c.parquet", row_group_size=50)
    files = [tmp_path / n for n in ("a.jsonl", "b.jsonl.gz", "c.parquet")]
    preprocess([str(p) for p in files], str(tokenizer_dir), str(tmp_path / "o"), progress=True, log=lambda s: None)
    bar = bars[-1]
    assert bar["unit"] == "B" and bar["total"] == sum(p.stat().st_size for p in files)
    assert bar["done"] == sorted(bar["done"]) and bar["done"][-1] == bar["total"] and len(set(bar["done"])) > 3
    assert bar["kept"]


def test_progress_without_a_known_total(tmp_path):
    from megatron_lite.data.progress import PreprocessProgress

    bar = PreprocessProgress(None, "doc")
    bar.update(5, 5, 100)
    bar.update(3, 5, 100)  # never backwards
    assert bar.position == 5 and "ETA" not in str(bar._bar) and "<" not in str(bar._bar)
    bar.close()
