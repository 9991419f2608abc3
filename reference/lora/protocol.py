"""The LoRA wrapper protocol: what apply_lora, merge_lora and finalize_lora_grads need of a wrapper.

A wrapper holds a frozen base layer (`to_wrap`) and the adapters that add to its output. LoRALinear
is one (reference/lora/wrapper.py); the MoE wrappers (reference/lora/experts.py) are others. As with
torchtune's AdapterModule, code that walks a model asks the module (its `is_lora_wrapper` flag and
`lora_adapters()`), never checks a class, so a new wrapper needs nothing registered anywhere.
"""

from __future__ import annotations

from typing import Iterator, Protocol, TypeGuard

from torch import nn


class LoRAWrapper(Protocol):
    """A base layer with LoRA adapters beside it.

    Attributes:
        is_lora_wrapper (bool): True; the flag that `is_lora_wrapper(module)` reads.
        to_wrap (nn.Module): the base layer, frozen; what merge_lora(model) puts back in its place.
        merged (bool): whether the adapters are folded into to_wrap.weight (and no longer called).
        adapters_enabled (bool): whether forward calls the adapters (False: exactly the base's output).
    """

    is_lora_wrapper: bool
    to_wrap: nn.Module
    merged: bool
    adapters_enabled: bool

    def lora_adapters(self) -> list[nn.Module]:
        """The adapter modules: their parameters are the trainable ones."""
        ...

    def merge_(self) -> None:
        """Fold the adapters' update into to_wrap.weight and stop calling them (no-op if merged)."""
        ...

    def unmerge_(self) -> None:
        """Subtract the update again and call the adapters again (no-op if not merged)."""
        ...

    def check_mergeable(self) -> None:
        """Raise, before any collective, if merge_() cannot fold the adapters in (e.g. they are disabled)."""
        ...

    def enable_adapters(self) -> None:
        """Call the adapters in forward again."""
        ...

    def disable_adapters(self) -> None:
        """Forward returns exactly the base's output; raises RuntimeError if merged."""
        ...


def is_lora_wrapper(module: nn.Module) -> TypeGuard[LoRAWrapper]:
    """Whether `module` follows the wrapper protocol (its `is_lora_wrapper` flag; False if absent).

    Args:
        module (nn.Module): any module.
    """
    return getattr(module, "is_lora_wrapper", False)


def named_lora_wrappers(model: nn.Module) -> Iterator[tuple[str, LoRAWrapper]]:
    """(full name, wrapper) for every wrapper in `model`, `model` itself included, depth-first."""
    for name, module in model.named_modules():
        if is_lora_wrapper(module):
            yield name, module


def lora_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Every adapter module in `model`, wrapper by wrapper.

    Args:
        model (nn.Module): a model (or one pipeline chunk) after apply_lora.
    """
    for _, wrapper in named_lora_wrappers(model):
        yield from wrapper.lora_adapters()


__all__ = ["LoRAWrapper", "is_lora_wrapper", "named_lora_wrappers", "lora_adapters"]
