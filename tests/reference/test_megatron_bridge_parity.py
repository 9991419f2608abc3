"""Where the reference meets Megatron-Bridge 0.6.2's API details: aligned, or a SPEC Decision.

Each test pins one detail from Megatron-Bridge's own unit tests (re-expressed, not copied): the ones
the reference aligned with, and the ones SPEC decides otherwise (and says why)."""

import pytest
import torch
from torch import nn

from reference import LoRA, ParallelLinearAdapter


def test_adapter_built_directly_defaults_alpha_to_dim():
    """[LORA-FWD-5] ParallelLinearAdapter without alpha scales by 1 (alpha = dim), as Megatron-Bridge's;
    an explicit alpha still gives alpha / dim."""
    plain = ParallelLinearAdapter(6, 5, 4, base_kind="none")
    assert (plain.alpha, plain.scale) == (4, 1.0)
    scaled = ParallelLinearAdapter(6, 5, 4, base_kind="none", alpha=2)
    assert (scaled.alpha, scaled.scale) == (2, 0.5)
    with torch.no_grad():
        plain.linear_out.weight.normal_()
    x = torch.randn(3, 2, 6, dtype=torch.float32, device=plain.linear_in.weight.device)
    A, B = plain.linear_in.weight.double(), plain.linear_out.weight.double()
    torch.testing.assert_close(plain(x).double(), x.double() @ A.T @ B.T, rtol=1e-5, atol=1e-5)


def test_match_without_a_name_is_none():
    """[LORA-MATCH-2] LoRA.match(module) and match(module, None) select nothing, as Megatron-Bridge's."""
    lora = LoRA(target_modules=["linear_qkv"])
    layer = nn.Linear(4, 4)
    assert lora.match(layer) is None
    assert lora.match(layer, None) is None
    assert lora.match(layer, "linear_qkv") == "linear_qkv"


@pytest.mark.parametrize("method", ["uniform", "kaiming_uniform", "glorot"])
def test_unknown_init_methods_are_value_errors(method):
    """[LORA-CFG-2] Decision: an unknown init method is a ValueError at construction naming the field
    and the allowed values (Megatron-Bridge: NotImplementedError later, or nothing on nn.Linear); for
    "uniform" the message points at "kaiming", the same distribution."""
    for field in ("lora_A_init_method", "lora_B_init_method"):
        with pytest.raises(ValueError, match=field) as raised:
            LoRA(**{field: method})
        assert "xavier" in str(raised.value) and "kaiming" in str(raised.value)
        assert not isinstance(raised.value, NotImplementedError)


def test_empty_pattern_is_rejected():
    """[LORA-CFG-2] Decision: target_modules=[""] is a ValueError (Megatron-Bridge accepts it and it
    selects nothing)."""
    with pytest.raises(ValueError, match="target_modules"):
        LoRA(target_modules=[""])
    with pytest.raises(ValueError, match="exclude_modules"):
        LoRA(target_modules=[], exclude_modules=[""])


class _Named(nn.Module):
    """Modules of other types under the names of LoRA targets."""

    def __init__(self):
        super().__init__()
        self.linear_qkv = nn.Conv1d(4, 4, 1)
        self.linear_proj = nn.LayerNorm(4)
        self.linear_fc1 = nn.Linear(4, 8)


def test_only_linear_modules_named_like_targets_are_adapted():
    """[LORA-MATCH-2] Decision: a Conv1d and a LayerNorm named like targets are left alone (Megatron-Bridge
    matches by name whatever the type); the nn.Linear beside them is adapted, and the other two
    patterns are reported as matching nothing."""
    with pytest.warns(UserWarning, match="matched no module: \\['linear_qkv', 'linear_proj'\\]"):
        model = LoRA(target_modules=["linear_qkv", "linear_proj", "linear_fc1"], dim=2)(_Named())
    assert isinstance(model.linear_qkv, nn.Conv1d) and isinstance(model.linear_proj, nn.LayerNorm)
    assert getattr(model.linear_fc1, "is_lora_wrapper", False)
