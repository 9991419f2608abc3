"""SPEC section 10: mixture of experts, expert parallelism and LoRA on experts and routers.

Models are the backend's TinyGPT with MoE layers (make_model 'moe'), built at layouts (TP, EP,
expert-TP) that divide the world (TP > 1 with sequence parallelism; conformance/moe_case.py). Expected values come from
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

from ..layout import Shard, gather
from ..model_case import (
    apply_quietly,
    check_adapter_shapes,
    expected_selection,
    is_expert_linear,
    linear_candidates,
    load_model_adapters,
    plans,
)
from ..moe_case import (MOE_LAYER, block_tokens, build_moe, dense_moe_output, describe_layout, expert_base_weights,
                        forward_logits, layouts, moe_examples, moe_layer_observed, moe_lora, moe_spec, sizes)
from ..registry import FORWARD_MATH, explicit_examples, prop, tupled, with_explicit

NEEDS = {"models", "moe"}
ALL_TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "router"]


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
      strategy=lambda ctx: tupled(moe_examples(ctx), st.booleans(), st.booleans(),
                                  always=[(False, False), (True, True), (True, False), (False, True)]))
def moe_logits_are_the_same_at_every_layout(ctx, backend, drawn):
    """One seed gives the same logits at every (TP, EP, expert-TP), grouped or sequential, gated or not."""
    ex, baseline_grouped, gated = drawn
    _, spec1, model1 = build_moe(ctx, backend, ex, (1, 1, 1), grouped=baseline_grouped, gated=gated)
    want = forward_logits(ctx, backend, spec1, model1, ex["seed"] + 1).detach().double()
    _, spec, model = build_moe(ctx, backend, ex, gated=gated)
    got = forward_logits(ctx, backend, spec, model, ex["seed"] + 1)
    ctx.assert_close(got, want, torch.float32,
                     f"MoE logits at {describe_layout(ex)} grouped={ex['grouped']} vs (1, 1, 1) "
                     f"grouped={baseline_grouped} (gated={gated}, shared experts={ex['shared_experts']})", scale=10)


@prop("MOE-LAYER-1", needs=NEEDS, min_world=2, weight=0.25,
      strategy=lambda ctx: moe_examples(ctx, min_tp=2))
def moe_needs_sequence_parallelism_at_tp(ctx, backend, ex):
    """A MoE model with TP > 1 and sequence_parallel=False raises ValueError on every rank."""
    backend.init_parallel(ex["tp"], ex["ep"], ex["etp"])
    spec = moe_spec(ctx, ex)
    spec.sequence_parallel = False
    try:
        backend.make_model(spec)
    except ValueError as error:
        ctx.check("sequence_parallel" in str(error),
                  f"the ValueError does not name sequence_parallel: {error}")
        return
    raise AssertionError(f"a MoE model at TP {ex['tp']} without sequence parallelism was built without a ValueError")


# ---- [MOE-MATCH-1] [MOE-RANK-1] [MOE-RANK-2] ------------------------------------------------------------

def rank_examples(ctx):
    """Half the examples are the case the rounding is for: normalize_moe_lora at expert TP > 1 with
    dim // topk not a multiple of it (where the world allows one). Always run: every layout with
    normalize_moe_lora (rounding where expert TP > 1), and the first without it."""
    explicit = []
    for i, ex in enumerate(explicit_examples(moe_examples(ctx, topk=(2, 3)))):
        unit = math.lcm(ex["tp"], ex["topk"])
        dims = [unit * f for f in range(1, 2 * ex["etp"] + 1)]
        explicit.append(dict(ex, normalize=True, dim=next((d for d in dims if (d // ex["topk"]) % ex["etp"]), unit)))
        if i == 0:
            explicit.append(dict(ex, normalize=False, dim=math.lcm(ex["tp"], ex["etp"])))
    return with_explicit(_draw_rank_example(ctx), explicit)


@st.composite
def _draw_rank_example(draw, ctx):
    ex = draw(moe_examples(ctx))
    rounding_layouts = [lay for lay in layouts(ctx) if lay[2] > 1]
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
    groups, spec, model = build_moe(ctx, backend, ex)
    model, _ = apply_quietly(backend, model, moe_lora(ALL_TARGETS, ex["dim"], ex["alpha"], normalize_moe_lora=ex["normalize"],
                                        share_expert_adapters=ex["share"]))
    plan_by_name = plans(backend, model, spec, groups, ex["dim"], normalize=ex["normalize"], share=ex["share"])
    ctx.check(any(is_expert_linear(n) for n in plan_by_name),
              f"no expert linear got an adapter ({describe_layout(ex)})")
    check_adapter_shapes(backend, model, plan_by_name)


@prop("MOE-MATCH-1", needs=NEEDS, weight=0.5, requires=("MOE-RANK-1",),
      strategy=lambda ctx: moe_examples(ctx, topk=(2, 3)))
def expert_linears_are_found_by_name(ctx, backend, ex):
    """With normalize_moe_lora exactly the expert linears (mlp. ... experts ... .linear_fc1|2, not under
    shared_experts) get a reduced rank; router, shared experts and attention keep dim."""
    dim = ex["topk"] * ex["tp"] * ex["etp"] * ex["dim_factor"]     # dim // topk needs no rounding
    groups, spec, model = build_moe(ctx, backend, ex)
    candidates = linear_candidates(model)
    model, _ = apply_quietly(backend, model, moe_lora(ALL_TARGETS, dim, ex["alpha"], normalize_moe_lora=True,
                                        share_expert_adapters=ex["share"]))
    modules = backend.lora_modules(model)
    want = expected_selection(candidates, ALL_TARGETS)
    ctx.check(set(modules) == want, f"adapted modules {sorted(set(modules) ^ want)[:4]} differ from the suite's "
                                    f"selection of {ALL_TARGETS} ({describe_layout(ex)})")
    normalized = {n for n, m in modules.items() if backend.adapter_weights(m)[1].shape[-1] != dim}
    experts = {n for n in modules if is_expert_linear(n)}
    ctx.check(normalized == experts,
              f"normalize_moe_lora (dim {dim}, topk {ex['topk']}) reduced the rank of "
              f"{sorted(normalized - experts)[:3]} (not expert linears) / kept dim on "
              f"{sorted(experts - normalized)[:3]} (expert linears) ({describe_layout(ex)}, grouped={ex['grouped']})")


@prop("MOE-RANK-2", "LORA-ERR-1", needs=NEEDS, weight=0.25, requires=("MOE-RANK-1",),
      strategy=lambda ctx: tupled(moe_examples(ctx, topk=(2, 3)), st.integers(1, 2), always=[(1,), (2,)]))
def rank_not_divisible_by_topk_raises(ctx, backend, drawn):
    """normalize_moe_lora with dim % topk != 0 raises ValueError naming an expert module, on every rank."""
    ex, remainder = drawn
    remainder = min(remainder, ex["topk"] - 1)
    dim = ex["topk"] * ex["dim_factor"] + remainder
    _, _, model = build_moe(ctx, backend, dict(ex, shared_experts=False))
    try:
        model, _ = apply_quietly(backend, model, moe_lora(["linear_fc1", "linear_fc2"], dim, ex["alpha"], normalize_moe_lora=True,
                                            share_expert_adapters=ex["share"]))
    except ValueError as error:
        ctx.check("linear_fc" in str(error), f"the ValueError does not name the expert module: {error}")
        return
    raise AssertionError(f"normalize_moe_lora with dim {dim} and moe_router_topk {ex['topk']} did not raise "
                         f"ValueError ({describe_layout(ex)})")


# ---- [MOE-SHARE-1] [MOE-SHARE-2] ----------------------------------------------------------------------------

def _sgd_step(backend, model, lr=0.5):
    backend.finalize_grads(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.grad is not None:
                p -= lr * p.grad
                p.grad = None


@prop("MOE-SHARE-1", needs=NEEDS, min_world=2, weight=0.25,
      requires=FORWARD_MATH,
      strategy=lambda ctx: moe_examples(ctx, min_ep=2))
def shared_expert_adapters_stay_identical_across_ep(ctx, backend, ex):
    """share_expert_adapters=True: a grouped module's one adapter is identical on every EP rank after
    init (even from different generator states) and after SGD steps with finalize_grads."""
    ex = dict(ex, grouped=True, share=True)
    dim = math.lcm(ex["tp"], ex["etp"]) * ex["dim_factor"]
    groups, spec, model = build_moe(ctx, backend, ex)
    # Only expert adapters are trainable: a rank whose experts get no token must still join the backward.
    config = moe_lora(["linear_fc1", "linear_fc2"], dim, ex["alpha"], share_expert_adapters=True)
    with torch.random.fork_rng(devices=[]):      # leave the caller's generator as it was
        torch.manual_seed(1000 + ctx.rank)       # a different generator state on every rank
        model, _ = apply_quietly(backend, model, config)
    modules = backend.lora_modules(model)
    shared = [n for n in modules if is_expert_linear(n) and "local_experts" not in n]
    ctx.check(bool(shared), f"no grouped expert module got an adapter ({describe_layout(ex)})")

    def check(when):
        for name in shared:
            for label, param in zip("AB", backend.adapter_weights(modules[name])):
                copies = _replicas(ctx, param, groups.ep_group)
                diff = max((c - copies[0]).abs().max().item() for c in copies)
                ctx.check(diff == 0, f"{when}: the shared adapter {label} of {name} differs across the EP group "
                                     f"by up to {diff:.3g} ({describe_layout(ex)})")

    check("after apply_lora")
    for step in range(2):
        logits = forward_logits(ctx, backend, spec, model, ex["seed"] + 1)
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
      requires=FORWARD_MATH,
      strategy=lambda ctx: tupled(moe_examples(ctx, topk=(1, 2)), st.integers(0, 63), always=[(0,), (5,), (2,)]))
def unrouted_expert_adapter_gets_no_gradient(ctx, backend, drawn):
    """share_expert_adapters=False: a grouped module's adapters are stacked per local expert, and the
    adapter of an expert that no token is routed to gets zero gradient (the others do get one)."""
    ex, pick = drawn
    ex = dict(ex, grouped=True, share=False, shared_experts=False)
    E = sizes(ctx)["experts"]
    silent = pick % E
    dim = math.lcm(ex["tp"], ex["etp"]) * ex["dim_factor"]
    groups, spec, model = build_moe(ctx, backend, ex)
    model, _ = apply_quietly(backend, model, moe_lora(["linear_fc1", "linear_fc2", "router"], dim, ex["alpha"],
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
            forward_logits(ctx, backend, spec, model, ex["seed"] + 1)
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
        logits = forward_logits(ctx, backend, spec, model, ex["seed"] + 1)
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
                                         f"{norm:.3g} though no token was routed to expert {g} ({describe_layout(ex)})")
                elif g in routed:
                    ctx.check(norm > 0, f"the per-expert adapter {label} of expert {g} in {name} got no gradient "
                                        f"though tokens were routed to it ({describe_layout(ex)})")


# ---- [MOE-FWD-1] [MOE-ROUTER-1] ------------------------------------------------------------------------------

@prop("MOE-FWD-1", "MOE-SHARE-2", needs=NEEDS | {"relayout"}, weight=0.25,
      requires=FORWARD_MATH + ("MOE-RANK-1",),
      strategy=lambda ctx: tupled(moe_examples(ctx, topk=(1, 2)), st.booleans(), st.booleans(),
                                  st.lists(st.sampled_from(["linear_qkv", "linear_proj", "router"]), unique=True),
                                  always=[(False, True, ["router"]), (True, False, []),
                                          (False, False, ["linear_qkv", "linear_proj"])]))
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
        groups, spec, model = build_moe(ctx, backend, ex, layout, grouped=grouped)
        model, _ = apply_quietly(backend, model, moe_lora(targets, dim, ex["alpha"], **config))
        plan_by_name = plans(backend, model, spec, groups, dim, normalize=normalize, share=ex["share"])
        load_model_adapters(ctx, backend, model, plan_by_name, ex["seed"])
        outputs.append(forward_logits(ctx, backend, spec, model, ex["seed"] + 1).detach().double())
    ctx.assert_close(outputs[1], outputs[0], torch.float32,
                     f"logits of the adapted MoE model at {describe_layout(ex)} vs (1, 1, 1) (targets {targets}, "
                     f"share={ex['share']}, normalize={normalize})", scale=10)


@prop("MOE-ROUTER-1", needs=NEEDS, weight=0.5, requires=FORWARD_MATH + ("MOE-SHARE-1",),
      strategy=lambda ctx: tupled(moe_examples(ctx, topk=(1, 2, 3)), st.sampled_from([2, 4, 8]),
                                  always=[(2,), (4,), (8,)]))
def router_adapter_adds_to_the_logits(ctx, backend, drawn):
    """A targeted router routes by top-k softmax of x (W + (alpha/dim) B A)^T; under SP its adapter's
    gradient, partial per TP rank, is the TP group's sum after finalize_grads."""
    ex, dim = drawn
    groups, spec, model = build_moe(ctx, backend, dict(ex, shared_experts=False))
    model, _ = apply_quietly(backend, model, moe_lora(["router"], dim, ex["alpha"]))
    plan_by_name = plans(backend, model, spec, groups, dim)
    load_model_adapters(ctx, backend, model, plan_by_name, ex["seed"])
    name, router = _router(ctx, backend, model)
    store = {}
    handle = _capture(router, store)
    try:
        logits = forward_logits(ctx, backend, spec, model, ex["seed"] + 1)
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
                  f"{diff:.3g} ({describe_layout(ex)}, sequence parallel)")
        # A backend may sum during backward already (then finalize_grads leaves the gradient as it is).
        partials = _replicas(ctx, before, groups.tp_group)
        already = all(torch.equal(c, partials[0]) for c in partials)
        target = before if already else ctx.all_reduce(before, groups.tp_group)
        ctx.assert_close(param.grad, target.double(), torch.float32,
                         f"the router adapter's {label} gradient after finalize_grads (the TP group's sum)", scale=10)


