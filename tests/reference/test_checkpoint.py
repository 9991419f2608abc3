"""Checkpoint keys of LoRA wrappers (SPEC [LORA-INJ-7]): the base's keys unchanged, Megatron-Bridge's
adapter keys beside them, base checkpoints loading strictly into the adapted model.

The expectations are written from the clause: a key set is the unwrapped model's plus
`<module>.adapter.linear_in.weight` / `<module>.adapter.linear_out.weight` per adapted module, with
this rank's shard shapes of [LORA-FWD-2]; under TP the state dict is this rank's shards, and gathered
over the TP group (plain torch.distributed) they are the full tensors of the TP 1 model and the
full A and B that were loaded.
"""

import pytest
import torch
import torch.distributed as dist
from torch import nn

import reference.parallel as P
from reference import LoRA, TinyGPT, TinyGPTConfig
from reference.lora import named_lora_wrappers

from ..distributed import run_distributed
from ..helpers import device, gather_full, seeded

H, FFN, VOCAB, R = 8, 16, 16, 4
COLUMN = {"linear_qkv": (H, 3 * H), "linear_fc1": (H, FFN), "output_layer": (H, VOCAB)}   # in, out
ROW = {"linear_proj": (H, H), "linear_fc2": (FFN, H)}
TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "output_layer"]
ADAPTER_KEYS = ("adapter.linear_in.weight", "adapter.linear_out.weight")


def _model(tp, seed, moe=False):
    config = TinyGPTConfig(vocab_size=VOCAB, hidden_size=H, num_layers=2, num_attention_heads=2, ffn_hidden_size=FFN,
                           sequence_parallel=tp > 1, params_dtype=torch.float64,
                           num_moe_experts=4 if moe else None, moe_router_topk=2, moe_ffn_hidden_size=8)
    return TinyGPT(config, seed=seed)


def _ids():
    return torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(3)).to(device())


