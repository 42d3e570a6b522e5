"""The tensor-parallel collectives as conjugate pairs of autograd functions, each taking its process group explicitly.

Each forward collective is paired with the one whose backward it needs, so that a sharded computation has exactly the
gradients of the unsharded one:

    copy_to_group        identity              | all-reduce of the gradient
    reduce_from_group    all-reduce            | identity
    split_to_group       keep this rank's slice | all-gather of the gradient
    reduce_scatter       reduce-scatter        | all-gather                   (sequence parallelism, after a row layer)
    all_gather           all-gather            | reduce-scatter               (sequence parallelism, before a column layer)
    all_to_all           rows to their ranks   | the same rows back             (expert parallelism)
    all_reduce_sum       all-reduce            | all-reduce                     (a total every rank then uses alike)

``all_to_all`` sends uneven runs of rows (``send[r]`` rows to rank r, ``recv[r]`` from it), its own conjugate with
the counts swapped. Other slices are along ``dim`` (the last dimension for features, dimension 1 for the sequence of a [b, s, h] activation) and
are equal: callers check divisibility. With a group of one rank every function is the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if _size(group) == 1:
        return x
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    return x.chunk(n, dim=dim)[dist.get_rank(group)].contiguous()


def _gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    x = x.contiguous()
    out = x.new_empty((n * x.shape[0], *x.shape[1:]))  # the ranks' tensors one after another along dim 0
    dist.all_gather_into_tensor(out, x, group=group)
    return torch.cat(out.chunk(n, dim=0), dim=dim) if dim != 0 else out


def _reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = _size(group)
    if n == 1:
        return x
    parts = x.chunk(n, dim=dim)
    flat = torch.cat([p.contiguous() for p in parts], dim=0) if dim != 0 else x.contiguous()  # rank r's slice r-th
    out = flat.new_empty(parts[0].shape)
    dist.reduce_scatter_tensor(out, flat, group=group)
    return out


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), ctx.group), None


class _ReduceFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _conjugate(name: str, forward, backward) -> type[torch.autograd.Function]:
    """An autograd function along ``dim`` of a group: ``forward`` one way, ``backward`` (its conjugate) the other."""

    def fwd(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return forward(x, dim, group)

    def bwd(ctx, grad):
        return backward(grad, ctx.dim, ctx.group), None, None

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(bwd)})


_SplitToGroup = _conjugate("_SplitToGroup", _split, _gather)
_ReduceScatter = _conjugate("_ReduceScatter", _reduce_scatter, _gather)
_AllGather = _conjugate("_AllGather", _gather, _reduce_scatter)


def copy_to_group(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward; the gradient is summed over ``group`` (a replicated input feeding sharded work)."""
    return x if _size(group) == 1 else _CopyToGroup.apply(x, group)


def reduce_from_group(x: torch.Tensor, group) -> torch.Tensor:
    """Sum partial results over ``group``; the gradient passes through (after a row-parallel layer)."""
    return x if _size(group) == 1 else _ReduceFromGroup.apply(x, group)


def split_to_group(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Keep this rank's slice along ``dim``; the gradient is gathered back to the full size."""
    return x if _size(group) == 1 else _SplitToGroup.apply(x, dim, group)


def reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Sum partial results over ``group`` and keep this rank's slice along ``dim``; the gradient is all-gathered."""
    return x if _size(group) == 1 else _ReduceScatter.apply(x, dim, group)


def all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Concatenate the ranks' slices along ``dim``; the gradient is reduce-scattered (each slice summed over ranks)."""
    return x if _size(group) == 1 else _AllGather.apply(x, dim, group)


def _all_to_all(x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send, recv, group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return _all_to_all(x, send, recv, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.recv, ctx.send, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    """Rows of ``x`` [n, ...] in runs of ``send[r]`` go to rank r; the runs of ``recv[r]`` rows from each rank r
    come back concatenated in rank order. The gradient travels the other way."""
    return x if _size(group) == 1 else _AllToAll.apply(x, send, recv, group)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), ctx.group), None


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Sum partial results over ``group``, where every rank then computes the same function of the total: each part's
    gradient is the sum of the gradients every rank's copy asks of it (a mixture layer's per-sequence sums under
    context parallelism)."""
    return x if _size(group) == 1 else _AllReduceSum.apply(x, group)
