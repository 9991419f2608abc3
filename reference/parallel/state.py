"""Process groups: who shares a tensor-parallel shard with whom.

Ranks are laid out as in Megatron, tensor parallelism varying fastest:

    dense layers:   rank = dp_rank * tp + tp_rank
    expert layers:  rank = edp_rank * (ep * etp) + ep_rank * etp + etp_rank

so with world 4, TP=2: TP groups {0,1} {2,3}, DP groups {0,2} {1,3}; and with TP=2, EP=2 (expert TP
defaults to TP... here 2): expert-TP groups {0,1} {2,3}, EP groups {0,2} {1,3}.

Every rank must call `initialize_model_parallel` with the same arguments (it is collective).
Groups are cached by their member ranks, so switching between layouts (as tests and the conformance
suite do) creates each group once.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .sharding import check_positive_int

DEFAULT_TIMEOUT_S = 300.0

_STATE: "ParallelState | None" = None
_GROUP_CACHE: dict[tuple[int, ...], dist.ProcessGroup] = {}
_TIMEOUT = datetime.timedelta(seconds=DEFAULT_TIMEOUT_S)   # for every group this module creates


@dataclass(frozen=True)
class ParallelState:
    """The process groups of one parallel layout, seen from this rank."""

    world_size: int
    rank: int
    tp_group: dist.ProcessGroup
    tp_size: int
    tp_rank: int
    dp_group: dist.ProcessGroup
    dp_size: int
    dp_rank: int
    ep_group: dist.ProcessGroup
    ep_size: int
    ep_rank: int
    expert_tp_group: dist.ProcessGroup
    expert_tp_size: int
    expert_tp_rank: int
    # The ep * etp ranks that share one set of experts: MoE tokens are gathered and combined here.
    expert_tp_ep_group: dist.ProcessGroup


def init_distributed(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Join the default process group from the torchrun environment (RANK, WORLD_SIZE, MASTER_*).

    backend: "nccl" or "gloo"; None picks NCCL when CUDA is available, else gloo.
    Without torchrun (no WORLD_SIZE), a world of one is created in-process.
    With NCCL, the CUDA device is set from LOCAL_RANK before the group starts.
    Calling it again when already initialized does nothing.
    """
    if backend is not None and backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl', 'gloo' or None, got {backend!r}")
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < float("inf"):
        raise ValueError(f"timeout_s must be a positive, finite number of seconds, got {timeout_s!r}")
    global _TIMEOUT
    if dist.is_initialized():
        return
    _TIMEOUT = datetime.timedelta(seconds=timeout_s)
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = datetime.timedelta(seconds=timeout_s)
    if "WORLD_SIZE" not in os.environ:
        store = dist.HashStore()
        dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
        return
    # NCCL binds the group to the current device, which makes a broken peer surface as an error.
    device_id = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else None
    dist.init_process_group(backend, timeout=timeout, device_id=device_id)


def _group(ranks: list[int]) -> dist.ProcessGroup:
    """The process group of exactly these ranks, created once (a collective call on all ranks)."""
    key = tuple(ranks)
    if key not in _GROUP_CACHE:
        _GROUP_CACHE[key] = dist.new_group(list(key), timeout=_TIMEOUT)
    return _GROUP_CACHE[key]


def made_here(group) -> bool:
    """Whether `group` is one of the process groups this module created (initialize_model_parallel).

    The conformance suite asks this to tell a backend's own process groups from borrowed ones."""
    return any(group is g for g in _GROUP_CACHE.values())


