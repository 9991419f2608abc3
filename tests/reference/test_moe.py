"""Mixture of experts (SPEC section 10): the MoE layer and LoRA on it, against dense float64 math.

Every expectation is computed on every rank from FULL tensors: the input X (s, b, h) and the output
gradient G are known everywhere; under sequence parallelism (TP > 1) a rank feeds its chunk of X along
dim 0 of its TP group and gets its chunk of the output. The dense math below is written here from the
clauses (router top-k softmax, per-expert MLP, shared experts, W + (alpha/r) B A), not taken from the
reference.

Gradient bookkeeping: MoE is token-wise, so a rank's input gradient is the gradient of its own loss.
Expert weights (and their adapters) are shared by the ep * etp ranks of one expert block, which gathers
the tokens of all of them: their expected gradient is the dense gradient summed over the block's ranks'
tokens. Router and shared-expert adapters see the tokens of the TP group (after finalize_lora_grads
for the router under SP): their expected gradient is the dense gradient of the full X.

Layouts (TP, EP, expert-TP) that divide the world are batched into one rank function per world size.
"""

import itertools
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import reference.parallel as P
from reference import LoRA, LoRALinear, TinyGPT, TinyGPTConfig, finalize_lora_grads
from reference.lora.experts import is_expert_linear
from reference.moe import MoELayer

from ..distributed import run_distributed
from ..helpers import all_reduce_sum, assert_close, chunk, device, rank_seed, seeded
from ..helpers import gather_full as gather
from .oracles import dense_moe_reference

H, FFN, E, K, S, BATCH = 8, 8, 4, 2, 8, 2
SHARED = 8

LAYOUTS = {
    1: [(1, 1, 1)],
    2: [(1, 1, 1), (1, 2, 1), (2, 1, 2), (2, 2, 1), (2, 1, 1), (1, 1, 2)],
    4: [(2, 2, 2), (1, 4, 1), (4, 1, 4), (2, 2, 1), (1, 2, 2), (4, 4, 1)],
}
EP_LAYOUTS = {2: [(1, 2, 1), (2, 2, 1)], 4: [(1, 4, 1), (2, 2, 2), (1, 2, 2), (2, 2, 1)]}


# ---- helpers ----------------------------------------------------------------------------------------

class MoEBlock(nn.Module):
    """Holds the MoE layer as `mlp` so its modules have Megatron's names (mlp.experts.linear_fc1 ...)."""

    def __init__(self, **kwargs):
        super().__init__()
        self.mlp = MoELayer(H, FFN, E, K, **kwargs)

    def forward(self, x):
        out, bias = self.mlp(x)
        assert bias is None
        return out


def build_block(tp, *, grouped=True, gated=False, shared=None, dtype=torch.float64, seed=11):
    torch.manual_seed(seed)
    return MoEBlock(grouped=grouped, gated=gated, shared_expert_size=shared, sequence_parallel=tp > 1,
                    device=device(), dtype=dtype)


def grad_of(param):
    return torch.zeros_like(param) if param.grad is None else param.grad


def act(hidden, gated):
    if gated:
        gate, up = hidden.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(hidden)


def dense_moe(x, router_w, fc1s, fc2s, gated, shared=None, topk=K):
    """First-principles MoE: x (..., h); router_w (E, h); fc1s[e] (F1, h); fc2s[e] (h, F); shared
    (S1 (S, h), S2 (h, S)) or None. Every expert is evaluated on every token and weighted by its gate
    (the softmax of the top-k logits, zero for experts outside the top k)."""
    tokens = x.reshape(-1, x.shape[-1])
    logits = tokens @ router_w.T                                          # (T, E)
    top, idx = torch.topk(logits, topk, dim=-1)
    gates = torch.zeros_like(logits).scatter(1, idx, torch.softmax(top, dim=-1))
    outs = torch.stack([act(tokens @ fc1s[e].T, gated) @ fc2s[e].T for e in range(len(fc1s))], dim=1)
    out = (gates.unsqueeze(-1) * outs).sum(1)                             # (T, h)
    if shared is not None:
        out = out + F.gelu(tokens @ shared[0].T) @ shared[1].T
    return out.reshape(x.shape)


def dense_routing(tokens, router_w, topk=K):
    top, idx = torch.topk(tokens @ router_w.T, topk, dim=-1)
    return torch.softmax(top, dim=-1), idx


def local_chunk(t, state):
    """This rank's part of a full (s, b, h) tensor: its sequence chunk within its TP group."""
    return chunk(t, 0, state.tp_rank, state.tp_size)


