"""Which modules get an adapter.

A module's full name is its parent's full name, a dot, and its attribute name (ModuleList children
are "0", "1", ...): `decoder.layers.1.self_attention.linear_qkv`. Only linear-like modules are
candidates (column/row-parallel linears, nn.Linear, and the MoE modules of reference/moe.py).

Target mode (target_modules non-empty): a module matches a pattern if its attribute name equals the
pattern, or the pattern matches the whole full name where `*` stands for any run of characters (dots
included) and every other character is literal. The first matching pattern wins.
So `*.layers.1.*` matches `decoder.layers.1.mlp.linear_fc1` but not `decoder.layers.10.mlp.linear_fc1`.

Exclude mode (target_modules empty): every linear-like module matches unless its attribute name or
full name matches an exclude pattern (same rules).
"""

from __future__ import annotations

import re
from functools import lru_cache

from torch import nn

from ..layers import ColumnParallelLinear, RowParallelLinear
from ..moe import GroupedLinear
from ..router import TopKRouter


@lru_cache(maxsize=None)
def _wildcard_regex(pattern: str) -> re.Pattern:
    return re.compile("".join(".*" if ch == "*" else re.escape(ch) for ch in pattern))


def pattern_matches(pattern: str, name: str, full_name: str) -> bool:
    """The attribute name equals the pattern, or the wildcard pattern matches the full name."""
    return name == pattern or _wildcard_regex(pattern).fullmatch(full_name) is not None


LINEAR_TYPES = (ColumnParallelLinear, RowParallelLinear, nn.Linear, GroupedLinear, TopKRouter)


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, LINEAR_TYPES)


def full_name_of(name: str, prefix: str | None) -> str:
    return f"{prefix}.{name}" if prefix else name


def match(config, module: nn.Module, name: str | None = None, prefix: str | None = None) -> str | None:
    """The pattern that selects this module (the full name in exclude mode), or None; None also for a
    module without a name (as Megatron-Bridge's match: nothing can select it)."""
    if name is None or not is_linear_like(module):
        return None
    full_name = full_name_of(name, prefix)
    if config.target_modules:
        for pattern in config.target_modules:
            if pattern_matches(pattern, name, full_name):
                return pattern
        return None
    if any(pattern_matches(pattern, name, full_name) for pattern in config.exclude_modules):
        return None
    return full_name
