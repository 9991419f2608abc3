"""VLMLoRA (SPEC section 11): per-part freezing of TinyVLM, at TP = 1 and 2.

The expected requires_grad of every parameter is derived from its name alone: adapter parameters
(`...adapter.linear_in|linear_out.weight`) are trainable; any other parameter is frozen exactly when the
part it lives in (`vision_model`, `vision_projection`, `language_model`) is flagged.
"""

import dataclasses
import itertools

import pytest
import torch
import torch.distributed as dist
from torch import nn

import reference.parallel as P
from reference import LoRA, LoRALinear, TinyVLM, VLMLoRA
from reference.vlm import VLM_PARTS

from ..distributed import run_distributed
from ..helpers import device

PARTS = ("vision_model", "vision_projection", "language_model")
FLAGS = ("freeze_vision_model", "freeze_vision_projection", "freeze_language_model")
FLAG_COMBINATIONS = list(itertools.product([True, False], repeat=3))


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    patches = torch.randn(2, 4, 12, generator=g).to(device())
    ids = torch.randint(0, 64, (2, 6), generator=g).to(device())
    return patches, ids


def is_adapter_param(name):
    return ".adapter.linear_in." in name or ".adapter.linear_out." in name


def expected_requires_grad(name, flags, prefix=""):
    """Trainable or not, from the parameter's name: adapters always; otherwise unless its part is flagged."""
    if is_adapter_param(name):
        return True
    rest = name[len(prefix):] if name.startswith(prefix) else None
    if rest is None:
        return True                                   # outside the VLM parts: never frozen
    part = rest.split(".", 1)[0]
    return not dict(zip(PARTS, flags))[part]


def check_map(model, flags, prefix="", where=""):
    params = dict(model.named_parameters())
    wrong = {n: p.requires_grad for n, p in params.items()
             if p.requires_grad != expected_requires_grad(n, flags, prefix)}
    assert not wrong, (where, flags, sorted(wrong))
    # Adapters were created in every part (so "adapters in frozen parts are trainable" is exercised).
    for part in PARTS:
        assert any(is_adapter_param(n) for n in params if n.startswith(prefix + part + ".")), (where, part)
    assert all(m.training for m in model.modules()), where


def vlm(seed=0):
    return TinyVLM(seed=seed)


def lora_config(flags, **kwargs):
    return VLMLoRA(**dict(zip(FLAGS, flags)), **kwargs)


def check_freeze_combinations():
    P.initialize_model_parallel(dist.get_world_size())
    patches, ids = inputs()
    for flags in FLAG_COMBINATIONS:
        where = f"flags={flags}"
        model = vlm()
        model.eval()                                   # apply must put it back in train mode
        with torch.no_grad():
            before = model(patches, ids)
        returned = lora_config(flags)(model)
        assert returned is model
        check_map(model, flags, where=where)
        # The adapted layers: Megatron's linears in all three parts; patch_embed and output_layer stay.
        wrapped = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
        assert "vision_projection.encoder.linear_fc1" in wrapped and "vision_projection.encoder.linear_fc2" in wrapped
        assert "vision_model.decoder.layers.0.self_attention.linear_qkv" in wrapped
        assert "language_model.decoder.layers.1.mlp.linear_fc2" in wrapped
        assert not any(n.endswith(("patch_embed", "output_layer")) for n in wrapped)
        # Forward still works and, with B = 0, the logits are the base model's bit for bit.
        after = model(patches, ids)
        assert after.shape == (2, 4 + 6, 64)
        assert torch.equal(after, before), where
        # Backward: frozen parameters get no gradient, trainable ones (adapters included) do.
        after.square().mean().backward()
        for name, p in model.named_parameters():
            assert (p.grad is not None) == p.requires_grad, (where, name)

        # training=False: everything frozen, adapters included, eval mode.
        model = vlm()
        lora_config(flags)(model, training=False)
        assert not any(p.requires_grad for p in model.parameters()), where
        assert any(is_adapter_param(n) for n, _ in model.named_parameters())
        assert not any(m.training for m in model.modules()), where
        with torch.no_grad():
            assert torch.equal(model(patches, ids), before), where