def block_pieces(t, state):
    """The tokens of every rank of this rank's expert block, in rank order, and this rank's index."""
    size = state.ep_size * state.expert_tp_size
    start = (state.rank // size) * size
    return [chunk(t, 0, q % state.tp_size, state.tp_size) for q in range(start, start + size)], state.rank - start


def base_weights(moe):
    """(router (E, h), fc1s (E, F1, h), fc2s (E, h, F), shared (S1, S2) or None), full, float64."""
    experts = moe.experts.full_expert_weights()
    fc1s = torch.stack([w1 for w1, _ in experts]).double()
    fc2s = torch.stack([w2 for _, w2 in experts]).double()
    shared = None
    if moe.shared_experts is not None:
        shared = (moe.shared_experts.linear_fc1.full_weight()[0].double(),
                  moe.shared_experts.linear_fc2.full_weight()[0].double())
    return moe.router.weight.detach().double().clone(), fc1s, fc2s, shared


def xavier(shape):
    w = torch.empty(*shape, dtype=torch.float32)
    nn.init.xavier_normal_(w)
    return w


# ---- [MOE-LAYER-1] [MOE-INIT-1] -------------------------------------------------------------------------

LAYER_CASES = [  # (grouped, gated, shared, dtype)
    (True, False, None, torch.float64),
    (False, False, None, torch.float64),
    (True, True, SHARED, torch.float64),
    (False, True, SHARED, torch.float64),
    (True, False, SHARED, torch.float64),
    (False, True, None, torch.float64),
    (True, True, SHARED, torch.float32),
    (False, False, SHARED, torch.float32),
]


def check_init_draws(tp, grouped, gated, shared):
    """[MOE-INIT-1] the full weights are the global generator's draws: router, then fc1, fc2 of each
    global expert in turn, then the shared experts; the generator advances the same on every rank."""
    torch.manual_seed(321)
    router = xavier((E, H))
    draws = [(xavier((2 * FFN if gated else FFN, H)), xavier((H, FFN))) for _ in range(E)]
    shared_draws = (xavier((SHARED, H)), xavier((H, SHARED))) if shared else None
    after_manual = torch.rand(1)

    block = build_block(tp, grouped=grouped, gated=gated, shared=shared, dtype=torch.float32, seed=321)
    after_build = torch.rand(1)
    assert torch.equal(after_build, after_manual)
    moe = block.mlp
    assert torch.equal(moe.router.weight.detach().cpu(), router)
    experts = moe.experts.full_expert_weights()
    assert len(experts) == E
    for (w1, w2), (d1, d2) in zip(experts, draws):
        assert torch.equal(w1.cpu(), d1) and torch.equal(w2.cpu(), d2)
    if shared:
        assert torch.equal(moe.shared_experts.linear_fc1.full_weight()[0].cpu(), shared_draws[0])
        assert torch.equal(moe.shared_experts.linear_fc2.full_weight()[0].cpu(), shared_draws[1])
    # Local experts: EP rank p holds experts [p E/ep, (p+1) E/ep).
    state = P.get_parallel_state()
    per = E // state.ep_size
    assert moe.experts.local_expert_ids == list(range(state.ep_rank * per, (state.ep_rank + 1) * per))
    return after_build


def check_moe_layer(layouts):
    X, G = seeded((S, BATCH, H), 1), seeded((S, BATCH, H), 2)
    for tp, ep, etp in layouts:
        state = P.initialize_model_parallel(tp, ep, etp)
        for grouped, gated, shared, dtype in LAYER_CASES:
            where = f"layout={(tp, ep, etp)} grouped={grouped} gated={gated} shared={shared} dtype={dtype}"
            after = check_init_draws(tp, grouped, gated, shared).to(device())
            others = [torch.empty_like(after) for _ in range(state.world_size)]
            dist.all_gather(others, after)
            assert all(torch.equal(o, after) for o in others), where

            block = build_block(tp, grouped=grouped, gated=gated, shared=shared, dtype=dtype)
            router_w, fc1s, fc2s, shared_w = base_weights(block.mlp)
            x = local_chunk(X, state).to(dtype).clone().requires_grad_()
            g = local_chunk(G, state)
            y = block(x)
            assert y.shape == x.shape and y.dtype == dtype, where

            x64 = local_chunk(X, state).clone().requires_grad_()
            expected = dense_moe(x64, router_w, fc1s, fc2s, gated, shared_w)
            scale = 1 if dtype == torch.float64 else 20
            assert_close(y, expected, dtype, scale=scale, msg=where)
            # The reference's own dense helper agrees with the first-principles math too.
            experts = list(zip(fc1s.unbind(0), fc2s.unbind(0)))
            assert_close(dense_moe_reference(x64.detach(), router_w, experts, K, gated, shared_w), expected.detach(),
                         torch.float64, msg=where)

            (y * g.to(dtype)).sum().backward()
            (expected * g).sum().backward()
            assert_close(x.grad, x64.grad, dtype, scale=10 * scale, msg=where)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_moe_layer_matches_dense_math(world_size):
    """[MOE-LAYER-1] [MOE-INIT-1] grouped and sequential experts, gated or not, with or without shared
    experts, float64 and float32: the output and the input gradient equal the dense math on the gathered
    full weights at every (TP, EP, expert-TP) layout, and those full weights are the generator's draws
    in global expert order (so the same at every layout, grouped or sequential)."""
    run_distributed(check_moe_layer, world_size, LAYOUTS[world_size])


def _tiny_moe_logits(layout, grouped, gated, shared):
    tp, ep, etp = layout
    P.initialize_model_parallel(tp, ep, etp)
    config = TinyGPTConfig(vocab_size=32, hidden_size=16, num_layers=2, num_attention_heads=4, ffn_hidden_size=16,
                           num_moe_experts=4, moe_router_topk=2, moe_grouped_gemm=grouped, gated_linear_unit=gated,
                           moe_ffn_hidden_size=8, moe_shared_expert_intermediate_size=shared,
                           sequence_parallel=tp > 1, params_dtype=torch.float64)
    model = TinyGPT(config, seed=5)
    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(6)).to(device())
    return model(ids)


def check_tiny_gpt_moe(layouts):
    cases = [(True, False, None), (False, False, None), (True, True, 8), (False, True, 8)]
    baselines = {}
    for grouped, gated, shared in cases:
        baselines[grouped, gated, shared] = _tiny_moe_logits((1, 1, 1), grouped, gated, shared)
    for gated, shared in {(g, s) for _, g, s in cases}:
        assert_close(baselines[False, gated, shared], baselines[True, gated, shared], torch.float64, scale=10)
    for layout in layouts:
        for grouped, gated, shared in cases:
            logits = _tiny_moe_logits(layout, grouped, gated, shared)
            assert_close(logits, baselines[grouped, gated, shared], torch.float64, scale=10,
                         msg=f"layout={layout} grouped={grouped} gated={gated} shared={shared}")


@pytest.mark.parametrize("world_size", [2, 4])
def test_tiny_gpt_moe_logits_are_the_same_at_every_layout(world_size):
    """[MOE-LAYER-1] [MOE-INIT-1] TinyGPT(num_moe_experts=4) gives the logits of (TP, EP, ETP) = (1, 1, 1)
    at every layout (SP when TP > 1), grouped == sequential."""
    run_distributed(check_tiny_gpt_moe, world_size, LAYOUTS[world_size])


