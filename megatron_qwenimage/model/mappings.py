"""Tensor-parallel communication as autograd functions, on whatever device the tensor lives.

These are megatron-core's ``tensor_parallel.mappings`` (same names, same forward/backward pairs),
rewritten because megatron-core 0.16.1 allocates the outputs of its all-gather and
reduce-scatter with ``device=torch.cuda.current_device()``: they cannot run on CPU + gloo, where
this project's multi-rank tests run. Allocating with ``torch.empty_like``-style calls on the
input's device gives one code path for CPU and GPU.

Every function is the identity when the group has one rank.

| function | forward | backward |
|---|---|---|
| `copy_to_tp` | identity | all-reduce |
| `reduce_from_tp` | all-reduce | identity |
| `gather_last_dim` | all-gather along the last dim | keep own slice |
| `scatter_to_seq` | keep own slice of dim 0 | all-gather dim 0 |
| `gather_from_seq` | all-gather dim 0 | reduce-scatter (or keep own slice) dim 0 |
| `reduce_scatter_to_seq` | reduce-scatter dim 0 | all-gather dim 0 |
"""

from __future__ import annotations

import torch
import torch.distributed as dist

#: The flat-tensor collectives under their current names (torch >= 2.13 deprecates
#: ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` for these), with the old names where an
#: older torch (a GPU container's) has only those. Every flat all-gather / reduce-scatter of the
#: project goes through these two.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _size(group) -> int:
    return group.size()


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


def _all_gather_first(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((x.shape[0] * _size(group), *x.shape[1:]))
    all_gather_single(out, x, group=group)
    return out


def _reduce_scatter_first(x: torch.Tensor, group) -> torch.Tensor:
    n = _size(group)
    if x.shape[0] % n:
        raise ValueError(f"reduce-scatter: dim 0 of size {x.shape[0]} is not divisible by the TP size {n}")
    x = x.contiguous()
    out = x.new_empty((x.shape[0] // n, *x.shape[1:]))
    reduce_scatter_single(out, x, group=group)
    return out


def _split_first(x: torch.Tensor, group) -> torch.Tensor:
    n = _size(group)
    if x.shape[0] % n:
        raise ValueError(f"sequence split: dim 0 of size {x.shape[0]} is not divisible by the TP size {n}")
    return x.chunk(n, dim=0)[group.rank()].contiguous()


def _gather_last(x: torch.Tensor, group) -> torch.Tensor:
    gathered = _all_gather_first(x, group)
    return torch.cat(gathered.chunk(_size(group), dim=0), dim=-1)


def _split_last(x: torch.Tensor, group) -> torch.Tensor:
    return x.chunk(_size(group), dim=-1)[group.rank()].contiguous()


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_last(grad, ctx.group), None


class _ScatterToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_first(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_first(grad, ctx.group), None


class _GatherFromSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, tensor_parallel_output_grad):
        ctx.group = group
        ctx.tensor_parallel_output_grad = tensor_parallel_output_grad
        return _all_gather_first(x, group)

    @staticmethod
    def backward(ctx, grad):
        if ctx.tensor_parallel_output_grad:
            return _reduce_scatter_first(grad, ctx.group), None, None
        return _split_first(grad, ctx.group), None, None


class _ReduceScatterToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_first(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_first(grad, ctx.group), None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Identity; all-reduces the gradient (input of a column-parallel layer, replicated tensors
    consumed by rank-local data)."""
    return x if _size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce (output of a row-parallel layer); gradient passes through."""
    return x if _size(group) == 1 else _ReduceFromTP.apply(x, group)


def gather_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather along the last dim (a column-parallel layer's gathered output)."""
    return x if _size(group) == 1 else _GatherLastDim.apply(x, group)


def scatter_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """Keep this rank's contiguous chunk of the sequence ``[s, ...] -> [s/tp, ...]``."""
    return x if _size(group) == 1 else _ScatterToSeq.apply(x, group)


def gather_from_seq(x: torch.Tensor, group, tensor_parallel_output_grad: bool = True) -> torch.Tensor:
    """All-gather the sequence ``[s/tp, ...] -> [s, ...]``.

    Backward reduce-scatters when the consumer is tensor-parallel (its per-rank gradients are
    partial sums), else keeps this rank's slice (the consumer is replicated).
    """
    return x if _size(group) == 1 else _GatherFromSeq.apply(x, group, tensor_parallel_output_grad)


def reduce_scatter_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """Reduce-scatter along the sequence (a row-parallel layer's output under SP)."""
    return x if _size(group) == 1 else _ReduceScatterToSeq.apply(x, group)
