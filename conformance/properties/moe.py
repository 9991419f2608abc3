"""SPEC section 10: mixture of experts, expert parallelism and LoRA on experts and routers.

Models are the backend's TinyGPT with MoE layers (make_model 'moe'), built at layouts (TP, EP,
expert-TP) that divide the world (TP > 1 with sequence parallelism). Expected values come from
SPEC: logits that do not depend on the layout, the suite's expert-linear rule and effective ranks
(conformance/model_case.py), adapter shard shapes per [LORA-FWD-2] over the expert-TP group, and the
router's top-k softmax recomputed in float64 from the router's replicated weight and the suite's A
and B. The router's input and output are observed with a forward hook on the wrapped router, which
is called with the tokens (T, h) and returns (probs (T, k), expert indices (T, k)) as in Megatron's
TopKRouter (reference/moe.py).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from hypothesis import strategies as st

from ..backend import ModelSpec
from ..configs import lora
from ..context import divisors
from ..layout import Shard, gather
from ..model_case import (
    apply_quietly,
    check_adapter_shapes,
    expected_selection,
    is_expert_linear,
    linear_candidates,
    load_model_adapters,
    plans,
    token_ids,
)
from ..registry import prop

NEEDS = {"models", "moe"}
ALL_TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "router"]
SHARED_SIZE = 8


def _sizes(ctx):
    heads = max(4, ctx.world_size)
    return {"heads": heads, "hidden": 4 * heads, "experts": max(4, ctx.world_size), "seq": max(4, ctx.world_size)}


def _layouts(ctx, min_ep: int = 1) -> list[tuple[int, int, int]]:
    w, E = ctx.world_size, _sizes(ctx)["experts"]
    return [(tp, ep, etp) for tp in divisors(w) for ep in divisors(w) for etp in divisors(w)
            if w % (ep * etp) == 0 and E % ep == 0 and ep >= min_ep]


@st.composite
def moe_examples(draw, ctx, min_ep=1, topk=(1, 2, 3)):
    tp, ep, etp = draw(st.sampled_from(_layouts(ctx, min_ep)))
    k = draw(st.sampled_from(list(topk)))
    return {"tp": tp, "ep": ep, "etp": etp, "topk": k, "grouped": draw(st.booleans()),
            "share": draw(st.booleans()), "shared_experts": draw(st.booleans()),
            "dim_factor": draw(st.integers(1, 3)), "alpha": draw(st.sampled_from([4, 8, 16])),
            "seed": draw(st.integers(0, 2**16))}


def _spec(ctx, ex, tp=None, grouped=None, gated=False) -> ModelSpec:
    size = _sizes(ctx)
    tp = ex["tp"] if tp is None else tp
    return ModelSpec(kind="moe", seed=ex["seed"], num_layers=1, hidden_size=size["hidden"], ffn_hidden_size=8,
                     num_attention_heads=size["heads"], vocab_size=16, sequence_parallel=tp > 1,
                     gated_linear_unit=gated, num_moe_experts=size["experts"], moe_router_topk=ex["topk"],
                     moe_grouped_gemm=ex["grouped"] if grouped is None else grouped,
                     moe_shared_expert_intermediate_size=SHARED_SIZE if ex["shared_experts"] else None)


def _build(ctx, backend, ex, layout=None, **spec_overrides):
    tp, ep, etp = layout or (ex["tp"], ex["ep"], ex["etp"])
    groups = backend.init_parallel(tp, ep, etp)
    spec = _spec(ctx, ex, tp=tp, **spec_overrides)
    return groups, spec, backend.make_model(spec)


def _lora(targets, dim, alpha, **fields):
    return lora(target_modules=list(targets), dim=dim, alpha=alpha, **fields)


def _forward(ctx, backend, spec, model, seed, batch=2):
    ids = token_ids(ctx, spec, batch=batch, seq=_sizes(ctx)["seq"], seed=seed)
    return backend.model_forward(model, spec, {"input_ids": ids})


def _where(ex, layout=None) -> str:
    tp, ep, etp = layout or (ex["tp"], ex["ep"], ex["etp"])
    return f"(TP, EP, expert-TP) = ({tp}, {ep}, {etp})"


def _router(ctx, backend, model):
    routers = [(n, m) for n, m in backend.lora_modules(model).items() if n.endswith(".router")]
    ctx.check(len(routers) == 1, f"expected one adapted router, got {[n for n, _ in routers]}")
    return routers[0]


def _replicas(ctx, t: torch.Tensor, group) -> list[torch.Tensor]:
    """Every group member's copy of `t` (same shape on each)."""
    size = dist.get_world_size(group)
    return list(gather(t.unsqueeze(0), Shard(0), group).chunk(size, dim=0)) if size > 1 else [t.detach()]


