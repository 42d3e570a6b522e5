"""Small corpora and shards generated per test."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from megatron_lite.config import DataConfig
from megatron_lite.data import IndexedDatasetWriter

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = "the of and data model train token sample shard index epoch blend split loader seed".split()


def write_shard(prefix, n_docs: int, seed: int = 0, max_len: int = 30, dtype=np.int32, start: int = 0) -> list:
    """Documents whose tokens are unique consecutive ids, so every token names its place in the corpus."""
    rng = np.random.default_rng(seed)
    docs, t = [], start
    with IndexedDatasetWriter(prefix, dtype) as w:
        for _ in range(n_docs):
            n = int(rng.integers(1, max_len))
            d = np.arange(t, t + n)
            w.add_document(d)
            docs.append(d)
            t += n
    return docs


@pytest.fixture(autouse=True, scope="session")
def _fast_bpe_cache(tmp_path_factory):
    """Checked rank tables go to a directory of this session's, not the user's cache."""
    os.environ["MEGATRON_LITE_CACHE"] = str(tmp_path_factory.mktemp("fast_bpe_cache"))


@pytest.fixture
def shard(tmp_path):
    prefix = str(tmp_path / "shard")
    docs = write_shard(prefix, 200)
    return prefix, docs


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "corpus.jsonl"
    with open(path, "w") as f:
        for i in range(300):
            text = " ".join(rng.choice(WORDS) for _ in range(int(rng.integers(1, 40))))
            f.write(json.dumps({"text": f"Document {i}: {text}.", "id": i}) + "\n")
    return path


@pytest.fixture
def tokenizer_dir(tmp_path, corpus):
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
    from train_tokenizer import main

    out = tmp_path / "tok"
    assert main(["--input", str(corpus), "--vocab-size", "300", "--output", str(out), "--sentinels", "2"]) == 0
    return out


def data_cfg(prefixes, tmp_path, split="98,1,1", seq_len=16, seed=1234, reset=False):
    return DataConfig(prefixes=prefixes, split=split, seq_len=seq_len, seed=seed, reset_at_document=reset,
                      cache_dir=str(tmp_path / "cache"), prefetch=2)