def _my_group(all_groups: list[list[int]], rank: int) -> tuple[dist.ProcessGroup, list[int]]:
    """Create every group of a partition (all ranks must) and return the one holding `rank`."""
    mine = None
    for ranks in all_groups:
        group = _group(ranks)
        if rank in ranks:
            mine = (group, ranks)
    assert mine is not None
    return mine


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    expert_tensor_parallel_size: int | None = None,
) -> ParallelState:
    """Build (or reuse) the TP, DP, EP and expert-TP groups and make them the current state."""
    global _STATE
    if not dist.is_initialized():
        init_distributed()
    if expert_tensor_parallel_size is None:
        expert_tensor_parallel_size = tensor_model_parallel_size
    check_positive_int("tensor_model_parallel_size", tensor_model_parallel_size)
    check_positive_int("expert_model_parallel_size", expert_model_parallel_size)
    check_positive_int("expert_tensor_parallel_size", expert_tensor_parallel_size)
    world, rank = dist.get_world_size(), dist.get_rank()
    tp, ep, etp = tensor_model_parallel_size, expert_model_parallel_size, expert_tensor_parallel_size
    if world % tp != 0:
        raise ValueError(
            f"tensor_model_parallel_size ({tp}) must divide the world size ({world})"
        )
    if world % (ep * etp) != 0:
        raise ValueError(
            f"expert_model_parallel_size * expert_tensor_parallel_size ({ep} * {etp}) "
            f"must divide the world size ({world})"
        )

    # Dense layout: consecutive blocks of tp ranks; DP strides across blocks.
    tp_groups = [list(range(start, start + tp)) for start in range(0, world, tp)]
    dp_groups = [list(range(first, world, tp)) for first in range(tp)]
    # Expert layout: blocks of ep*etp ranks; inside a block, etp varies fastest.
    block = ep * etp
    etp_groups = [list(range(s, s + etp)) for s in range(0, world, etp)]
    ep_groups = [
        [start + e * etp + t for e in range(ep)]
        for start in range(0, world, block)
        for t in range(etp)
    ]

    block_groups = [list(range(s, s + block)) for s in range(0, world, block)]

    tp_group, tp_ranks = _my_group(tp_groups, rank)
    dp_group, dp_ranks = _my_group(dp_groups, rank)
    ep_group, ep_ranks = _my_group(ep_groups, rank)
    etp_group, etp_ranks = _my_group(etp_groups, rank)
    block_group, _ = _my_group(block_groups, rank)
    _STATE = ParallelState(
        world_size=world,
        rank=rank,
        tp_group=tp_group, tp_size=tp, tp_rank=tp_ranks.index(rank),
        dp_group=dp_group, dp_size=len(dp_ranks), dp_rank=dp_ranks.index(rank),
        ep_group=ep_group, ep_size=ep, ep_rank=ep_ranks.index(rank),
        expert_tp_group=etp_group, expert_tp_size=etp, expert_tp_rank=etp_ranks.index(rank),
        expert_tp_ep_group=block_group,
    )
    return _STATE


def get_parallel_state() -> ParallelState:
    """The current layout; a world-1 layout is created on first use if none was set up."""
    if _STATE is None:
        return initialize_model_parallel()
    return _STATE


def resolve_tp_group(group: dist.ProcessGroup | None = None) -> dist.ProcessGroup:
    """`group` itself, or the current layout's TP group when it is None.

    Every layer, adapter, merge and collective takes `tp_group=None` to mean "the TP group of the
    current layout"; this is the one place that reads it (creating a world-1 layout if none is set).

    Args:
        group (dist.ProcessGroup | None): an explicit group, returned as it is. Default: None.

    Returns:
        dist.ProcessGroup: the group to communicate over.
    """
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"tp_group must be a torch.distributed ProcessGroup or None (the current TP group), "
                        f"got {group!r} ({type(group).__name__})")
    return get_parallel_state().tp_group if group is None else group


def destroy_model_parallel(forget_groups: bool = False) -> None:
    """Forget the current layout. The cached groups stay alive for reuse unless forget_groups, which
    makes the next layout create fresh groups (after a collective failed or timed out, the old ones
    may be out of step)."""
    global _STATE
    _STATE = None
    if forget_groups:
        _GROUP_CACHE.clear()


def set_group_timeout(timeout_s: float) -> None:
    """The timeout of the groups created from now on (existing groups keep theirs)."""
    global _TIMEOUT
    _TIMEOUT = datetime.timedelta(seconds=timeout_s)


def default_device() -> torch.device:
    """Where new parameters go by default: this rank's GPU under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