# ---- [MOE-LAYER-1] [MOE-INIT-1] --------------------------------------------------------------------------

@prop("MOE-LAYER-1", "MOE-INIT-1", needs=NEEDS | {"relayout"}, weight=0.5,
      strategy=lambda ctx: st.tuples(moe_examples(ctx), st.booleans(), st.booleans()))
def moe_logits_are_the_same_at_every_layout(ctx, backend, drawn):
    """One seed gives the same logits at every (TP, EP, expert-TP), grouped or sequential, gated or not."""
    ex, baseline_grouped, gated = drawn
    _, spec1, model1 = _build(ctx, backend, ex, (1, 1, 1), grouped=baseline_grouped, gated=gated)
    want = _forward(ctx, backend, spec1, model1, ex["seed"] + 1).detach().double()
    _, spec, model = _build(ctx, backend, ex, gated=gated)
    got = _forward(ctx, backend, spec, model, ex["seed"] + 1)
    ctx.assert_close(got, want, torch.float32,
                     f"MoE logits at {_where(ex)} grouped={ex['grouped']} vs (1, 1, 1) grouped={baseline_grouped} "
                     f"(gated={gated}, shared experts={ex['shared_experts']})", scale=10)


@prop("MOE-LAYER-1", needs=NEEDS, min_world=2, weight=0.25,
      strategy=lambda ctx: moe_examples(ctx).filter(lambda ex: ex["tp"] > 1))
def moe_needs_sequence_parallelism_at_tp(ctx, backend, ex):
    """A MoE model with TP > 1 and sequence_parallel=False raises ValueError on every rank."""
    backend.init_parallel(ex["tp"], ex["ep"], ex["etp"])
    spec = _spec(ctx, ex)
    spec.sequence_parallel = False
    try:
        backend.make_model(spec)
    except ValueError as error:
        ctx.check("sequence_parallel" in str(error),
                  f"the ValueError does not name sequence_parallel: {error}")
        return
    raise AssertionError(f"a MoE model at TP {ex['tp']} without sequence parallelism was built without a ValueError")


# ---- [MOE-MATCH-1] [MOE-RANK-1] [MOE-RANK-2] ------------------------------------------------------------

@prop("MOE-MATCH-1", needs=NEEDS, weight=0.5,
      strategy=lambda ctx: moe_examples(ctx, topk=(2, 3)))
def expert_linears_are_found_by_name(ctx, backend, ex):
    """With normalize_moe_lora exactly the expert linears (mlp. ... experts ... .linear_fc1|2, not under
    shared_experts) get a reduced rank; router, shared experts and attention keep dim."""
    dim = ex["topk"] * ex["tp"] * ex["etp"] * ex["dim_factor"]     # dim // topk needs no rounding
    groups, spec, model = _build(ctx, backend, ex)
    candidates = linear_candidates(model)
    apply_quietly(backend, model, _lora(ALL_TARGETS, dim, ex["alpha"], normalize_moe_lora=True,
                                        share_expert_adapters=ex["share"]))
    modules = backend.lora_modules(model)
    want = expected_selection(candidates, ALL_TARGETS)
    ctx.check(set(modules) == want, f"adapted modules {sorted(set(modules) ^ want)[:4]} differ from the suite's "
                                    f"selection of {ALL_TARGETS} ({_where(ex)})")
    normalized = {n for n, m in modules.items() if backend.adapter_weights(m)[1].shape[-1] != dim}
    experts = {n for n in modules if is_expert_linear(n)}
    ctx.check(normalized == experts,
              f"normalize_moe_lora (dim {dim}, topk {ex['topk']}) reduced the rank of "
              f"{sorted(normalized - experts)[:3]} (not expert linears) / kept dim on "
              f"{sorted(experts - normalized)[:3]} (expert linears) ({_where(ex)}, grouped={ex['grouped']})")


