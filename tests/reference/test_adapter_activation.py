"""The adapter's optional activation between A and B (SPEC [LORA-FWD-1]): Δ = (α/d) B act(A x),
against float64 full-matrix math, forward and backward, for column and row bases at TP 1 and 2.

The activations are written here from their definitions (not with torch.nn), and the expected
gradients are those of the full formula, taken by autograd on the full float64 tensors.
"""

import math

import pytest
import torch
from torch import nn

from reference import ColumnParallelLinear, LoRA, LoRALinear, RowParallelLinear, merge_lora
from reference.lora import ADAPTER_ACTIVATIONS, ParallelLinearAdapter, adapter_arguments

from ..distributed import run_distributed
from ..helpers import NoCollectives, assert_close, init_tp, local_piece, seeded

S, BATCH, IN, OUT, R = 8, 2, 12, 16, 4
ALPHA = 8.0

FORMULAS = {
    "identity": lambda h: h,
    "relu": lambda h: torch.where(h > 0, h, torch.zeros_like(h)),
    "gelu": lambda h: 0.5 * h * (1 + torch.erf(h / math.sqrt(2))),
    "swish": lambda h: h / (1 + torch.exp(-h)),
    "silu": lambda h: h / (1 + torch.exp(-h)),
    "tanh": lambda h: (torch.exp(h) - torch.exp(-h)) / (torch.exp(h) + torch.exp(-h)),
    "sigmoid": lambda h: 1 / (1 + torch.exp(-h)),
}


def _in(kind, sp, X, r, t):
    """This rank's input: column (s/t, b, in) under SP, else (s, b, in); row (s, b, in/t)."""
    return local_piece("input", kind, X, r, t, sp=sp)


def _out(kind, sp, Y, r, t):
    """This rank's output: column (s, b, out/t); row (s/t, b, out) under SP, else (s, b, out)."""
    return local_piece("output", kind, Y, r, t, sp=sp)


def _wrapper(kind, sp, share, activation):
    base = (ColumnParallelLinear(IN, OUT, sequence_parallel=sp, params_dtype=torch.float64) if kind == "column"
            else RowParallelLinear(IN, OUT, sequence_parallel=sp, params_dtype=torch.float64))
    base.load_full_weight(seeded((OUT, IN), 1), seeded((OUT,), 2))
    arguments = adapter_arguments(LoRA(dim=R, alpha=ALPHA), base.layout, "layer", dim=R, weight=base.weight)
    adapter = ParallelLinearAdapter(**arguments, activation=activation)
    adapter.load_full_weights(seeded((R, IN), 3), seeded((OUT, R), 4))
    base.requires_grad_(False)
    return LoRALinear(base, adapter, share_communication=share)


def check_activations():
    state = init_tp()
    r, t = state.tp_rank, state.tp_size
    W, b = seeded((OUT, IN), 1), seeded((OUT,), 2)
    X, G = seeded((S, BATCH, IN), 5), seeded((S, BATCH, OUT), 6)
    for name, formula in FORMULAS.items():
        A, Bm = seeded((R, IN), 3).requires_grad_(), seeded((OUT, R), 4).requires_grad_()
        Y = X @ W.T + b + (ALPHA / R) * formula(X @ A.T) @ Bm.T                      # (s, b, out)
        dA, dB = torch.autograd.grad((Y * G).sum(), (A, Bm))
        Y = Y.detach()
        for kind in ("column", "row"):
            for sp in sorted({False, t > 1}):
                for share in (True, False):
                    tag = f"{name} {kind} sp={sp} share={share} tp={t}"
                    wrapper = _wrapper(kind, sp, share, name)
                    y, _ = wrapper(_in(kind, sp, X, r, t))
                    assert_close(y, _out(kind, sp, Y, r, t), msg=tag)
                    (y * _out(kind, sp, G, r, t)).sum().backward()
                    assert_close(wrapper.adapter.linear_in.weight.grad, local_piece("A", kind, dA, r, t), scale=4,
                                 msg=f"dA {tag}")
                    assert_close(wrapper.adapter.linear_out.weight.grad, local_piece("B", kind, dB, r, t), scale=4,
                                 msg=f"dB {tag}")


@pytest.mark.parametrize("world_size", [1, 2])
def test_activation_between_A_and_B(world_size):
    """[LORA-FWD-1] [LORA-BWD-1] ParallelLinearAdapter(activation=...) for identity, relu, gelu, swish,
    silu, tanh and sigmoid on column and row bases (SP at TP 2, shared and separate communication):
    output x W^T + b + (alpha/d) B act(A x) and dA, dB equal the full float64 math's shards (a row
    base's activation acts on the sum of the ranks' A_r x_r)."""
    run_distributed(check_activations, world_size)


def test_activation_names_and_default():
    """[LORA-FWD-1] the accepted names are Megatron-Bridge's; the default (and what LoRA builds) is identity;
    an unknown name raises ValueError naming the field and the allowed values, before any collective;
    a non-identity adapter cannot be merged (ValueError)."""
    assert set(ADAPTER_ACTIVATIONS) == set(FORMULAS)
    for name, cls in ADAPTER_ACTIVATIONS.items():
        assert isinstance(ParallelLinearAdapter(IN, OUT, R, base_kind="none", activation=name).activation, cls)
    assert isinstance(ParallelLinearAdapter(IN, OUT, R, base_kind="none").activation, nn.Identity)
    holder = nn.Module()
    holder.linear_fc1 = nn.Linear(IN, OUT)
    LoRA(target_modules=["linear_fc1"], dim=R)(holder)
    assert isinstance(holder.linear_fc1.adapter.activation, nn.Identity)
    with pytest.raises(ValueError, match=r"activation must be one of \['identity', 'relu'.*got 'softplus'"), \
            NoCollectives():
        ParallelLinearAdapter(IN, OUT, R, base_kind="none", activation="softplus")

    model = nn.Sequential(nn.Linear(IN, IN), nn.Linear(IN, OUT))
    LoRA(target_modules=["0", "1"], dim=R, lora_B_init_method="normal")(model)
    model[1].adapter.activation = ADAPTER_ACTIVATIONS["tanh"]()
    with pytest.raises(ValueError, match="activation"):
        model[1].merged_weight()
    with pytest.raises(ValueError, match="activation"):
        merge_lora(model)
    assert not model[0].merged and not model[1].merged          # checked before any wrapper is merged
