"""Model-level LoRA: put adapters into a model, sum their gradients, merge them back out.

    apply_lora(model, config, training=True)
      1. config.freeze_model(model, training): LoRA freezes every parameter (the base weights never
         train); VLMLoRA freezes only the parts it is told to (reference/vlm.py);
      2. walk the modules depth-first; each match is replaced by LoRALinear(base, adapter) and not
         descended into; existing LoRALinear modules are left as they are (so applying twice changes
         nothing);
      3. adapters are trainable; with training=False every parameter is frozen and the model is put
         in eval mode;
      4. target patterns that matched no module are reported in one warning (exclude patterns that
         match no linear module, in another);
      a model that is not a module (or list of modules), or an existing adapter that this config
      would give another rank, is an error before anything changes.
    finalize_lora_grads(model)       after backward: sum the gradients of adapters whose copies saw
                                     different tokens (MoE shared experts over EP, the router under SP)
    merge_lora(model) / unmerge_lora(model)   fold every adapter into its base weight / take it out
    set_adapters_enabled(model, enabled)      turn every adapter off (the base model's outputs) or on
    with disabled_adapters(model): ...        the base model for a block (e.g. a DPO reference pass)

A model may also be a list of modules (pipeline chunks): each is handled in turn. Wrappers are found
through the wrapper protocol (reference/lora/protocol.py), never by class.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from ..layout import check_flags
from ..moe import GroupedLinear
from ..router import TopKRouter
from .build import build_adapter, effective_dim
from .config import LoRAConfig
from .experts import wrap_grouped_linear, wrap_router
from .matching import full_name_of, is_linear_like, match, pattern_matches
from .protocol import is_lora_wrapper, lora_adapters, named_lora_wrappers
from .wrapper import LoRALinear


def model_chunks(model) -> list[nn.Module]:
    """A model as its list of pipeline chunks (a bare module is one chunk)."""
    return list(model) if isinstance(model, (list, tuple)) else [model]


def transform(config, module: nn.Module, name: str | None = None, prefix: str | None = None) -> nn.Module:
    """LoRALinear(module, adapter) if the config selects `module`, else `module` unchanged.

    Args:
        config (LoRAConfig): the LoRA configuration.
        module (nn.Module): the candidate; a wrapper already is returned as it is.
        name (str | None): its attribute name in its parent; None selects nothing. Default: None.
        prefix (str | None): its parent's full name. Default: None.

    Returns:
        nn.Module: the wrapper (LoRALinear, or the MoE wrappers for GroupedLinear / TopKRouter), or
        `module` itself.
    """
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


def unmatched_patterns(config, chunks) -> list[str]:
    """Target patterns that select none of the wrapped modules."""
    wrapped = [full for chunk in chunks for full, _ in named_lora_wrappers(chunk)]
    return [p for p in config.target_modules
            if not any(pattern_matches(p, full.rsplit(".", 1)[-1], full) for full in wrapped)]


def unmatched_excludes(config, chunks) -> list[str]:
    """Exclude patterns (exclude mode) that match no linear-like module: a misspelt exclude would
    otherwise silently adapt the module it meant to leave out."""
    if config.target_modules:
        return []
    candidates = [(name.rsplit(".", 1)[-1], name) for chunk in chunks for name, module in chunk.named_modules()
                  if name and is_linear_like(module)]
    return [p for p in config.exclude_modules if not any(pattern_matches(p, short, full) for short, full in candidates)]


def check_config(config) -> None:
    """`config` is a LoRA config, its fields valid now: a list field changed in place (cfg.target_modules
    .append(1)) escapes the checks on assignment, so they run again here."""
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a LoRA config (reference.LoRA, a LoRAConfig), got {type(config).__name__}")
    config.validate()


def check_model(what: str, model) -> None:
    """`model` is an nn.Module or a non-empty list of them (pipeline chunks), named in the error."""
    chunks = model_chunks(model)
    if not chunks or not all(isinstance(chunk, nn.Module) for chunk in chunks):
        raise TypeError(f"{what}: model must be an nn.Module or a non-empty list of nn.Modules (pipeline chunks), "
                        f"got {type(model).__name__}"
                        + (f" holding {sorted({type(c).__name__ for c in chunks})}" if chunks else ""))


def _check_existing_ranks(config, chunk: nn.Module) -> None:
    """Applying again keeps the existing adapters ([LORA-INJ-3]); one that this config selects with
    another rank would be silently kept at the old rank: an error instead."""
    for full_name, wrapper in named_lora_wrappers(chunk):
        adapter, base = getattr(wrapper, "adapter", None), getattr(wrapper, "to_wrap", None)
        if adapter is None or base is None or not full_name:
            continue
        prefix, _, name = full_name.rpartition(".")
        if match(config, base, name, prefix) is None:
            continue
        wanted = effective_dim(config, base, full_name)
        if adapter.dim != wanted:
            raise ValueError(f"{full_name} already has a LoRA adapter of dim {adapter.dim}; this config gives it "
                             f"dim {wanted}. Merge or remove the adapters first (applying again keeps them).")


def freeze_all(model, training: bool = True) -> None:
    """Freeze every parameter; train mode when training (LoRA's freeze_model).

    Args:
        model (nn.Module | list[nn.Module]): a model or its pipeline chunks.
        training (bool): put the model in train mode (else leave its mode). Default: True.
    """
    for chunk in model_chunks(model):
        chunk.requires_grad_(False)
        chunk.train(training)


def apply_lora(model, config, training: bool = True):
    """Freeze `model`, wrap every matched linear with an adapter, and set train/eval; returns model.

    Args:
        model (nn.Module | list[nn.Module]): a model or its pipeline chunks, changed in place.
        config (LoRAConfig): what to adapt; its `freeze_model(chunks, training)` is used when it has
            one (LoRA, VLMLoRA), else every parameter is frozen.
        training (bool): adapters trainable and train mode; False: everything frozen, eval mode.
            Default: True.

    Returns:
        the same `model` object.

    Raises:
        TypeError: model is not an nn.Module (or list of them); training is not a bool.
        ValueError: an adapter already in the model that this config selects with another dim.

    Warns:
        UserWarning: naming the target_modules patterns that matched no module; another naming the
            exclude_modules patterns that match no linear module.
    """
    chunks = model_chunks(model)
    check_model("apply_lora", model)
    check_config(config)
    if not isinstance(training, bool):
        raise TypeError(f"training must be True or False, got {training!r}")
    for chunk in chunks:
        _check_existing_ranks(config, chunk)
    excluded_nothing = unmatched_excludes(config, chunks)
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
    if excluded_nothing:
        warnings.warn(f"LoRA exclude_modules matched no module: {excluded_nothing}", UserWarning, stacklevel=3)
    return model


@torch.no_grad()
def finalize_lora_grads(model) -> None:
    """After backward: sum the gradients of adapters whose copies saw different tokens.

    Shared grouped-expert adapters are summed over the EP group; router adapters under sequence
    parallelism over the TP group (each names its group as `grad_sync_group`; an adapter with a
    `grad_sync_parameters()` method, the grouped experts', has only those summed: its shared factors).
    Megatron does the same in finalize_model_grads / grad hooks. A collective on every rank of those
    groups.

    Args:
        model (nn.Module | list[nn.Module]): a model or its pipeline chunks, after backward.
    """
    check_model("finalize_lora_grads", model)
    for chunk in model_chunks(model):
        for adapter in lora_adapters(chunk):
            group = getattr(adapter, "grad_sync_group", None)
            if group is None:
                continue
            for param in getattr(adapter, "grad_sync_parameters", adapter.parameters)():
                if not param.requires_grad:
                    continue
                if param.grad is None:   # this rank's experts got no token: a zero contribution
                    param.grad = torch.zeros_like(param)
                dist.all_reduce(param.grad, group=group)


def replace_children(module: nn.Module, replace) -> None:
    """Set each descendant `child` of `module` to `replace(child)`; a replaced child is not descended into."""
    for name, child in list(module.named_children()):
        new = replace(child)
        if new is not child:
            setattr(module, name, new)
        else:
            replace_children(child, replace)


@torch.no_grad()
def merge_lora(model: nn.Module, *, keep_wrappers: bool = False) -> nn.Module:
    """Merge every LoRA adapter of `model` into its base weight (a collective under TP).

    Args:
        model (nn.Module): a model with adapters, or a single wrapper.
        keep_wrappers (bool): False: each wrapper is replaced by its base layer carrying the merged
            weight, leaving a model with no adapters. True: the wrappers stay, merged (their adapters
            are no longer called), so that `unmerge_lora` can undo it. Default: False.

    Returns:
        nn.Module: `model` (changed in place), or the base layer when `model` is itself a wrapper and
        keep_wrappers is False.

    Raises:
        TypeError: model is not an nn.Module.
        RuntimeError, ValueError: a wrapper that cannot be merged (its adapters disabled, or a
            non-identity activation); raised before any wrapper changes.
    """
    check_model("merge_lora", model)
    check_flags(keep_wrappers=keep_wrappers)
    if isinstance(model, (list, tuple)):
        raise TypeError("merge_lora: merge each pipeline chunk on its own (merge_lora(chunk) for chunk in chunks)")
    for _, wrapper in named_lora_wrappers(model):      # every check before the first change or collective
        if not wrapper.merged:
            wrapper.check_mergeable()

    def replace(child):
        if is_lora_wrapper(child):
            child.merge_()
            return child if keep_wrappers else child.to_wrap
        return child

    new_model = replace(model)
    if new_model is model:
        replace_children(model, replace)
    return new_model


@torch.no_grad()
def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo `merge_lora(model, keep_wrappers=True)`: subtract each adapter again (up to rounding).

    Args:
        model (nn.Module): a model whose wrappers were merged in place.

    Returns:
        nn.Module: the same `model`.
    """
    check_model("unmerge_lora", model)
    if isinstance(model, (list, tuple)):
        raise TypeError("unmerge_lora: unmerge each pipeline chunk on its own")
    for _, wrapper in named_lora_wrappers(model):
        wrapper.unmerge_()
    return model


def _named_wrappers(model) -> list:
    return [(name, wrapper) for chunk in model_chunks(model) for name, wrapper in named_lora_wrappers(chunk)]


def set_adapters_enabled(model, enabled: bool) -> None:
    """Turn every LoRA adapter of `model` on or off (Megatron-Bridge's enable/disable_adapter_layers).

    Off, each wrapper returns exactly its base's output: the adapters are not called (no dropout, no
    collective) and get no gradient. Nothing else changes (trainable flags, train/eval mode).

    Args:
        model (nn.Module | list[nn.Module]): a model (or a wrapper, or pipeline chunks) after apply_lora.
        enabled (bool): True: the adapters add their update; False: the base model's outputs.

    Raises:
        TypeError: `enabled` is not a bool.
        RuntimeError: disabling a model with merged wrappers (checked before any wrapper changes).
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True or False, got {enabled!r}")
    check_model("set_adapters_enabled", model)
    wrappers = _named_wrappers(model)
    merged = [name or "<model>" for name, wrapper in wrappers if wrapper.merged]
    if not enabled and merged:
        raise RuntimeError(f"cannot disable the adapters of merged LoRA wrappers {merged[:4]}: unmerge_lora first")
    for _, wrapper in wrappers:
        if enabled:
            wrapper.enable_adapters()
        else:
            wrapper.disable_adapters()


@contextmanager
def disabled_adapters(model):
    """Within the block every adapter of `model` is off (the base model); on leaving it, also through an
    exception, each wrapper is back in the state it had (Megatron-Bridge's PEFT.disable_adapter).

        with disabled_adapters(policy):
            reference_logits = policy(input_ids)      # the base model's logits

    Args:
        model (nn.Module | list[nn.Module]): a model (or a wrapper, or pipeline chunks) after apply_lora.

    Yields:
        the same `model`.
    """
    before = [(wrapper, wrapper.adapters_enabled) for _, wrapper in _named_wrappers(model)]
    set_adapters_enabled(model, False)
    try:
        yield model
    finally:
        for wrapper, enabled in before:
            if enabled:
                wrapper.enable_adapters()


# build_adapter, is_lora_wrapper and lora_adapters were defined here before; they stay importable.
__all__ = ["apply_lora", "transform", "freeze_all", "unmatched_patterns", "finalize_lora_grads", "merge_lora",
           "unmerge_lora", "set_adapters_enabled", "disabled_adapters", "build_adapter", "is_lora_wrapper",
           "lora_adapters"]