# ---- against dense float64 math: [MOE-FWD-1] [MOE-SHARE-1] [MOE-RANK-1] ------------------------------------

def _check_against_dense_math(ctx, backend, ex, dim, gated, what, **config):
    """Grouped experts with LoRA on fc1 and fc2 (config: share_expert_adapters, normalize_moe_lora,
    experts_shared_outer_loras): the MoE layer's output and every factor's gradient after
    finalize_grads equal dense float64 math with W1_e + (alpha/r1) B1_e A1_e and W2_e + (alpha/r2) B2_e
    A2_e over the tokens of the rank's expert block; per-expert factors are gathered over EP, shared
    ones are the same on every rank (their gradient is the sum over every expert)."""
    ex = dict(ex, grouped=True, shared_experts=False)
    groups, spec, model = build_moe(ctx, backend, ex, gated=gated)
    model, _ = apply_quietly(backend, model, moe_lora(["linear_fc1", "linear_fc2"], dim, ex["alpha"], **config))
    plan_by_name = plans(backend, model, spec, groups, dim, normalize=config.get("normalize_moe_lora", False),
                         share=config.get("share_expert_adapters", True),
                         outer=config.get("experts_shared_outer_loras", False))
    load_model_adapters(ctx, backend, model, plan_by_name, ex["seed"])          # SPEC's shard shapes first
    modules = backend.lora_modules(model)
    with moe_layer_observed(model) as seen:
        logits = forward_logits(ctx, backend, spec, model, ex["seed"] + 1)
        (logits.float() * ctx.randn(tuple(logits.shape), ex["seed"] + 2).float()).sum().backward()
    backend.finalize_grads(model)

    names = [f"{MOE_LAYER}.experts.linear_fc1", f"{MOE_LAYER}.experts.linear_fc2"]
    params = [p for name in names for p in backend.adapter_weights(modules[name])]
    full = [t for name in names for t in plan_by_name[name].all_experts_full(ctx, ex["seed"], spec.num_moe_experts)]
    leaves = [t.to(p.dtype).double().requires_grad_() for t, p in zip(full, params)]   # what the backend holds
    A1, B1, A2, B2 = leaves
    W1, W2 = expert_base_weights(backend, modules, groups, gated)
    s1, s2 = (ex["alpha"] / plan_by_name[name].rank for name in names)

    def per_expert(t, e):
        return t[e] if t.dim() == 3 else t

    w1 = [W1[e] + s1 * per_expert(B1, e) @ per_expert(A1, e) for e in range(spec.num_moe_experts)]
    w2 = [W2[e] + s2 * per_expert(B2, e) @ per_expert(A2, e) for e in range(spec.num_moe_experts)]
    where = f"{describe_layout(ex)}, topk={ex['topk']}, gated={gated}, dim={dim}, {config}"
    ctx.assert_close(seen["output"], dense_moe_output(seen["tokens"], seen["probs"], seen["ids"], w1, w2, gated),
                     torch.float32, f"MoE layer output with {what} ({where})", scale=10)
    block = block_tokens(seen, groups)
    dense = dense_moe_output(block["tokens"], block["probs"], block["ids"], w1, w2, gated)
    loss = (dense * block["grad"].double()).sum()
    for (name, which), param, want in zip([(n, w) for n in names for w in "AB"], params,
                                          torch.autograd.grad(loss, leaves)):
        plan = plan_by_name[name]
        got = plan.gather(ctx, torch.zeros_like(param) if param.grad is None else param.grad, which)
        if plan.stacked(which):
            got = gather(got, Shard(0), groups.ep_group)                       # every EP rank's experts
        kind = "per-expert" if plan.stacked(which) else "shared"
        ctx.assert_close(got, want, torch.float32, f"gradient of the {kind} {which} of {name} with {what} ({where})",
                         scale=100)


