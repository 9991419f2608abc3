"""The LoRA configuration: Megatron-Bridge's fields and defaults, validated at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Real

import torch

from ..init import INIT_METHODS, check_init_method
from ..parallel import check_positive_int

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
        for name in FIELD_CHECKS:
            object.__setattr__(self, name, FIELD_CHECKS[name](getattr(self, name)))
        _check_exclusive(self.target_modules, self.exclude_modules)
        object.__setattr__(self, "_validated", True)

    def validate(self) -> None:
        """Every field checked again (apply_lora calls it): a list changed in place escapes __setattr__."""
        for name in FIELD_CHECKS:
            FIELD_CHECKS[name](getattr(self, name))
        _check_exclusive(self.target_modules, self.exclude_modules)

    def __setattr__(self, name, value):
        # Recipes change a config after building it (cfg.dim = 0, cfg.target_modules = "linear_qkv"):
        # an assignment is validated like the constructor's argument, so a bad value never waits for
        # apply time (a ZeroDivisionError, or a string read as single letters).
        if getattr(self, "_validated", False) and name in FIELD_CHECKS:
            value = FIELD_CHECKS[name](value)
            if name in ("target_modules", "exclude_modules"):
                other = self.exclude_modules if name == "target_modules" else self.target_modules
                _check_exclusive(*((value, other) if name == "target_modules" else (other, value)))
        object.__setattr__(self, name, value)


def _check_exclusive(target_modules, exclude_modules) -> None:
    if target_modules and exclude_modules:
        raise ValueError(
            "target_modules and exclude_modules cannot both be non-empty: to adapt every linear layer "
            "except some, pass target_modules=[] and exclude_modules=[...]"
        )


def _positive_int(name: str):
    def check(value):
        check_positive_int(name, value)       # Python and numpy integers alike (not bool)
        return int(value)
    return check


def _check_alpha(value):
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or not value > 0:
        raise ValueError(f"alpha must be a positive number (finite), got {value!r}")
    return value


def _check_dropout(value):
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 <= value < 1:
        raise ValueError(f"dropout must be a number in [0, 1), got {value!r}")
    return value


def _check_position(value):
    if value not in DROPOUT_POSITIONS:
        raise ValueError(f"dropout_position must be one of {list(DROPOUT_POSITIONS)}, got {value!r}")
    return value


def _keeping(check, name: str):
    """check(name, value) as a field check that returns the value unchanged."""
    def checked(value):
        check(name, value)
        return value
    return checked


def _check_lora_dtype(value):
    if value is None:
        return None
    if not isinstance(value, torch.dtype):
        raise TypeError(f"lora_dtype must be None or a torch.dtype, got {value!r}")
    if value not in LORA_DTYPES:
        raise ValueError(f"lora_dtype must be None or a floating dtype adapters can train in, one of "
                         f"{[str(d) for d in LORA_DTYPES]}; got {value}")
    return value


# Dtypes A and B can train in (matmul and autograd support them on CPU and GPU).
LORA_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

FIELD_CHECKS = {
    "target_modules": lambda value: _check_patterns("target_modules", value),
    "exclude_modules": lambda value: _check_patterns("exclude_modules", value),
    "dim": _positive_int("dim"),
    "alpha": _check_alpha,
    "dropout": _check_dropout,
    "dropout_position": _check_position,
    "lora_A_init_method": _keeping(check_init_method, "lora_A_init_method"),
    "lora_B_init_method": _keeping(check_init_method, "lora_B_init_method"),
    "lora_dtype": _check_lora_dtype,
    **{name: _keeping(_check_bool, name) for name in ("a2a_experimental", "normalize_moe_lora",
                                                       "share_expert_adapters", "sequence_parallel_input_regather",
                                                       "experts_shared_outer_loras")},
}


__all__ = ["LoRAConfig", "DEFAULT_TARGET_MODULES", "DROPOUT_POSITIONS", "INIT_METHODS"]
