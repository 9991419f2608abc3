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

import torch

from .layout import BaseLayout
from .parallel import gather_shards, resolve_tp_group


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _merge(base_weight: torch.Tensor, B: torch.Tensor, A: torch.Tensor, alpha: float, dim: int, *,
           gather_A: bool, gather_B: bool, tp_size: int, tp_group) -> torch.Tensor:
    """base_weight + (alpha/dim) B A, after gathering the factor that is split."""
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
    delta = (alpha / dim) * (B.to(dtype) @ A.to(dtype))                       # like base_weight
    return (base_weight.to(dtype) + delta).to(base_weight.dtype)


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
        ValueError: the shards do not multiply to base_weight's shape (raised before any collective).
    """
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
            ValueError: the shards do not multiply to base_weight's shape (before any collective).
        """
        A, B = linear_in, linear_out
        if tp_size > 1 and tp_group is None:
            tp_group = resolve_tp_group()
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
    return merge_lora_shard(base_weight, adapter.linear_out.weight, adapter.linear_in.weight,
                            sign * adapter.alpha, adapter.dim, adapter.layout)


__all__ = ["LoRAMerge", "merge_lora_shard", "merge_lora_weight"]