def _dense_examples(ctx, min_ep=1):
    return tupled(moe_examples(ctx, topk=(1, 2), min_ep=min_ep), st.booleans(), always=[(False,), (True,)])


@prop("MOE-FWD-1", needs=NEEDS, weight=0.25, requires=FORWARD_MATH,
      strategy=lambda ctx: _dense_examples(ctx))
def per_expert_adapters_match_dense_math(ctx, backend, drawn):
    """share_expert_adapters=False on grouped experts: the MoE layer's output and each expert's A and
    B gradients equal dense float64 math with W_e + (alpha/r) B_e A_e (absolute, at every layout)."""
    ex, gated = drawn
    dim = math.lcm(ex["tp"], ex["etp"]) * ex["dim_factor"]
    _check_against_dense_math(ctx, backend, ex, dim, gated, "per-expert adapters", share_expert_adapters=False)


@prop("MOE-SHARE-1", needs=NEEDS, weight=0.25, requires=FORWARD_MATH,
      strategy=lambda ctx: _dense_examples(ctx))
def shared_expert_adapter_matches_dense_math(ctx, backend, drawn):
    """share_expert_adapters=True: one A and B for every expert; the output and their gradients after
    finalize_grads (the sum over every expert, across EP) equal dense float64 math."""
    ex, gated = drawn
    dim = math.lcm(ex["tp"], ex["etp"]) * ex["dim_factor"]
    _check_against_dense_math(ctx, backend, ex, dim, gated, "a shared expert adapter", share_expert_adapters=True)


