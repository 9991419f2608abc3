"""The LoRA configuration: Megatron-Bridge's fields and defaults, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from numbers import Real

import torch

from ..init import INIT_METHODS, check_init_method

DEFAULT_TARGET_MODULES = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
DROPOUT_POSITIONS = ("pre", "post")


def _check_patterns(field_name: str, patterns) -> list[str]:
    if isinstance(patterns, str) or not isinstance(patterns, (list, tuple)):
        raise TypeError(f"{field_name} must be a list of strings, got {type(patterns).__name__}")
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"{field_name} must hold only strings, got {pattern!r} ({type(pattern).__name__})")
        if not pattern:
            raise ValueError(f"{field_name} must not hold an empty pattern")
    return list(patterns)


def _check_bool(field_name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{field_name} must be True or False, got {value!r}")


@dataclass
class LoRAConfig:
    """What to adapt and how. `reference.LoRA` adds the behaviour (apply, transform) on top.

    target_modules   short names (exact match) or `*` wildcards over full names (anchored, dots literal)
    exclude_modules  when target_modules is empty: adapt every linear layer except these
    dim, alpha       rank r and scale alpha / r of the update  W + (alpha / r) B A
    dropout          probability, applied "pre" (to the adapter input) or "post" (to its output)
    lora_A_init_method, lora_B_init_method   one of xavier, kaiming, normal, zero
    lora_dtype       dtype of A and B (None: the base weight's dtype)
    a2a_experimental one all-to-all instead of gather + scatter for row bases under sequence parallelism
    normalize_moe_lora, share_expert_adapters   MoE expert adapters (see reference/moe.py)
    sequence_parallel_input_regather  a column adapter's A keeps only its sequence shard for backward
    experts_shared_outer_loras  grouped experts share fc1's A and fc2's B, the other factor per expert
    """

    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    exclude_modules: list[str] = field(default_factory=list)
    dim: int = 32
    alpha: float = 32
    dropout: float = 0.0
    dropout_position: str = "pre"
    a2a_experimental: bool = False
    lora_A_init_method: str = "xavier"
    lora_B_init_method: str = "zero"
    lora_dtype: torch.dtype | None = None
    normalize_moe_lora: bool = False
    share_expert_adapters: bool = True
    sequence_parallel_input_regather: bool = False
    experts_shared_outer_loras: bool = False

    def __post_init__(self):
        self.target_modules = _check_patterns("target_modules", self.target_modules)
        self.exclude_modules = _check_patterns("exclude_modules", self.exclude_modules)
        if self.target_modules and self.exclude_modules:
            raise ValueError(
                "target_modules and exclude_modules cannot both be non-empty: to adapt every linear layer "
                "except some, pass target_modules=[] and exclude_modules=[...]"
            )
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim <= 0:
            raise ValueError(f"dim must be a positive integer, got {self.dim!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, Real) or not self.alpha > 0:
            raise ValueError(f"alpha must be a positive number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, Real) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        if self.dropout_position not in DROPOUT_POSITIONS:
            raise ValueError(f"dropout_position must be one of {list(DROPOUT_POSITIONS)}, got {self.dropout_position!r}")
        check_init_method("lora_A_init_method", self.lora_A_init_method)
        check_init_method("lora_B_init_method", self.lora_B_init_method)
        if self.lora_dtype is not None:
            if not isinstance(self.lora_dtype, torch.dtype):
                raise TypeError(f"lora_dtype must be None or a torch.dtype, got {self.lora_dtype!r}")
            if not self.lora_dtype.is_floating_point:
                raise ValueError(f"lora_dtype must be a floating dtype (e.g. torch.float32, torch.bfloat16), "
                                 f"got {self.lora_dtype}")
        for name in ("a2a_experimental", "normalize_moe_lora", "share_expert_adapters",
                     "sequence_parallel_input_regather", "experts_shared_outer_loras"):
            _check_bool(name, getattr(self, name))


__all__ = ["LoRAConfig", "DEFAULT_TARGET_MODULES", "DROPOUT_POSITIONS", "INIT_METHODS"]
