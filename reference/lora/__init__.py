"""LoRA: configuration, matching, the parallel adapter, the wrapper and the model transform."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .adapter import LoRAWeight, ParallelLinearAdapter
from .config import DEFAULT_TARGET_MODULES, LoRAConfig
from .matching import is_linear_like, match, pattern_matches
from .experts import finalize_lora_grads
from .transform import apply_lora, build_adapter, freeze_all, lora_adapters, transform
from .wrapper import LoRALinear


@dataclass
class LoRA(LoRAConfig):
    """Megatron-Bridge's `LoRA`: a config that applies itself.

        model = LoRA(dim=16, alpha=32)(model)              # freeze base, add trainable adapters
        module = LoRA().transform(module, name, prefix)    # one module: wrapped if selected
    """

    def __call__(self, model, training: bool = True):
        return apply_lora(model, self, training=training)

    def freeze_model(self, model, training: bool = True) -> None:
        """Freeze every parameter of the model (or of each chunk); train mode when training."""
        freeze_all(model, training)

    def transform(self, module: nn.Module, name: str | None = None, prefix: str | None = None) -> nn.Module:
        return transform(self, module, name, prefix)

    def match(self, module: nn.Module, name: str, prefix: str | None = None) -> str | None:
        return match(self, module, name, prefix)


__all__ = [
    "LoRA", "LoRAConfig", "LoRALinear", "LoRAWeight", "ParallelLinearAdapter", "DEFAULT_TARGET_MODULES",
    "apply_lora", "build_adapter", "freeze_all", "finalize_lora_grads", "transform", "match", "pattern_matches", "is_linear_like", "lora_adapters",
]
