import pytest
import torch
from .conftest import data_cfg

from megatron_lite.config import ConfigError
from megatron_lite.data import GlobalBatchLoader, build_datasets


@pytest.fixture
def train(shard, tmp_path):
    prefix, _ = shard
    cfg = data_cfg(prefix, tmp_path, split="1", seq_len=8, reset=True)
    return build_datasets(cfg, {"train": 96}, log=lambda s: None)["train"]


def global_sequence(ds, dp, consumed=0, steps=None, prefetch=2, G=8, mb=None):
    """Per step, the global batch's input rows reassembled from every rank in rank order."""
    mb = mb or G // dp // (2 if G // dp >= 2 else 1)
    loaders = [GlobalBatchLoader(ds, G, mb, r, dp, consumed_samples=consumed, prefetch=prefetch) for r in range(dp)]
    out = []
    for per_rank in zip(*loaders):
        rows = [m["input_ids"] for rank in per_rank for m in rank]
        out.append(torch.cat(rows))
        if steps and len(out) == steps:
            break
    return out, loaders


def test_same_global_sequence_on_dp_1_2_4(train):
    ref, _ = global_sequence(train, 1, prefetch=0)
    assert len(ref) == len(train) // 8
    for dp in (2, 4):
        got, _ = global_sequence(train, dp)
        assert all(torch.equal(a, b) for a, b in zip(ref, got))
    expected = torch.stack([torch.from_numpy(train[i]["tokens"][:-1]) for i in range(8)])
    assert torch.equal(ref[0], expected)


def test_microbatch_contents(train):
    loader = GlobalBatchLoader(train, 8, 2, dp_rank=1, dp_size=2, prefetch=1)
    step = next(iter(loader))
    assert len(step) == 2
    m = step[0]
    assert set(m) == {"input_ids", "labels", "position_ids", "document_ids"}
    assert all(v.dtype == torch.long and v.shape == (2, 8) for v in m.values())
    t = torch.from_numpy(train[4]["tokens"])  # rank 1 of 2 starts at sample 4
    assert torch.equal(m["input_ids"][0], t[:-1]) and torch.equal(m["labels"][0], t[1:])


def test_resume_mid_stream_on_other_dp_size(train):
    ref, _ = global_sequence(train, 1)
    first, loaders = global_sequence(train, 2, steps=5)
    state = loaders[0].state_dict()
    assert state == {"consumed_samples": 40} and loaders[1].consumed_samples == 40
    resumed = []
    for dp in (1, 4):
        fresh = [GlobalBatchLoader(train, 8, 1, r, dp) for r in range(dp)]
        for ld in fresh:
            ld.load_state_dict(state)
        rest = [torch.cat([m["input_ids"] for rank in per_rank for m in rank]) for per_rank in zip(*fresh)]
        assert all(torch.equal(a, b) for a, b in zip(ref, first + rest)) and len(first + rest) == len(ref)
        resumed.append(rest)


def test_indivisible_global_batch(train):
    with pytest.raises(ConfigError, match=r"global batch size=10 is not divisible by training.micro_batch_size=2 "
                                          r"x data-parallel size 4"):
        GlobalBatchLoader(train, 10, 2, 0, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
@pytest.mark.parametrize("prefetch", [0, 2])
def test_pinned_memory(train, prefetch):
    """Pinned in the prefetch thread too, so host-to-device copies can run asynchronously."""
    loader = GlobalBatchLoader(train, 8, 2, dp_rank=0, dp_size=2, prefetch=prefetch, pin_memory=True)
    step = next(iter(loader))
    assert step and all(v.is_pinned() for m in step for v in m.values())
    ref = next(iter(GlobalBatchLoader(train, 8, 2, dp_rank=0, dp_size=2, prefetch=prefetch)))
    assert all(torch.equal(m[k], r[k]) for m, r in zip(step, ref) for k in m)
