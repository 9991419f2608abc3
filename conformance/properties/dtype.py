"""SPEC section 7: lora_dtype, against full-matrix float64 math with the lora dtype's rounding."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from ..layer_case import build, expected, fit_to_backend, layer_examples, load_adapter_weights, local_piece, run
from ..layout import DTYPES, example_shard
from ..registry import FORWARD_MATH, paired, prop

# Reduced dtypes first: hypothesis starts from the first choice, and they are the telling case.
LORA_DTYPES = ["bfloat16", "float16", None, "float32"]


def _examples(ctx):
    return paired(layer_examples(ctx, kinds=("column", "row", "linear"), sp=(False,), a2a=(False,)),
                  st.sampled_from(LORA_DTYPES), LORA_DTYPES)


@prop("LORA-DTYPE-1", needs={"lora_dtype"}, strategy=_examples)
def adapter_parameters_have_the_lora_dtype(ctx, backend, drawn):
    """A and B have lora_dtype for column, row and nn.Linear bases; None means the base's dtype."""
    ex, lora_name = drawn
    ex = fit_to_backend(ctx, ex, backend)
    lora_dtype = None if lora_name is None else DTYPES[lora_name]
    built = build(ctx, backend, ex, load_adapter=False, lora_dtype=lora_dtype)
    want = lora_dtype or built.dtype
    A, B = backend.adapter_weights(built.wrapped)
    for label, param in (("A", A), ("B", B)):
        ctx.check(param.dtype == want,
                  f"adapter {label} of a {ex['kind']} base ({ex['dtype']}, tp={ex['tp']}) with lora_dtype={lora_name} "
                  f"is {param.dtype}, expected {want}")


@prop("LORA-DTYPE-2", needs={"lora_dtype"}, requires=FORWARD_MATH,
      strategy=_examples)
def output_has_the_base_dtype_and_lora_dtype_math(ctx, backend, drawn):
    """The wrapped layer's output has the base output's dtype, and equals the full math with x, A
    and B rounded to lora_dtype (to that dtype's tolerance)."""
    ex, lora_name = drawn
    ex = fit_to_backend(ctx, ex, backend)
    lora_dtype = None if lora_name is None else DTYPES[lora_name]
    built = build(ctx, backend, ex, load_adapter=False, lora_dtype=lora_dtype)
    adapter_dtype = lora_dtype or built.dtype
    built.A, built.B = built.A.to(adapter_dtype).double(), built.B.to(adapter_dtype).double()
    load_adapter_weights(built, backend)
    X = ctx.randn((ex["s"], ex["b"], ex["in"]), ex["seed"] + 10).to(built.dtype).double()
    G = ctx.randn((ex["s"], ex["b"], ex["out"]), ex["seed"] + 11)
    y, _, _ = run(ctx, built, X, G)
    X_lora = X.to(adapter_dtype).double()
    Y = expected(built, X, G, lora=False)["Y"] + built.scale * (X_lora @ built.A.T) @ built.B.T
    where = f"{ex['kind']} base ({ex['dtype']}, tp={ex['tp']}) with lora_dtype={lora_name}"
    ctx.check(isinstance(y, torch.Tensor) and y.dtype == built.dtype,
              f"output of the {where} is {getattr(y, 'dtype', type(y).__name__)}, expected the base's {built.dtype}")
    coarser = max((adapter_dtype, built.dtype), key=lambda d: {torch.float64: 0, torch.float32: 1,
                                                                torch.float16: 2, torch.bfloat16: 3}[d])
    ctx.assert_close(y, local_piece(Y, example_shard("output", ex), built.groups), coarser, f"output of the {where}", scale=2)