def _expected_adapter_shapes(name, t):
    """[LORA-FWD-2]: column A (r/t, in), B (out/t, r); row A (r, in/t), B (out/t, r)."""
    short = name.rsplit(".", 1)[-1]
    if short in COLUMN:
        i, o = COLUMN[short]
        return (R // t, i), (o // t, R)
    i, o = ROW[short]
    return (R, i // t), (o // t, R)


def _fill_adapters(model, seed):
    """Non-zero full A, B for every adapter (drawn by module name), loaded as this rank's shards."""
    full = {}
    for k, (name, wrapper) in enumerate(named_lora_wrappers(model)):
        A = seeded((wrapper.adapter.dim, wrapper.adapter.in_features), seed + 2 * k)
        B = seeded((wrapper.adapter.out_features, wrapper.adapter.dim), seed + 2 * k + 1)
        wrapper.adapter.load_full_weights(A, B)
        full[name] = (A, B)
    return full


def check_base_checkpoint(world):
    """At TP 1 and TP world: keys, shapes, strict load of a base checkpoint, logits, gathered shards."""
    ids, full_state = _ids(), None
    for tp in sorted({1, world}):
        state = P.initialize_model_parallel(tp)
        base = _model(tp, seed=0)
        base_sd, base_logits = base.state_dict(), base(ids)
        model = _model(tp, seed=1)                                 # other weights: the load must set them
        LoRA(target_modules=TARGETS, dim=R, alpha=8)(model)
        names = [name for name, _ in named_lora_wrappers(model)]
        assert len(names) == 9, names
        sd = model.state_dict()
        adapter_keys = {f"{n}.{k}" for n in names for k in ADAPTER_KEYS}
        assert set(sd) == set(base_sd) | adapter_keys, sorted(set(sd) ^ (set(base_sd) | adapter_keys))[:6]
        assert not [k for k in list(sd) + list(sd._metadata) if "to_wrap" in k]
        assert {k: v.shape for k, v in sd.items() if k in base_sd} == {k: v.shape for k, v in base_sd.items()}
        for n in names:
            want_A, want_B = _expected_adapter_shapes(n, tp)
            assert sd[f"{n}.adapter.linear_in.weight"].shape == want_A, (n, tp)
            assert sd[f"{n}.adapter.linear_out.weight"].shape == want_B, (n, tp)
        result = model.load_state_dict(base_sd, strict=True)        # no adapter key at all: B stays zero
        assert result.missing_keys == [] and result.unexpected_keys == []
        assert torch.equal(model(ids), base_logits), f"tp={tp}"
        loaded = model.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in base_sd.items())
        if tp == 1:
            full_state = {k: v.clone() for k, v in loaded.items() if k in base_sd}
            continue
        group = state.tp_group                                     # gathered shards = the TP 1 tensors
        for name in names:
            short = name.rsplit(".", 1)[-1]
            weight = gather_full(loaded[f"{name}.weight"], 0 if short in COLUMN else 1, group)
            assert torch.equal(weight, full_state[f"{name}.weight"]), name
        assert dist.get_world_size(group) == tp


@pytest.mark.parametrize("world_size", [1, 2])
def test_base_checkpoint_loads_strictly_into_the_adapted_model(world_size):
    """[LORA-INJ-7] [LORA-INIT-3] the adapted TinyGPT's state dict has the base's keys and shapes and the
    adapter keys adapter.linear_in|linear_out.weight with their shard shapes; a base checkpoint (another
    seed's weights) loads with strict=True and gives the base model's logits bit for bit; at TP 2 the
    gathered base shards are the TP 1 tensors."""
    run_distributed(check_base_checkpoint, world_size, world_size)


def check_round_trip_and_partial(world):
    P.initialize_model_parallel(world)
    ids = _ids()
    model = LoRA(target_modules=TARGETS, dim=R, alpha=8)(_model(world, seed=0))
    full = _fill_adapters(model, seed=10)
    sd, logits = model.state_dict(), model(ids)
    fresh = LoRA(target_modules=TARGETS, dim=R, alpha=8)(_model(world, seed=1))
    fresh.load_state_dict(sd, strict=True)
    assert torch.equal(fresh(ids), logits)
    for name, wrapper in named_lora_wrappers(fresh):
        A, B = wrapper.adapter.full_weights()                      # gathered shards = the loaded full A, B
        assert torch.equal(A, full[name][0]) and torch.equal(B, full[name][1]), name
    wrapped = {name for name, _ in named_lora_wrappers(model)}

    def old_key(key):                                              # the base under `to_wrap.`, as before
        module, leaf = key.rsplit(".", 1)
        return f"{module}.to_wrap.{leaf}" if module in wrapped else key

    old_format = {old_key(k): v for k, v in sd.items()}
    assert {k.split(".to_wrap.")[0] for k in old_format if ".to_wrap." in k} == wrapped
    third = LoRA(target_modules=TARGETS, dim=R, alpha=8)(_model(world, seed=2))
    third.load_state_dict(old_format, strict=True)                 # the `to_wrap.` keys of older checkpoints
    assert torch.equal(third(ids), logits)

    dropped = "decoder.layers.1.mlp.linear_fc2.adapter.linear_out.weight"
    partial = {k: v for k, v in sd.items() if k != dropped}
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*linear_fc2\.adapter\.linear_out\.weight"):
        fresh.load_state_dict(partial, strict=True)
    assert fresh.load_state_dict(partial, strict=False).missing_keys == [dropped]
    one_off = {k: v for k, v in sd.items() if not k.startswith("decoder.layers.1.mlp.linear_fc2.adapter.")}
    before = [t.clone() for t in dict(named_lora_wrappers(fresh))["decoder.layers.1.mlp.linear_fc2"].adapter.parameters()]
    fresh.load_state_dict(one_off, strict=True)                    # none of that wrapper's keys: it keeps its own
    after = dict(named_lora_wrappers(fresh))["decoder.layers.1.mlp.linear_fc2"].adapter.parameters()
    assert all(torch.equal(a, b) for a, b in zip(after, before))


@pytest.mark.parametrize("world_size", [1, 2])
def test_adapted_checkpoint_round_trip_and_partial_adapter_keys(world_size):
    """[LORA-INJ-7] save an adapted model (non-zero adapters), load it strictly into a fresh adapted model
    of other weights: identical logits and the same gathered A, B; the `to_wrap.` keys of older
    checkpoints load too; a checkpoint lacking one adapter key reports exactly it missing; one lacking
    every key of one wrapper loads and leaves that wrapper's adapter as it was."""
    run_distributed(check_round_trip_and_partial, world_size, world_size)


def check_moe_keys(layout):
    tp, ep, etp = layout
    P.initialize_model_parallel(tp, ep, etp)
    ids = _ids()
    for share in (True, False):
        base = _model(tp, seed=0, moe=True)
        base_sd, base_logits = base.state_dict(), base(ids)
        model = _model(tp, seed=1, moe=True)
        LoRA(target_modules=["linear_fc1", "linear_fc2", "router"], dim=R, alpha=8, share_expert_adapters=share)(model)
        sd = model.state_dict()
        prefix = "decoder.layers.0.mlp."
        assert f"{prefix}experts.linear_fc1.weight" in sd and f"{prefix}router.weight" in sd
        e_local = 4 // ep
        stacked = () if share else (e_local,)
        assert sd[f"{prefix}experts.linear_fc1.adapter.linear_in.weight"].shape == (*stacked, R // etp, H)
        assert sd[f"{prefix}experts.linear_fc1.adapter.linear_out.weight"].shape == (*stacked, 8 // etp, R)
        assert sd[f"{prefix}experts.linear_fc2.adapter.linear_in.weight"].shape == (*stacked, R, 8 // etp)
        assert sd[f"{prefix}router.adapter.linear_in.weight"].shape == (R, H)
        assert sd[f"{prefix}router.adapter.linear_out.weight"].shape == (4, R)
        extra = {k for k in sd if k not in base_sd}
        assert extra and all(k.endswith(ADAPTER_KEYS) for k in extra), sorted(extra)[:4]
        model.load_state_dict(base_sd, strict=True)
        assert torch.equal(model(ids), base_logits), (layout, share)


@pytest.mark.parametrize("world_size", [1, 2])
def test_moe_wrappers_keep_base_keys(world_size):
    """[LORA-INJ-7] [MOE-SHARE-2] grouped experts and the router: the base's `weight` keys unchanged,
    adapter keys adapter.linear_in|linear_out.weight (stacked (E_local, ...) per expert), and a base
    MoE checkpoint loads strictly with the base logits, at (TP, EP, ETP) = (1, 1, 1) and with EP or ETP."""
    layouts = [(1, 1, 1)] if world_size == 1 else [(1, 2, 1), (2, 1, 2)]
    for layout in layouts:
        run_distributed(check_moe_keys, world_size, layout)


def test_bias_is_the_base_bias():
    """[LORA-INJ-7] LoRALinear.bias is its base's bias (read-only), None for a base without one."""
    for bias in (True, False):
        holder = nn.Module()
        holder.linear_fc1 = nn.Linear(4, 6, bias=bias)
        LoRA(target_modules=["linear_fc1"], dim=2)(holder)
        wrapper = holder.linear_fc1
        assert wrapper.bias is wrapper.to_wrap.bias and (wrapper.bias is None) == (not bias)
        with pytest.raises(AttributeError):
            wrapper.bias = None
