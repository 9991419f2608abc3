"""Weight initialization, defined on the full (logical) matrix.

Every rank draws the whole matrix from the global CPU generator in float32 and keeps its shard, so
with the same `torch.manual_seed` the full weight is the same at every TP size, on CPU and GPU, and
the generator advances by the same amount on every rank. The fans used by xavier and kaiming are
those of the full matrix (out, in), never of a shard.

    xavier   N(0, std^2),          std = sqrt(2 / (fan_in + fan_out))      (xavier_normal_)
    kaiming  U(-bound, bound),     bound = sqrt(6 / ((1 + a^2) fan_in)), a = sqrt(5)
                                   = 1 / sqrt(fan_in)                      (kaiming_uniform_)
    normal   N(0, 0.2^2)
    zero     0
"""

from __future__ import annotations

import math

import torch

INIT_METHODS = ("xavier", "kaiming", "normal", "zero")
NORMAL_STD = 0.2


def check_init_method(field: str, method) -> None:
    """A ValueError naming `field` and the allowed methods when `method` is not one (SPEC [LORA-CFG-2])."""
    if method not in INIT_METHODS:
        # Megatron-Bridge's "uniform" (nn.Linear bases only) is kaiming-uniform: say so.
        hint = "; for kaiming-uniform (Megatron-Bridge's 'uniform') use 'kaiming'" if method == "uniform" else ""
        raise ValueError(f"{field} must be one of {list(INIT_METHODS)}, got {method!r}{hint}")


def init_full_weight(shape: tuple[int, int], method: str, *, field: str = "init_method") -> torch.Tensor:
    """A float32 CPU tensor of `shape` = (out, in), drawn from the global generator."""
    check_init_method(field, method)
    out_features, in_features = shape
    weight = torch.empty(out_features, in_features, dtype=torch.float32)
    if method == "xavier":
        torch.nn.init.xavier_normal_(weight)
    elif method == "kaiming":
        torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    elif method == "normal":
        torch.nn.init.normal_(weight, mean=0.0, std=NORMAL_STD)
    else:
        torch.nn.init.zeros_(weight)
    return weight
