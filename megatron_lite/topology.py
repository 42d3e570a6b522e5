"""The process layout: a (pp, dp, cp, tp) mesh with its process groups, passed explicitly to whatever needs it.

There are no module-level globals: code that needs a rank or a group along an axis asks the Topology object it was
given. A single process gets a Topology of size 1 on every axis and no process groups, so the same code paths run
with or without ``torch.distributed``.

Rank order is pp-major, then dp and cp, tp-minor (tp ranks are neighbours, so they land on one node first, and the cp
ranks of one sample next to them), as in Megatron-LM.
"""

from __future__ import annotations

import datetime
import os
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_lite import rules
from megatron_lite.config import ConfigError, ParallelConfig


@dataclass
class Topology:
    """Sizes and this process's coordinates along each axis, plus the device mesh when distributed."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    pp: int = 1
    dp: int = 1
    tp: int = 1
    dp_replicate: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mesh: "torch.distributed.device_mesh.DeviceMesh | None" = None
    cp: int = 1  # context parallelism: ranks that split each sample's sequence
    ep: int = 1  # expert parallelism: data-parallel ranks that split each mixture layer's experts

    @property
    def data_size(self) -> int:
        """Ranks that hold the same weights and average their gradients: data-parallel x context-parallel."""
        return self.dp * self.cp

    @property
    def dp_shard(self) -> int:
        return self.dp // self.dp_replicate

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def coord(self, axis: str) -> int:
        """This rank's index along ``axis`` ("pp", "dp", "cp", "tp")."""
        if self.mesh is None:
            return 0
        return self.mesh.get_local_rank(axis)

    @property
    def dp_rank(self) -> int:
        return self.coord("dp")

    @property
    def tp_rank(self) -> int:
        return self.coord("tp")

    @property
    def pp_rank(self) -> int:
        return self.coord("pp")

    @property
    def cp_rank(self) -> int:
        return self.coord("cp")

    @property
    def ep_rank(self) -> int:
        """This rank's index in its expert-parallel group: consecutive data-parallel ranks form one."""
        return self.dp_rank % self.ep

    @property
    def expert_data_size(self) -> int:
        """Ranks that hold the same experts and average their gradients: (dp / ep) x cp."""
        return self.data_size // self.ep

    def expert_group(self) -> "dist.ProcessGroup | None":
        """The ranks that split each mixture layer's experts (None without expert parallelism)."""
        if self.mesh is None or self.ep == 1:
            return None
        return self._expert_mesh()["ep"].get_group()

    def expert_data_mesh(self) -> "torch.distributed.device_mesh.DeviceMesh":
        """The ranks holding the same experts, as one mesh dimension: FSDP2 shards experts over it."""
        if self.ep == 1:
            return self.data_mesh_1d()
        mesh = self._expert_mesh()
        return mesh["edp"] if self.cp == 1 else self._flat(mesh, ("edp", "cp"), "edp_cp")

    def expert_data_group(self) -> "dist.ProcessGroup | None":
        """The ranks that average the gradients of this rank's experts (the data group without expert parallelism)."""
        if self.mesh is None:
            return None
        return self.expert_data_mesh().get_group()

    def _expert_mesh(self) -> "torch.distributed.device_mesh.DeviceMesh":
        """A second mesh over the same ranks, (pp, edp, ep, cp, tp): data index = edp index * ep + ep index, so its
        coordinates agree with the main mesh's. Built on first use (every rank builds it at the same point)."""
        key = "_expert"
        if getattr(self, key, None) is None:
            from torch.distributed.device_mesh import init_device_mesh

            shape = (self.pp, self.dp // self.ep, self.ep, self.cp, self.tp)
            names = ("pp", "edp", "ep", "cp", "tp")
            object.__setattr__(self, key, init_device_mesh(self.device.type, shape, mesh_dim_names=names))
        return getattr(self, key)

    @property
    def data_rank(self) -> int:
        """This rank's index among the ``data_size`` ranks that average gradients (dp-major, cp-minor)."""
        return self.dp_rank * self.cp + self.cp_rank

    def group(self, axis: str) -> "dist.ProcessGroup | None":
        """The process group along ``axis``; None in a single process."""
        if self.mesh is None:
            return None
        return self.mesh.get_group(axis)

    def submesh(self, *axes: str) -> "torch.distributed.device_mesh.DeviceMesh | None":
        if self.mesh is None:
            return None
        return self.mesh[axes if len(axes) > 1 else axes[0]]

    def data_group(self) -> "dist.ProcessGroup | None":
        """The ranks that average gradients (and that ZeRO partitions over): data-parallel x context-parallel."""
        if self.mesh is None:
            return None
        return self.group("dp") if self.cp == 1 else self.data_mesh_1d().get_group()

    def data_mesh_1d(self) -> "torch.distributed.device_mesh.DeviceMesh":
        """The dp x cp ranks as one mesh dimension (``dp`` itself without context parallelism)."""
        if self.cp == 1:
            return self.mesh["dp"]
        return self._flat(self.mesh, ("dp", "cp"), "dp_cp")

    def data_mesh(self) -> "torch.distributed.device_mesh.DeviceMesh | None":
        """The mesh FSDP2 shards over: 1-D (dp, or dp x cp flattened) or, for HSDP, 2-D (dp_replicate, dp_shard,
        with cp folded into the shards)."""
        if self.mesh is None:
            return None
        if self.dp_replicate == 1:
            return self.data_mesh_1d()
        hsdp = self._hsdp_mesh()
        if self.cp > 1:
            self._flat(hsdp, ("dp_shard", "cp"), "dp_shard_cp")
            return hsdp["dp_replicate", "dp_shard_cp"]
        return hsdp["dp_replicate", "dp_shard"]

    def mesh_of(self, *axes: str) -> "torch.distributed.device_mesh.DeviceMesh":
        """The submesh over ``axes``, which may name the HSDP axes (dp_replicate, dp_shard, dp_shard_cp) or the
        flattened data axis (dp_cp) beside pp and tp."""
        if any(a in ("dp_replicate", "dp_shard", "dp_shard_cp") for a in axes):
            self.data_mesh()  # the flattened dims exist once made
            return self._hsdp_mesh()[axes]
        if "dp_cp" in axes:
            self.data_mesh_1d()
        return self.mesh[axes if len(axes) > 1 else axes[0]]

    @staticmethod
    def _flat(mesh, axes: tuple[str, ...], name: str):
        """``axes`` of ``mesh`` flattened into one dimension called ``name`` (made once)."""
        import warnings as _warnings

        with _warnings.catch_warnings():  # slicing a flattened dim from the root mesh: still the way in torch 2.13
            _warnings.simplefilter("ignore", UserWarning)
            try:
                return mesh[name]
            except KeyError:
                return mesh[axes]._flatten(name)

    def _hsdp_mesh(self) -> "torch.distributed.device_mesh.DeviceMesh":
        """A second mesh over the same ranks, (pp, dp_replicate, dp_shard, cp, tp): data index = replica * shards +
        shard, so its coordinates agree with the main mesh's. Built on first use."""
        key = "_hsdp"
        if getattr(self, key, None) is None:
            from torch.distributed.device_mesh import init_device_mesh

            shape = (self.pp, self.dp_replicate, self.dp_shard, self.cp, self.tp)
            names = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
            object.__setattr__(self, key, init_device_mesh(self.device.type, shape, mesh_dim_names=names))
        return getattr(self, key)

    def describe(self) -> str:
        return f"world={self.world_size} pp={self.pp} dp={self.dp}{f' cp={self.cp}' if self.cp > 1 else ''} " \
               f"tp={self.tp}{f' ep={self.ep}' if self.ep > 1 else ''}" + (
            f" (dp_replicate={self.dp_replicate} x dp_shard={self.dp_shard})" if self.dp_replicate > 1 else ""
        )

    @classmethod
    def from_env(cls, parallel: ParallelConfig, device: str = "auto") -> "Topology":
        """Build the topology for this process, initializing torch.distributed when launched with several ranks.

        Works under torchrun, the deepspeed launcher (RANK/WORLD_SIZE/LOCAL_RANK in the environment) and plain python.
        """
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        dev = resolve_device(device, local_rank)
        tp, pp, cp = parallel.tp, parallel.pp, parallel.cp
        dp = rules.data_parallel_size(parallel, world_size)
        check_tp_fits_node(tp)
        topo = cls(world_size, rank, local_rank, pp, dp, tp, parallel.dp_replicate, dev, cp=cp, ep=parallel.ep)
        if world_size == 1:
            return topo
        if not dist.is_initialized():
            backend = "nccl" if dev.type == "cuda" else "gloo"
            init_process_group(backend, timeout=datetime.timedelta(seconds=parallel.timeout_s))
        from torch.distributed.device_mesh import init_device_mesh

        topo.mesh = init_device_mesh(dev.type, (pp, dp, cp, tp), mesh_dim_names=("pp", "dp", "cp", "tp"))
        return topo


def check_tp_fits_node(tp: int) -> None:
    """Warn when the tensor-parallel group is wider than one node: its all-reduces, one or two per layer and per
    microbatch, would cross the network. ``LOCAL_WORLD_SIZE`` is what the launchers (torchrun, deepspeed) set."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
    if tp > 1 and 0 < local < tp:
        warnings.warn(
            f"parallel.tp={tp} spans more ranks than one node has ({local}): tensor-parallel collectives will cross "
            "nodes; keep parallel.tp within a node and use data (or pipeline) parallelism across nodes",
            stacklevel=2,
        )


def ensure_process_group(device: torch.device) -> None:
    """Initialize a one-rank process group when none exists.

    Engines built on collectives (FSDP, DeepSpeed) then run unchanged in a single process, e.g. to resume a
    multi-rank checkpoint under the same engine on one device. An in-memory store is used: no port is opened.
    """
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def init_process_group(backend: str, **kwargs) -> None:
    """The one place the default process group is made: NCCL's error handling is set first (``nccl_environment``)."""
    if backend == "nccl":
        nccl_environment()
    dist.init_process_group(backend, **kwargs)


NCCL_ERROR_HANDLING = "2"  # TORCH_NCCL_ASYNC_ERROR_HANDLING: CleanUpOnly


def nccl_environment() -> None:
    """Make a failed NCCL collective an exception in the training loop instead of a killed process.

    Under torch's default (``TORCH_NCCL_ASYNC_ERROR_HANDLING=3``; torchrun sets 1 for its workers), NCCL's watchdog
    thread takes the process down when a collective times out or a peer is lost: no Python exception, so no one-line
    report naming the peer. With 2 (clean up only) the watchdog aborts the group's communicators and leaves the
    process alive; whatever waited on the collective returns, and the next collective (or the wait on the failed one)
    raises ``DistBackendError``, which the trainer turns into ``PeerLostError`` (``training/cluster.py``). With
    ``TORCH_NCCL_BLOCKING_WAIT=1`` every wait blocks the CPU and raises on timeout itself, so the variable is left as
    it is. ProcessGroupNCCL reads both when a group is made, so this runs before the first one.
    """
    if os.environ.get("TORCH_NCCL_BLOCKING_WAIT", "0").strip().lower() in ("1", "true", "yes", "on"):
        return
    os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = NCCL_ERROR_HANDLING


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """'auto' picks this rank's GPU when CUDA is available, else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("training.device=cuda but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(device)