@pytest.mark.parametrize("world_size", [1, 2])
def test_vlm_freeze_flags(world_size):
    """[VLM-FREEZE-1] [VLM-FREEZE-2] all 8 flag combinations at TP = world: the exact requires_grad map
    (base parameters frozen exactly in the flagged parts, unflagged parts fully trainable, adapters
    trainable everywhere), train mode; training=False freezes everything and sets eval mode; forward and
    backward work and default B = 0 leaves the logits unchanged."""
    run_distributed(check_freeze_combinations, world_size)


class Llava(nn.Module):
    """A model holding the parts under `llava_model`, with a parameter of its own outside them."""

    def __init__(self):
        super().__init__()
        self.llava_model = vlm()
        self.logit_scale = nn.Parameter(torch.ones(1, device=device()))


def check_holders_and_chunks():
    P.initialize_model_parallel(dist.get_world_size())
    for flags in FLAG_COMBINATIONS:
        where = f"flags={flags}"
        # The parts under llava_model; the wrapper's own parameter is outside every part: not frozen.
        model = Llava()
        lora_config(flags)(model)
        check_map(model, flags, prefix="llava_model.", where=where)
        assert model.logit_scale.requires_grad

        # A list of two chunks: both frozen the same way (not just the first).
        chunks = [vlm(0), vlm(1)]
        returned = lora_config(flags)(chunks)
        assert returned is chunks
        for i, chunk in enumerate(chunks):
            check_map(chunk, flags, where=f"{where} chunk {i}")

        # training=False on chunks: everything frozen, eval mode.
        chunks = [vlm(0), vlm(1)]
        lora_config(flags)(chunks, training=False)
        for chunk in chunks:
            assert not any(p.requires_grad for p in chunk.parameters())
            assert not any(m.training for m in chunk.modules())

    # A part set to None, or absent, is skipped without error; the others follow their flags.
    for missing, how in itertools.product(PARTS, ("none", "absent")):
        where = f"{missing} {how}"
        model = vlm()
        if how == "none":
            setattr(model, missing, None)
        else:
            delattr(model, missing)
        VLMLoRA()(model)                               # every part flagged
        for name, p in model.named_parameters():
            assert p.requires_grad == is_adapter_param(name), (where, name)
        model = vlm()
        if how == "none":
            setattr(model, missing, None)
        else:
            delattr(model, missing)
        VLMLoRA(freeze_vision_model=False, freeze_vision_projection=False, freeze_language_model=False)(model)
        assert all(p.requires_grad for p in model.parameters()), where
        assert all(m.training for m in model.modules()), where


@pytest.mark.parametrize("world_size", [1, 2])
def test_vlm_holders_chunks_and_missing_parts(world_size):
    """[VLM-FREEZE-1] [VLM-FREEZE-3] parts found under `llava_model` (and nothing outside them frozen);
    a list of two pipeline chunks, each frozen the same way; a part that is None or absent is skipped."""
    run_distributed(check_holders_and_chunks, world_size)


def test_vlm_lora_fields():
    """[VLM-FREEZE-1] VLMLoRA is a LoRA with three freeze flags, all True by default, and LoRA's other
    defaults; a flag that is not a bool raises TypeError naming it."""
    config = VLMLoRA()
    assert isinstance(config, LoRA)
    assert (config.freeze_vision_model, config.freeze_vision_projection, config.freeze_language_model) == (
        True, True, True)
    base = LoRA()
    for field in dataclasses.fields(LoRA):
        assert getattr(config, field.name) == getattr(base, field.name), field.name
    assert {f.name for f in dataclasses.fields(VLMLoRA)} == {f.name for f in dataclasses.fields(LoRA)} | set(FLAGS)
    assert tuple(VLM_PARTS) == PARTS
    partial = VLMLoRA(freeze_language_model=False, dim=8)
    assert partial.freeze_vision_model and not partial.freeze_language_model and partial.dim == 8
    for flag in FLAGS:
        for bad in (1, 0, "yes", None, 1.0):
            with pytest.raises(TypeError, match=flag):
                VLMLoRA(**{flag: bad})
    # LoRA's own validation still runs.
    with pytest.raises(ValueError, match="dim"):
        VLMLoRA(dim=0)
