"""SPEC's sharding table, written once: which piece of each full tensor a TP rank holds.

SPEC [TP-COL-1], [TP-ROW-1], [LORA-FWD-2], [LORA-FWD-3], [LORA-FWD-8]. A `Shard` names the dimension
a tensor is split along over the TP group (None: every rank holds all of it) and its stride: with
stride k the tensor is k equal blocks ([gate; up] of a gated MLP, say), each split the same way, so
rank r holds [block_0 piece r; ...; block_{k-1} piece r].

                    column base                    row base
    weight (out, in)  dim 0, the base's stride       dim 1
    bias   (out,)     dim 0, the base's stride       whole
    A      (r, in)    dim 0                          dim 1
    B      (out, r)   dim 0, the base's stride       dim 0
    input  (s, b, in) whole; dim 0 (sequence) if SP  dim -1; whole if not input_is_parallel
    output (s,b,out)  dim -1, the base's stride;     whole; dim 0 (sequence) if SP
                      whole if gather_output

A plain nn.Linear base (kind "linear", or "none" for a replicated adapter) holds everything whole.

The suite computes its expectations with these functions and never with the reference's own
sharding code (reference/parallel/sharding.py): a checker that reused the code it checks would
agree with that code's bugs.

Tolerances by dtype live here too: what "equal" means for every comparison of the suite and of the
project's tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

# (rtol, atol) by dtype, in the style of torch.testing.assert_close's defaults. The reduced-precision
# ones are wider because a TP layer sums in a different order than the full math.
TOLERANCES = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
TENSORS = ("weight", "bias", "A", "B", "input", "output")


@dataclass(frozen=True)
class Shard:
    dim: int | None          # None: whole on every rank
    stride: int = 1


WHOLE = Shard(None)


def shard_of(tensor: str, kind: str, *, stride: int = 1, sp: bool = False, gather_output: bool = False,
             input_is_parallel: bool = True) -> Shard:
    """Where `tensor` (one of TENSORS) of a `kind` base ("column", "row", else plain) lives; see the table."""
    if tensor not in TENSORS:
        raise ValueError(f"tensor must be one of {TENSORS}, got {tensor!r}")
    if kind == "column":
        return {"weight": Shard(0, stride), "bias": Shard(0, stride), "A": Shard(0), "B": Shard(0, stride),
                "input": Shard(0) if sp else WHOLE,
                "output": WHOLE if gather_output else Shard(-1, stride)}[tensor]
    if kind == "row":
        return {"weight": Shard(1), "bias": WHOLE, "A": Shard(1), "B": Shard(0),
                "input": Shard(-1) if input_is_parallel else WHOLE,
                "output": Shard(0) if sp else WHOLE}[tensor]
    return WHOLE


def example_shard(tensor: str, ex: dict) -> Shard:
    """`shard_of` for a layer example's base (a dict with kind, stride, sp, gather_output, input_is_parallel)."""
    return shard_of(tensor, ex["kind"], stride=ex.get("stride", 1), sp=ex.get("sp", False),
                    gather_output=ex.get("gather_output", False), input_is_parallel=ex.get("input_is_parallel", True))


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of `t`: a DTensor's local tensor, any other tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def piece(full: torch.Tensor, shard: Shard, rank: int, size: int, offset: int = 0) -> torch.Tensor:
    """Rank `rank`'s piece of `full` (of `size` ranks). `offset` shifts the split dimension (by 1 for a
    stack of per-expert tensors)."""
    if shard.dim is None or size == 1:
        return full
    dim = shard.dim + offset if shard.dim >= 0 else shard.dim
    blocks = full.chunk(shard.stride, dim=dim)                                     # stride x (n/stride)
    return torch.cat([block.chunk(size, dim=dim)[rank] for block in blocks], dim=dim)


def gather(local: torch.Tensor, shard: Shard, group, offset: int = 0) -> torch.Tensor:
    """The full tensor from every rank's piece `local` (same shape on every rank); no autograd."""
    local = local.detach().contiguous()
    size = dist.get_world_size(group) if dist.is_initialized() else 1
    if shard.dim is None or size == 1:
        return local.clone()
    dim = shard.dim + offset if shard.dim >= 0 else shard.dim
    parts = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(parts, local, group=group)
    per_rank = [part.chunk(shard.stride, dim=dim) for part in parts]               # size x stride
    return torch.cat([torch.cat([blocks[k] for blocks in per_rank], dim=dim) for k in range(shard.stride)], dim=dim)