@prop("MOE-RANK-1", needs=NEEDS, weight=0.25, requires=FORWARD_MATH + ("MOE-SHARE-1",),
      strategy=lambda ctx: tupled(moe_examples(ctx, topk=(2, 3)), st.booleans(), always=[(False,), (True,)]))
def normalized_expert_ranks_scale_by_alpha_over_rank(ctx, backend, drawn):
    """normalize_moe_lora: expert adapters of rank dim // k (fc1 rounded up to expert TP) scale by
    alpha / that rank: the output and gradients equal dense float64 math with it."""
    ex, gated = drawn
    dim = ex["topk"] * math.lcm(ex["tp"], ex["etp"]) * ex["dim_factor"]
    _check_against_dense_math(ctx, backend, ex, dim, gated, "normalized expert ranks", normalize_moe_lora=True,
                              share_expert_adapters=ex["share"])


# ---- [MOE-SHARE-3] ---------------------------------------------------------------------------------------

@prop("MOE-SHARE-3", "MOE-FWD-1", needs=NEEDS | {"shared_outer_loras"}, weight=0.25,
      requires=FORWARD_MATH + ("MOE-SHARE-1",),
      strategy=lambda ctx: tupled(moe_examples(ctx, topk=(1, 2)), st.booleans(), always=[(True,), (False,)]))
def shared_outer_loras_match_dense_math(ctx, backend, drawn):
    """experts_shared_outer_loras on grouped experts: fc1's A and fc2's B are one tensor for all experts,
    fc1's B_e and fc2's A_e stacked per local expert (SPEC shards over expert TP, whatever
    share_expert_adapters says); the MoE layer's output and the four factors' gradients (after
    finalize_grads) equal dense float64 math with W1_e + (alpha/r) B1_e A1 and W2_e + (alpha/r) B2 A2_e
    over the tokens of the rank's expert block."""
    ex, gated = drawn
    dim = math.lcm(ex["tp"], ex["etp"]) * ex["dim_factor"]
    _check_against_dense_math(ctx, backend, ex, dim, gated, "shared outer LoRA factors",
                              experts_shared_outer_loras=True, share_expert_adapters=ex["share"])
