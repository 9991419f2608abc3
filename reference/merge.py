"""Folding an adapter into its base weight: W' = W + (alpha / r) B A, shard by shard.

Each rank needs the part of B A that lands on its base shard:

    column base  W_r (out/t, in)   = W_r + s * B_r A        B_r (out/t, r) local; A (r, in) gathered from (r/t, in)
    row base     W_r (out, in/t)   = W_r + s * B A_r        B (out, r) gathered from (out/t, r); A_r (r, in/t) local

Which factor to gather is the base's layout (reference/layout.py): `merge_lora_shard` takes it whole.
`LoRAMerge` (Megatron-Bridge's API) is given no layout, only tensors: it reads the case off the shapes.
The arithmetic is float32 (or float64 if the base is), cast back to the base weight's dtype.

This module is tensor math only; merging a whole model (merge_lora, unmerge_lora) is a model transform
and lives with apply_lora in reference/lora/transform.py.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
import torch.distributed as dist

from .layout import BaseLayout
from .parallel import check_positive_int, gather_shards, resolve_tp_group


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_arguments(base_weight, B, A, alpha, dim, tp_size: int, tp_group) -> None:
    """Types, values and the group size, named, before any rank starts a gather."""
    for name, tensor in (("base_weight", base_weight), ("linear_out", B), ("linear_in", A)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise TypeError(f"{name} must be a 2-D torch.Tensor, got {shape}")
    if not base_weight.dtype.is_floating_point:
        raise TypeError(f"base_weight must be a floating tensor (the merged weight is W + (alpha/dim) B A), "
                        f"got {base_weight.dtype}")
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    check_positive_int("dim", dim)
    check_positive_int("tp_size", tp_size)
    if tp_size > 1 and dist.get_world_size(tp_group) != tp_size:
        raise ValueError(f"tp_size={tp_size} but tp_group has {dist.get_world_size(tp_group)} rank(s): pass the "
                         f"group the weights are split over, or tp_size=1 for local tensors")


def _merge(base_weight: torch.Tensor, B: torch.Tensor, A: torch.Tensor, alpha: float, dim: int, *,
           gather_A: bool, gather_B: bool, tp_size: int, tp_group) -> torch.Tensor:
    """base_weight + (alpha/dim) B A, after gathering the factor that is split; an adapter with a
    non-finite value is refused on every rank (as PEFT's safe merge refuses NaNs)."""
    # Check the shapes the product will have before any rank starts a gather.
    A_rows = A.shape[0] * (tp_size if gather_A else 1)
    B_rows = B.shape[0] * (tp_size if gather_B else 1)
    if (B_rows, A.shape[1]) != tuple(base_weight.shape) or B.shape[1] != A_rows or A_rows != dim:
        raise ValueError(
            f"cannot merge: linear_out {tuple(B.shape)} @ linear_in {tuple(A.shape)} with tp_size={tp_size} "
            f"and dim={dim} does not give the base weight's shape {tuple(base_weight.shape)}"
        )
    if gather_A:
        A = gather_shards(A, 0, tp_group)                                     # (r/t, in) -> (r, in)
    if gather_B:
        B = gather_shards(B, 0, tp_group)                                     # (out/t, r) -> (out, r)
    dtype = _compute_dtype(base_weight.dtype)
    # W + (alpha/dim) B A in one GEMM (the scale and the add in its epilogue), on a copy of W.
    merged = base_weight.to(dtype, copy=True).addmm_(B.to(dtype), A.to(dtype), alpha=alpha / dim)
    merged = merged.to(base_weight.dtype)
    finite = torch.isfinite(merged).all().to(torch.int32).reshape(1)
    if tp_size > 1:             # a NaN in one rank's shard: every rank refuses
        dist.all_reduce(finite, op=dist.ReduceOp.MIN, group=tp_group)
    if not bool(finite.item()):
        raise ValueError("cannot merge: the merged weight would have NaN or inf values (in the base weight "
                         "or the adapter's update (alpha/dim) B A); the weight is left as it was")
    return merged


@torch.no_grad()
def merge_lora_shard(base_weight: torch.Tensor, linear_out: torch.Tensor, linear_in: torch.Tensor,
                     alpha: float, dim: int, layout: BaseLayout) -> torch.Tensor:
    """This rank's shard of W + (alpha/dim) B A for a base split as `layout` says (a collective if split).

    Args:
        base_weight (torch.Tensor): this rank's W shard: column (out/t, in), row (out, in/t), none (out, in).
        linear_out (torch.Tensor): this rank's B shard: (out/t, r), or (out, r) for "none".
        linear_in (torch.Tensor): this rank's A shard: column (r/t, in), row (r, in/t), none (r, in).
        alpha (float): the scale numerator (negated to unmerge).
        dim (int): the rank r.
        layout (BaseLayout): the base's layout: its kind says which factor to gather.

    Returns:
        torch.Tensor: the merged shard, shaped and typed like base_weight.

    Raises:
        ValueError, TypeError: as LoRAMerge.merge (bad arguments before any collective; a non-finite
            update on every rank).
    """
    if not isinstance(layout, BaseLayout):
        raise TypeError(f"layout must be the base's BaseLayout (reference.layout_of(layer)), got {layout!r}")
    _check_arguments(base_weight, linear_out, linear_in, alpha, dim, layout.tp_size, layout.tp_group)
    split = layout.tp_size > 1
    return _merge(base_weight, linear_out, linear_in, alpha, dim, gather_A=split and layout.kind == "column",
                  gather_B=split and layout.kind == "row", tp_size=layout.tp_size, tp_group=layout.tp_group)


class LoRAMerge:
    """Tensor helper (Megatron-Bridge's API): merge one adapter into one base weight shard."""

    @torch.no_grad()
    def merge(self, base_weight: torch.Tensor, linear_out: torch.Tensor, linear_in: torch.Tensor,
              alpha: float, dim: int, *, tp_size: int = 1, tp_group=None) -> torch.Tensor:
        """base_weight + (alpha/dim) * B @ A for this rank's shard, the case read off the shapes.

        A with dim/tp_size rows is a column-base shard (A is gathered); otherwise B with fewer rows
        than the base is a row-base shard (B is gathered).

        Args:
            base_weight (torch.Tensor): this rank's W shard, (out/t, in) or (out, in/t).
            linear_out (torch.Tensor): this rank's B shard, (out/t, r).
            linear_in (torch.Tensor): this rank's A shard, (r/t, in) or (r, in/t).
            alpha (float): the scale numerator.
            dim (int): the rank r.
            tp_size (int): the TP size t; 1 merges local tensors only. Default: 1.
            tp_group (dist.ProcessGroup | None): None: the current TP group. Default: None.

        Returns:
            torch.Tensor: the merged shard, shaped and typed like base_weight.

        Raises:
            ValueError: the shards do not multiply to base_weight's shape, alpha is not finite, dim or
                tp_size is not a positive integer, tp_size is not the group's size (all before any
                collective); the update has NaN or inf values (on every rank).
            TypeError: a weight that is not a 2-D tensor, a tp_group that is not a process group.
        """
        A, B = linear_in, linear_out
        check_positive_int("tp_size", tp_size)
        if tp_size > 1 or tp_group is not None:
            tp_group = resolve_tp_group(tp_group)
        _check_arguments(base_weight, B, A, alpha, dim, tp_size, tp_group)
        gather_A = tp_size > 1 and A.shape[0] * tp_size == dim                   # column base: A is split
        gather_B = tp_size > 1 and not gather_A and B.shape[0] * tp_size == base_weight.shape[0]  # row base
        return _merge(base_weight, B, A, alpha, dim, gather_A=gather_A, gather_B=gather_B, tp_size=tp_size,
                      tp_group=tp_group)


def merge_lora_weight(base_weight: torch.Tensor, adapter, sign: float = 1.0) -> torch.Tensor:
    """W + sign * (alpha/r) B A for a ParallelLinearAdapter beside `base_weight` (a collective under TP).

    Args:
        base_weight (torch.Tensor): this rank's shard of the base weight.
        adapter (ParallelLinearAdapter): its A, B, alpha, dim and the base's `layout` are read.
        sign (float): 1.0 merges, -1.0 unmerges. Default: 1.0.
    """
    if not all(hasattr(adapter, name) for name in ("linear_in", "linear_out", "alpha", "dim", "layout")):
        raise TypeError(f"adapter must be a ParallelLinearAdapter (linear_in, linear_out, alpha, dim, layout), "
                        f"got {type(adapter).__name__}")
    if sign not in (1.0, -1.0):
        raise ValueError(f"sign must be 1.0 (merge) or -1.0 (unmerge), got {sign!r}")
    return merge_lora_shard(base_weight, adapter.linear_out.weight, adapter.linear_in.weight,
                            sign * adapter.alpha, adapter.dim, adapter.layout)


__all__ = ["LoRAMerge", "merge_lora_shard", "merge_lora_weight"]
