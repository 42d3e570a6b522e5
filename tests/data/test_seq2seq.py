"""Seq2seq pairs: aligned shards from two JSON keys, padded samples whose labels count real target tokens only, and
one clear line for shards that do not line up."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np
import pytest

from megatron_lite.data import GlobalBatchLoader, IndexedDataset, IndexedDatasetWriter, build_datasets, load_tokenizer
from megatron_lite.data.errors import DataError
from megatron_lite.data.seq2seq import target_prefix

from .conftest import WORDS, data_cfg

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))


def write_pairs(prefix: str, n: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Sources of 2-20 unique ids and targets that are the source reversed and doubled: each names its pair."""
    rng = np.random.default_rng(seed)
    pairs, t = [], 1000
    with IndexedDatasetWriter(prefix, np.int32) as ws, IndexedDatasetWriter(target_prefix(prefix), np.int32) as wt:
        for _ in range(n):
            k = int(rng.integers(2, 20))
            src = np.arange(t, t + k)
            tgt = np.concatenate([src[::-1], src])
            ws.add_document(src)
            wt.add_document(tgt)
            pairs.append((src, tgt))
            t += k
    return pairs


def test_samples_are_aligned_padded_pairs(tmp_path) -> None:
    prefix = str(tmp_path / "pairs")
    pairs = write_pairs(prefix, 120)
    cfg = dataclasses.replace(data_cfg(prefix, tmp_path, split="90,10,0", seq_len=12), objective="seq2seq",
                              target_seq_len=16)
    out = build_datasets(cfg, {"train": 200}, log=lambda _: None)
    by_first = {int(s[0]): (s, t) for s, t in pairs}
    ds = out["train"]
    assert len(ds) == 200 and len(out["valid"]) == 12  # valid: one epoch of its documents
    for i in range(len(ds)):
        s = ds[i]
        src, tgt = by_first[int(s["input_ids"][0])]
        n, m = min(src.size, 12), min(tgt.size, 16)
        assert s["input_ids"].shape == (12,) and s["labels"].shape == (16,)
        assert s["padding_mask"].tolist() == [True] * n + [False] * (12 - n)
        assert s["input_ids"][:n].tolist() == src[:n].tolist()
        assert s["labels"].tolist() == tgt[:m].tolist() + [-100] * (16 - m)  # the pair of that very source


def test_loader_stacks_pairs(tmp_path) -> None:
    prefix = str(tmp_path / "pairs")
    write_pairs(prefix, 40)
    cfg = dataclasses.replace(data_cfg(prefix, tmp_path, split="1,0,0", seq_len=8), objective="seq2seq")
    ds = build_datasets(cfg, {"train": 16}, log=lambda _: None)["train"]
    loader = GlobalBatchLoader(ds, global_batch_size=8, micro_batch_size=2, dp_rank=1, dp_size=2, prefetch=0)
    mbs = next(iter(loader))
    assert len(mbs) == 2 and set(mbs[0]) == {"input_ids", "padding_mask", "labels"}
    assert mbs[0]["input_ids"].shape == (2, 8) and mbs[0]["labels"].dtype.is_floating_point is False
    assert mbs[1]["labels"][1].tolist() == ds[7]["labels"].tolist()  # rank 1's second microbatch ends at sample 7


def test_misaligned_or_missing_targets_are_refused(tmp_path) -> None:
    prefix = str(tmp_path / "pairs")
    write_pairs(prefix, 30)
    cfg = dataclasses.replace(data_cfg(prefix, tmp_path, split="1,0,0", seq_len=8), objective="seq2seq")
    with IndexedDatasetWriter(target_prefix(prefix), np.int32, overwrite=True) as w:
        w.add_document(np.arange(3))
    with pytest.raises(DataError, match=r"30 source documents but .*pairs_target holds 1 targets"):
        build_datasets(cfg, {"train": 8}, log=lambda _: None)
    other = str(tmp_path / "alone")
    with IndexedDatasetWriter(other, np.int32) as w:
        w.add_document(np.arange(3))
    with pytest.raises(DataError, match=r"alone_target.idx not found: data.objective=seq2seq"):
        build_datasets(dataclasses.replace(cfg, prefixes=other), {"train": 8}, log=lambda _: None)


def test_preprocess_writes_aligned_shards(tmp_path, tokenizer_dir) -> None:
    from preprocess_data import main

    rng = np.random.default_rng(3)
    records = []
    path = tmp_path / "pairs.jsonl"
    with open(path, "w") as f:
        for i in range(60):
            words = [str(w) for w in rng.choice(WORDS, int(rng.integers(1, 9)))]
            records.append({"src": " ".join(words), "tgt": " ".join(reversed(words)) + f" {i}"})
            f.write(json.dumps(records[-1]) + "\n")
    prefix = str(tmp_path / "out" / "rev")
    argv = ["--input", str(path), "--tokenizer", str(tokenizer_dir), "--output-prefix", prefix, "--json-key", "src",
            "--target-key", "tgt", "--append-eod", "--workers", "2", "--no-progress"]
    assert main(argv) == 0
    tok = load_tokenizer(tokenizer_dir)
    src, tgt = IndexedDataset(prefix), IndexedDataset(target_prefix(prefix))
    assert src.num_documents == tgt.num_documents == 60
    for k in (0, 31, 59):
        assert tok.decode(src.document(k)[:-1].tolist()) == records[k]["src"]
        assert tok.decode(tgt.document(k)[:-1].tolist()) == records[k]["tgt"]
        assert src.document(k)[-1] == tgt.document(k)[-1] == tok.eod_id
    with pytest.raises(DataError, match="--skip-bad-records cannot be combined with --target-key"):
        main([*argv, "--overwrite", "--skip-bad-records"])
