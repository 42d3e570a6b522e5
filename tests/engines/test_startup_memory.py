"""Start-up memory on the sharding engines: a rank builds only its share of the model, never the whole of it.

Measured on 2 CPU ranks for a ~400M-parameter model (1.5 GiB in fp32), as the growth of each rank's peak resident
memory while the engine is built (``tools/bench.py startup`` prints the same for more sizes and layouts).

The bound, and why: a rank holds its parameter shards (``held``, half the model here). Building them draws the
initial values block by block and, for a row-sharded tensor, at most the rows of one tensor at a time, so the model
costs at most ``held`` + the largest tensor + 128 MiB of allocator and library slack. With 2 ranks that is well under
the whole fp32 model, which is what every rank allocated when it built the full model before sharding it. DeepSpeed's
``initialize`` then adds its own ZeRO-3 buffers for the same share (a flat copy of the partitions, an fp32 master
copy, AdamW's two moments, the gradient partitions): at most 5 x ``held`` more.
"""

from __future__ import annotations

import pytest

from megatron_lite.bench.startup import STARTUP_BASE, STARTUP_SIZES, startup_memory

SLACK = 128 * 2**20
FULL_FP32 = 4 * 400e6  # bytes of the whole model in fp32


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["fsdp2", "zero3"])
def test_a_rank_builds_only_its_share(layout):
    ranks = startup_memory(layout, [*STARTUP_BASE, *STARTUP_SIZES["400m"]], timeout=600)
    assert len(ranks) == 2
    for r in ranks:
        assert r["held"] == pytest.approx(FULL_FP32 / 2, rel=0.01)  # each rank holds half the parameters
        assert r["model"] <= r["held"] + r["largest"] + SLACK, r
        assert r["model"] < 0.65 * FULL_FP32, r
        if layout == "fsdp2":  # FSDP allocates nothing more until the first step
            assert r["engine"] <= r["held"] + r["largest"] + SLACK, r
        else:
            assert r["engine"] <= r["model"] + 5 * r["held"], r
