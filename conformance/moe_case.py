"""Tiny MoE models for the properties of SPEC section 10, and the MoE layer's dense float64 math.

Examples (`moe_examples`) fix a layout (TP, EP, expert-TP) that divides the world, the router's
top-k, grouped or sequential experts and the LoRA options; `build_moe` asks the backend for the
parallel groups and the model (TinyGPT with one MoE layer, `decoder.layers.0.mlp`).

The dense math ([MOE-LAYER-1], [MOE-FWD-1]) is written here from SPEC, in float64: a token's output is
the sum over its k routed experts e of p_e · act(x W1_eᵀ) W2_eᵀ, act being Megatron's MLP activation
(gelu, or SwiGLU silu(gate) · up on fc1's [gate; up] halves when gated). What the layer routed and
with which probabilities is read from the router's output ((probs (T, k), expert ids (T, k)), as
Megatron's TopKRouter returns it), the layer's input and output gradient with hooks on the router and
on `decoder.layers.0.mlp`; the experts' base weights through `backend.base_weight`, gathered by SPEC's
expert sharding (fc1 rows, fc2 columns over expert TP; experts over EP).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

from .backend import ModelSpec
from .configs import lora
from .context import divisors
from .layout import Shard, gather
from .model_case import token_ids
from .registry import with_explicit

SHARED_SIZE = 8
MOE_LAYER = "decoder.layers.0.mlp"


def sizes(ctx) -> dict:
    """Sizes of the MoE model for this world: heads, hidden, experts, sequence length."""
    heads = max(4, ctx.world_size)
    return {"heads": heads, "hidden": 4 * heads, "experts": max(4, ctx.world_size), "seq": max(4, ctx.world_size)}


def layouts(ctx, min_ep: int = 1, min_tp: int = 1) -> list[tuple[int, int, int]]:
    """Every (TP, EP, expert-TP) that divides the world (EP dividing the experts, at least min_ep;
    TP at least min_tp)."""
    w, E = ctx.world_size, sizes(ctx)["experts"]
    return [(tp, ep, etp) for tp in divisors(w) for ep in divisors(w) for etp in divisors(w)
            if w % (ep * etp) == 0 and E % ep == 0 and ep >= min_ep and tp >= min_tp]


def moe_examples(ctx, min_ep=1, topk=(1, 2, 3), min_tp=1):
    """MoE examples; always run: one per layout (TP, EP, expert-TP) that divides the world, the
    options (top-k, grouped, shared adapter, shared experts) alternating over them."""
    explicit = [{"tp": tp, "ep": ep, "etp": etp, "topk": topk[i % len(topk)], "grouped": i % 2 == 0,
                 "share": i % 4 >= 2, "shared_experts": i % 3 == 1, "dim_factor": 1, "alpha": 8, "seed": i}
                for i, (tp, ep, etp) in enumerate(layouts(ctx, min_ep, min_tp))]
    return with_explicit(_draw_moe_example(ctx, min_ep, topk, min_tp), explicit)


@st.composite
def _draw_moe_example(draw, ctx, min_ep, topk, min_tp):
    tp, ep, etp = draw(st.sampled_from(layouts(ctx, min_ep, min_tp)))
    k = draw(st.sampled_from(list(topk)))
    return {"tp": tp, "ep": ep, "etp": etp, "topk": k, "grouped": draw(st.booleans()),
            "share": draw(st.booleans()), "shared_experts": draw(st.booleans()),
            "dim_factor": draw(st.integers(1, 3)), "alpha": draw(st.sampled_from([4, 8, 16])),
            "seed": draw(st.integers(0, 2**16))}


def moe_spec(ctx, ex, tp=None, grouped=None, gated=False) -> ModelSpec:
    size = sizes(ctx)
    tp = ex["tp"] if tp is None else tp
    return ModelSpec(kind="moe", seed=ex["seed"], num_layers=1, hidden_size=size["hidden"], ffn_hidden_size=8,
                     num_attention_heads=size["heads"], vocab_size=16, sequence_parallel=tp > 1,
                     gated_linear_unit=gated, num_moe_experts=size["experts"], moe_router_topk=ex["topk"],
                     moe_grouped_gemm=ex["grouped"] if grouped is None else grouped,
                     moe_shared_expert_intermediate_size=SHARED_SIZE if ex["shared_experts"] else None)


def build_moe(ctx, backend, ex, layout=None, **spec_overrides):
    """(groups, spec, model) of the example at `layout` (default: the example's)."""
    tp, ep, etp = layout or (ex["tp"], ex["ep"], ex["etp"])
    groups = backend.init_parallel(tp, ep, etp)
    spec = moe_spec(ctx, ex, tp=tp, **spec_overrides)
    return groups, spec, backend.make_model(spec)


def moe_lora(targets, dim, alpha, **fields):
    return lora(target_modules=list(targets), dim=dim, alpha=alpha, **fields)


def forward_logits(ctx, backend, spec, model, seed, batch=2):
    ids = token_ids(ctx, spec, batch=batch, seq=sizes(ctx)["seq"], seed=seed)
    return backend.model_forward(model, spec, {"input_ids": ids})


def describe_layout(ex, layout=None) -> str:
    tp, ep, etp = layout or (ex["tp"], ex["ep"], ex["etp"])
    return f"(TP, EP, expert-TP) = ({tp}, {ep}, {etp})"


# ---- the MoE layer's dense math --------------------------------------------------------------------------

@contextmanager
def moe_layer_observed(model):
    """Within the block, record the MoE layer's tokens (T, h), routing (probs, ids (T, k)), output
    (T, h) and, after backward, the output's gradient (T, h): this rank's, in the dict yielded."""
    store = {}

    def on_router(_module, args, output):
        store["tokens"], store["probs"], store["ids"] = args[0].detach(), output[0].detach(), output[1].detach()

    def on_layer(_module, _args, output):
        out = output[0] if isinstance(output, tuple) else output
        store["output"] = out.detach().reshape(-1, out.shape[-1])
        if out.requires_grad:
            out.register_hook(lambda grad: store.__setitem__("grad", grad.detach().reshape(-1, grad.shape[-1])))

    handles = [model.get_submodule(f"{MOE_LAYER}.router").register_forward_hook(on_router),
               model.get_submodule(MOE_LAYER).register_forward_hook(on_layer)]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


def expert_base_weights(backend, modules: dict, groups, gated: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The full fc1 (E, F1, h) and fc2 (E, h, ffn) base weights of the grouped experts, float64, from
    this rank's shards (fc1 rows, [gate; up] kept as blocks, and fc2 columns over expert TP)."""
    fc1 = backend.base_weight(modules[f"{MOE_LAYER}.experts.linear_fc1"]).detach().double()
    fc2 = backend.base_weight(modules[f"{MOE_LAYER}.experts.linear_fc2"]).detach().double()
    fc1 = gather(fc1, Shard(0, 2 if gated else 1), groups.expert_tp_group, offset=1)
    fc2 = gather(fc2, Shard(1), groups.expert_tp_group, offset=1)
    return gather(fc1, Shard(0), groups.ep_group), gather(fc2, Shard(0), groups.ep_group)


def block_tokens(store: dict, groups) -> dict:
    """The observed tokens, routing and output gradients of every rank of this rank's expert block
    (its expert-TP and EP groups): the tokens its experts computed."""
    out = {}
    for key in ("tokens", "probs", "ids", "grad"):
        value = gather(store[key], Shard(0), groups.expert_tp_group)
        out[key] = gather(value, Shard(0), groups.ep_group)
    return out


def dense_moe_output(tokens, probs, ids, W1, W2, gated: bool) -> torch.Tensor:
    """Σ_j probs[:, j] · act(x W1_eᵀ) W2_eᵀ with e = ids[:, j]: (T, h), float64.

    W1 (E, F1, h) and W2 (E, h, ffn) may be lists of per-expert matrices (with autograd)."""
    x = tokens.double()
    out = torch.zeros_like(x)
    for j in range(ids.shape[1]):
        for e in ids[:, j].unique().tolist():
            rows = (ids[:, j] == e).nonzero().flatten()
            hidden = x[rows] @ W1[e].T
            if gated:
                gate, up = hidden.chunk(2, dim=-1)
                hidden = F.silu(gate) * up
            else:
                hidden = F.gelu(hidden)
            out = out.index_add(0, rows, probs[rows, j].double().unsqueeze(-1) * (hidden @ W2[e].T))
    return out


__all__ = ["SHARED_SIZE", "MOE_LAYER", "sizes", "layouts", "moe_examples", "moe_spec", "build_moe", "moe_lora",
           "forward_logits", "describe_layout", "moe_layer_observed", "expert_base_weights", "block_tokens",
           "dense_moe_output"]