def check_moe_layer_errors():
    world = dist.get_world_size()
    P.initialize_model_parallel(world)
    messages = []
    with pytest.raises(ValueError, match="sequence_parallel=True") as info:
        MoELayer(H, FFN, E, K, sequence_parallel=False, device=device())
    messages.append(str(info.value))
    for topk in (0, E + 1):
        with pytest.raises(ValueError, match="moe_router_topk") as info:
            MoELayer(H, FFN, E, topk, sequence_parallel=True, device=device())
        messages.append(str(info.value))
    P.initialize_model_parallel(1, world, 1)
    with pytest.raises(ValueError, match="divisible by expert_model_parallel_size"):
        MoELayer(H, FFN, 3 if world == 2 else 6, K, device=device())
    assert all_reduce_sum(torch.ones(1, device=device())).item() == world
    return messages


@pytest.mark.parametrize("world_size", [2, 4])
def test_moe_layer_errors(world_size):
    """[MOE-LAYER-1] TP > 1 without sequence parallelism, topk outside [1, E] and E not divisible by EP
    raise ValueError on every rank, and the group still works afterwards."""
    messages = run_distributed(check_moe_layer_errors, world_size)
    assert all(m == messages[0] for m in messages)


# ---- [MOE-MATCH-1] ------------------------------------------------------------------------------------

EXPERT_NAMES = [
    ("decoder.layers.0.mlp.experts.linear_fc1", True),
    ("decoder.layers.0.mlp.experts.linear_fc2", True),
    ("decoder.layers.1.mlp.experts.local_experts.3.linear_fc2", True),
    ("decoder.layers.1.mlp.experts.local_experts.0.linear_fc1", True),
    ("mlp.experts.linear_fc1", True),
    ("decoder.layers.0.mlp.shared_experts.linear_fc1", False),
    ("decoder.layers.0.mlp.shared_experts.linear_fc2", False),
    ("decoder.layers.0.mlp.linear_fc1", False),
    ("decoder.layers.0.mlp.linear_fc2", False),
    ("decoder.layers.0.mlp.router", False),
    ("decoder.layers.0.mlp.experts.linear_fc1.adapter", False),
    ("decoder.layers.0.mlp.experts.linear_fc3", False),
    ("decoder.layers.0.self_attention.linear_qkv", False),
    ("experts.linear_fc1", False),
]


@pytest.mark.parametrize("name, expected", EXPERT_NAMES, ids=[n for n, _ in EXPERT_NAMES])
def test_is_expert_linear(name, expected):
    """[MOE-MATCH-1] expert linears by full name: mlp. ... experts ... .linear_fc1|2 at the end, never
    under .shared_experts.; routers and dense MLP linears are not expert linears."""
    assert is_expert_linear(name) is expected


# ---- [MOE-RANK-1] ---------------------------------------------------------------------------------------

RANK_TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "router"]
RANK_H, RANK_FFN, RANK_MOE_FFN, RANK_SHARED, RANK_E, RANK_K = 16, 16, 8, 8, 4, 2


def _rank_model(tp, grouped, gated, topk=RANK_K):
    config = TinyGPTConfig(vocab_size=16, hidden_size=RANK_H, num_layers=1, num_attention_heads=2,
                           ffn_hidden_size=RANK_FFN, max_sequence_length=16, num_moe_experts=RANK_E,
                           moe_router_topk=topk, moe_grouped_gemm=grouped, gated_linear_unit=gated,
                           moe_ffn_hidden_size=RANK_MOE_FFN, moe_shared_expert_intermediate_size=RANK_SHARED,
                           sequence_parallel=tp > 1)
    return TinyGPT(config, seed=3)


def _numel(kind, in_f, out_f, r, t):
    """Local parameter count of one adapter (A then B) sharded like its base over t ranks."""
    if kind == "column":
        return r // t * in_f + out_f // t * r
    if kind == "row":
        return r * in_f // t + out_f // t * r
    return r * in_f + out_f * r


def expected_adapters(state, grouped, share, gated, normalize, dim, topk):
    """{full name: (rank, local numel)} of every adapter TinyGPT + LoRA(RANK_TARGETS) should have."""
    t, etp, e_local = state.tp_size, state.expert_tp_size, RANK_E // state.ep_size
    pre = "decoder.layers.0"
    f1 = 2 * RANK_MOE_FFN if gated else RANK_MOE_FFN
    out = {
        f"{pre}.self_attention.linear_qkv": (dim, _numel("column", RANK_H, 3 * RANK_H, dim, t)),
        f"{pre}.self_attention.linear_proj": (dim, _numel("row", RANK_H, RANK_H, dim, t)),
        f"{pre}.mlp.shared_experts.linear_fc1": (dim, _numel("column", RANK_H, RANK_SHARED, dim, t)),
        f"{pre}.mlp.shared_experts.linear_fc2": (dim, _numel("row", RANK_SHARED, RANK_H, dim, t)),
        f"{pre}.mlp.router": (dim, _numel("none", RANK_H, RANK_E, dim, 1)),
    }
    r_row = dim // topk if normalize else dim
    r_col = math.ceil(r_row / etp) * etp if normalize else dim      # column bases: a multiple of expert TP
    fc1 = (r_col, _numel("column", RANK_H, f1, r_col, etp))
    fc2 = (r_row, _numel("row", RANK_MOE_FFN, RANK_H, r_row, etp))
    if grouped:
        copies = 1 if share else e_local
        out[f"{pre}.mlp.experts.linear_fc1"] = (fc1[0], fc1[1] * copies)
        out[f"{pre}.mlp.experts.linear_fc2"] = (fc2[0], fc2[1] * copies)
    else:
        for j in range(e_local):
            out[f"{pre}.mlp.experts.local_experts.{j}.linear_fc1"] = fc1
            out[f"{pre}.mlp.experts.local_experts.{j}.linear_fc2"] = fc2
    return out


