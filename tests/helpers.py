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
