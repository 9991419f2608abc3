"""SPEC section 4: the adapter's forward, against full-matrix float64 math.

Dropout ([LORA-FWD-6], the last part of this module): where the adapter's dropout acts, and where it does not.

The update Δ = y - base(x) is observed against the full-math base output. Under "post" dropout acts
on the adapter's output, elementwise: every element of Δ is 0 or the exact update / (1 - p), a check
each rank makes on its own output piece (ranks may draw different masks for their shards). Under
"pre" it acts on the adapter's input, so each token's Δ is s · B (A (m ⊙ x)) / (1 - p): in the column
space of the full B whatever the masks (with TP the ranks' masked partial products meet before B).
That needs whole output rows: column outputs are gathered over the TP group first; row and plain
outputs already hold whole rows. Sizes are chosen so that out >= 2 dim + 2 (the column space is a
real constraint) and at least 64 elements are dropped at random (some are dropped, some are kept,
all but surely).
"""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

from ..collectives_counter import counting
from ..layer_case import (build, build_base, expected, fit_to_backend, layer_examples, load_adapter_weights, local_piece,
                          run, term_sizes)
from ..layout import example_shard, gather, local_tensor
from ..registry import FORWARD_MATH, prop, with_explicit


def _check_forward(ctx, backend, ex, what, fit_scale=True, **lora_overrides):
    """The wrapped layer's output piece against base + s B A x (full float64 math, SPEC's shard).

    fit_scale: s is the one scalar that best fits the update over every rank (it must be > 0), so
    that these layout properties judge the update's direction and placement; the value of s is
    [LORA-FWD-5]'s own property (fit_scale=False: s = alpha / dim exactly)."""
    built = build(ctx, backend, ex, **lora_overrides)
    X = ctx.randn((ex["s"], ex["b"], ex["in"]), ex["seed"] + 10).to(built.dtype).double()
    G = ctx.randn((ex["s"], ex["b"], ex["out"]), ex["seed"] + 11)
    y, returned_bias, _ = run(ctx, built, X, G)
    output = example_shard("output", ex)
    if fit_scale and isinstance(y, torch.Tensor) and bool(torch.isfinite(y.detach()).all()):
        built.scale_override = _fitted_scale(ctx, built, X, G, y, output, what)
    want, terms = expected(built, X, G), term_sizes(built, X, G)
    ctx.assert_close(y, local_piece(want["Y"], output, built.groups), built.dtype,
                     f"{what}: output of the LoRA-wrapped {ex['kind']} layer", terms=terms["Y"])
    if ex["skip_bias_add"]:
        ctx.check(returned_bias is not None, "skip_bias_add: the wrapper must return the base's bias, got None")
        ctx.assert_close(returned_bias, local_piece(built.bias, example_shard("bias", ex), built.groups),
                         built.dtype, "the bias returned with skip_bias_add")
    return built


def _fitted_scale(ctx, built, X, G, y, output, what) -> float:
    """The least-squares s in y - base = s U (U = B A x, full float64 math) on this rank's piece (no
    collective: a rank whose scale differs is [LORA-FWD-5]'s to find)."""
    base = local_piece(expected(built, X, G, lora=False)["Y"], output, built.groups)
    unit = local_piece((X @ built.A.T) @ built.B.T, output, built.groups)
    if y.shape != unit.shape:
        return built.ex["alpha"] / built.ex["dim"]            # the comparison reports the shape
    delta = y.detach().double().to(unit.device) - base
    num, den = (delta * unit).sum().item(), (unit * unit).sum().item()
    ctx.check(den == 0 or num / den > 1e-6,
              f"{what}: the output minus the base is not s B A x for any s > 0 (best-fitting s = {num / den:.3g}): "
              f"the update is missing, negated or misplaced")
    return num / den if den else built.ex["alpha"] / built.ex["dim"]


@prop("LORA-FWD-1", needs={"tp"},
      strategy=lambda ctx: layer_examples(ctx, kinds=("column", "row"), sp=(False,)))
def parallel_forward_matches_full_math(ctx, backend, ex):
    """Column and row bases without SP: base + (alpha/r) B A x, the output sharded as SPEC says."""
    _check_forward(ctx, backend, ex, "forward")


