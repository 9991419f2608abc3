"""Turning adapters off and on (SPEC [LORA-INJ-6]), layer by layer against float64 full-matrix math,
and on whole models (dense TinyGPT at TP 1 and 2, MoE) against the base model's logits.

Off, a wrapper must return exactly its base's output and leave no trace of the adapter: it is not
called (a forward pre-hook counts calls), draws no dropout mask (the generator's state is unchanged)
and gets no gradient.
"""

import pytest
import torch
from torch import nn

import reference
import reference.parallel as P
from reference import ColumnParallelLinear, LoRA, RowParallelLinear, TinyGPT, TinyGPTConfig
from reference.lora import disabled_adapters, named_lora_wrappers, set_adapters_enabled

from ..distributed import run_distributed
from ..helpers import assert_close, device, init_tp, local_piece, seeded

S, BATCH, IN, OUT, R = 8, 2, 12, 16, 4
ALPHA = 8.0


def _wrapped(kind, sp, share, dropout):
    base = (ColumnParallelLinear(IN, OUT, sequence_parallel=sp, params_dtype=torch.float64) if kind == "column"
            else RowParallelLinear(IN, OUT, sequence_parallel=sp, params_dtype=torch.float64))
    base.load_full_weight(seeded((OUT, IN), 1), seeded((OUT,), 2))
    holder = nn.Module()
    holder.layer = base
    LoRA(target_modules=["layer"], dim=R, alpha=ALPHA, dropout=dropout)(holder)
    wrapper = holder.layer
    wrapper.share_communication = share
    wrapper.adapter.load_full_weights(seeded((R, IN), 3), seeded((OUT, R), 4))
    return wrapper


def _in(kind, sp, X, r, t):
    """This rank's input: column (s/t, b, in) under SP, else (s, b, in); row (s, b, in/t)."""
    return local_piece("input", kind, X, r, t, sp=sp)


def _out(kind, sp, Y, r, t):
    """This rank's output: column (s, b, out/t); row (s/t, b, out) under SP, else (s, b, out)."""
    return local_piece("output", kind, Y, r, t, sp=sp)


def _rng_states():
    """The generators dropout draws from (CPU, and the GPU's under NCCL)."""
    return [torch.get_rng_state()] + ([torch.cuda.get_rng_state()] if torch.cuda.is_available() else [])


