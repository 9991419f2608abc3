"""Shared helpers for the rank functions that tests run through `run_distributed`."""

from __future__ import annotations

import torch
import torch.distributed as dist

from conformance.layout import TOLERANCES, Shard, gather, piece, shard_of
from reference.parallel import default_device, initialize_model_parallel

def device() -> torch.device:
    return default_device()


def init_tp(tp: int | None = None):
    """TP groups of size tp (default: the whole world); returns the ParallelState."""
    return initialize_model_parallel(tensor_model_parallel_size=tp or dist.get_world_size())


def seeded(shape, seed: int, dtype=torch.float64) -> torch.Tensor:
    """The same tensor on every rank and backend: drawn on the CPU from its own generator."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device())


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype=None, scale: float = 1.0, msg: str = ""):
    """assert_close with the tolerances of `dtype` (default: actual's), widened by `scale`: the suite's
    table (conformance/layout.py), so that "equal" means the same in the tests and in the suite."""
    rtol, atol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(actual.to(expected.dtype).to(expected.device), expected,
                               rtol=rtol * scale, atol=atol * scale, msg=msg or None)


def chunk(x: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    """Rank `rank`'s piece of `x` split along `dim` (the suite's layout code: conformance/layout.py)."""
    return piece(x, Shard(dim), rank, size)


def strided_chunk(x: torch.Tensor, dim: int, rank: int, size: int, stride: int = 1) -> torch.Tensor:
    """Rank `rank`'s part of a [part_0; ...; part_{stride-1}] tensor along `dim` (SPEC [TP-COL-1])."""
    return piece(x, Shard(dim, stride), rank, size)


def local_piece(tensor: str, kind: str, full: torch.Tensor, rank: int, size: int, **flags) -> torch.Tensor:
    """This rank's piece of a full `tensor` ("input", "output", "weight", "bias", "A" or "B") of a
    `kind` base with the layout `flags` (sp, stride, gather_output, input_is_parallel): SPEC's table."""
    return piece(full, shard_of(tensor, kind, **flags), rank, size)


def gather_full(local: torch.Tensor, dim: int, group, stride: int = 1) -> torch.Tensor:
    """The full tensor from every rank's (strided) shard, with plain torch.distributed (no autograd)."""
    return gather(local, Shard(dim, stride), group)


def all_reduce_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    out = x.detach().clone()
    dist.all_reduce(out, group=group)
    return out


def rank_seed(base: int) -> int:
    """A seed that differs per global rank."""
    return base * 1000 + dist.get_rank()


_COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_gather_single", "all_reduce", "reduce_scatter",
                "reduce_scatter_tensor", "reduce_scatter_single", "all_to_all_single", "broadcast",
                "all_gather_object")


class NoCollectives:
    """Within the block, any torch.distributed collective raises instead of communicating: an error
    that must come before the first collective is checked by raising inside it."""

    def __enter__(self):
        self.saved = {n: getattr(dist, n) for n in _COLLECTIVES if hasattr(dist, n)}

        def trap(name):
            def collective(*args, **kwargs):
                raise AssertionError(f"dist.{name} was called before the error was raised")
            return collective

        for n in self.saved:
            setattr(dist, n, trap(n))
        return self

    def __exit__(self, *exc):
        for n, fn in self.saved.items():
            setattr(dist, n, fn)
        return False
