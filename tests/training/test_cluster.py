"""Hosts, banner and collective timeouts of training/cluster.py on forked gloo ranks (the two-host runs are in
tests/multinode/)."""

from __future__ import annotations

import json
import time

from megatron_lite.config import ParallelConfig
from megatron_lite.parity import run_ranks


def _hung_peer_rank(rank: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from megatron_lite.topology import Topology
    from megatron_lite.training.cluster import apply_collective_timeout, banner, explain_lost_peer, gather_hosts

    topo = Topology.from_env(ParallelConfig(timeout_s=600.0))
    hosts = gather_hosts(topo)
    pair = dist.new_group([0, 1])  # made after init_process_group: torch gives it the 30-minute default
    apply_collective_timeout(2.0)
    if rank == 1:
        time.sleep(8.0)  # a peer that hangs
        return
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1), group=pair)
        outcome = {"error": None}
    except Exception as e:  # noqa: BLE001 - the test records what the collective raised
        lost = explain_lost_peer(e, hosts, hosts[rank], 2.0)
        outcome = {"error": str(lost) if lost else repr(e)}
    outcome["waited"] = time.monotonic() - start
    outcome["banner"] = banner(topo, "ddp", hosts)
    with open(out, "w") as f:
        json.dump(outcome, f)
    # leave without the collective teardown: the peer is still asleep


def test_a_hung_peer_fails_a_subgroup_collective_within_the_timeout(tmp_path):
    out = tmp_path / "outcome.json"
    run_ranks(_hung_peer_rank, 2, (str(out),), timeout=60)
    outcome = json.loads(out.read_text())
    assert outcome["waited"] < 6.0, outcome  # 2 s, not 30 minutes
    assert outcome["error"].startswith("rank 0 on "), outcome
    assert "all_reduce got no answer within parallel.timeout_s=2 s" in outcome["error"], outcome
    assert "ranks 0-1" in outcome["banner"] and "world 2 = pp 1 x dp 2 x tp 1; engine ddp" in outcome["banner"]