@prop("LORA-FWD-2", needs={"tp"},
      strategy=lambda ctx: layer_examples(ctx, kinds=("column", "row"), sp=(False,), dtypes=("float32",)))
def adapter_shards_follow_the_spec_layout(ctx, backend, ex):
    """This rank's A and B parameters (adapter_weights; a DTensor's local tensor) are SPEC's shards of
    the full A and B: rows of both on a column base (B by the base's stride), columns of A and rows of
    B on a row base. The one property that judges the layout of a backend with "full_adapter"."""
    built = build(ctx, backend, ex)        # the full A and B written (whole, or as SPEC shards)
    where = f"{ex['kind']} base, tp={ex['tp']}, stride={ex['stride']}"
    for label, param in zip("AB", backend.adapter_weights(built.wrapped)):
        local = local_tensor(param).detach()
        want = local_piece(getattr(built, label), example_shard(label, ex), built.groups)
        ctx.check(tuple(local.shape) == tuple(want.shape),
                  f"adapter {label} on this rank has shape {tuple(local.shape)}; SPEC [LORA-FWD-2] gives "
                  f"{tuple(want.shape)} ({where}, full {tuple(getattr(built, label).shape)})")
        ctx.assert_close(local, want, built.dtype, f"this rank's adapter {label}: SPEC's shard of the full {label} "
                                                   f"({where})")


@prop("LORA-FWD-8", needs={"tp"}, min_world=2,
      requires=("LORA-FWD-1",),
      strategy=lambda ctx: layer_examples(ctx, kinds=("column", "row"), sp=(False,), unsharded_io=(True,),
                                          tp=[t for t in ctx.tp_sizes if t > 1]))
def gathered_output_or_full_input_matches_full_math(ctx, backend, ex):
    """A column base with gather_output returns the full (s, b, out); a row base with
    input_is_parallel=False takes the full (s, b, in). The adapter follows: the same full-matrix math."""
    _check_forward(ctx, backend, ex, "forward with gather_output / the full input")


@prop("LORA-FWD-1", needs={"linear"}, strategy=lambda ctx: layer_examples(ctx, kinds=("linear",)))
def linear_forward_matches_full_math(ctx, backend, ex):
    """A plain nn.Linear base gets a non-parallel adapter with the same math."""
    _check_forward(ctx, backend, ex, "forward")


@prop("LORA-FWD-3", needs={"tp", "sp"}, min_world=2,
      requires=("LORA-FWD-1", "LORA-FWD-8"),
      strategy=lambda ctx: layer_examples(ctx, kinds=("column", "row"), sp=(True,), a2a=(False,),
                                          tp=[t for t in ctx.tp_sizes if t > 1]))
def sequence_parallel_forward_matches_full_math(ctx, backend, ex):
    """Under SP: column adapters gather the sequence; row adapters return sequence shards."""
    _check_forward(ctx, backend, ex, "sequence-parallel forward")


@prop("LORA-FWD-4", needs={"tp", "sp", "a2a"}, min_world=2,
      requires=("LORA-FWD-1", "LORA-FWD-8", "LORA-FWD-3"),
      strategy=lambda ctx: layer_examples(ctx, kinds=("row", "column"), sp=(True,), a2a=(True,),
                                          tp=[t for t in ctx.tp_sizes if t > 1]))
def a2a_forward_matches_full_math(ctx, backend, ex):
    """a2a_experimental gives the same output (row under SP) and changes nothing elsewhere."""
    ex = dict(ex, a2a=True)
    _check_forward(ctx, backend, ex, "a2a_experimental forward")


@prop("LORA-FWD-10", "LORA-FWD-3", needs={"tp", "sp", "sp_input_regather"}, min_world=2,
      requires=("LORA-FWD-1", "LORA-FWD-8", "LORA-FWD-3"),
      strategy=lambda ctx: layer_examples(ctx, kinds=("column", "row"), sp=(True,),
                                          tp=[t for t in ctx.tp_sizes if t > 1]))
def sp_input_regather_forward_matches_full_math(ctx, backend, ex):
    """sequence_parallel_input_regather under SP (column linear_qkv and row bases, a2a when drawn and
    supported): the output is still base + (alpha/r) B A x."""
    ex = fit_to_backend(ctx, ex, backend)
    _check_forward(ctx, backend, ex, "forward with sequence_parallel_input_regather",
                   sequence_parallel_input_regather=True)


