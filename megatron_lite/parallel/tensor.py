"""Megatron-style tensor-parallel layers: column- and row-parallel linears, a vocabulary-parallel embedding, and
projections that replicate key/value heads which the group cannot split.

Why they are written here rather than taken from DTensor (``parallelize_module``): their parameters are plain
tensors, each rank's shard, so every engine can take them as they are. DeepSpeed ZeRO cannot hold DTensor parameters,
and FSDP2 and DDP shard or replicate plain tensors over the data axis without knowing about the tensor axis. One
mechanism then serves single, DDP, FSDP2 and ZeRO 1-2 alike. Each parameter carries its partition: which dimension
is split over the group (``tp_shards``, by parameter name, kept on the module so that it survives FSDP replacing the
parameter objects) and, for DeepSpeed's gradient norm, ``tensor_model_parallel`` / ``partition_dim`` /
``partition_stride`` on the tensor.

Shards are equal, contiguous slices: rank ``r`` of ``n`` holds elements ``[r * d / n, (r + 1) * d / n)`` of the split
dimension, the layout the initial values (``engines/materialize.py``) and the logical checkpoints use.

With ``sequence_parallel``, activations between these layers are split along the sequence (dimension 1): a column
layer all-gathers its input, a row layer (and the embedding) reduce-scatters its output, instead of the all-reduce.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron_lite.parallel.collectives import all_gather, copy_to_group, reduce_from_group, reduce_scatter

SEQUENCE_DIM = 1  # activations are [batch, sequence, hidden]


@dataclass(frozen=True)
class TPShard:
    """How a parameter is split over the tensor-parallel group: along ``dim``, this rank holding part ``rank`` of
    ``size`` equal parts of the full tensor of ``global_shape``."""

    dim: int
    rank: int
    size: int
    global_shape: tuple[int, ...]

    @property
    def offset(self) -> int:
        return self.rank * self.global_shape[self.dim] // self.size


def _group_rank_size(group) -> tuple[int, int]:
    return (0, 1) if group is None else (dist.get_rank(group), dist.get_world_size(group))


class _TPModule(nn.Module):
    """Registers the shards of its parameters and marks them for DeepSpeed's model-parallel gradient norm."""

    def __init__(self, group) -> None:
        super().__init__()
        self.group = group
        self.tp_rank, self.tp_size = _group_rank_size(group)
        self.tp_shards: dict[str, TPShard] = {}

    def _shard(self, name: str, local: tuple[int, ...], dim: int) -> nn.Parameter:
        full = tuple(n * self.tp_size if d == dim else n for d, n in enumerate(local))
        p = nn.Parameter(torch.empty(local))
        p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, dim, 1
        self.tp_shards[name] = TPShard(dim, self.tp_rank, self.tp_size, full)
        return p


class ColumnParallelLinear(_TPModule):
    """``y = x W^T + b`` with W split by output rows: each rank computes its slice of the outputs."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group, sequence_parallel: bool) -> None:
        super().__init__(group)
        self.in_features, self.out_features, self.sequence_parallel = in_features, out_features, sequence_parallel
        self.weight = self._shard("weight", (out_features // self.tp_size, in_features), 0)
        self.bias = self._shard("bias", (out_features // self.tp_size,), 0) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = all_gather(x, SEQUENCE_DIM, self.group) if self.sequence_parallel else copy_to_group(x, self.group)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features} (this rank: {self.weight.shape[0]} outputs)"


class RowParallelLinear(_TPModule):
    """``y = x W^T + b`` with W split by input columns: each rank holds a slice of ``x``; partial results are summed."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group, sequence_parallel: bool) -> None:
        super().__init__(group)
        self.in_features, self.out_features, self.sequence_parallel = in_features, out_features, sequence_parallel
        self.weight = self._shard("weight", (out_features, in_features // self.tp_size), 1)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None  # replicated, added once after the sum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = reduce_scatter(y, SEQUENCE_DIM, self.group)
            # on sequence shards each rank sees part of the bias's gradient: sum it over the group
            return y + copy_to_group(self.bias, self.group) if self.bias is not None else y
        y = reduce_from_group(y, self.group)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features} (this rank: {self.weight.shape[1]} inputs)"


class VocabParallelEmbedding(_TPModule):
    """Embedding with the table split by rows (token ids): each rank looks up the ids it holds, zeros elsewhere, and
    the partial lookups are summed (or reduce-scattered to sequence shards)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, group, sequence_parallel: bool) -> None:
        super().__init__(group)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.sequence_parallel = sequence_parallel
        self.weight = self._shard("weight", (num_embeddings // self.tp_size, embedding_dim), 0)
        self.vocab_start = self.tp_rank * (num_embeddings // self.tp_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter(out, SEQUENCE_DIM, self.group)
        return reduce_from_group(out, self.group)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim} (this rank: ids {self.vocab_start}..)"


class HeadSliceLinear(nn.Module):
    """A key or value projection the group cannot split (fewer kv heads than ranks): the weight stays whole on every
    rank and each rank keeps the output of the one kv head its query heads use.

    Every rank uses a different slice of the same replicated weight, so each holds part of its gradient: the weight
    (and bias) pass through ``copy_to_group``, whose backward sums the parts.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, head_dim: int, head: int, group,
                 sequence_parallel: bool) -> None:
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        self.head_dim, self.head = head_dim, head
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = all_gather(x, SEQUENCE_DIM, self.group) if self.sequence_parallel else copy_to_group(x, self.group)
        rows = slice(self.head * self.head_dim, (self.head + 1) * self.head_dim)
        weight = copy_to_group(self.weight, self.group)[rows]
        bias = copy_to_group(self.bias, self.group)[rows] if self.bias is not None else None
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]}, {self.weight.shape[0]} (this rank: kv head {self.head})"


def tensor_parallel_shards(model: nn.Module) -> dict[str, TPShard]:
    """Every split parameter's TP split, under each of its names in ``model``; a name not in it is replicated."""
    return {
        f"{mod_name}.{p_name}" if mod_name else p_name: shard
        for mod_name, module in model.named_modules(remove_duplicate=False)
        for p_name, shard in getattr(module, "tp_shards", {}).items()
    }


def tensor_aliases(model: nn.Module) -> dict[str, str]:
    """Every name of every parameter -> the tensor's first name (a tied tensor has several names)."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out[name] = first.setdefault(id(p), name)
    return out
