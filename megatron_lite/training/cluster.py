"""What a multi-node run needs to say about itself: which host holds which ranks, a startup banner, a log file per
rank under the run directory, one collective timeout for every process group, and a failed collective explained.

A node that dies shows up on the others as a failed collective: gloo reports "Connection closed by peer [addr]:port"
at once, and a peer that hangs shows up as a timeout. NCCL reports a lost peer as a remote error ("Connection closed
by remote peer host<port>") and a hung one through its watchdog, which aborts the communicators after the timeout
(``topology.nccl_environment`` keeps it from killing the process instead). None of these names a host or a rank, and
the launchers then print every surviving rank's traceback. The host table gathered at start turns the peer's address
into "node1 (ranks 2-3)", so a user reads one line that says which node to look at.
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_lite.errors import PeerLostError
from megatron_lite.topology import Topology


@dataclass(frozen=True)
class RankHost:
    """Where one rank runs: the host's name, the address its peers reach it at, and its process id."""

    rank: int
    host: str
    address: str
    pid: int


def local_address() -> str:
    """This host's address on the route to the rendezvous host (``MASTER_ADDR``), found without sending a packet."""
    master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect((master, int(os.environ.get("MASTER_PORT", "29500"))))  # UDP connect: routing only
        return probe.getsockname()[0]
    except OSError:
        return "unknown"
    finally:
        probe.close()


def gather_hosts(topology: Topology) -> list[RankHost]:
    """Every rank's host, gathered once at start (one small collective)."""
    mine = RankHost(topology.rank, socket.gethostname(), local_address(), os.getpid())
    if not topology.is_distributed:
        return [mine]
    table: list[RankHost | None] = [None] * topology.world_size
    dist.all_gather_object(table, mine)
    return [t for t in table if t is not None]


def _span(ranks: list[int]) -> str:
    ranks = sorted(ranks)
    if len(ranks) > 1 and ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"ranks {ranks[0]}-{ranks[-1]}"
    return ("rank " if len(ranks) == 1 else "ranks ") + ",".join(map(str, ranks))


def by_host(hosts: list[RankHost]) -> dict[tuple[str, str], list[int]]:
    """(host, address) -> its ranks, in the order the hosts first appear."""
    grouped: dict[tuple[str, str], list[int]] = {}
    for h in hosts:
        grouped.setdefault((h.host, h.address), []).append(h.rank)
    return grouped


def banner(topology: Topology, engine: str, hosts: list[RankHost]) -> str:
    """The lines a run starts with: world and mesh, engine, hosts with their ranks, and library versions."""
    cuda = torch.version.cuda or "none"
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else "none"
    nodes = by_host(hosts)
    lines = [
        f"megatron_lite: world {topology.world_size} = pp {topology.pp} x dp {topology.dp} x tp {topology.tp}"
        + (f" (dp_replicate {topology.dp_replicate} x dp_shard {topology.dp_shard})" if topology.dp_replicate > 1
           else "")
        + f"; engine {engine}; device {topology.device}; {len(nodes)} host(s)",
        *(f"  host {name} ({addr}): {_span(ranks)}" for (name, addr), ranks in nodes.items()),
        f"  torch {torch.__version__}, deepspeed {_version('deepspeed')}, cuda {cuda}, nccl {nccl}, "
        f"python {sys.version.split()[0]}",
    ]
    return "\n".join(lines)


