"""Putting adapters into a model: match, build the adapter for the base's kind, wrap, freeze.

    apply_lora(model, config, training=True)
      1. config.freeze_model(model, training): LoRA freezes every parameter (the base weights never
         train); VLMLoRA freezes only the parts it is told to (reference/vlm.py);
      2. walk the modules depth-first; each match is replaced by LoRALinear(base, adapter) and not
         descended into; existing LoRALinear modules are left as they are (so applying twice changes
         nothing);
      3. adapters are trainable; with training=False every parameter is frozen and the model is put
         in eval mode;
      4. target patterns that matched no module are reported in one warning.

A model may also be a list of modules (pipeline chunks): each is handled in turn.
"""

from __future__ import annotations

import warnings

from torch import nn

from ..layers import ColumnParallelLinear, RowParallelLinear
from ..moe import GroupedLinear, TopKRouter
from .adapter import ParallelLinearAdapter
from .experts import effective_dim, wrap_grouped_linear, wrap_router
from .matching import full_name_of, match, pattern_matches
from .wrapper import LoRALinear

def base_kind(module: nn.Module) -> str:
    if isinstance(module, ColumnParallelLinear):
        return "column"
    if isinstance(module, RowParallelLinear):
        return "row"
    return "none"


def build_adapter(config, module: nn.Module, full_name: str) -> nn.Module:
    """The ParallelLinearAdapter that fits `module` (column, row or plain nn.Linear)."""
    kind = base_kind(module)
    weight = module.weight
    if kind == "none":
        in_features, out_features = module.in_features, module.out_features
        extra = {}
    else:
        in_features, out_features = module.input_size, module.output_size
        extra = dict(tp_group=module.tp_group, sequence_parallel=module.sequence_parallel,
                     gather_output=getattr(module, "gather_output", False),
                     input_is_parallel=getattr(module, "input_is_parallel", True),
                     stride=getattr(module, "stride", 1),
                     explicit_expert_comm=getattr(module, "explicit_expert_comm", False))
    return ParallelLinearAdapter(
        in_features, out_features, effective_dim(config, module, full_name), base_kind=kind,
        alpha=config.alpha, dropout=config.dropout, dropout_position=config.dropout_position,
        lora_A_init_method=config.lora_A_init_method, lora_B_init_method=config.lora_B_init_method,
        dtype=config.lora_dtype or weight.dtype, device=weight.device,
        a2a_experimental=config.a2a_experimental, base_name=full_name, **extra)


def is_lora_wrapper(module: nn.Module) -> bool:
    """LoRALinear, or a MoE module that carries its own adapters (reference/moe.py)."""
    return getattr(module, "is_lora_wrapper", False)


def transform(config, module: nn.Module, name: str | None = None, prefix: str | None = None) -> nn.Module:
    """LoRALinear(module, adapter) if the config selects `module`, else `module` unchanged."""
    if is_lora_wrapper(module) or name is None:
        return module
    if match(config, module, name, prefix) is None:
        return module
    full_name = full_name_of(name, prefix)
    if isinstance(module, GroupedLinear):
        return wrap_grouped_linear(config, module, full_name)
    if isinstance(module, TopKRouter):
        return wrap_router(config, module, full_name)
    return LoRALinear(module, build_adapter(config, module, full_name))


def _walk(config, module: nn.Module, prefix: str) -> None:
    for name, child in list(module.named_children()):
        if is_lora_wrapper(child):
            continue
        new = transform(config, child, name, prefix)
        if new is not child:
            setattr(module, name, new)
        else:
            _walk(config, child, full_name_of(name, prefix))


def lora_adapters(model: nn.Module):
    """Every adapter module in `model`."""
    for module in model.modules():
        if is_lora_wrapper(module):
            yield from module.lora_adapters()


def unmatched_patterns(config, chunks) -> list[str]:
    """Target patterns that select none of the wrapped modules."""
    wrapped = [full for chunk in chunks for full, m in chunk.named_modules() if is_lora_wrapper(m)]
    return [p for p in config.target_modules
            if not any(pattern_matches(p, full.rsplit(".", 1)[-1], full) for full in wrapped)]


def freeze_all(model, training: bool = True) -> None:
    """Freeze every parameter; train mode when training (LoRA's freeze_model)."""
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    for chunk in chunks:
        chunk.requires_grad_(False)
        chunk.train(training)


def apply_lora(model, config, training: bool = True):
    """Freeze `model`, wrap every matched linear with an adapter, and set train/eval; returns model."""
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    getattr(config, "freeze_model", freeze_all)(chunks, training)
    for chunk in chunks:
        _walk(config, chunk, "")
        for adapter in lora_adapters(chunk):
            adapter.requires_grad_(True)
        if not training:
            chunk.requires_grad_(False)
        chunk.train(training)
    unmatched = unmatched_patterns(config, chunks)
    if unmatched:
        warnings.warn(f"LoRA target_modules matched no module: {unmatched}", UserWarning, stacklevel=3)
    return model
