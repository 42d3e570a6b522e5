import os

import numpy as np
import pytest
from .conftest import data_cfg, write_shard

from megatron_lite.data import DataError, GPTDataset, IndexedDataset, build_datasets, parse_blend
from megatron_lite.data.blend import blend_indices, greedy_assignment, normalize
from megatron_lite.data.splits import split_ranges


def test_every_token_once_per_epoch(shard, tmp_path):
    prefix, docs = shard
    r = IndexedDataset(prefix)
    seq = 7
    ds = GPTDataset(r, (20, 180), seq_len=seq, seed=3, num_samples=800, cache_dir=tmp_path / "c")
    split_tokens = np.concatenate(docs[20:180])
    T = split_tokens.size
    assert ds.tokens_per_epoch == T and ds.epochs >= 2
    n_built = ds.sample_index.shape[0] - 1
    stream = np.concatenate([ds.unshuffled(j)["tokens"][:-1] for j in range(n_built)])
    for e in range(len(stream) // T):
        assert np.array_equal(np.sort(stream[e * T:(e + 1) * T]), np.sort(split_tokens))
    # consecutive samples share one token; labels are inputs shifted by one
    a, b = ds.unshuffled(0)["tokens"], ds.unshuffled(1)["tokens"]
    assert a[-1] == b[0] and a.size == seq + 1 and a.dtype == np.int64
    # the shuffle is a permutation of the built samples
    assert np.array_equal(np.sort(ds.shuffle_index), np.arange(n_built))


def test_no_sample_crosses_a_split(shard, tmp_path):
    prefix, docs = shard
    cfg = data_cfg(prefix, tmp_path, split="80,10,10", seq_len=8)
    out = build_datasets(cfg, {"train": 300, "valid": 50, "test": 50}, log=lambda s: None)
    ranges = split_ranges("80,10,10", len(docs))
    for name, ds in out.items():
        a, b = ranges[name]
        allowed = set(np.concatenate(docs[a:b]).tolist())
        for i in range(len(ds)):
            assert set(ds[i]["tokens"].tolist()) <= allowed, name


def test_sample_is_pure_function_of_seed_and_index(shard, tmp_path):
    prefix, _ = shard
    r = IndexedDataset(prefix)
    small = GPTDataset(r, (0, 200), seq_len=9, seed=5, num_samples=100, cache_dir=tmp_path / "c1")
    large = GPTDataset(r, (0, 200), seq_len=9, seed=5, num_samples=1000, cache_dir=tmp_path / "c2")
    again = GPTDataset(r, (0, 200), seq_len=9, seed=5, num_samples=100, cache_dir=tmp_path / "c1")
    other = GPTDataset(r, (0, 200), seq_len=9, seed=6, num_samples=100, cache_dir=tmp_path / "c1")
    for i in range(100):
        assert np.array_equal(small[i]["tokens"], large[i]["tokens"])
        assert np.array_equal(small[i]["tokens"], again[i]["tokens"])
    assert any(not np.array_equal(small[i]["tokens"], other[i]["tokens"]) for i in range(100))
    assert len(os.listdir(tmp_path / "c1")) == 2  # one entry per seed, nothing left half-written


def test_document_features(tmp_path):
    prefix = str(tmp_path / "s")
    docs = write_shard(prefix, 40, max_len=6)
    r = IndexedDataset(prefix)
    ds = GPTDataset(r, (0, 40), seq_len=10, seed=0, num_samples=20, reset_at_document=True, cache_dir=tmp_path / "c")
    first_tokens = {int(d[0]) for d in docs}
    for i in range(len(ds)):
        s = ds[i]
        assert s["position_ids"].shape == s["document_ids"].shape == (10,)
        for p in range(1, 10):
            starts = int(s["tokens"][p]) in first_tokens
            assert (s["position_ids"][p] == 0) == starts
            assert (s["document_ids"][p] != s["document_ids"][p - 1]) == starts
            if not starts:
                assert s["position_ids"][p] == s["position_ids"][p - 1] + 1


def test_blend_within_one_sample_over_every_prefix():
    for weights in ([0.7, 0.3], [5, 3, 2], [0.91] + [0.01] * 9, [1, 1, 1]):
        w = normalize(weights)
        n = 20000
        idx = greedy_assignment(w, n)
        counts = np.cumsum(np.eye(len(w), dtype=np.int64)[idx], axis=0)
        expected = np.arange(1, n + 1)[:, None] * w[None, :]
        assert np.abs(counts - expected).max() < 1.0, weights


def test_blend_build_and_counts(tmp_path):
    write_shard(str(tmp_path / "web"), 300, seed=1)
    write_shard(str(tmp_path / "code"), 300, seed=2, start=10**6)
    logs = []
    cfg = data_cfg(f"0.7 {tmp_path}/web 0.3 {tmp_path}/code", tmp_path, split="100,0,0")
    out = build_datasets(cfg, {"train": 1000}, log=logs.append)
    assert set(out) == {"train"}
    train = out["train"]
    assert len(train) == 1000
    from_code = sum(int(train[i]["tokens"][0]) >= 10**6 for i in range(1000))
    assert from_code == 300
    assert any("code 300 (30.0%" in line for line in logs)
    _, _, counts = blend_indices([0.7, 0.3], 1000, tmp_path / "cache")
    assert counts.tolist() == [700, 300]


def test_parse_blend_forms():
    assert parse_blend("0.7 web 0.3 code") == [(0.7, "web"), (0.3, "code")]
    assert parse_blend(["web"]) == [(1.0, "web")]
    assert parse_blend("web") == [(1.0, "web")]
    assert parse_blend(["0.7", "web", "0.3", "code"]) == [(0.7, "web"), (0.3, "code")]
    with pytest.raises(DataError, match="blend weight -0.3 for 'code' is not positive"):
        parse_blend("0.7 web -0.3 code")
    with pytest.raises(DataError, match="blend weight 0 for 'code'"):
        parse_blend("1 web 0 code")
    with pytest.raises(DataError, match="expected pairs"):
        parse_blend("0.7 web code")


def test_split_errors(shard, tmp_path):
    prefix, _ = shard
    with pytest.raises(DataError, match="leaves valid empty"):
        split_ranges("98,1,1", 60, prefix)
    assert split_ranges("98,1,1", 1000, "x") == {"train": (0, 980), "valid": (980, 990), "test": (990, 1000)}
    assert set(split_ranges("9,1", 10)) == {"train", "valid"}
    with pytest.raises(DataError, match="expected"):
        split_ranges("a,b", 10)
    cfg = data_cfg(prefix, tmp_path, split="99.5,0.4,0.1")
    with pytest.raises(DataError, match=r"shard: split '99.5,0.4,0.1' leaves test empty"):
        build_datasets(cfg, {"train": 10})


def test_dataset_smaller_than_one_sample(tmp_path):
    prefix = str(tmp_path / "tiny")
    write_shard(prefix, 3, max_len=3)
    cfg = data_cfg(prefix, tmp_path, split="1", seq_len=64)
    with pytest.raises(DataError, match=r"tiny.*fewer than one sample of seq_len \+ 1 = 65"):
        build_datasets(cfg, {"train": 10})


def test_concurrent_cache_builders_agree_and_leave_no_partial_entry(shard, tmp_path):
    """Two builders of one entry, forced to overlap: one rename wins, both get identical arrays, no partial entry."""
    import threading

    from megatron_lite.data.cache import cached_arrays
    from megatron_lite.data.gpt_dataset import build_indices

    prefix, _ = shard
    r = IndexedDataset(prefix)
    both_building = threading.Barrier(2, timeout=30)

    def build():
        both_building.wait()  # neither publishes before both have missed the cache
        return build_indices(r.sequence_lengths, r.document_indices, (0, 200), 8, 3, 500)

    results, errors = [None, None], []

    def run(i):
        try:
            results[i] = cached_arrays(tmp_path / "cache", "gpt-race", {"k": 1}, build)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    a, b = results
    assert set(a) == set(b) == {"doc_index", "sample_index", "shuffle_index", "epochs"}
    assert all(np.array_equal(a[k], b[k]) for k in a)
    entries = os.listdir(tmp_path / "cache")
    assert len(entries) == 1 and entries[0].startswith("gpt-race-")  # no temporary directory left behind
    again = cached_arrays(tmp_path / "cache", "gpt-race", {"k": 1}, lambda: pytest.fail("should be cached"))
    assert all(np.array_equal(again[k], a[k]) for k in a)
