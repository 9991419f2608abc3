"""SPEC section 1: the backend's base layers, process groups and TinyGPT, against full-matrix float64 math."""

from __future__ import annotations

import torch
import torch.distributed as dist
from hypothesis import strategies as st

from reference.parallel import made_here

from ..backend import ModelSpec
from ..context import NotOwnCode, check_group_in_step, divisors, raises_everywhere
from ..layer_case import build, build_base, layer_examples, local_piece, plain_example, run
from ..layout import WHOLE, example_shard, gather, local_tensor
from ..model_case import base_shard
from ..registry import each_of, prop, with_explicit


def _where(ex: dict) -> str:
    flags = [f"tp={ex['tp']}", f"sp={ex['sp']}"]
    flags += [name for name in ("gather_output", "skip_bias_add", "bias") if ex.get(name)]
    flags += ["input_is_parallel=False"] if not ex.get("input_is_parallel", True) else []
    flags += [f"stride={ex['stride']}"] if ex.get("stride", 1) != 1 else []
    return ", ".join(flags)


def _check_base(ctx, backend, ex):
    """Forward and backward of the bare base layer: output, input grad, weight grad shard, bias grad."""
    base = build_base(ctx, backend, ex)
    layer, groups, dtype = base.wrapped, base.groups, base.dtype
    X = ctx.randn((ex["s"], ex["b"], ex["in"]), ex["seed"] + 10).to(dtype).double()
    G = ctx.randn((ex["s"], ex["b"], ex["out"]), ex["seed"] + 11)
    y, returned_bias, x = run(ctx, base, X, G)
    W, bias = base.W, base.bias
    Y = X @ W.T
    if bias is not None and not ex["skip_bias_add"]:
        Y = Y + bias
    Xf, Gf = X.reshape(-1, ex["in"]), G.reshape(-1, ex["out"])
    dX, dW, db = G @ W, Gf.T @ Xf, Gf.sum(0)
    what = f"{ex['kind']} base layer ({_where(ex)})"

    ctx.assert_close(y, local_piece(Y, example_shard("output", ex), groups), dtype, f"output of the {what}")
    bias_shard = example_shard("bias", ex)
    if ex["skip_bias_add"]:
        ctx.check(returned_bias is not None, f"skip_bias_add: the {what} must return its bias, got None")
        ctx.assert_close(returned_bias, local_piece(bias, bias_shard, groups), dtype,
                         f"the bias returned with skip_bias_add by the {what}")
    else:
        ctx.check(returned_bias is None,
                  f"the {what} returned a bias without skip_bias_add (it would be added twice)")

    ctx.check(x.grad is not None, f"the input of the {what} got no gradient")
    ctx.assert_close(x.grad, local_piece(dX, example_shard("input", ex), groups), dtype,
                     f"gradient of the input of the {what}", scale=4)
    weight = layer.weight
    ctx.check(weight.grad is not None, f"the weight of the {what} got no gradient")
    ctx.assert_close(local_tensor(weight.grad), local_piece(dW, example_shard("weight", ex), groups), dtype,
                     f"gradient of this rank's weight shard of the {what}", scale=4)
    if bias is not None:
        b = layer.bias
        if ex["skip_bias_add"]:
            ctx.check(b.grad is None or not b.grad.any(),
                      f"the {what} with skip_bias_add: its bias is not used in the output, yet got a gradient")
        else:
            ctx.check(b.grad is not None, f"the bias of the {what} got no gradient")
            grad = local_tensor(b.grad)
            if ex["kind"] == "row" and ex["sp"]:
                grad = ctx.all_reduce(grad, groups.tp_group)   # partial per sequence shard [TP-ROW-2]
            summed = " (summed over the TP group)" if ex["kind"] == "row" and ex["sp"] else ""
            ctx.assert_close(grad, local_piece(db, bias_shard, groups), dtype,
                             f"gradient of the bias of the {what}{summed}", scale=4)


@prop("TP-COL-1", "TP-COL-2", "TP-COLL-1", needs={"tp"},
      strategy=lambda ctx: layer_examples(ctx, kinds=("column",), sp=(False,), a2a=(False,),
                                          unsharded_io=(False, True)))
def column_base_matches_full_math(ctx, backend, ex):
    """The bare column-parallel layer: output shard y_r = x W_r^T + b_r, dx = G W, dW_r, db_r."""
    _check_base(ctx, backend, ex)