@prop("LORA-FWD-10", needs={"tp", "sp", "sp_input_regather"}, min_world=2, weight=0.5,
      requires=("LORA-FWD-1", "LORA-FWD-8", "LORA-FWD-3"),
      strategy=lambda ctx: layer_examples(ctx, kinds=("column",), sp=(True,), dtypes=("float32",),
                                          tp=[t for t in ctx.tp_sizes if t > 1]))
def sp_input_regather_keeps_only_the_sequence_shard(ctx, backend, ex):
    """With sequence_parallel_input_regather, a training step of a column linear_qkv layer under SP
    saves nothing for backward as large as the gathered input (s, b, in): its A keeps the shard."""
    t = ex["tp"]
    # Sizes where the gathered input (s, b, in) is larger than anything else autograd may keep.
    ex = dict(ex, dim=t, s=4 * t, b=2, **{"in": 8 * t, "out": 2 * t * ex["stride"]})
    built = build(ctx, backend, ex, sequence_parallel_input_regather=True)
    X = ctx.randn((ex["s"], ex["b"], ex["in"]), ex["seed"] + 10, dtype=built.dtype)
    x = local_piece(X, example_shard("input", ex), built.groups).clone().requires_grad_(True)
    sizes = []

    def pack(tensor):
        sizes.append((tensor.numel(), tuple(tensor.shape)))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = built.wrapped(x)
    (out[0] if isinstance(out, tuple) else out).float().sum().backward()
    full = ex["s"] * ex["b"] * ex["in"]
    large = [shape for numel, shape in sizes if numel >= full]
    ctx.check(not large, f"sequence_parallel_input_regather at tp={t}: tensors of shapes {large} are kept for "
                         f"backward, as large as the gathered input {(ex['s'], ex['b'], ex['in'])}; only the "
                         f"sequence shard {(ex['s'] // t, ex['b'], ex['in'])} should be")


def _scale_examples(ctx):
    """(layer example, dim factor, alpha); always run: every base layout with alpha/dim = 3/(2 d), and
    the extreme factors and alphas on the first one."""
    layers = layer_examples(ctx, kinds=("column", "row", "linear"), sp=(False,), dtypes=("float32",))
    explicit = [(ex, 2, 3.0) for ex in layers.explicit]
    explicit += [(layers.explicit[0], f, a) for f in (1, 64) for a in (0.25, 128.0)]
    return with_explicit(st.tuples(layers, st.sampled_from([1, 2, 4, 64]), st.sampled_from([0.25, 3.0, 128.0])),
                         explicit)


@prop("LORA-FWD-5",
      requires=("LORA-FWD-1",),
      strategy=lambda ctx: _scale_examples(ctx))
