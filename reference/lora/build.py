"""From a LoRA config and a base layer to its adapter: the one place the config is unpacked.

    build_adapter(config, module, full_name)
      layout = layout_of(module)                       the base's split, as the layer named it
      dim    = effective_dim(config, module, name)     the rank: config.dim, or smaller for MoE experts
      ParallelLinearAdapter(**adapter_arguments(config, layout, name, dim=dim, weight=module.weight))

Every adapter the transform creates (dense, router, grouped experts) gets its arguments from
`adapter_arguments`, so a config field reaches every kind of adapter the same way.

MoE rank (normalize_moe_lora): an expert linear gets rank r_e = dim // moe_router_topk (a token passes
through k experts, so k adapters of rank dim/k match one dense adapter's capacity); alpha is
unchanged, so the scale is alpha / r_e. For column-parallel expert bases r_e is rounded up to a
multiple of the expert-TP size (A is split by rows there). Expert linears are found by full name:
`mlp.` … `experts` … `.linear_fc1|2` at the end, and not under `.shared_experts.`; shared experts and
the router are dense modules and keep the full rank.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from ..layout import BaseLayout, layout_of
from .adapter import ParallelLinearAdapter

EXPERT_LINEAR = re.compile(r".*mlp\..*experts.*\.linear_fc[12]$")


def is_expert_linear(full_name: str) -> bool:
    """Whether the module named `full_name` is a routed expert's fc1 / fc2 (not a shared expert's)."""
    return EXPERT_LINEAR.match(full_name) is not None and ".shared_experts." not in full_name


def effective_dim(config, module: nn.Module, full_name: str) -> int:
    """The adapter rank for `module`: dim, or dim // topk (rounded up for column bases) for experts.

    Args:
        config (LoRAConfig): reads dim and normalize_moe_lora.
        module (nn.Module): the base; an expert carries `moe_router_topk`.
        full_name (str): the base's full name (decides whether it is an expert linear).

    Raises:
        ValueError: normalize_moe_lora on an expert without a positive int moe_router_topk, or a dim
            that the topk does not divide.
    """
    if not (config.normalize_moe_lora and is_expert_linear(full_name)):
        return config.dim
    topk = getattr(module, "moe_router_topk", None)
    if isinstance(topk, bool) or not isinstance(topk, int) or topk <= 0:
        raise ValueError(f"normalize_moe_lora needs a positive int moe_router_topk on the expert module "
                         f"{full_name}, got {topk!r}")
    if config.dim % topk:
        raise ValueError(f"dim ({config.dim}) must be divisible by moe_router_topk ({topk}) when "
                         f"normalize_moe_lora=True (expert module {full_name})")
    rank = config.dim // topk
    layout = layout_of(module)
    if layout.kind == "column":
        rank = math.ceil(rank / layout.tp_size) * layout.tp_size
    return rank


def adapter_arguments(config, layout: BaseLayout, full_name: str, *, dim: int, weight: torch.Tensor) -> dict:
    """ParallelLinearAdapter's keyword arguments for a base with `layout` under `config`.

    Args:
        config (LoRAConfig): alpha, dropout, dropout_position, the init methods, lora_dtype,
            a2a_experimental and sequence_parallel_input_regather (never for expert linears, as in
            Megatron-Bridge) are read.
        layout (BaseLayout): the base's layout, handed to the adapter whole.
        full_name (str): the base's full name (the adapter's base_name).
        dim (int): the adapter rank (see effective_dim).
        weight (torch.Tensor): the base weight: A and B take its device, and its dtype unless
            config.lora_dtype is set.

    Returns:
        dict: keyword arguments; ParallelLinearAdapter(**adapter_arguments(...)) builds the adapter.
    """
    return dict(in_features=layout.input_size, out_features=layout.output_size, dim=dim, layout=layout,
                alpha=config.alpha, dropout=config.dropout, dropout_position=config.dropout_position,
                lora_A_init_method=config.lora_A_init_method, lora_B_init_method=config.lora_B_init_method,
                dtype=config.lora_dtype or weight.dtype, device=weight.device,
                a2a_experimental=config.a2a_experimental, base_name=full_name,
                sequence_parallel_input_regather=config.sequence_parallel_input_regather
                and not is_expert_linear(full_name))


def build_adapter(config, module: nn.Module, full_name: str) -> ParallelLinearAdapter:
    """The ParallelLinearAdapter that fits `module` (column, row, nn.Linear or the MoE router).

    Args:
        config (LoRAConfig): the LoRA configuration.
        module (nn.Module): the base layer; its layout comes from layout_of(module).
        full_name (str): the base's full name, e.g. "decoder.layers.0.mlp.linear_fc1".
    """
    layout = layout_of(module)
    dim = effective_dim(config, module, full_name)
    return ParallelLinearAdapter(**adapter_arguments(config, layout, full_name, dim=dim, weight=module.weight))


__all__ = ["EXPERT_LINEAR", "is_expert_linear", "effective_dim", "adapter_arguments", "build_adapter"]
