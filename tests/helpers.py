"""Shared helpers for the rank functions that tests run through `run_distributed`."""

from __future__ import annotations

import torch
import torch.distributed as dist

from reference.parallel import default_device

# Tolerances by dtype, as torch.testing.assert_close uses them (rtol, atol).
TOLERANCES = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1.3e-6, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.float16: (1e-3, 1e-5),
}


def device() -> torch.device:
    return default_device()


def seeded(shape, seed: int, dtype=torch.float64) -> torch.Tensor:
    """The same tensor on every rank and backend: drawn on the CPU from its own generator."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device())


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype=None, scale: float = 1.0, msg: str = ""):
    """assert_close with the tolerances of `dtype` (default: actual's), widened by `scale`."""
    rtol, atol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(actual.to(expected.dtype).to(expected.device), expected,
                               rtol=rtol * scale, atol=atol * scale, msg=msg or None)


def chunk(x: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    return x.chunk(size, dim=dim)[rank]


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