def check_effective_ranks(layouts):
    alpha = 16
    checked = 0
    for tp, ep, etp in layouts:
        state = P.initialize_model_parallel(tp, ep, etp)
        for normalize, share, grouped, (dim, topk, gated) in itertools.product(
                [False, True], [False, True], [True, False], [(8, 2, False), (6, 2, True), (12, 4, False)]):
            where = (f"layout={(tp, ep, etp)} normalize={normalize} share={share} grouped={grouped} dim={dim} "
                     f"topk={topk} gated={gated}")
            model = _rank_model(tp, grouped, gated, topk)
            LoRA(target_modules=RANK_TARGETS, dim=dim, alpha=alpha, normalize_moe_lora=normalize,
                 share_expert_adapters=share)(model)
            expected = expected_adapters(state, grouped, share, gated, normalize, dim, topk)
            actual = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
            assert set(actual) == set(expected), (where, sorted(actual))
            for name, (rank, numel) in expected.items():
                adapter = actual[name].adapter
                assert adapter.dim == rank, (where, name, adapter.dim, rank)
                assert adapter.scale == pytest.approx(alpha / rank), (where, name)
                assert adapter.alpha == alpha
                got = sum(p.numel() for p in adapter.parameters())
                assert got == numel, (where, name, got, numel)
                assert all(p.requires_grad for p in adapter.parameters())
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            assert trainable == sum(n for _, n in expected.values()), where
            # The case the rounding is for: dim // topk = 3 at expert TP 2 -> column (fc1) 4, row (fc2) 3
            # (dim 6, topk 2 and dim 12, topk 4 alike).
            if normalize and dim // topk == 3:
                fc1 = "decoder.layers.0.mlp.experts." + ("linear_fc1" if grouped else "local_experts.0.linear_fc1")
                fc2 = fc1[:-1] + "2"
                assert actual[fc1].adapter.dim == (4 if etp == 2 else 3), where
                assert actual[fc2].adapter.dim == 3, where
            checked += 1
    return checked


@pytest.mark.parametrize("world_size", [1, 2])
def test_effective_ranks_and_parameter_counts(world_size):
    """[MOE-RANK-1] for every normalize_moe_lora x share_expert_adapters x grouped/sequential at expert
    TP 1 and 2: expert linears get rank dim // topk (rounded up to a multiple of expert TP for fc1, not
    fc2) or dim, scale alpha / rank; dense, shared-expert and router linears keep dim; the trainable
    parameter count of every adapter and of the model is the formula's."""
    layouts = {1: [(1, 1, 1)], 2: [(1, 2, 1), (2, 2, 1), (1, 1, 2), (2, 1, 2)]}[world_size]
    counts = run_distributed(check_effective_ranks, world_size, layouts)
    assert counts[0] == 24 * len(layouts)


# ---- [MOE-RANK-2] ---------------------------------------------------------------------------------------

def check_rank_errors():
    world = dist.get_world_size()
    state = P.initialize_model_parallel(1, world, 1)     # EP = world: shared adapters broadcast
    messages = []

    def expect(grouped, mutate, full_name, match, **cfg):
        model = _rank_model(1, grouped, False)
        mutate(model.decoder.layers[0].mlp.experts)
        lora = LoRA(target_modules=["linear_fc1", "linear_fc2"], dim=cfg.pop("dim", 8), normalize_moe_lora=True,
                    **cfg)
        with pytest.raises(ValueError, match=match) as info:
            lora(model)
        assert full_name in str(info.value), str(info.value)
        messages.append(str(info.value))

    pre = "decoder.layers.0.mlp.experts"

    def delete(attr_path):
        def mutate(experts):
            module = experts
            for part in attr_path.split("."):
                module = getattr(module, part) if not part.isdigit() else module[int(part)]
            del module.moe_router_topk
        return mutate

    def set_topk(attr_path, value):
        def mutate(experts):
            module = experts
            for part in attr_path.split("."):
                module = getattr(module, part) if not part.isdigit() else module[int(part)]
            module.moe_router_topk = value
        return mutate

    expect(True, delete("linear_fc1"), f"{pre}.linear_fc1", "moe_router_topk")
    expect(True, delete("linear_fc2"), f"{pre}.linear_fc2", "moe_router_topk")
    expect(False, delete("local_experts.0.linear_fc1"), f"{pre}.local_experts.0.linear_fc1", "moe_router_topk")
    expect(True, set_topk("linear_fc1", 0), f"{pre}.linear_fc1", "moe_router_topk")
    expect(True, set_topk("linear_fc2", -2), f"{pre}.linear_fc2", "moe_router_topk")
    expect(True, set_topk("linear_fc1", "2"), f"{pre}.linear_fc1", "moe_router_topk")
    expect(True, set_topk("linear_fc1", True), f"{pre}.linear_fc1", "moe_router_topk")
    expect(False, set_topk("local_experts.0.linear_fc2", 0), f"{pre}.local_experts.0.linear_fc2", "moe_router_topk")
    expect(True, lambda experts: None, f"{pre}.linear_fc1", r"dim \(5\) must be divisible by moe_router_topk \(2\)",
           dim=5, share_expert_adapters=True)
    expect(False, lambda experts: None, f"{pre}.local_experts.0.linear_fc1", r"divisible", dim=7)

    # Without normalize_moe_lora the topk is never read: no error, full rank.
    model = _rank_model(1, True, False)
    del model.decoder.layers[0].mlp.experts.linear_fc1.moe_router_topk
    LoRA(target_modules=["linear_fc1"], dim=8, normalize_moe_lora=False)(model)
    assert model.decoder.layers[0].mlp.experts.linear_fc1.adapter.dim == 8
    # Nothing was left half-communicated: a collective on the whole world still works.
    assert all_reduce_sum(torch.ones(1, device=device())).item() == world
    assert state.ep_size == world
    return messages


@pytest.mark.parametrize("world_size", [1, 2])
def test_rank_normalization_errors(world_size):
    """[MOE-RANK-2] normalize_moe_lora with moe_router_topk missing, not an int, a bool or <= 0 on an
    expert module, or dim % topk != 0, raises ValueError naming the module, the same on every rank and
    before any collective (an all_reduce still works afterwards)."""
    messages = run_distributed(check_rank_errors, world_size)
    assert all(m == messages[0] for m in messages)


# ---- [MOE-FWD-1] (and the gradients of shared / per-expert / router adapters) ---------------------------

FWD_CASES = [  # (grouped, share, gated, normalize, router, shared)
    (True, True, False, False, True, SHARED),
    (True, True, True, True, False, None),
    (True, False, False, True, True, None),
    (True, False, True, False, False, SHARED),
    (False, True, False, True, False, SHARED),
    (False, False, True, False, True, None),
]