@prop("TP-ROW-1", "TP-ROW-2", "TP-COLL-1", needs={"tp"},
      strategy=lambda ctx: layer_examples(ctx, kinds=("row",), sp=(False,), a2a=(False,),
                                          unsharded_io=(False, True)))
def row_base_matches_full_math(ctx, backend, ex):
    """The bare row-parallel layer: the reduced output, bias added once, dx_r = G W_r, dW_r, db."""
    _check_base(ctx, backend, ex)


@prop("TP-COL-1", "TP-COL-2", "TP-ROW-1", "TP-ROW-2", "TP-COLL-1", needs={"tp", "sp"}, min_world=2,
      strategy=lambda ctx: layer_examples(ctx, kinds=("column", "row"), sp=(True,), a2a=(False,),
                                          tp=[t for t in ctx.tp_sizes if t > 1]))
def sequence_parallel_base_matches_full_math(ctx, backend, ex):
    """Bare layers under SP: column gathers the sequence (dx reduce-scattered), row reduce-scatters."""
    _check_base(ctx, backend, ex)


@prop("TP-INIT-2", needs={"tp"},
      strategy=lambda ctx: layer_examples(ctx, kinds=("column", "row", "linear"), sp=(False,), a2a=(False,)))
def full_weights_are_stored_as_spec_shards(ctx, backend, ex):
    """make_linear(full W, b) keeps this rank's SPEC shard, bare and inside a LoRA wrapper."""
    if ex["kind"] == "linear" and not backend.supports("linear"):
        ex = dict(ex, kind="column")
        ctx.ran(kind="column")
    base = build_base(ctx, backend, ex)
    what = f"{ex['kind']} base ({_where(ex)})"
    want_W = local_piece(base.W, example_shard("weight", ex), base.groups)
    ctx.assert_close(local_tensor(base.wrapped.weight), want_W, torch.float64, f"the weight of the bare {what} vs its SPEC shard")
    if base.bias is not None:
        ctx.assert_close(local_tensor(base.wrapped.bias), local_piece(base.bias, example_shard("bias", ex), base.groups),
                         torch.float64, f"the bias of the bare {what} vs its SPEC shard")
    built = build(ctx, backend, ex)
    ctx.assert_close(local_tensor(backend.base_weight(built.wrapped)), want_W, torch.float64,
                     f"the base weight inside the LoRA-wrapped {what} vs its SPEC shard")