def _randomize_adapters(model, seed):
    """Non-zero adapters: every adapter parameter drawn from one generator (the same on every rank)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".adapter." in name:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype))


def check_layer_switch():
    state = init_tp()
    r, t = state.tp_rank, state.tp_size
    W, b, A, Bm = seeded((OUT, IN), 1), seeded((OUT,), 2), seeded((R, IN), 3), seeded((OUT, R), 4)
    X, G = seeded((S, BATCH, IN), 5), seeded((S, BATCH, OUT), 6)
    for kind in ("column", "row"):
        for sp in sorted({False, t > 1}):
            for share in (True, False):
                tag = f"{kind} sp={sp} share={share} tp={t}"
                wrapper = _wrapped(kind, sp, share, dropout=0.5)
                calls = []
                wrapper.adapter.register_forward_pre_hook(lambda *_: calls.append(1))
                wrapper.disable_adapters()
                assert not wrapper.adapters_enabled and not wrapper.shares_communication(), tag
                x = _in(kind, sp, X, r, t).clone().requires_grad_()
                rng = _rng_states()
                y, _ = wrapper(x)                                               # train mode, dropout 0.5
                assert all(map(torch.equal, _rng_states(), rng)), f"dropout drawn while off: {tag}"
                assert calls == [], tag
                assert torch.equal(y, wrapper.to_wrap(x)[0]), tag
                assert_close(y, _out(kind, sp, X @ W.T + b, r, t), msg=tag)       # the base's full math
                (y * _out(kind, sp, G, r, t)).sum().backward()
                assert wrapper.adapter.linear_in.weight.grad is None, tag
                assert wrapper.adapter.linear_out.weight.grad is None, tag
                assert_close(x.grad, _in(kind, sp, G @ W, r, t), msg=f"dx {tag}")

                wrapper.enable_adapters()
                wrapper.eval()
                assert wrapper.shares_communication() == (share and t > 1), tag
                y, _ = wrapper(_in(kind, sp, X, r, t))
                assert calls == [1], tag
                Y = X @ W.T + b + (ALPHA / R) * (X @ A.T) @ Bm.T
                assert_close(y, _out(kind, sp, Y, r, t), msg=f"on again {tag}")


@pytest.mark.parametrize("world_size", [1, 2])
def test_disabled_layer_is_exactly_its_base(world_size):
    """[LORA-INJ-6] column and row bases (SP at TP 2; shared and separate communication): off, the output
    is the base's (x W^T + b, float64) in train mode with dropout 0.5, the adapter is not called, no
    dropout mask is drawn and A, B get no gradient; on again, the full LoRA math."""
    run_distributed(check_layer_switch, world_size)


def _gpt(tp, seed=0):
    config = TinyGPTConfig(vocab_size=16, hidden_size=8, num_layers=2, num_attention_heads=2, ffn_hidden_size=16,
                           sequence_parallel=tp > 1, params_dtype=torch.float64)
    return TinyGPT(config, seed=seed)


def check_model_switch(world):
    P.initialize_model_parallel(world)
    ids = torch.randint(0, 16, (2, 8), generator=torch.Generator().manual_seed(3)).to(device())
    model = _gpt(world)
    base_logits = model(ids)
    LoRA(target_modules=["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "output_layer"], dim=R, alpha=8,
         dropout=0.5)(model)
    _randomize_adapters(model, seed=20)
    wrappers = dict(named_lora_wrappers(model))
    model.eval()
    adapted = model(ids)
    assert not torch.equal(adapted, base_logits)
    model.train()
    set_adapters_enabled(model, False)
    assert torch.equal(model(ids), base_logits) and not any(w.adapters_enabled for w in wrappers.values())
    set_adapters_enabled(model, True)
    model.eval()
    assert torch.equal(model(ids), adapted)

    qkv = wrappers["decoder.layers.0.self_attention.linear_qkv"]
    qkv.disable_adapters()                                         # a state of its own, kept by the block
    with disabled_adapters(model) as same:
        assert same is model and torch.equal(model(ids), base_logits)
    assert not qkv.adapters_enabled and sum(w.adapters_enabled for w in wrappers.values()) == len(wrappers) - 1
    with pytest.raises(KeyError), disabled_adapters([model]):      # a list of chunks; an exception inside
        raise KeyError("inside")
    assert sum(w.adapters_enabled for w in wrappers.values()) == len(wrappers) - 1
    qkv.enable_adapters()
    assert torch.equal(model(ids), adapted)
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for w in wrappers.values()
                                                                      for p in w.adapter.parameters()}
    with pytest.raises(TypeError, match="enabled"):
        set_adapters_enabled(model, 0)

    reference.merge_lora(model, keep_wrappers=True)
    with pytest.raises(RuntimeError, match="merged"):
        set_adapters_enabled(model, False)
    assert all(w.adapters_enabled for w in wrappers.values())      # checked before any wrapper changed
    with pytest.raises(RuntimeError, match="merged"):
        qkv.disable_adapters()
    reference.unmerge_lora(model)
    qkv.disable_adapters()
    with pytest.raises(RuntimeError, match="disabled"):
        qkv.merge_()
    with pytest.raises(RuntimeError, match="disabled"):
        reference.merge_lora(model)                                # checked before any wrapper is merged
    assert not any(w.merged for w in wrappers.values())


@pytest.mark.parametrize("world_size", [1, 2])
def test_model_adapters_off_and_on(world_size):
    """[LORA-INJ-6] TinyGPT (SP at TP 2) with non-zero adapters: set_adapters_enabled(model, False) gives
    the base model's logits bit for bit (train mode, dropout 0.5), True the adapted ones; disabled_adapters
    restores each wrapper's own state, also through an exception; the trainable set does not change;
    a non-bool raises TypeError; merged wrappers cannot be disabled (nothing changes), disabled ones
    cannot be merged (merge_lora checks every wrapper before it merges any)."""
    run_distributed(check_model_switch, world_size, world_size)


def check_moe_switch(layout):
    tp, ep, etp = layout
    P.initialize_model_parallel(tp, ep, etp)
    ids = torch.randint(0, 16, (2, 8), generator=torch.Generator().manual_seed(3)).to(device())
    config = TinyGPTConfig(vocab_size=16, hidden_size=8, num_layers=1, num_attention_heads=2, ffn_hidden_size=16,
                           sequence_parallel=tp > 1, params_dtype=torch.float64, num_moe_experts=4, moe_router_topk=2,
                           moe_ffn_hidden_size=8, moe_shared_expert_intermediate_size=8)
    for share in (True, False):
        model = TinyGPT(config, seed=0)
        base_logits = model(ids)
        LoRA(target_modules=["linear_fc1", "linear_fc2", "router"], dim=R, alpha=8, share_expert_adapters=share)(model)
        _randomize_adapters(model, seed=4)
        assert not torch.equal(model(ids), base_logits)
        with disabled_adapters(model):
            logits = model(ids)
            assert torch.equal(logits, base_logits), (layout, share)
            assert not logits.requires_grad                         # nothing trainable took part
        assert not torch.equal(model(ids), base_logits)


@pytest.mark.parametrize("world_size", [1, 2])
def test_moe_adapters_off_and_on(world_size):
    """[LORA-INJ-6] MoE wrappers (grouped experts shared or per expert, the router, shared experts): off,
    the MoE TinyGPT's logits are the base's bit for bit and no adapter takes part; on again, they differ."""
    for layout in ([(1, 1, 1)] if world_size == 1 else [(1, 2, 1), (2, 1, 2)]):
        run_distributed(check_moe_switch, world_size, layout)
