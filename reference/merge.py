"""Folding an adapter into its base weight: W' = W + (alpha / r) B A, shard by shard.

Each rank needs the part of B A that lands on its base shard:

    column base  W_r (out/t, in)   = W_r + s * B_r A        B_r (out/t, r) local; A (r, in) gathered from (r/t, in)
    row base     W_r (out, in/t)   = W_r + s * B A_r        B (out, r) gathered from (out/t, r); A_r (r, in/t) local

The arithmetic is float32 (or float64 if the base is), cast back to the base weight's dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from .parallel import gather_shards, get_parallel_state


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class LoRAMerge:
    """Tensor helper (Megatron-Bridge's API): merge one adapter into one base weight shard."""

    @torch.no_grad()
    def merge(self, base_weight: torch.Tensor, linear_out: torch.Tensor, linear_in: torch.Tensor,
              alpha: float, dim: int, *, tp_size: int = 1, tp_group=None) -> torch.Tensor:
        """base_weight + (alpha/dim) * B @ A for this rank's shard; which factor to gather comes from
        the shapes: A with dim/tp_size rows is a column-base shard, B with fewer rows than the base
        is a row-base shard."""
        A, B = linear_in, linear_out
        if tp_size > 1 and tp_group is None:
            tp_group = get_parallel_state().tp_group
        gather_A = tp_size > 1 and A.shape[0] * tp_size == dim                   # column base: A is split
        gather_B = tp_size > 1 and not gather_A and B.shape[0] * tp_size == base_weight.shape[0]  # row base
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
        delta = (alpha / dim) * (B.to(dtype) @ A.to(dtype))
        return (base_weight.to(dtype) + delta).to(base_weight.dtype)


def merge_lora_weight(base_weight: torch.Tensor, adapter, sign: float = 1.0) -> torch.Tensor:
    """W + sign * (alpha/r) B A for a ParallelLinearAdapter beside `base_weight`."""
    return LoRAMerge().merge(base_weight, adapter.linear_out.weight, adapter.linear_in.weight,
                             sign * adapter.alpha, adapter.dim, tp_size=adapter.tp_size,
                             tp_group=adapter.tp_group)


def _replace_children(module: nn.Module, replace) -> None:
    for name, child in list(module.named_children()):
        new = replace(child)
        if new is not child:
            setattr(module, name, new)
        else:
            _replace_children(child, replace)


@torch.no_grad()
def merge_lora(model: nn.Module, *, keep_wrappers: bool = False) -> nn.Module:
    """Merge every LoRA adapter of `model` into its base weight.

    keep_wrappers=False (default): each LoRALinear is replaced by its base layer carrying the merged
    weight, leaving a model with no adapters. keep_wrappers=True: the wrappers stay, merged (their
    adapters are no longer called), so that `unmerge_lora` can undo it.
    """
    from .lora.transform import is_lora_wrapper

    def replace(child):
        if is_lora_wrapper(child):
            child.merge_()
            return child if keep_wrappers else child.to_wrap
        return child

    new_model = replace(model)
    if new_model is model:
        _replace_children(model, replace)
    return new_model


@torch.no_grad()
def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo `merge_lora(model, keep_wrappers=True)`: subtract each adapter again (up to rounding)."""
    from .lora.transform import is_lora_wrapper

    for module in model.modules():
        if is_lora_wrapper(module):
            module.unmerge_()
    return model