def _layouts(world: int) -> list[dict]:
    return [{"tp": tp, "ep": ep, "etp": etp} for tp in divisors(world)
            for etp in divisors(world) for ep in divisors(world // etp)]


def _ranks(group) -> list[int]:
    return dist.get_process_group_ranks(dist.group.WORLD if group is None else group)


def _own_groups(backend, groups) -> None:
    """The groups judged must be the backend's: the reference's own groups, handed out by another
    backend's init_parallel, make TP-GROUP properties n/a (the same answer on every rank)."""
    if not backend.is_reference and made_here(groups.tp_group):
        raise NotOwnCode("init_parallel: its groups are reference.parallel's")


@prop("TP-GROUP-1", judges=("init_parallel",),
      strategy=lambda ctx: each_of(_layouts(ctx.world_size)))
def groups_have_the_spec_layout(ctx, backend, ex):
    """TP groups are blocks of t consecutive ranks; expert-TP varies fastest, then EP; groups are reused."""
    rank, tp = ctx.rank, ex["tp"]
    moe = backend.supports("moe") and (ex["ep"] > 1 or ex["etp"] != tp)
    groups = backend.init_parallel(tp, ex["ep"], ex["etp"]) if moe else backend.init_parallel(tp)
    _own_groups(backend, groups)
    block = list(range(rank // tp * tp, rank // tp * tp + tp))
    ctx.check(_ranks(groups.tp_group) == block, f"tp={tp}: the TP group holds ranks {_ranks(groups.tp_group)}, "
                                                f"expected {block} (blocks of tp consecutive ranks)")
    ctx.check((groups.tp_size, groups.tp_rank) == (tp, block.index(rank)),
              f"tp={tp}: Groups says tp_size={groups.tp_size}, tp_rank={groups.tp_rank}; "
              f"expected {tp}, {block.index(rank)}")
    if moe:
        ep, etp = ex["ep"], ex["etp"]
        start = rank // (ep * etp) * (ep * etp)
        etp_ranks = list(range(rank // etp * etp, rank // etp * etp + etp))
        ep_ranks = [start + e * etp + rank % etp for e in range(ep)]
        for label, group, want, size, index in (
                ("expert-TP", groups.expert_tp_group, etp_ranks, groups.expert_tp_size, groups.expert_tp_rank),
                ("EP", groups.ep_group, ep_ranks, groups.ep_size, groups.ep_rank)):
            ctx.check(_ranks(group) == want,
                      f"ep={ep}, etp={etp}: the {label} group holds ranks {_ranks(group)}, expected {want}")
            ctx.check((size, index) == (len(want), want.index(rank)),
                      f"ep={ep}, etp={etp}: Groups says {label} size {size}, rank {index}; "
                      f"expected {len(want)}, {want.index(rank)}")
    again = backend.init_parallel(tp, ex["ep"], ex["etp"]) if moe else backend.init_parallel(tp)
    ctx.check(again.tp_group is groups.tp_group,
              f"tp={tp}: a second init_parallel with the same sizes made a new TP group (groups must be reused)")


@prop("TP-GROUP-1", "TP-ERR-1", needs={"tp"}, judges=("init_parallel",),
      strategy=lambda ctx: each_of([t for t in range(2, 4 * ctx.world_size + 2) if ctx.world_size % t][:4]))
def bad_parallel_sizes_raise(ctx, backend, tp):
    """init_parallel with a TP size that does not divide the world raises ValueError naming it."""
    _own_groups(backend, backend.init_parallel(1))
    raises_everywhere(ctx, lambda: backend.init_parallel(tp), (ValueError,),
                      f"init_parallel(tp={tp}) in a world of {ctx.world_size}",
                      mentions=("tensor_model_parallel_size", "tensor parallel", "tp"))


BAD_LAYER_CASES = ("column_out", "row_in", "column_input_shape", "row_input_shape")


@st.composite
def _draw_bad_layer_example(draw, ctx):
    t = draw(st.sampled_from([t for t in ctx.tp_sizes if t > 1]))
    case = draw(st.sampled_from(BAD_LAYER_CASES))
    ex = plain_example(kind=case.split("_")[0], tp=t, bias=draw(st.booleans()), s=t, dim=t,
                       seed=draw(st.integers(0, 2**16)), case=case,
                       **{"in": t * draw(st.integers(1, 3)), "out": t * draw(st.integers(1, 3))})
    if case == "column_out":
        ex["out"] += draw(st.integers(1, t - 1))
    if case == "row_in":
        ex["in"] += draw(st.integers(1, t - 1))
    return ex


def _bad_layer_examples(ctx):
    """Always run: each case at each TP > 1 (the size off by one where it must divide)."""
    explicit = []
    for t in [t for t in ctx.tp_sizes if t > 1]:
        for case in BAD_LAYER_CASES:
            ex = plain_example(kind=case.split("_")[0], tp=t, bias=True, s=t, dim=t, seed=0, case=case,
                               **{"in": t, "out": t})
            ex["out"] += case == "column_out"
            ex["in"] += case == "row_in"
            explicit.append(ex)
    return with_explicit(_draw_bad_layer_example(ctx), explicit)


@prop("TP-ERR-1", needs={"tp"}, min_world=2, strategy=_bad_layer_examples)
def bad_layer_sizes_and_inputs_raise_everywhere(ctx, backend, ex):
    """Sizes not divisible by t, or an input of the wrong shape: ValueError naming it, on every rank,
    before any collective (a collective on the TP group still works afterwards)."""
    case, t = ex["case"], ex["tp"]
    if case in ("column_out", "row_in"):
        what = f"make_linear of a {ex['kind']} layer in={ex['in']}, out={ex['out']} at tp={t}"
        mentions = ("out",) if case == "column_out" else ("input", "in_features", "in_size")
        raises_everywhere(ctx, lambda: build_base(ctx, backend, ex), (ValueError,), what, mentions)
    else:
        base = build_base(ctx, backend, ex)
        last = ex["in"] // t if ex["kind"] == "row" else ex["in"]
        x = torch.zeros(ex["s"], ex["b"], last + 1, dtype=base.dtype, device=ctx.device)
        raises_everywhere(ctx, lambda: base.wrapped(x), (ValueError,),
                          f"a {ex['kind']} layer (in={ex['in']}, tp={t}) given an input of shape {tuple(x.shape)}",
                          mentions=("input", "shape"))
    check_group_in_step(ctx, backend.init_parallel(t).tp_group, t)


# -- TinyGPT ----------------------------------------------------------------------------------------

def _model_spec(ex: dict, t: int, sp: bool) -> ModelSpec:
    return ModelSpec(kind="gpt", seed=ex["seed"], sequence_parallel=sp, gated_linear_unit=ex["gated"],
                     num_attention_heads=max(4, t))


@st.composite
def _draw_model_example(draw, ctx):
    t = draw(st.sampled_from([t for t in ctx.tp_sizes if t > 1]))
    return {"tp": t, "sp": draw(st.booleans()), "gated": draw(st.booleans()), "seed": draw(st.integers(0, 2**16)),
            "s": t * draw(st.integers(1, 3)), "b": draw(st.integers(1, 2))}


def _model_examples(ctx):
    """TinyGPT at TP t > 1; always run: every t with SP off and on."""
    explicit = [{"tp": t, "sp": sp, "gated": False, "seed": 0, "s": t, "b": 1}
                for t in ctx.tp_sizes if t > 1 for sp in (False, True)]
    return with_explicit(_draw_model_example(ctx), explicit)


def _input_ids(ctx, ex: dict, vocab: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(ex["seed"] + 7)
    return torch.randint(0, vocab, (ex["b"], ex["s"]), generator=generator).to(ctx.device)


@prop("TP-MODEL-1", needs={"relayout", "models", "tp"}, min_world=2, judges=("make_model",), weight=0.5, strategy=_model_examples)
def tiny_gpt_logits_are_the_same_at_every_tp(ctx, backend, ex):
    """The same seed gives the same TinyGPT logits at TP 1 and TP t (with or without SP, gated or
    not); building it leaves the caller's generator untouched."""
    sp = ex["sp"] and backend.supports("sp")
    if sp != ex["sp"]:
        ctx.ran(sp=sp)
    logits = {}
    for t, use_sp in ((1, False), (ex["tp"], sp)):
        backend.init_parallel(t)
        spec = _model_spec(ex, t, use_sp)
        state = torch.get_rng_state()
        model = backend.make_model(spec)
        ctx.check(torch.equal(torch.get_rng_state(), state),
                  f"make_model (tp={t}, sp={use_sp}) changed the caller's global generator")
        logits[t] = backend.model_forward(model, spec, {"input_ids": _input_ids(ctx, ex, spec.vocab_size)})
    want = logits[1].double()
    ctx.check(tuple(logits[ex["tp"]].shape) == (ex["b"], ex["s"], 64),
              f"TinyGPT logits have shape {tuple(logits[ex['tp']].shape)}, expected {(ex['b'], ex['s'], 64)}")
    ctx.assert_close(logits[ex["tp"]], want, torch.float32,
                     f"TinyGPT logits at tp={ex['tp']} (sp={sp}, gated={ex['gated']}) vs tp=1", scale=10)


@prop("TP-INIT-1", needs={"relayout", "models", "tp"}, min_world=2, judges=("make_model",), weight=0.5, strategy=_model_examples)
def tiny_gpt_full_weights_are_the_same_at_every_tp(ctx, backend, ex):
    """One seed gives one full weight at every t: the gathered parameters of TinyGPT at TP t equal
    those at TP 1 (gathered as SPEC shards the module by its name: conformance/model_case.base_shard;
    a parameter of another layout, a vocab-parallel embedding say, is left out)."""
    models, groups = {}, {}
    for t in (1, ex["tp"]):
        groups[t] = backend.init_parallel(t)
        models[t] = backend.make_model(_model_spec(ex, t, False))
    sharded = dict(models[ex["tp"]].named_modules())
    compared = 0
    for module_name, module in models[1].named_modules():
        for name, full in module.named_parameters(recurse=False):
            other = sharded.get(module_name)
            qualified = f"{module_name}.{name}" if module_name else name
            ctx.check(other is not None and getattr(other, name, None) is not None,
                      f"tp={ex['tp']}: TinyGPT has no parameter {qualified}")
            local = getattr(other, name)
            shard = base_shard(module_name, name, ex["gated"]) if name in ("weight", "bias") else WHOLE
            if shard == WHOLE and tuple(local.shape) != tuple(full.shape):
                continue
            gathered = gather(local, shard, groups[ex["tp"]].tp_group)
            compared += 1
            ctx.assert_close(gathered, full.detach().double(), torch.float64,
                             f"full {qualified} at tp={ex['tp']} (gated={ex['gated']}) vs tp=1")
    ctx.check(compared > 0, "no TinyGPT parameter could be compared")
