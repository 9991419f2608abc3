"""SPEC section 4: the adapter's forward, against full-matrix float64 math."""

from __future__ import annotations

from hypothesis import strategies as st

from ..layer_case import (build, expected, fit_to_backend, layer_examples, local_piece, output_layout, run,
                          term_sizes)
from ..registry import prop


def _check_forward(ctx, backend, ex, what):
    built = build(ctx, backend, ex)
    X = ctx.randn((ex["s"], ex["b"], ex["in"]), ex["seed"] + 10).to(built.dtype).double()
    G = ctx.randn((ex["s"], ex["b"], ex["out"]), ex["seed"] + 11)
    y, returned_bias, _ = run(ctx, built, X, G)
    want, terms = expected(built, X, G), term_sizes(built, X, G)
    dim, stride = output_layout(ex)
    ctx.assert_close(y, local_piece(ctx, want["Y"], dim, built.groups, stride), built.dtype,
                     f"{what}: output of the LoRA-wrapped {ex['kind']} layer", terms=terms["Y"])
    if ex["skip_bias_add"]:
        ctx.check(returned_bias is not None, "skip_bias_add: the wrapper must return the base's bias, got None")
        bias_dim = 0 if ex["kind"] == "column" else None
        ctx.assert_close(returned_bias, local_piece(ctx, built.bias, bias_dim, built.groups, ex["stride"]),
                         built.dtype, "the bias returned with skip_bias_add")
    return built


@prop("LORA-FWD-1", "LORA-FWD-2", needs={"tp"},
      strategy=lambda ctx: layer_examples(ctx, kinds=("column", "row"), sp=(False,)))
def parallel_forward_matches_full_math(ctx, backend, ex):
    """Column and row bases without SP: base + (alpha/r) B A x, sharded as SPEC says."""
    _check_forward(ctx, backend, ex, "forward")


@prop("LORA-FWD-8", needs={"tp"}, min_world=2,
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
      strategy=lambda ctx: layer_examples(ctx, kinds=("column", "row"), sp=(True,), a2a=(False,),
                                          tp=[t for t in ctx.tp_sizes if t > 1]))
def sequence_parallel_forward_matches_full_math(ctx, backend, ex):
    """Under SP: column adapters gather the sequence; row adapters return sequence shards."""
    _check_forward(ctx, backend, ex, "sequence-parallel forward")


@prop("LORA-FWD-4", needs={"tp", "sp", "a2a"}, min_world=2,
      strategy=lambda ctx: layer_examples(ctx, kinds=("row", "column"), sp=(True,), a2a=(True,),
                                          tp=[t for t in ctx.tp_sizes if t > 1]))
def a2a_forward_matches_full_math(ctx, backend, ex):
    """a2a_experimental gives the same output (row under SP) and changes nothing elsewhere."""
    ex = dict(ex, a2a=True)
    _check_forward(ctx, backend, ex, "a2a_experimental forward")


@prop("LORA-FWD-5",
      strategy=lambda ctx: st.tuples(layer_examples(ctx, kinds=("column", "row", "linear"), sp=(False,),
                                                    dtypes=("float32",)),
                                     st.sampled_from([1, 2, 4, 64]), st.sampled_from([0.25, 3.0, 128.0])))
def scale_is_alpha_over_dim(ctx, backend, drawn):
    """The update is scaled by alpha / dim for any alpha and dim (on whatever bases the backend has)."""
    ex, dim_factor, alpha = drawn
    ex = fit_to_backend(ex, backend)
    dim = ex["dim"] * dim_factor if ex["kind"] == "column" else max(1, ex["dim"] * dim_factor // 4)
    _check_forward(ctx, backend, dict(ex, dim=dim, alpha=alpha), f"scale alpha/dim = {alpha}/{dim}")


@prop("LORA-FWD-7", needs={"tp"}, min_world=2,
      strategy=lambda ctx: layer_examples(ctx, kinds=("column", "row"), a2a=(False,), dtypes=("float32",),
                                          tp=[t for t in ctx.tp_sizes if t > 1]))
def lora_adds_no_activation_sized_collective(ctx, backend, ex):
    """A step of the LoRA layer runs no more activation-sized collectives than the base alone."""
    from ..collectives_counter import counting
    from ..layer_case import build_base, input_layout

    # Sizes where the activations (s·b·in, s·b·out per rank) are clearly larger than h (s·b·r).
    t = ex["tp"]
    ex = dict(ex, dim=t, **{"in": 8 * t, "out": 8 * t * ex["stride"]})

    def step(built):
        X = ctx.randn((ex["s"], ex["b"], ex["in"]), ex["seed"] + 10, dtype=built.dtype)
        dim, stride = input_layout(ex)
        x = local_piece(ctx, X, dim, built.groups, stride).clone().requires_grad_(True)
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
