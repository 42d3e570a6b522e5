"""T5 span corruption: T5's lengths, ~15% noise, sentinels in order, inputs + targets give back the text exactly,
and samples that are a function of (seed, global index)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from megatron_lite.data import build_datasets, load_tokenizer
from megatron_lite.data.errors import DataError
from megatron_lite.data.gpt_dataset import GPTDataset
from megatron_lite.data.indexed import IndexedDataset
from megatron_lite.data.span_corruption import SpanCorruptionDataset, corrupt, noise_mask, raw_length_for, span_lengths

from .conftest import data_cfg, write_shard

SENTINELS = list(range(50, 90))  # below the shard's token ids (which start at 1000), so each sentinel is unambiguous
EOS = 7


def test_lengths_follow_t5() -> None:
    assert raw_length_for(512) == 568 and span_lengths(568) == (512, 114)
    assert span_lengths(raw_length_for(8))[0] <= 8  # tiny: the clamps (one span at least) still fit
    for inputs in (31, 64, 100, 128, 256, 1024):
        raw = raw_length_for(inputs)
        noise, spans = round(0.15 * raw), round(round(0.15 * raw) / 3)
        assert span_lengths(raw) == (raw - noise + spans + 1, noise + spans + 1)
        assert span_lengths(raw)[0] <= inputs < span_lengths(raw + 1)[0]  # the largest window that fits


def windows(tmp_path, inputs_length: int = 64):
    prefix = str(tmp_path / "shard")
    write_shard(prefix, 300, start=1000)
    reader = IndexedDataset(prefix)
    raw = raw_length_for(inputs_length)
    return GPTDataset(reader, (0, reader.num_documents), raw - 1, seed=5, num_samples=40, cache_dir=str(tmp_path))


def reassemble(inputs: np.ndarray, targets: np.ndarray) -> list[int]:
    """Put each sentinel's span from the targets back in its place in the inputs."""
    spans, current = {}, None
    for t in targets[:-1].tolist():
        if t in SENTINELS:
            current = t
            spans[current] = []
        else:
            spans[current].append(t)
    out = []
    for t in inputs[:-1].tolist():
        out.extend(spans[t] if t in SENTINELS else [t])
    return out


def test_samples(tmp_path) -> None:
    raw = windows(tmp_path)
    ds = SpanCorruptionDataset(raw, 64, SENTINELS, EOS, seed=11)
    noise_share = []
    for i in range(len(ds)):
        s = ds[i]
        assert s["input_ids"].shape == (ds.inputs_length,) == (64,)
        assert s["labels"].shape == (ds.targets_length,)
        assert s["input_ids"][-1] == EOS and s["labels"][-1] == EOS
        used_in = [t for t in s["input_ids"].tolist() if t in SENTINELS]
        used_out = [t for t in s["labels"].tolist() if t in SENTINELS]
        assert used_in == used_out == SENTINELS[: len(used_in)]  # one per span, in order, the same on both sides
        assert reassemble(s["input_ids"], s["labels"]) == raw[i]["tokens"].tolist()
        noise_share.append((len(s["labels"]) - len(used_out) - 1) / ds.raw_length)
    assert np.allclose(noise_share, round(0.15 * ds.raw_length) / ds.raw_length)
    assert abs(np.mean(noise_share) - 0.15) < 0.01


def test_deterministic_by_seed_and_index(tmp_path) -> None:
    raw = windows(tmp_path)
    a = SpanCorruptionDataset(raw, 64, SENTINELS, EOS, seed=11)
    b = SpanCorruptionDataset(raw, 64, SENTINELS, EOS, seed=11)
    c = SpanCorruptionDataset(raw, 64, SENTINELS, EOS, seed=12)
    for i in (0, 17, 39, 3):  # any order: no state carries from one sample to the next
        assert np.array_equal(a[i]["input_ids"], b[i]["input_ids"])
        assert np.array_equal(a[i]["labels"], b[i]["labels"])
    assert any(not np.array_equal(a[i]["input_ids"], c[i]["input_ids"]) for i in range(5))


def test_span_lengths_average_three() -> None:
    rng = np.random.default_rng(0)
    runs = []
    for _ in range(200):
        m = noise_mask(568, 0.15, 3.0, rng)
        assert not m[0] and m.sum() == 85
        edges = np.flatnonzero(np.diff(np.concatenate(([0], m.astype(int), [0]))))
        runs.extend(edges[1::2] - edges[::2])
    assert len(runs) == 200 * 28 and np.mean(runs) == pytest.approx(85 / 28)


def test_too_few_sentinels_is_one_clear_error(tmp_path) -> None:
    with pytest.raises(DataError, match=r"makes 11 spans, but the tokenizer has 2 sentinels; .*--sentinels 11"):
        SpanCorruptionDataset(windows(tmp_path, 200), 200, [1, 2], EOS, seed=0)
    with pytest.raises(DataError, match="must start with a kept token"):
        corrupt(np.arange(4), np.array([True, False, False, True]), SENTINELS, EOS)


def test_built_from_config_with_tokenizer_sentinels(tmp_path, tokenizer_dir) -> None:
    write_shard(str(tmp_path / "shard"), 300, start=1000)
    cfg = dataclasses.replace(data_cfg(str(tmp_path / "shard"), tmp_path, seq_len=24), objective="span_corruption",
                              tokenizer=str(tokenizer_dir))
    tok = load_tokenizer(tokenizer_dir)
    assert len(tok.sentinel_ids) == 2  # train_tokenizer.py --sentinels 2
    out = build_datasets(cfg, {"train": 16}, log=lambda _: None)
    ds = out["train"]
    assert ds.sentinels == tok.sentinel_ids and ds.eos_id == tok.eod_id
    s = ds[3]
    assert s["input_ids"].size == 24 and s["labels"][0] == tok.sentinel_ids[0]
    with pytest.raises(DataError, match="sentinels from data.tokenizer, which is not set"):
        build_datasets(dataclasses.replace(cfg, tokenizer=None), {"train": 16}, log=lambda _: None)
