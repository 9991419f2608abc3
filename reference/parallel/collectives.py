"""The communication of tensor and sequence parallelism, as autograd functions.

Activations use Megatron's layout (s, b, h): sequence first, then batch, then hidden. With TP size t:

    hidden-sharded     (s,   b, h/t)   column-parallel outputs, row-parallel inputs
    sequence-sharded   (s/t, b, h)     activations between layers under sequence parallelism
    replicated         (s,   b, h)     the same tensor on every TP rank

Each function is a pair (forward, backward) of conjugate operations: the backward of a collective is
the collective whose math is the transpose of the forward's.

    function                                     forward                 backward
    copy_to_tensor_parallel_region               identity                all-reduce
    reduce_from_tensor_parallel_region           all-reduce              identity
    scatter_to_tensor_parallel_region            split last dim          all-gather last dim
    gather_from_tensor_parallel_region           all-gather last dim     split last dim
    gather_from_sequence_parallel_region         all-gather dim 0        reduce-scatter dim 0
                                                                         (split if the output grad
                                                                          is already replicated)
    scatter_to_sequence_parallel_region          split dim 0             all-gather dim 0
    reduce_scatter_to_sequence_parallel_region   reduce-scatter dim 0    all-gather dim 0
    all_to_all_hidden_to_sequence_parallel_region (s, b, h/t)->(s/t, b, h)  the inverse all-to-all
    all_to_all_sequence_to_hidden_parallel_region (s/t, b, h)->(s, b, h/t)  the inverse all-to-all

With a group of one rank every function is the identity. Shapes are checked before any collective
starts, so a bad shape raises the same ValueError on every rank instead of hanging.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd import Function

from .sharding import check_divisible
from .state import resolve_tp_group


def _size(group: dist.ProcessGroup) -> int:
    return dist.get_world_size(group)


# ---- raw collectives (no autograd) --------------------------------------------------------------

# torch 2.13 renamed the tensor-in/tensor-out all-gather; take whichever this torch has. Looked up at
# every call (not bound at import), so that a tool wrapping torch.distributed's functions sees these.
# async_op=True returns the work handle (wait() before reading `out`), as torch.distributed does.
def all_gather_into(out: torch.Tensor, x: torch.Tensor, group, async_op: bool = False):
    """out (t*n, ...) <- every rank's x (n, ...) in rank order, along dim 0."""
    return (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, x, group=group,
                                                                                       async_op=async_op)


