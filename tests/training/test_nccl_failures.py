"""A lost or hung peer under NCCL, as far as a CPU can check it: the error handling NCCL is given before its first
process group is made, and NCCL's own error texts (as ProcessGroupNCCL and NCCL word them) turned into the same one
line that gloo's errors give (tests/training/test_cluster.py runs gloo for real)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_lite import topology
from megatron_lite.config import ParallelConfig
from megatron_lite.training.cluster import RankHost, explain_lost_peer

HOSTS = [RankHost(0, "node0", "10.0.0.1", 100), RankHost(1, "node0", "10.0.0.1", 101),
         RankHost(2, "node1", "10.0.0.2", 200), RankHost(3, "node1", "10.0.0.2", 201)]


# ----------------------------------------------------------------------------------------------------------------------
# The environment, set in the one place that makes the process group
# ----------------------------------------------------------------------------------------------------------------------


class _Made(Exception):
    """Stops the topology right after it asked for its process group."""


@pytest.fixture
def made(monkeypatch):
    """Record (backend, TORCH_NCCL_ASYNC_ERROR_HANDLING at that moment) of every process group asked for."""
    calls = []

    def init(backend, **kwargs):
        import os

        calls.append((backend, os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING")))
        raise _Made

    monkeypatch.setattr(dist, "init_process_group", init)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TORCH_NCCL_BLOCKING_WAIT", raising=False)
    return calls


def _start(device: str) -> None:
    with pytest.raises(_Made):
        topology.Topology.from_env(ParallelConfig(), device)


def test_a_gpu_run_makes_nccl_failures_exceptions_before_its_process_group_exists(made, monkeypatch):
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # what torchrun gives its workers: kill the process
    monkeypatch.setattr(topology, "resolve_device", lambda device, local_rank=0: torch.device("cuda", local_rank))
    _start("cuda")
    assert made == [("nccl", "2")]


def test_a_one_process_nccl_group_gets_the_same_environment(made, monkeypatch):
    monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", raising=False)
    with pytest.raises(_Made):
        topology.ensure_process_group(torch.device("cuda", 0))
    assert made == [("nccl", "2")]


def test_blocking_waits_are_left_as_the_user_set_them(made, monkeypatch):
    monkeypatch.setenv("TORCH_NCCL_BLOCKING_WAIT", "1")  # every wait raises on timeout by itself
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
    monkeypatch.setattr(topology, "resolve_device", lambda device, local_rank=0: torch.device("cuda", local_rank))
    _start("cuda")
    assert made == [("nccl", "3")]


def test_gloo_runs_leave_nccl_alone(made, monkeypatch):
    monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", raising=False)
    _start("cpu")
    assert made == [("gloo", None)]


# ----------------------------------------------------------------------------------------------------------------------
# NCCL's error texts in one line
# ----------------------------------------------------------------------------------------------------------------------

# As ProcessGroupNCCL words them (torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp, NCCLUtils.cpp) with NCCL's own
# "Last error" line (src/misc/socket.cc: "%s<%s>" is the peer's host and port).
TIMEOUT = ("[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=212, OpType=ALLREDUCE, NumelIn=3, "
           "NumelOut=3, Timeout(ms)=60000) ran for 60013 milliseconds before timing out.")
ABORTED_AFTER_TIMEOUT = ("NCCL communicator was aborted on rank 0.  Original reason for failure was: [Rank 0] Watchdog "
                         "caught collective operation timeout: WorkNCCL(SeqNum=40, OpType=_REDUCE_SCATTER_BASE, "
                         "NumelIn=4096, NumelOut=2048, Timeout(ms)=60000) ran for 60005 milliseconds before timing out.")
ABORTED = "NCCL communicator was aborted on rank 0. "
REMOTE = ("NCCL error in: /pytorch/torch/csrc/distributed/c10d/NCCLUtils.cpp:77, remote process exited or there was a "
          "network error, NCCL version 2.26.2\nncclRemoteError: A call failed possibly due to a network error or a "
          "remote process exiting prematurely.\nLast error:\nsocketProgress: Connection closed by remote peer "
          "node1<45312>")
REMOTE_BY_ADDRESS = REMOTE.replace("node1<45312>", "10.0.0.2<45312>")
REMOTE_WITHOUT_PEER = ("NCCL communicator was aborted on rank 0. Original reason for failure was: NCCL error: remote "
                       "process exited or there was a network error, NCCL version 2.21.5\nncclRemoteError: A call "
                       "failed possibly due to a network error or a remote process exiting prematurely.\nLast error:\n")


def _raised_in_a_collective(text: str) -> BaseException:
    """The error with the traceback it has in training: raised inside torch's all_reduce, called from our metrics."""
    scope: dict = {}
    exec(compile("def all_reduce(error):\n    raise error\n", "/torch/distributed/distributed_c10d.py", "exec"), scope)
    exec(compile("def max_over_ranks(error):\n    all_reduce(error)\n",
                 "/site/megatron_lite/training/metrics.py", "exec"), scope)
    try:
        scope["max_over_ranks"](dist.DistBackendError(text))
    except dist.DistBackendError as e:
        return e
    raise AssertionError("not raised")


@pytest.mark.parametrize("text, expected", [
    (TIMEOUT, "rank 0 on node0: all_reduce in metrics.max_over_ranks got no answer within parallel.timeout_s=60 s; a "
              "peer hangs or died (hosts: node1: ranks 2-3); the last checkpoint is kept"),
    (ABORTED_AFTER_TIMEOUT, "rank 0 on node0: reduce_scatter_tensor got no answer within parallel.timeout_s=60 s; a "
                            "peer hangs or died (hosts: node1: ranks 2-3); the last checkpoint is kept"),
    (ABORTED, "rank 0 on node0: all_reduce in metrics.max_over_ranks got no answer within parallel.timeout_s=60 s; a "
              "peer hangs or died (hosts: node1: ranks 2-3); the last checkpoint is kept"),
    (REMOTE, "rank 0 on node0: lost its peer node1 (ranks 2-3, 10.0.0.2) during all_reduce in metrics.max_over_ranks: "
             "the peer's process ended (look at that host's log); the last checkpoint is kept"),
    (REMOTE_BY_ADDRESS, "rank 0 on node0: lost its peer node1 (ranks 2-3, 10.0.0.2) during all_reduce in "
                        "metrics.max_over_ranks: the peer's process ended (look at that host's log); the last "
                        "checkpoint is kept"),
    (REMOTE_WITHOUT_PEER, "rank 0 on node0: lost a peer during all_reduce in metrics.max_over_ranks: a peer's process "
                          "ended or the network failed (hosts: node1: ranks 2-3); the last checkpoint is kept"),
], ids=["timeout", "aborted-after-timeout", "aborted", "remote-by-name", "remote-by-address", "remote-no-peer"])
def test_nccl_errors_become_the_one_line_peer_lost_error(text, expected):
    lost = explain_lost_peer(_raised_in_a_collective(text), HOSTS, HOSTS[0], 60.0)
    assert lost is not None and str(lost) == expected
    assert "\n" not in str(lost)


def test_other_nccl_errors_are_left_as_they_are():
    oom = dist.DistBackendError("NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled cuda error (run with NCCL_DEBUG"
                                "=INFO for details), NCCL version 2.26.2\nncclUnhandledCudaError: Call to CUDA function "
                                "failed.\nLast error:\nCuda failure 2 'out of memory'")
    assert explain_lost_peer(oom, HOSTS, HOSTS[0], 60.0) is None
