"""With several ranks, tokens/s and the data-wait share follow the slowest rank (max over ranks), not rank 0's clock."""

from __future__ import annotations

import os
import time

import pytest

import megatron_lite.training.trainer as trainer_module
from megatron_lite.parity import run_layout

DELAY = 0.4  # seconds rank 1 waits for each batch


def test_throughput_and_data_wait_are_reduced_over_ranks(tiny_config, monkeypatch):
    class SlowOnRank1(trainer_module.GlobalBatchLoader):
        """Rank 1's data arrives late; rank 0 then waits in the gradient all-reduce, not for data."""

        def __iter__(self):
            for batch in super().__iter__():
                if os.environ.get("RANK") == "1":
                    time.sleep(DELAY)
                yield batch

    monkeypatch.setattr(trainer_module, "GlobalBatchLoader", SlowOnRank1)  # inherited by the forked ranks
    run = run_layout("ddp2", tiny_config, ["training.train_steps=2"], timeout=300)
    records = run.records
    assert [r["step"] for r in records] == [1, 2]
    tokens_per_step = 8 * 32  # the tiny config's global batch x seq_len
    for r in records:
        assert r["step_time_s"] >= DELAY
        assert r["tokens_per_s"] == pytest.approx(tokens_per_step / r["step_time_s"])
        # rank 0 alone waited ~0 s for data: only the maximum over ranks shows rank 1's wait
        assert r["data_wait"] * r["step_time_s"] >= 0.9 * DELAY, r
        assert r["memory_gib"] > 0