def expert_adapter_tensors(moe, grouped, share, gated, state, grads):
    """Full (A1, B1, A2, B2) of the expert adapters, or of their gradients: 2-D when shared, else
    stacked over all E experts (gathered over expert TP and EP)."""
    etp_group, ep_group = state.expert_tp_group, state.ep_group
    stride1 = 2 if gated else 1
    if grouped:
        adapters = [moe.experts.linear_fc1.adapter, moe.experts.linear_fc2.adapter]
        if grads:
            local = [(grad_of(a.linear_in.weight), grad_of(a.linear_out.weight)) for a in adapters]
        elif share:
            return tuple(w for a in adapters for w in a.full_weights())
        else:
            full = [a.full_weights() for a in adapters]
            return tuple(gather(w, 0, ep_group) for pair in full for w in pair)
        if share:
            (a1, b1), (a2, b2) = local
            return (gather(a1, 0, etp_group), gather(b1, 0, etp_group, stride1),
                    gather(a2, 1, etp_group), gather(b2, 0, etp_group))
        (a1, b1), (a2, b2) = local     # stacked (E_local, ...): the shard dims move by one
        return tuple(gather(gather(w, d, etp_group, s), 0, ep_group)
                     for w, d, s in ((a1, 1, 1), (b1, 1, stride1), (a2, 2, 1), (b2, 1, 1)))
    experts = list(moe.experts.local_experts)
    if grads:
        per = [[grad_of(p) for p in (e.linear_fc1.adapter.linear_in.weight, e.linear_fc1.adapter.linear_out.weight,
                                     e.linear_fc2.adapter.linear_in.weight, e.linear_fc2.adapter.linear_out.weight)]
               for e in experts]
        stacked = [torch.stack([p[i] for p in per]) for i in range(4)]
        return tuple(gather(gather(w, d, etp_group, s), 0, ep_group)
                     for w, d, s in zip(stacked, (1, 1, 2, 1), (1, stride1, 1, 1)))
    per = [e.linear_fc1.adapter.full_weights() + e.linear_fc2.adapter.full_weights() for e in experts]
    return tuple(gather(torch.stack([p[i] for p in per]), 0, ep_group) for i in range(4))


