"""SPEC section 5: gradients of A, B and the input, against full-matrix float64 math."""

from __future__ import annotations

from ..layer_case import adapter_tensors, build, expected, fit_to_backend, layer_examples, local_piece, run, term_sizes
from ..layout import example_shard
from ..registry import FORWARD_MATH, prop


def _check_backward(ctx, backend, ex, **lora_overrides):
    built = build(ctx, backend, ex, **lora_overrides)
    X = ctx.randn((ex["s"], ex["b"], ex["in"]), ex["seed"] + 10).to(built.dtype).double()
    G = ctx.randn((ex["s"], ex["b"], ex["out"]), ex["seed"] + 11)
    _, _, x = run(ctx, built, X, G)
    want, terms = expected(built, X, G), term_sizes(built, X, G)
    (dA, A_shard), (dB, B_shard) = adapter_tensors(backend, built, grad=True)
    where = f"{ex['kind']} base, tp={ex['tp']}, sp={ex['sp']}"
    ctx.check(dA is not None and dB is not None, f"adapter A or B got no gradient ({where})")
    ctx.assert_close(dA, local_piece(want["dA"], A_shard, built.groups), built.dtype,
                     f"gradient of A ({where})", scale=4, terms=terms["dA"])
    ctx.assert_close(dB, local_piece(want["dB"], B_shard, built.groups), built.dtype,
                     f"gradient of B ({where})", scale=4, terms=terms["dB"])
    ctx.check(x.grad is not None, f"the input got no gradient ({where})")
    ctx.assert_close(x.grad, local_piece(want["dX"], example_shard("input", ex), built.groups), built.dtype,
                     f"gradient of the input ({where})", scale=4, terms=terms["dX"])
    return built


@prop("LORA-BWD-1", "LORA-BWD-2", "TP-COLL-1", needs={"tp"}, requires=FORWARD_MATH,
      strategy=lambda ctx: layer_examples(ctx, kinds=("column", "row"), sp=(False,)))
def parallel_gradients_match_full_math(ctx, backend, ex):
    """dA, dB (this rank's shards) and dx (its layout) equal the full-matrix gradients."""
    _check_backward(ctx, backend, ex)


@prop("LORA-BWD-1", "LORA-BWD-2", "LORA-FWD-3", "LORA-FWD-4", needs={"tp", "sp"}, min_world=2,
      requires=FORWARD_MATH,
      strategy=lambda ctx: layer_examples(ctx, kinds=("column", "row"), sp=(True,),
                                          tp=[t for t in ctx.tp_sizes if t > 1]))
def sequence_parallel_gradients_match_full_math(ctx, backend, ex):
    """The same under sequence parallelism (and a2a when drawn, if the backend has it)."""
    ex = fit_to_backend(ctx, ex, backend)
    _check_backward(ctx, backend, ex)


@prop("LORA-FWD-10", "LORA-BWD-1", "LORA-BWD-2", needs={"tp", "sp", "sp_input_regather"}, min_world=2,
      requires=FORWARD_MATH,
      strategy=lambda ctx: layer_examples(ctx, kinds=("column", "row"), sp=(True,),
                                          tp=[t for t in ctx.tp_sizes if t > 1]))
def sp_input_regather_gradients_match_full_math(ctx, backend, ex):
    """sequence_parallel_input_regather: dA (from the re-gathered input), dB and dx still equal the
    full-matrix gradients."""
    ex = fit_to_backend(ctx, ex, backend)
    _check_backward(ctx, backend, ex, sequence_parallel_input_regather=True)


@prop("LORA-FWD-8", needs={"tp"}, min_world=2, requires=FORWARD_MATH,
      strategy=lambda ctx: layer_examples(ctx, kinds=("column", "row"), sp=(False,), unsharded_io=(True,),
                                          tp=[t for t in ctx.tp_sizes if t > 1]))
def gathered_output_or_full_input_gradients_match_full_math(ctx, backend, ex):
    """gather_output columns and full-input rows: dA, dB, and dx in the input's layout."""
    _check_backward(ctx, backend, ex)


@prop("LORA-BWD-1", "LORA-BWD-2", needs={"linear"}, requires=FORWARD_MATH,
      strategy=lambda ctx: layer_examples(ctx, kinds=("linear",)))
def linear_gradients_match_full_math(ctx, backend, ex):
    """A plain nn.Linear base: the same gradients."""
    _check_backward(ctx, backend, ex)


@prop("LORA-BWD-3", requires=FORWARD_MATH,
      strategy=lambda ctx: layer_examples(ctx, kinds=("column", "row", "linear"), sp=(False,)))
def base_weights_are_frozen(ctx, backend, ex):
    """After LoRA is applied the base weight and bias do not require grad and get no gradient, while
    A and B get one (only that: the gradients' values are [LORA-BWD-1/2]'s)."""
    ex = fit_to_backend(ctx, ex, backend)
    built = build(ctx, backend, ex)
    X = ctx.randn((ex["s"], ex["b"], ex["in"]), ex["seed"] + 10).to(built.dtype).double()
    G = ctx.randn((ex["s"], ex["b"], ex["out"]), ex["seed"] + 11)
    run(ctx, built, X, G)
    A, B = backend.adapter_weights(built.wrapped)
    ctx.check(A.grad is not None and B.grad is not None, "adapter A or B got no gradient")
    for name, param in built.container.named_parameters():
        is_adapter = any(param is w for w in backend.adapter_weights(built.wrapped))
        if not is_adapter:
            ctx.check(not param.requires_grad, f"base parameter {name} requires grad after LoRA")
            ctx.check(param.grad is None, f"base parameter {name} received a gradient")