def _version(package: str) -> str:
    """An installed package's version without importing it (importing deepspeed takes seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def apply_collective_timeout(seconds: float) -> None:
    """Give every process group that exists now the same timeout.

    ``init_process_group`` takes a timeout, but the groups made after it (the device mesh's dimensions, FSDP's and
    DeepSpeed's own, the pipeline's pairs) fall back to torch's 30-minute default. Called once the engine is built,
    so that a rank waiting on a hung peer fails after ``parallel.timeout_s`` whichever group it waits in.
    """
    if not dist.is_initialized():
        return
    from torch.distributed import distributed_c10d as c10d

    timeout = datetime.timedelta(seconds=seconds)
    for group in list(c10d._world.pg_map):
        if group is not None and not c10d._rank_not_in_group(group):
            c10d._set_pg_timeout(timeout, group)


_PEER = re.compile(r"by peer \[([0-9a-fA-F.:]+)\]:\d+")  # gloo: "Connection closed by peer [10.0.0.2]:50354"
# NCCL's "Last error" line: "socketProgress: Connection closed by remote peer node1<45312>" (a name or an address)
_NCCL_PEER = re.compile(r"closed by remote peer ([^\s<>]+)<\d+>")
# NCCL through ProcessGroupNCCL: a peer's process ended ("remote process exited or there was a network error ...
# ncclRemoteError: ..."), a collective timed out ("[Rank 0] Watchdog caught collective operation timeout:
# WorkNCCL(SeqNum=5, OpType=ALLREDUCE, ...) ran for 60012 milliseconds before timing out."), or the watchdog
# aborted the communicators after either ("NCCL communicator was aborted on rank 0. ...").
_REMOTE_EXIT = ("remote process exited", "ncclRemoteError", "closed by remote peer")
_LOST = ("closed by peer", "reset by peer", "Broken pipe", "Timed out", "timed out", "Timeout",
         "Watchdog caught collective operation timeout", "communicator was aborted", *_REMOTE_EXIT)
_NCCL_OP = re.compile(r"OpType=(\w+)")
_NCCL_OPS = {"ALLREDUCE": "all_reduce", "ALLGATHER": "all_gather", "_ALLGATHER_BASE": "all_gather_into_tensor",
             "REDUCE_SCATTER": "reduce_scatter", "_REDUCE_SCATTER_BASE": "reduce_scatter_tensor",
             "BROADCAST": "broadcast", "REDUCE": "reduce", "BARRIER": "barrier", "SEND": "send", "RECV": "recv",
             "ALLTOALL": "all_to_all", "ALLTOALL_BASE": "all_to_all_single", "GATHER": "gather", "SCATTER": "scatter"}


def explain_lost_peer(error: BaseException, hosts: list[RankHost], me: RankHost, timeout_s: float
                      ) -> PeerLostError | None:
    """A one-line error for a collective that failed because a peer died or hung; None for other errors.

    Reads gloo's error text and NCCL's (``topology.nccl_environment`` makes NCCL's failures exceptions); a peer's
    address, when the text has one, names its host and ranks from the table gathered at start.
    """
    text = str(error)
    if not isinstance(error, (RuntimeError, dist.DistError)) or not any(k in text for k in _LOST):
        return None
    op = _NCCL_OP.search(text)
    where = _collective_of(error, _NCCL_OPS.get(op.group(1), op.group(1).lower()) if op else None)
    match = _PEER.search(text) or _NCCL_PEER.search(text)
    if match:
        address = match.group(1)
        peer_hosts = [h for h in hosts if address in (h.address, h.host) or h.host.startswith(address + ".")
                      or address.startswith(h.host + ".")]
        ranks = [h.rank for h in peer_hosts if h.rank != me.rank]
        name = peer_hosts[0].host if peer_hosts else address
        shown = peer_hosts[0].address if peer_hosts else address
        peer = f"{name} ({_span(ranks)}, {shown})" if ranks else address
        return PeerLostError(f"rank {me.rank} on {me.host}: lost its peer {peer} during {where}: the peer's "
                             "process ended (look at that host's log); the last checkpoint is kept")
    others = by_host([h for h in hosts if h.host != me.host]) or by_host(hosts)
    peers = "; ".join(f"{name}: {_span(r)}" for (name, _), r in others.items())
    if any(k in text for k in _REMOTE_EXIT):
        return PeerLostError(f"rank {me.rank} on {me.host}: lost a peer during {where}: a peer's process ended or "
                             f"the network failed (hosts: {peers}); the last checkpoint is kept")
    return PeerLostError(f"rank {me.rank} on {me.host}: {where} got no answer within parallel.timeout_s="
                         f"{timeout_s:g} s; a peer hangs or died (hosts: {peers}); the last checkpoint is kept")


def _collective_of(error: BaseException, op: str | None = None) -> str:
    """'all_reduce in metrics.max_over_ranks': the collective and our function that called it, from the traceback.

    ``op`` is the collective the error itself names (NCCL's watchdog does); when the traceback shows another one, the
    error surfaced at a later collective (NCCL's aborted communicators) and the caller is left out.
    """
    tb = error.__traceback__
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    ours = [f for f in frames if "megatron_lite" in f.f_code.co_filename]
    theirs = [f for f in frames if f.f_code.co_filename.endswith("distributed_c10d.py")]
    called = theirs[-1].f_code.co_name if theirs else None
    if op is not None and op != called:
        return op
    op = called or "a collective"
    if not ours:
        return op
    caller = ours[-1]
    module = Path(caller.f_code.co_filename).stem
    return f"{op} in {module}.{caller.f_code.co_name}"


class RankLog:
    """This rank's log lines, in ``<run_dir>/logs/<host>/rank-<N>.log``.

    Only rank 0 prints to the console; the other ranks' lines, and each rank's own error, would otherwise be lost with
    the launcher's output. A file per rank, grouped by host, keeps them with the run's other files, whichever node
    the user looks from. Each line is appended and closed at once, so a killed rank loses nothing it logged.
    """

    def __init__(self, run_dir: Path, topology: Topology) -> None:
        self.path = Path(run_dir) / "logs" / socket.gethostname() / f"rank-{topology.rank}.log"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write_line(self, line: str) -> None:
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        with open(self.path, "a") as f:
            f.write("".join(f"{stamp} {part}\n" for part in str(line).splitlines() or [""]))