def check_moe_lora(layouts, cases=FWD_CASES):
    X, G = seeded((S, BATCH, H), 21), seeded((S, BATCH, H), 22)
    alpha = 12.0
    for tp, ep, etp in layouts:
        state = P.initialize_model_parallel(tp, ep, etp)
        for grouped, share, gated, normalize, router, shared in cases:
            where = (f"layout={(tp, ep, etp)} grouped={grouped} share={share} gated={gated} normalize={normalize} "
                     f"router={router} shared={shared}")
            block = build_block(tp, grouped=grouped, gated=gated, shared=shared)
            moe = block.mlp
            router_w, fc1s, fc2s, shared_w = base_weights(moe)
            dim = (6 if max(tp, etp) <= 2 else 12) if normalize else 8
            targets = ["linear_fc1", "linear_fc2"] + (["router"] if router else [])
            torch.manual_seed(5)
            LoRA(target_modules=targets, dim=dim, alpha=alpha, lora_B_init_method="normal",
                 normalize_moe_lora=normalize, share_expert_adapters=share)(block)
            per_expert = not (grouped and share)

            # Effective ranks (MOE-RANK-1) and the full adapters.
            r2 = dim // K if normalize else dim
            r1 = math.ceil(r2 / etp) * etp if normalize else dim
            A1, B1, A2, B2 = (w.double() for w in expert_adapter_tensors(moe, grouped, share, gated, state, False))
            lead = (E,) if per_expert else ()
            f1 = 2 * FFN if gated else FFN
            assert A1.shape == lead + (r1, H) and B1.shape == lead + (f1, r1), where
            assert A2.shape == lead + (r2, FFN) and B2.shape == lead + (H, r2), where
            s1, s2 = alpha / r1, alpha / r2
            leaves = [t.clone().requires_grad_() for t in (A1, B1, A2, B2)]
            tp_leaves = []
            if router:
                RA, RB = (w.double() for w in moe.router.adapter.full_weights())
                assert RA.shape == (dim, H) and RB.shape == (E, dim), where
                tp_leaves += [RA.clone().requires_grad_(), RB.clone().requires_grad_()]
            if shared:
                tp_leaves += [w.double().clone().requires_grad_()
                              for lin in (moe.shared_experts.linear_fc1, moe.shared_experts.linear_fc2)
                              for w in lin.adapter.full_weights()]

            def dense(x, expert_leaves, other_leaves):
                a1, b1, a2, b2 = expert_leaves
                pick = (lambda w, e: w[e]) if per_expert else (lambda w, e: w)
                w1 = [fc1s[e] + s1 * pick(b1, e) @ pick(a1, e) for e in range(E)]
                w2 = [fc2s[e] + s2 * pick(b2, e) @ pick(a2, e) for e in range(E)]
                rest = list(other_leaves)
                rw = router_w
                if router:
                    ra, rb = rest[:2]
                    rest = rest[2:]
                    rw = router_w + (alpha / dim) * rb @ ra
                sw = None
                if shared:
                    sa1, sb1, sa2, sb2 = rest
                    sw = (shared_w[0] + (alpha / dim) * sb1 @ sa1, shared_w[1] + (alpha / dim) * sb2 @ sa2)
                return dense_moe(x, rw, w1, w2, gated, sw)

            const_tp = [t.detach() for t in tp_leaves]
            const_experts = [t.detach() for t in leaves]

            # The expert adapters alone, for local expert 0: fc1's (column) output is this rank's row
            # shard of scale B A x; fc2's (row) is its hidden shard of scale B A h in place, zeros elsewhere,
            # so that the combine's sum over expert-TP ranks is exactly scale B A h.
            gid = moe.experts.local_expert_ids[0]
            a1, b1, a2, b2 = (w[gid] if per_expert else w for w in const_experts)
            r, t = state.expert_tp_rank, state.expert_tp_size
            x_in, h_in = seeded((5, H), 71), seeded((5, FFN), 72)
            with torch.no_grad():
                if grouped:
                    out1 = moe.experts.linear_fc1.adapter(x_in, 0)
                    out2 = moe.experts.linear_fc2.adapter(chunk(h_in, -1, r, t), 0)
                else:
                    out1 = moe.experts.local_experts[0].linear_fc1.adapter(x_in)
                    out2 = moe.experts.local_experts[0].linear_fc2.adapter(chunk(h_in, -1, r, t))
            full1 = s1 * x_in @ a1.T @ b1.T                                       # (n, F1) = [gate; up]
            want1 = torch.cat([chunk(part, -1, r, t) for part in full1.chunk(2 if gated else 1, -1)], -1)
            assert_close(out1, want1, torch.float64, scale=10, msg=where)
            full2 = s2 * h_in @ a2.T @ b2.T                                       # (n, h)
            want2 = torch.zeros_like(full2)
            cols = slice(r * H // t, (r + 1) * H // t)
            want2[:, cols] = full2[:, cols]
            assert_close(out2, want2, torch.float64, scale=10, msg=where)
            # This rank: forward and backward through the model.
            x = local_chunk(X, state).clone().requires_grad_()
            g = local_chunk(G, state)
            y = block(x)
            assert_close(y, dense(local_chunk(X, state), const_experts, const_tp), torch.float64, scale=10, msg=where)
            (y * g).sum().backward()
            finalize_lora_grads(block)

            # Expected: expert adapters summed over the expert block's tokens, the input gradient of
            # this rank's own tokens.
            pieces, me = block_pieces(X, state)
            g_pieces, _ = block_pieces(G, state)
            pieces = [p.clone().requires_grad_() for p in pieces]
            loss = sum((dense(p, leaves, const_tp) * gp).sum() for p, gp in zip(pieces, g_pieces))
            expected = torch.autograd.grad(loss, [pieces[me]] + leaves)
            assert_close(x.grad, expected[0], torch.float64, scale=10, msg=where)
            actual = expert_adapter_tensors(moe, grouped, share, gated, state, True)
            for name, got, want in zip(("A1", "B1", "A2", "B2"), actual, expected[1:]):
                assert want.abs().max() > 1e-3, (where, name)        # the check has something to compare
                assert_close(got, want, torch.float64, scale=100, msg=f"{where} grad {name}")

            # Router and shared-expert adapters: the TP group's tokens, i.e. the full X.
            if tp_leaves:
                loss = (dense(X, const_experts, tp_leaves) * G).sum()
                expected = torch.autograd.grad(loss, tp_leaves)
                actual = []
                if router:
                    ra = moe.router.adapter
                    actual += [grad_of(ra.linear_in.weight), grad_of(ra.linear_out.weight)]
                if shared:
                    tpg = state.tp_group
                    a, b = moe.shared_experts.linear_fc1.adapter, moe.shared_experts.linear_fc2.adapter
                    actual += [gather(grad_of(a.linear_in.weight), 0, tpg),
                               gather(grad_of(a.linear_out.weight), 0, tpg),
                               gather(grad_of(b.linear_in.weight), 1, tpg),
                               gather(grad_of(b.linear_out.weight), 0, tpg)]
                for i, (got, want) in enumerate(zip(actual, expected)):
                    assert_close(got, want, torch.float64, scale=100, msg=f"{where} router/shared grad {i}")


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_moe_lora_matches_dense_math(world_size):
    """[MOE-FWD-1] [MOE-RANK-1] [MOE-SHARE-1] [MOE-SHARE-2] [MOE-ROUTER-1] LoRA on the expert linears
    (shared or per-expert grouped adapters, sequential adapters; gated or not; with and without rank
    normalization, router LoRA and shared experts): the output, the input gradient and the gathered
    gradients of every A and B (after finalize_lora_grads) equal the dense math with
    W_e + (alpha/r_e) B_e A_e per expert, at expert TP 1, 2 and 4."""
    run_distributed(check_moe_lora, world_size, LAYOUTS[world_size])


# ---- [MOE-SHARE-1] --------------------------------------------------------------------------------------

def same_over_ep(param, state) -> bool:
    """Whether `param` is the same on every rank of this rank's EP group."""
    copies = [torch.empty_like(param) for _ in range(state.ep_size)]
    dist.all_gather(copies, param.detach().contiguous(), group=state.ep_group)
    return all(torch.equal(c, copies[0]) for c in copies)


def _ep_identical(module, state):
    """Whether every parameter of `module` is the same on every rank of this rank's EP group."""
    return all([same_over_ep(p, state) for p in module.parameters()])   # a list: every rank joins every gather


def sgd_steps(block, tp, steps, finalize):
    """`steps` SGD steps on `block`'s trainable parameters, each rank on its own tokens (so the experts
    of different EP ranks see different tokens); finalize_lora_grads after each backward if asked."""
    opt = torch.optim.SGD([p for p in block.parameters() if p.requires_grad], lr=0.5)
    for step in range(steps):
        x = seeded((S // tp, BATCH, H), rank_seed(100 + step))
        g = seeded((S // tp, BATCH, H), rank_seed(200 + step))
        opt.zero_grad()
        (block(x) * g).sum().backward()
        if finalize:
            finalize_lora_grads(block)
        opt.step()


def _shared_run(tp, state, finalize, steps=3):
    block = build_block(tp, grouped=True)
    torch.manual_seed(rank_seed(17))          # ranks seeded differently before LoRA is applied
    LoRA(target_modules=["linear_fc1", "linear_fc2"], dim=4, alpha=8, lora_B_init_method="normal",
         share_expert_adapters=True)(block)
    adapters = [block.mlp.experts.linear_fc1.adapter, block.mlp.experts.linear_fc2.adapter]
    init_same = [_ep_identical(a, state) for a in adapters]
    start = [p.detach().clone() for a in adapters for p in a.parameters()]
    params = [p for p in block.parameters() if p.requires_grad]
    assert {id(p) for p in params} == {id(p) for a in adapters for p in a.parameters()}
    sgd_steps(block, tp, steps, finalize)
    moved = any(not torch.equal(p, s) for p, s in zip((p for a in adapters for p in a.parameters()), start))
    return init_same, [_ep_identical(a, state) for a in adapters], moved


def check_shared_adapter_sync(layouts):
    for tp, ep, etp in layouts:
        state = P.initialize_model_parallel(tp, ep, etp)
        where = f"layout={(tp, ep, etp)}"
        init_same, after_same, moved = _shared_run(tp, state, finalize=True)
        assert all(init_same), where
        assert all(after_same) and moved, where
        init_same, after_same, moved = _shared_run(tp, state, finalize=False)
        assert all(init_same) and moved, where
        assert not all(after_same), f"{where}: without finalize_lora_grads the EP copies should drift apart"


@pytest.mark.parametrize("world_size", [2, 4])
def test_shared_adapter_stays_identical_across_ep(world_size):
    """[MOE-SHARE-1] a shared grouped-expert adapter is identical across the EP group at init even when
    the ranks were seeded differently (broadcast), and after 3 SGD steps with finalize_lora_grads after
    each backward; without finalize_lora_grads the copies drift apart (the check can fail)."""
    run_distributed(check_shared_adapter_sync, world_size, EP_LAYOUTS[world_size])


# ---- [MOE-SHARE-2] --------------------------------------------------------------------------------------

def _never_expert_0_router():
    """A router weight that never picks expert 0 for positive tokens: its row is negative, the others
    positive."""
    w = seeded((E, H), 31).abs() + 0.1
    w[0] = -1.0
    return w


def _per_expert_adapter_grads(moe, grouped):
    """{local expert index: [grads of A1, B1, A2, B2 for that expert]} (None when absent)."""
    out = {}
    for j in range(moe.experts.num_local_experts):
        if grouped:
            ps = [moe.experts.linear_fc1.adapter.linear_in.weight, moe.experts.linear_fc1.adapter.linear_out.weight,
                  moe.experts.linear_fc2.adapter.linear_in.weight, moe.experts.linear_fc2.adapter.linear_out.weight]
            out[j] = [None if p.grad is None else p.grad[j] for p in ps]
        else:
            e = moe.experts.local_experts[j]
            out[j] = [p.grad for p in (e.linear_fc1.adapter.linear_in.weight, e.linear_fc1.adapter.linear_out.weight,
                                       e.linear_fc2.adapter.linear_in.weight, e.linear_fc2.adapter.linear_out.weight)]
    return out


def _perturb_expert_B(moe, grouped, local):
    with torch.no_grad():
        if grouped:
            moe.experts.linear_fc2.adapter.linear_out.weight[local] += 0.5
        else:
            moe.experts.local_experts[local].linear_fc2.adapter.linear_out.weight += 0.5


def check_per_expert_adapters(layouts):
    X = seeded((S, BATCH, H), 41).abs() + 0.1
    G = seeded((S, BATCH, H), 42)
    router_w = _never_expert_0_router()
    for tp, ep, etp in layouts:
        state = P.initialize_model_parallel(tp, ep, etp)
        for grouped in (True, False):
            where = f"layout={(tp, ep, etp)} grouped={grouped}"
            block = build_block(tp, grouped=grouped)
            moe = block.mlp
            with torch.no_grad():
                moe.router.weight.copy_(router_w)
            torch.manual_seed(8)
            LoRA(target_modules=["linear_fc1", "linear_fc2"], dim=4, alpha=8, lora_B_init_method="normal",
                 share_expert_adapters=False)(block)
            x = local_chunk(X, state)
            (block(x) * local_chunk(G, state)).sum().backward()
            finalize_lora_grads(block)

            # Which experts got tokens in this rank's expert block (dense routing of the block's tokens).
            pieces, _ = block_pieces(X, state)
            _, idx = dense_routing(torch.cat(pieces).reshape(-1, H), router_w)
            used = set(idx.unique().tolist())
            assert 0 not in used and len(used) >= 2, (where, used)
            # Precondition (see test_moe_backward_when_an_ep_rank_gets_no_token): every EP rank's experts
            # get some token, else the backward would not be collective-consistent in the reference.
            for p in range(state.ep_size):
                assert used & set(range(p * E // state.ep_size, (p + 1) * E // state.ep_size)), (where, used)
            grads = _per_expert_adapter_grads(moe, grouped)
            for j, global_id in enumerate(moe.experts.local_expert_ids):
                for k, gr in enumerate(grads[j]):
                    if global_id in used:
                        assert gr is not None and gr.abs().max() > 1e-6, (where, global_id, k)
                    else:
                        assert gr is None or torch.count_nonzero(gr) == 0, (where, global_id, k)

            # Perturbing expert e's adapter changes exactly the outputs of the tokens routed to e.
            with torch.no_grad():
                before = block(x)
                _, local_idx = dense_routing(x.reshape(-1, H), router_w)
                for e in sorted(used):
                    owner = moe.experts.local_expert_ids
                    if e in owner:
                        _perturb_expert_B(moe, grouped, owner.index(e))
                    after = block(x)
                    routed = (local_idx == e).any(-1)
                    diff = (after - before).reshape(-1, H).abs().amax(-1)
                    assert torch.all(diff[~routed] <= 1e-12), (where, e)
                    assert torch.all(diff[routed] > 1e-6), (where, e)
                    before = after


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_per_expert_adapters_are_separate(world_size):
    """[MOE-SHARE-2] per-expert grouped adapters and sequential adapters: an expert that gets no token
    (the router never picks expert 0) has zero/None adapter gradients while the others do not, and
    changing expert e's adapter changes exactly the outputs of the tokens routed to e."""
    # Every EP rank holds two experts, one of which gets tokens (see test_moe_backward_when_an_ep_rank_gets_no_token).
    layouts = {1: [(1, 1, 1)], 2: [(1, 2, 1), (2, 1, 2), (2, 2, 1)], 4: [(2, 2, 1), (1, 2, 2), (2, 2, 2)]}
    run_distributed(check_per_expert_adapters, world_size, layouts[world_size])


def check_no_token_rank(layout, starved):
    """The router never picks the experts in `starved`, which are all the local experts of EP rank 0."""
    tp, ep, etp = layout
    state = P.initialize_model_parallel(tp, ep, etp)
    X, G = seeded((S, BATCH, H), 61).abs() + 0.1, seeded((S, BATCH, H), 62)
    router_w = seeded((E, H), 63).abs() + 0.1
    router_w[list(starved)] = -1.0
    block = build_block(tp, grouped=True)
    moe = block.mlp
    assert set(moe.experts.local_expert_ids) <= set(starved) or state.ep_rank != 0
    with torch.no_grad():
        moe.router.weight.copy_(router_w)
    _, fc1s, fc2s, _ = base_weights(moe)
    x = local_chunk(X, state).clone().requires_grad_()     # as if it came from an earlier layer
    y = block(x)
    x64 = local_chunk(X, state).clone().requires_grad_()
    expected = dense_moe(x64, router_w, fc1s, fc2s, False)
    assert_close(y, expected, torch.float64, scale=10)     # the forward values are right everywhere
    # Every rank must take part in the backward's collectives: if one rank's output has no autograd
    # graph, its backward skips them and the other ranks wait forever. Agree first, so that the test
    # fails instead of hanging.
    has_graph = torch.tensor([1.0 if y.requires_grad else 0.0], device=device())
    flags = [torch.empty_like(has_graph) for _ in range(state.world_size)]
    dist.all_gather(flags, has_graph)
    missing = [r for r, f in enumerate(flags) if f.item() == 0]
    if missing:
        return missing       # reported by the test, so that the worker pool survives the failure
    (y * local_chunk(G, state)).sum().backward()
    (expected * local_chunk(G, state)).sum().backward()
    assert_close(x.grad, x64.grad, torch.float64, scale=10)
    return missing


@pytest.mark.parametrize("world_size", [2, 4])
def test_moe_backward_when_an_ep_rank_gets_no_token(world_size):
    """[MOE-LAYER-1] [MOE-SHARE-1] an EP rank whose local experts get no token from the whole expert
    block ("contributes zero") still takes part in the backward: every rank's input gradient equals the
    dense gradient (its tokens were computed by the other EP ranks' experts)."""
    layout, starved = {2: ((1, 2, 1), (0, 1)), 4: ((1, 4, 1), (0,))}[world_size]
    missing = run_distributed(check_no_token_rank, world_size, layout, starved)[0]
    assert not missing, (f"layout {layout}: the MoE output of rank(s) {missing}, whose local experts got no token, "
                         f"has no autograd graph although the input requires grad: their tokens (computed by other "
                         f"EP ranks' experts) get no input gradient, and the other ranks' backward blocks in the "
                         f"dispatcher's collectives")


# ---- [MOE-ROUTER-1] -------------------------------------------------------------------------------------

def check_router_lora(layouts):
    X, G = seeded((S, BATCH, H), 51), seeded((S, BATCH, H), 52)
    dim, alpha = 4, 6.0
    for tp, ep, etp in layouts:
        state = P.initialize_model_parallel(tp, ep, etp)
        where = f"layout={(tp, ep, etp)}"
        block = build_block(tp, grouped=True)
        moe = block.mlp
        W = moe.router.weight.detach().clone()
        torch.manual_seed(9)
        # normalize_moe_lora does not touch the router: it keeps the full rank.
        LoRA(target_modules=["router"], dim=dim, alpha=alpha, lora_B_init_method="normal",
             normalize_moe_lora=True)(block)
        adapter = moe.router.adapter
        assert adapter.dim == dim and adapter.scale == pytest.approx(alpha / dim), where
        A, B = adapter.full_weights()
        assert A.shape == (dim, H) and B.shape == (E, dim)
        tokens = local_chunk(X, state).reshape(-1, H)
        with torch.no_grad():
            delta = (moe.router.to_wrap.gating(tokens) + adapter(tokens)) - tokens @ W.T
            assert_close(delta, (alpha / dim) * tokens @ A.T @ B.T, torch.float64, msg=where)
            probs, idx = moe.router(tokens)
            want_probs, want_idx = dense_routing(tokens, W + (alpha / dim) * B @ A)
            assert torch.equal(idx, want_idx), where
            assert_close(probs, want_probs, torch.float64, msg=where)
        # The adapter matters: some token's routing changes (for the full X, at least).
        _, all_idx = dense_routing(X.reshape(-1, H), W + (alpha / dim) * B @ A)
        assert not torch.equal(all_idx, dense_routing(X.reshape(-1, H), W)[1]), where

        x = local_chunk(X, state).clone().requires_grad_()
        (block(x) * local_chunk(G, state)).sum().backward()
        local = [adapter.linear_in.weight.grad.clone(), adapter.linear_out.weight.grad.clone()]
        finalize_lora_grads(block)
        leaves = [A.double().clone().requires_grad_(), B.double().clone().requires_grad_()]
        router_fn = lambda a, b: W + (alpha / dim) * b @ a   # noqa: E731
        experts = moe.experts.full_expert_weights()
        fc1s = [w1.double() for w1, _ in experts]
        fc2s = [w2.double() for _, w2 in experts]
        loss = (dense_moe(X, router_fn(*leaves), fc1s, fc2s, False) * G).sum()
        expected = torch.autograd.grad(loss, leaves)
        got = [adapter.linear_in.weight.grad, adapter.linear_out.weight.grad]
        for name, g_, l_, e_ in zip("AB", got, local, expected):
            assert e_.abs().max() > 1e-3
            assert_close(g_, e_, torch.float64, scale=100, msg=f"{where} grad {name}")
            if tp > 1:   # before finalize_lora_grads each TP rank holds only its sequence shard's part
                assert not torch.allclose(l_, e_, rtol=1e-4, atol=1e-6), (where, name)
                assert_close(all_reduce_sum(l_, state.tp_group), e_, torch.float64, scale=100, msg=where)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_router_lora(world_size):
    """[MOE-ROUTER-1] [MOE-RANK-1] the router's logits get (alpha/dim) B A x with the full rank (also
    with normalize_moe_lora); routing equals the dense top-k softmax of x (W + scale B A)^T; under SP
    the adapter gradient is partial per TP rank and finalize_lora_grads makes it the full gradient."""
    layouts = {1: [(1, 1, 1)], 2: [(2, 1, 2), (2, 2, 1), (1, 2, 1)], 4: [(2, 2, 2), (4, 1, 4), (1, 4, 1)]}
    run_distributed(check_router_lora, world_size, layouts[world_size])