def scale_is_alpha_over_dim(ctx, backend, drawn):
    """The update is scaled by alpha / dim for any alpha and dim (on whatever bases the backend has)."""
    ex, dim_factor, alpha = drawn
    ex = fit_to_backend(ctx, ex, backend)
    dim = ex["dim"] * dim_factor if ex["kind"] == "column" else max(1, ex["dim"] * dim_factor // 4)
    _check_forward(ctx, backend, dict(ex, dim=dim, alpha=alpha), f"scale alpha/dim = {alpha}/{dim}", fit_scale=False)


@prop("LORA-FWD-7", needs={"tp"}, min_world=2,
      requires=("LORA-FWD-1", "LORA-FWD-8", "LORA-FWD-3"),
      strategy=lambda ctx: layer_examples(ctx, kinds=("column", "row"), a2a=(False,), dtypes=("float32",),
                                          tp=[t for t in ctx.tp_sizes if t > 1]))
def lora_adds_no_activation_sized_collective(ctx, backend, ex):
    """A step of the LoRA layer runs no more activation-sized collectives than the base alone."""
    # Sizes where the activations (s·b·in, s·b·out per rank) are clearly larger than h (s·b·r).
    t = ex["tp"]
    ex = dict(ex, dim=t, **{"in": 8 * t, "out": 8 * t * ex["stride"]})

    def step(built):
        X = ctx.randn((ex["s"], ex["b"], ex["in"]), ex["seed"] + 10, dtype=built.dtype)
        x = local_piece(X, example_shard("input", ex), built.groups).clone().requires_grad_(True)
        with counting() as calls:
            out = built.wrapped(x)
            (out[0] if isinstance(out, tuple) else out).float().sum().backward()
        threshold = ex["s"] * ex["b"] * min(ex["in"], ex["out"]) // ex["tp"]
        return sum(1 for _, n in calls if n >= threshold and n > ex["dim"] * ex["s"] * ex["b"])

    base_count = step(build_base(ctx, backend, ex))
    lora_count = step(build(ctx, backend, ex))
    ctx.check(lora_count <= base_count,
              f"LoRA on a {ex['kind']} base (sp={ex['sp']}) runs {lora_count} activation-sized collectives "
              f"per step; the base alone runs {base_count}")


# -- dropout [LORA-FWD-6] -------------------------------------------------------------------------

MIN_ELEMENTS = 64


def _round_up(value: int, multiple: int) -> int:
    return multiple * math.ceil(value / multiple)


def dropout_examples(ctx):
    """Layer examples with dropout, sized so that dropout can be seen; always run: every layout with
    each supported dropout position."""
    layers = layer_examples(ctx, kinds=("column", "row", "linear"), dtypes=("float32",), dropout=True)
    return with_explicit(layers.map(_dropout_sizes), [_dropout_sizes(dict(ex)) for ex in layers.explicit])


def _dropout_sizes(ex: dict) -> dict:
    t, stride = ex["tp"], ex["stride"]
    tokens = ex["s"] * ex["b"]
    block = t * stride
    # "pre": out > dim (column space of B is a real constraint); enough input elements to drop some.
    ex["out"] = max(ex["out"], _round_up(2 * ex["dim"] + 2, block))
    ex["in"] = max(ex["in"], _round_up(math.ceil(MIN_ELEMENTS / tokens), t))
    # "post": enough elements in every rank's output piece to drop some and keep some.
    ex["out"] = max(ex["out"], _round_up(math.ceil(MIN_ELEMENTS * t / tokens), block))
    return ex


def _supported(ctx, ex, backend):
    """The example, moved onto what the backend supports (dropout is the point here, not TP or a2a)."""
    return fit_to_backend(ctx, ex, backend)


def _train_forward(ctx, backend, ex, **load):
    built = build(ctx, backend, ex, load_adapter=not load)
    if load:
        load_adapter_weights(built, backend, **load)
    X = ctx.randn((ex["s"], ex["b"], ex["in"]), ex["seed"] + 10).to(built.dtype).double()
    G = ctx.randn((ex["s"], ex["b"], ex["out"]), ex["seed"] + 11)
    torch.manual_seed(ex["seed"])          # the same generator state on every rank
    y, _, _ = run(ctx, built, X, G)
    return built, X, G, y


def _tolerance(reference: torch.Tensor) -> torch.Tensor:
    return 1e-4 * (1.0 + reference.abs())


def _check_post(ctx, built, y_local, base_local, exact_local, p):
    delta = y_local.detach().double() - base_local
    scaled = exact_local / (1 - p)
    tol = _tolerance(base_local) + 1e-4 * scaled.abs()
    dropped = delta.abs() <= tol
    kept = (delta - scaled).abs() <= tol
    bad = ~(dropped | kept)
    where = f"dropout_position='post', p={p}, {built.ex['kind']} base, tp={built.ex['tp']}"
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{where}: {int(bad.sum())} of {bad.numel()} elements of the update are neither 0 nor the exact update "
            f"/ (1-p); e.g. at {i}: update {delta[tuple(i)].item():.6g}, exact {exact_local[tuple(i)].item():.6g}, "
            f"exact/(1-p) {scaled[tuple(i)].item():.6g}")
    significant = scaled.abs() > 10 * tol
    ctx.check(bool((dropped & ~kept & significant).any()),
              f"{where}: no element of the update was dropped (the output shows no dropout in train mode)")
    ctx.check(bool((kept & ~dropped & significant).any()),
              f"{where}: every element of the update was dropped")


def _full_rows(ctx, built, y_local):
    """The whole output (s, b, out) this rank's piece belongs to (gathered over TP for column outputs)."""
    return gather(y_local.double(), example_shard("output", built.ex), built.groups.tp_group)


