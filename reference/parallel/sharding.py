"""Moving between a full (logical) tensor and this rank's shard of it, with no autograd.

A tensor of size n along `dim` is split into `size` equal shards; rank r holds rows
[r * n/size, (r+1) * n/size). With `stride` > 1 the tensor is first seen as `stride` equal parts
(for example the gate and the up projection of a gated MLP stacked as [gate; up]) and each part is
split the same way, so rank r holds [gate_r; up_r]. This keeps the full tensor independent of the
TP size while every rank can still chunk its local output into gate and up.
"""

from __future__ import annotations

from numbers import Integral

import torch
import torch.distributed as dist


AGREEMENT_SLOTS = 12       # integers one agreement check exchanges (a shape of up to 11 dims, and its length)


def check_agreement(what: str, values, group: dist.ProcessGroup | None) -> None:
    """Raise the same ValueError on every rank of `group` when the ranks hold different `values` (the
    sizes or shapes they are about to exchange): without it a mismatched collective fails on one rank
    ("Received data size doesn't match") and returns on another. One all-gather of a few integers.

    Args:
        what (str): what the values are, for the message ("the input's shape", ...).
        values (Sequence[int]): at most AGREEMENT_SLOTS - 1 integers.
        group (dist.ProcessGroup | None): the ranks that must agree; None or one rank: nothing to check.
    """
    size = dist.get_world_size(group) if group is not None else 1
    if size == 1:
        return
    values = [int(v) for v in values]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    mine = torch.full((AGREEMENT_SLOTS,), -1, dtype=torch.int64)
    mine[0], mine[1:1 + len(values)] = len(values), torch.tensor(values, dtype=torch.int64)
    everyone = [torch.empty(AGREEMENT_SLOTS, dtype=torch.int64, device=device) for _ in range(size)]
    dist.all_gather(everyone, mine.to(device), group=group)
    rows = [row[1:1 + row[0]] for row in torch.stack(everyone).tolist()]
    if any(row != rows[0] for row in rows):
        described = ", ".join(f"rank {r}: {tuple(row)}" for r, row in enumerate(rows))
        raise ValueError(f"the ranks of the TP group disagree on {what} ({described}); every rank must pass "
                         f"the same")


def check_positive_int(name: str, value) -> None:
    """Raise a ValueError naming the argument unless `value` is a positive integer (numpy's too, not a bool)."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_divisible(name: str, value: int, divisor: int, what: str) -> None:
    """Raise a ValueError naming the argument when `value` does not divide by `divisor`."""
    if value % divisor != 0:
        raise ValueError(f"{name} ({value}) must be divisible by {what} ({divisor})")


def shard(full: torch.Tensor, dim: int, rank: int, size: int, stride: int = 1) -> torch.Tensor:
    """This rank's shard of `full` along `dim` (a copy, contiguous)."""
    n = full.shape[dim]
    check_divisible(f"size of dim {dim}", n, size * stride, "tp_size * stride")
    parts = full.chunk(stride, dim=dim)                                   # stride x (n/stride)
    local = [part.chunk(size, dim=dim)[rank] for part in parts]          # stride x (n/(stride*size))
    return torch.cat(local, dim=dim).contiguous()


def unshard(shards: list[torch.Tensor], dim: int, stride: int = 1) -> torch.Tensor:
    """The full tensor from every rank's shard (in rank order); the inverse of `shard`."""
    per_rank_parts = [s.chunk(stride, dim=dim) for s in shards]          # size x stride
    parts = [torch.cat([p[k] for p in per_rank_parts], dim=dim) for k in range(stride)]
    return torch.cat(parts, dim=dim)


def gather_shards(local: torch.Tensor, dim: int, group: dist.ProcessGroup | None,
                  stride: int = 1) -> torch.Tensor:
    """All-gather every rank's shard and rebuild the full tensor on every rank (no autograd)."""
    size = dist.get_world_size(group) if group is not None else 1
    if size == 1:
        return local.detach().clone()
    local = local.detach().contiguous()
    shards = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(shards, local, group=group)
    return unshard(shards, dim, stride)