def reduce_scatter_into(out: torch.Tensor, x: torch.Tensor, group, async_op: bool = False):
    """out (n, ...) <- this rank's chunk (dim 0) of the sum over ranks of x (t*n, ...)."""
    return (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(out, x, group=group,
                                                                                         async_op=async_op)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    out = x.contiguous().clone()  # a fresh tensor: the caller's input is never modified
    dist.all_reduce(out, group=group)
    return out


def _all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Concatenate every rank's x along `dim` (rank order)."""
    size = _size(group)
    x = x.movedim(dim, 0).contiguous()                                   # (n, ...)
    out = x.new_empty((size * x.shape[0],) + tuple(x.shape[1:]))         # (size*n, ...)
    all_gather_into(out, x, group)
    return out.movedim(0, dim).contiguous()


def _reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Sum x over the ranks and keep this rank's chunk along `dim`."""
    size = _size(group)
    check_divisible(f"size of dim {dim}", x.shape[dim], size, "the group size")
    x = x.movedim(dim, 0).contiguous()                                   # (n, ...)
    out = x.new_empty((x.shape[0] // size,) + tuple(x.shape[1:]))        # (n/size, ...)
    reduce_scatter_into(out, x, group)
    return out.movedim(0, dim).contiguous()


def _split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """This rank's chunk of x along `dim` (no communication)."""
    size = _size(group)
    check_divisible(f"size of dim {dim}", x.shape[dim], size, "the group size")
    return x.chunk(size, dim=dim)[dist.get_rank(group)].contiguous()


def _all_to_all_hidden_to_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """(s, *mid, h/t) -> (s/t, *mid, h): trade hidden shards for sequence shards."""
    size = _size(group)
    s, h_local = x.shape[0], x.shape[-1]
    mid = x.shape[1:-1]
    send = x.reshape(size, s // size, -1, h_local).contiguous()        # (t, s/t, m, h/t): chunk j -> rank j
    recv = torch.empty_like(send)                                      # (t, s/t, m, h/t): from rank j, hidden shard j
    dist.all_to_all_single(recv, send, group=group)
    out = recv.permute(1, 2, 0, 3)                                     # (s/t, m, t, h/t)
    return out.reshape((s // size,) + tuple(mid) + (size * h_local,))


def _all_to_all_sequence_to_hidden(x: torch.Tensor, group) -> torch.Tensor:
    """(s/t, *mid, h) -> (s, *mid, h/t): trade sequence shards for hidden shards."""
    size = _size(group)
    s_local, h = x.shape[0], x.shape[-1]
    mid = x.shape[1:-1]
    send = x.reshape(s_local, -1, size, h // size).permute(2, 0, 1, 3).contiguous()  # (t, s/t, m, h/t)
    recv = torch.empty_like(send)                                      # from rank j: sequence chunk j
    dist.all_to_all_single(recv, send, group=group)
    return recv.reshape((size * s_local,) + tuple(mid) + (h // size,))


# ---- autograd functions -------------------------------------------------------------------------

class _CopyToTensorParallelRegion(Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTensorParallelRegion(Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTensorParallelRegion(Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, -1, ctx.group), None


class _GatherFromTensorParallelRegion(Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, -1, ctx.group), None


class _GatherFromSequenceParallelRegion(Function):
    @staticmethod
    def forward(ctx, x, group, tensor_parallel_output_grad):
        ctx.group = group
        ctx.tensor_parallel_output_grad = tensor_parallel_output_grad
        return _all_gather(x, 0, group)

    @staticmethod
    def backward(ctx, grad):
        # The gathered tensor feeds TP-sharded math, so each rank holds a partial gradient of the
        # whole sequence: sum them and keep our chunk. If the consumer's gradient is already the
        # full gradient on every rank, summing would count it t times: just keep our chunk.
        if ctx.tensor_parallel_output_grad:
            return _reduce_scatter(grad, 0, ctx.group), None, None
        return _split(grad, 0, ctx.group), None, None


class _ScatterToSequenceParallelRegion(Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, 0, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, 0, ctx.group), None


class _ReduceScatterToSequenceParallelRegion(Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, 0, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, 0, ctx.group), None


class _AllToAllHiddenToSequence(Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_to_all_hidden_to_sequence(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all_sequence_to_hidden(grad, ctx.group), None


class _AllToAllSequenceToHidden(Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_to_all_sequence_to_hidden(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all_hidden_to_sequence(grad, ctx.group), None


# ---- public API: shape checks first, then the autograd function ----------------------------------

def _needs_dims(name: str, x: torch.Tensor, ndim: int) -> None:
    if x.dim() < ndim:
        raise ValueError(f"{name}: input must have at least {ndim} dims, got shape {tuple(x.shape)}")


def copy_to_tensor_parallel_region(x, group=None):
    group = resolve_tp_group(group)
    return x if _size(group) == 1 else _CopyToTensorParallelRegion.apply(x, group)


def reduce_from_tensor_parallel_region(x, group=None):
    group = resolve_tp_group(group)
    return x if _size(group) == 1 else _ReduceFromTensorParallelRegion.apply(x, group)


def scatter_to_tensor_parallel_region(x, group=None):
    group = resolve_tp_group(group)
    if _size(group) == 1:
        return x
    _needs_dims("scatter_to_tensor_parallel_region", x, 1)
    check_divisible("last dim of input", x.shape[-1], _size(group), "the TP size")
    return _ScatterToTensorParallelRegion.apply(x, group)


def gather_from_tensor_parallel_region(x, group=None):
    group = resolve_tp_group(group)
    if _size(group) == 1:
        return x
    _needs_dims("gather_from_tensor_parallel_region", x, 1)
    return _GatherFromTensorParallelRegion.apply(x, group)


def gather_from_sequence_parallel_region(x, group=None, tensor_parallel_output_grad=True):
    group = resolve_tp_group(group)
    if _size(group) == 1:
        return x
    _needs_dims("gather_from_sequence_parallel_region", x, 1)
    return _GatherFromSequenceParallelRegion.apply(x, group, tensor_parallel_output_grad)


def scatter_to_sequence_parallel_region(x, group=None):
    group = resolve_tp_group(group)
    if _size(group) == 1:
        return x
    _needs_dims("scatter_to_sequence_parallel_region", x, 1)
    check_divisible("sequence length (dim 0) of input", x.shape[0], _size(group), "the TP size")
    return _ScatterToSequenceParallelRegion.apply(x, group)


def reduce_scatter_to_sequence_parallel_region(x, group=None):
    group = resolve_tp_group(group)
    if _size(group) == 1:
        return x
    _needs_dims("reduce_scatter_to_sequence_parallel_region", x, 1)
    check_divisible("sequence length (dim 0) of input", x.shape[0], _size(group), "the TP size")
    return _ReduceScatterToSequenceParallelRegion.apply(x, group)


def all_to_all_hidden_to_sequence_parallel_region(x, group=None):
    """(s, b, h/t) hidden shards -> (s/t, b, h) sequence shards."""
    group = resolve_tp_group(group)
    if _size(group) == 1:
        return x
    _needs_dims("all_to_all_hidden_to_sequence_parallel_region", x, 2)
    check_divisible("sequence length (dim 0) of input", x.shape[0], _size(group), "the TP size")
    return _AllToAllHiddenToSequence.apply(x, group)


def all_to_all_sequence_to_hidden_parallel_region(x, group=None):
    """(s/t, b, h) sequence shards -> (s, b, h/t) hidden shards."""
    group = resolve_tp_group(group)
    if _size(group) == 1:
        return x
    _needs_dims("all_to_all_sequence_to_hidden_parallel_region", x, 2)
    check_divisible("hidden size (last dim) of input", x.shape[-1], _size(group), "the TP size")
    return _AllToAllSequenceToHidden.apply(x, group)