def _check_pre(ctx, built, y_full, base_full, exact_full, p):
    ex = built.ex
    where = f"dropout_position='pre', p={p}, {ex['kind']} base, tp={ex['tp']}, sp={ex['sp']}"
    delta = (y_full - base_full).reshape(-1, ex["out"])                   # (tokens, out)
    B = built.B                                                           # (out, dim), full
    coefficients = torch.linalg.lstsq(B, delta.T).solution                # (dim, tokens)
    residual = (delta.T - B @ coefficients).T                             # (tokens, out)
    scale = delta.norm(dim=-1) + base_full.reshape(-1, ex["out"]).norm(dim=-1) + 1.0
    worst = (residual.norm(dim=-1) / scale).max().item()
    ctx.check(worst <= 1e-5,
              f"{where}: a token's update is not in the column space of B (relative residual {worst:.3g}); "
              f"dropout on the adapter's input keeps the update s B A (m x) / (1-p) in span(B)")
    scaled = (exact_full / (1 - p)).reshape(-1, ex["out"])
    tol = _tolerance(base_full.reshape(-1, ex["out"])) + 1e-4 * scaled.abs()
    post_form = (delta.abs() <= tol) | ((delta - scaled).abs() <= tol)
    ctx.check(not bool(post_form.all()),
              f"{where}: every element of the update is 0 or the exact update / (1-p), as if the dropout acted "
              f"on the adapter's output (or on no input element)")


@prop("LORA-FWD-6", needs={"dropout_position"}, requires=FORWARD_MATH,
      strategy=dropout_examples)
def dropout_acts_at_its_position_in_train_mode(ctx, backend, ex):
    """Train mode: 'post' drops elements of the update (0 or exact/(1-p)); 'pre' keeps it in span(B)."""
    ex = _supported(ctx, ex, backend)
    p = ex["dropout"]
    built, X, G, y = _train_forward(ctx, backend, ex)
    base = expected(built, X, G, lora=False)["Y"]
    exact = expected(built, X, G)["Y"] - base
    if ex["dropout_position"] == "post":
        output = example_shard("output", ex)
        _check_post(ctx, built, y, local_piece(base, output, built.groups), local_piece(exact, output, built.groups), p)
    else:
        _check_pre(ctx, built, _full_rows(ctx, built, y), base, exact, p)


@prop("LORA-FWD-6", needs={"dropout_position"}, requires=FORWARD_MATH,
      strategy=dropout_examples)
def no_dropout_in_eval_mode(ctx, backend, ex):
    """After .eval() the output is base + (alpha/r) B A x exactly, for 'pre' and 'post' alike."""
    ex = _supported(ctx, ex, backend)
    built = build(ctx, backend, ex)
    built.container.eval()
    X = ctx.randn((ex["s"], ex["b"], ex["in"]), ex["seed"] + 10).to(built.dtype).double()
    G = ctx.randn((ex["s"], ex["b"], ex["out"]), ex["seed"] + 11)
    torch.manual_seed(ex["seed"])
    y, _, _ = run(ctx, built, X, G)
    ctx.assert_close(y, local_piece(expected(built, X, G)["Y"], example_shard("output", ex), built.groups), built.dtype,
                     f"eval-mode output with dropout={ex['dropout']} '{ex['dropout_position']}' "
                     f"({ex['kind']} base, tp={ex['tp']})")


@prop("LORA-FWD-6", needs={"dropout_position"}, requires=FORWARD_MATH,
      strategy=dropout_examples)
def base_path_never_sees_dropout(ctx, backend, ex):
    """With B = 0 the train-mode output is the base output: dropout never touches the base path."""
    ex = _supported(ctx, ex, backend)
    built0, X, G, y = _train_forward(ctx, backend, ex, B=torch.zeros(ex["out"], ex["dim"], dtype=torch.float64))
    ctx.assert_close(y, local_piece(expected(built0, X, G, lora=False)["Y"], example_shard("output", ex), built0.groups),
                     built0.dtype, f"train-mode output with B = 0 and dropout={ex['dropout']} "
                     f"'{ex['dropout_position']}' ({ex['kind']} base, tp={ex['tp']})")