@st.composite
def rank_examples(draw, ctx):
    """Half the examples are the case the rounding is for: normalize_moe_lora at expert TP > 1 with
    dim // topk not a multiple of it (where the world allows one)."""
    ex = draw(moe_examples(ctx))
    rounding_layouts = [lay for lay in _layouts(ctx) if lay[2] > 1]
    if rounding_layouts and draw(st.booleans()):
        ex["tp"], ex["ep"], ex["etp"] = draw(st.sampled_from(rounding_layouts))
        ex["normalize"] = True
        dims = [math.lcm(ex["tp"], ex["topk"]) * f for f in range(1, 2 * ex["etp"] + 1)]
        dims = [d for d in dims if (d // ex["topk"]) % ex["etp"]] or dims
    else:
        ex["normalize"] = draw(st.booleans())
        unit = math.lcm(ex["tp"], ex["topk"]) if ex["normalize"] else math.lcm(ex["tp"], ex["etp"])
        dims = [unit * f for f in range(1, 4)]
    ex["dim"] = draw(st.sampled_from(dims))
    return ex


@prop("MOE-RANK-1", "MOE-SHARE-2", "LORA-FWD-2", needs=NEEDS, strategy=rank_examples)
def adapter_ranks_and_shards(ctx, backend, ex):
    """Every adapter's A and B have SPEC's shard shapes for its effective rank: dim // topk (rounded up
    to expert TP for fc1) on expert linears with normalize_moe_lora, dim elsewhere; per-expert grouped
    adapters stacked (E_local, ...); shared grouped and sequential adapters 2-D."""
    groups, spec, model = _build(ctx, backend, ex)
    apply_quietly(backend, model, _lora(ALL_TARGETS, ex["dim"], ex["alpha"], normalize_moe_lora=ex["normalize"],
                                        share_expert_adapters=ex["share"]))
    plan_by_name = plans(backend, model, spec, groups, ex["dim"], normalize=ex["normalize"], share=ex["share"])
    ctx.check(any(is_expert_linear(n) for n in plan_by_name), f"no expert linear got an adapter ({_where(ex)})")
    check_adapter_shapes(backend, model, plan_by_name)


@prop("MOE-RANK-2", "LORA-ERR-1", needs=NEEDS, weight=0.25,
      strategy=lambda ctx: st.tuples(moe_examples(ctx, topk=(2, 3)), st.integers(1, 2)))
def rank_not_divisible_by_topk_raises(ctx, backend, drawn):
    """normalize_moe_lora with dim % topk != 0 raises ValueError naming an expert module, on every rank."""
    ex, remainder = drawn
    remainder = min(remainder, ex["topk"] - 1)
    dim = ex["topk"] * ex["dim_factor"] + remainder
    _, _, model = _build(ctx, backend, dict(ex, shared_experts=False))
    try:
        apply_quietly(backend, model, _lora(["linear_fc1", "linear_fc2"], dim, ex["alpha"], normalize_moe_lora=True,
                                            share_expert_adapters=ex["share"]))
    except ValueError as error:
        ctx.check("linear_fc" in str(error), f"the ValueError does not name the expert module: {error}")
        return
    raise AssertionError(f"normalize_moe_lora with dim {dim} and moe_router_topk {ex['topk']} did not raise "
                         f"ValueError ({_where(ex)})")


# ---- [MOE-SHARE-1] [MOE-SHARE-2] ----------------------------------------------------------------------------

def _sgd_step(backend, model, lr=0.5):
    backend.finalize_grads(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.grad is not None:
                p -= lr * p.grad
                p.grad = None


@prop("MOE-SHARE-1", needs=NEEDS, min_world=2, weight=0.25,
      strategy=lambda ctx: moe_examples(ctx, min_ep=2))
def shared_expert_adapters_stay_identical_across_ep(ctx, backend, ex):
    """share_expert_adapters=True: a grouped module's one adapter is identical on every EP rank after
    init (even from different generator states) and after SGD steps with finalize_grads."""
    ex = dict(ex, grouped=True, share=True)
    dim = math.lcm(ex["tp"], ex["etp"]) * ex["dim_factor"]
    groups, spec, model = _build(ctx, backend, ex)
    # Only expert adapters are trainable: a rank whose experts get no token must still join the backward.
    config = _lora(["linear_fc1", "linear_fc2"], dim, ex["alpha"], share_expert_adapters=True)
    with torch.random.fork_rng(devices=[]):      # leave the caller's generator as it was
        torch.manual_seed(1000 + ctx.rank)       # a different generator state on every rank
        apply_quietly(backend, model, config)
    modules = backend.lora_modules(model)
    shared = [n for n in modules if is_expert_linear(n) and "local_experts" not in n]
    ctx.check(bool(shared), f"no grouped expert module got an adapter ({_where(ex)})")

    def check(when):
        for name in shared:
            for label, param in zip("AB", backend.adapter_weights(modules[name])):
                copies = _replicas(ctx, param, groups.ep_group)
                diff = max((c - copies[0]).abs().max().item() for c in copies)
                ctx.check(diff == 0, f"{when}: the shared adapter {label} of {name} differs across the EP group "
                                     f"by up to {diff:.3g} ({_where(ex)})")

    check("after apply_lora")
    for step in range(2):
        logits = _forward(ctx, backend, spec, model, ex["seed"] + 1)
        G = ctx.randn(tuple(logits.shape), ex["seed"] + 2 + step)
        (logits.float() * G.float()).sum().backward()
        _sgd_step(backend, model)
    check("after 2 SGD steps with finalize_grads")


def _capture(module, store):
    def hook(_module, args, output):
        store["input"] = args[0].detach()
        store["output"] = output
    return module.register_forward_hook(hook)


@prop("MOE-SHARE-2", needs=NEEDS, weight=0.25,
      strategy=lambda ctx: st.tuples(moe_examples(ctx, topk=(1, 2)), st.integers(0, 63)))
def unrouted_expert_adapter_gets_no_gradient(ctx, backend, drawn):
    """share_expert_adapters=False: a grouped module's adapters are stacked per local expert, and the
    adapter of an expert that no token is routed to gets zero gradient (the others do get one)."""
    ex, pick = drawn
    ex = dict(ex, grouped=True, share=False, shared_experts=False)
    E = _sizes(ctx)["experts"]
    silent = pick % E
    dim = math.lcm(ex["tp"], ex["etp"]) * ex["dim_factor"]
    groups, spec, model = _build(ctx, backend, ex)
    apply_quietly(backend, model, _lora(["linear_fc1", "linear_fc2", "router"], dim, ex["alpha"],
                                        share_expert_adapters=False))
    plan_by_name = plans(backend, model, spec, groups, dim, share=False)
    load_model_adapters(ctx, backend, model, plan_by_name, ex["seed"])
    _, router = _router(ctx, backend, model)
    with torch.no_grad():
        backend.adapter_weights(router)[1].zero_()                 # routing by the base weight alone
    store = {}
    handle = _capture(router, store)
    try:
        with torch.no_grad():
            _forward(ctx, backend, spec, model, ex["seed"] + 1)
        # Make expert `silent` the last choice of every token: its router row is -M u with x.u = 1 for
        # the router input x of every token of every rank (fewer tokens than hidden dimensions, so u
        # exists), and M larger than any other logit.
        X_all = gather(store["input"].double(), Shard(0), None)
        u = torch.linalg.pinv(X_all) @ torch.ones(X_all.shape[0], dtype=torch.float64, device=X_all.device)
        ctx.check(bool((X_all @ u > 0.5).all()), "the suite could not find a direction separating the tokens")
        W = backend.base_weight(router)
        others = (X_all @ W.detach().double().T).abs().max().item()
        with torch.no_grad():
            W[silent] = (-(2 * others + 10) / (X_all @ u).min().item() * u).to(W.dtype)
        logits = _forward(ctx, backend, spec, model, ex["seed"] + 1)
    finally:
        handle.remove()
    G = ctx.randn(tuple(logits.shape), ex["seed"] + 2)
    (logits.float() * G.float()).sum().backward()
    backend.finalize_grads(model)
    # Experts this rank's own tokens are routed to (with a clear margin) certainly got tokens.
    local_logits = store["input"].double() @ W.detach().double().T
    top = local_logits.topk(min(ex["topk"] + 1, E), dim=-1)
    routed = set()
    for row_values, row_ids in zip(top.values, top.indices):
        if ex["topk"] < E and row_values[ex["topk"] - 1] - row_values[ex["topk"]] < 1e-3:
            continue
        routed.update(row_ids[:ex["topk"]].tolist())
    ctx.check(silent not in routed, "the suite's routing still sends tokens to the silenced expert")
    modules = backend.lora_modules(model)
    for name, plan in plan_by_name.items():
        if plan.experts is None:
            continue
        for label, param in zip("AB", backend.adapter_weights(modules[name])):
            grad = torch.zeros_like(param) if param.grad is None else param.grad
            for j, g in enumerate(plan.experts):
                norm = grad[j].abs().max().item()
                if g == silent:
                    ctx.check(norm == 0, f"the per-expert adapter {label} of expert {g} in {name} got gradient "
                                         f"{norm:.3g} though no token was routed to expert {g} ({_where(ex)})")
                elif g in routed:
                    ctx.check(norm > 0, f"the per-expert adapter {label} of expert {g} in {name} got no gradient "
                                        f"though tokens were routed to it ({_where(ex)})")


# ---- [MOE-FWD-1] [MOE-ROUTER-1] ------------------------------------------------------------------------------

@prop("MOE-FWD-1", "MOE-SHARE-2", needs=NEEDS | {"relayout"}, weight=0.25,
      strategy=lambda ctx: st.tuples(moe_examples(ctx, topk=(1, 2)), st.booleans(), st.booleans(),
                                     st.lists(st.sampled_from(["linear_qkv", "linear_proj", "router"]), unique=True)))
def moe_lora_logits_are_the_same_at_every_layout(ctx, backend, drawn):
    """With the same full A and B in every adapter (per expert, or shared), the adapted MoE model gives the
    same logits at every layout as at (1, 1, 1); per-expert grouped adapters equal sequential experts'."""
    ex, baseline_grouped, normalize, extra = drawn
    dim = ex["topk"] * math.lcm(ex["tp"], ex["etp"]) * ex["dim_factor"]     # no rounding of expert ranks
    targets = ["linear_fc1", "linear_fc2", *extra]
    config = dict(normalize_moe_lora=normalize, share_expert_adapters=ex["share"])
    baseline_grouped = baseline_grouped or ex["share"]     # a shared adapter exists for grouped experts only
    outputs = []
    layouts = (((1, 1, 1), baseline_grouped), ((ex["tp"], ex["ep"], ex["etp"]), ex["grouped"] or ex["share"]))
    for layout, grouped in layouts:
        groups, spec, model = _build(ctx, backend, ex, layout, grouped=grouped)
        apply_quietly(backend, model, _lora(targets, dim, ex["alpha"], **config))
        plan_by_name = plans(backend, model, spec, groups, dim, normalize=normalize, share=ex["share"])
        load_model_adapters(ctx, backend, model, plan_by_name, ex["seed"])
        outputs.append(_forward(ctx, backend, spec, model, ex["seed"] + 1).detach().double())
    ctx.assert_close(outputs[1], outputs[0], torch.float32,
                     f"logits of the adapted MoE model at {_where(ex)} vs (1, 1, 1) (targets {targets}, "
                     f"share={ex['share']}, normalize={normalize})", scale=10)


@prop("MOE-ROUTER-1", needs=NEEDS, weight=0.5,
      strategy=lambda ctx: st.tuples(moe_examples(ctx, topk=(1, 2, 3)), st.sampled_from([2, 4, 8])))
def router_adapter_adds_to_the_logits(ctx, backend, drawn):
    """A targeted router routes by top-k softmax of x (W + (alpha/dim) B A)^T; under SP its adapter's
    gradient, partial per TP rank, is the TP group's sum after finalize_grads."""
    ex, dim = drawn
    groups, spec, model = _build(ctx, backend, dict(ex, shared_experts=False))
    apply_quietly(backend, model, _lora(["router"], dim, ex["alpha"]))
    plan_by_name = plans(backend, model, spec, groups, dim)
    load_model_adapters(ctx, backend, model, plan_by_name, ex["seed"])
    name, router = _router(ctx, backend, model)
    store = {}
    handle = _capture(router, store)
    try:
        logits = _forward(ctx, backend, spec, model, ex["seed"] + 1)
    finally:
        handle.remove()
    A_full, B_full = plan_by_name[name].full_tensors(ctx, ex["seed"], name)
    A_param, B_param = backend.adapter_weights(router)
    A_full, B_full = A_full.to(A_param.dtype).double(), B_full.to(B_param.dtype).double()
    W = backend.base_weight(router).detach().double()
    x = store["input"].double().reshape(-1, W.shape[1])
    scores = x @ (W + ex["alpha"] / dim * B_full @ A_full).T                  # (T, E)
    output = store["output"]
    ctx.check(isinstance(output, tuple) and len(output) >= 2,
              f"the router returned {type(output).__name__}; expected (probs, indices)")
    probs, indices = output[0].detach().reshape(x.shape[0], -1), output[1].detach().reshape(x.shape[0], -1)
    k = ex["topk"]
    ctx.check(tuple(indices.shape) == (x.shape[0], k), f"router indices have shape {tuple(indices.shape)}, "
                                                        f"expected {(x.shape[0], k)}")
    ordered = scores.sort(dim=-1, descending=True).values
    clear = ordered[:, k - 1] - ordered[:, k] > 1e-4                          # no near-tie at the k-th place
    want = scores.topk(k, dim=-1).indices.sort(dim=-1).values
    got = indices.long().sort(dim=-1).values
    wrong = ((want != got).any(dim=-1) & clear.to(want.device)).nonzero().flatten().tolist()
    ctx.check(not wrong, f"router top-{k} experts differ from those of x (W + (alpha/dim) B A)^T for tokens "
                         f"{wrong[:4]}: got {got[wrong[:1]].tolist()}, expected {want[wrong[:1]].tolist()}")
    chosen = scores.gather(1, indices.long())
    ctx.assert_close(probs, torch.softmax(chosen, dim=-1), torch.float32,
                     "router probabilities (softmax over the chosen experts' adapted logits)", scale=10)
    # The gradient of the router adapter: after finalize_grads, the TP group's sum of the partial ones.
    G = ctx.randn(tuple(logits.shape), ex["seed"] + 2)
    (logits.float() * G.float()).sum().backward()
    partial = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in (A_param, B_param)]
    backend.finalize_grads(model)
    for label, param, before in zip("AB", (A_param, B_param), partial):
        ctx.check(param.grad is not None, f"the router adapter's {label} got no gradient")
        if groups.tp_size == 1:
            continue
        copies = _replicas(ctx, param.grad, groups.tp_group)
        diff = max((c - copies[0]).abs().max().item() for c in copies)
        ctx.check(diff <= 1e-5 * (1 + copies[0].abs().max().item()),
                  f"after finalize_grads the router adapter's {label} gradient differs across the TP group by "
                  f"{diff:.3g} ({_where(ex)}, sequence parallel)")
        # A backend may sum during backward already (then finalize_grads leaves the gradient as it is).
        partials = _replicas(ctx, before, groups.tp_group)
        already = all(torch.equal(c, partials[0]) for c in partials)
        target = before if already else ctx.all_reduce(before, groups.tp_group)
        ctx.assert_close(param.grad, target.double(), torch.float32,
                         f"the router adapter's {label} gradient after finalize_grads (the TP group's sum)", scale=10)
