"""SPEC section 12: errors are raised before any collective, on every rank alike.

The other sections' error properties stay with the behaviour they guard (bad merge shapes in merge,
a rank not divisible by top-k in moe, bad layer sizes in parallel); this one is the LoRA errors of
[LORA-ERR-1] that belong to no other section: bad sizes found while applying LoRA, and a bad config.
"""

from __future__ import annotations

from hypothesis import strategies as st

from ..configs import layer_lora
from ..context import check_group_in_step, raises_everywhere
from ..layer_case import NAMES, build_base, plain_example
from ..registry import prop, with_explicit


CASES = ("column_dim", "row_out", "config")


def _error_examples(ctx):
    """Always run: each case at each TP > 1, with bias, in = out = dim = t (+ 1 where it must not divide)."""
    explicit = []
    for t in [t for t in ctx.tp_sizes if t > 1]:
        for case in CASES:
            ex = plain_example(kind="row" if case == "row_out" else "column", tp=t, bias=True, s=t, alpha=8, seed=0,
                               case=case, dim=t, **{"in": t, "out": t})
            ex["dim"] += case == "column_dim"
            ex["out"] += case == "row_out"
            explicit.append(ex)
    return with_explicit(_draw_error_example(ctx), explicit)


@st.composite
def _draw_error_example(draw, ctx):
    t = draw(st.sampled_from([t for t in ctx.tp_sizes if t > 1]))
    case = draw(st.sampled_from(CASES))
    kind = "row" if case == "row_out" else "column"
    ex = plain_example(kind=kind, tp=t, bias=draw(st.booleans()), s=t, alpha=8, seed=draw(st.integers(0, 2**16)),
                       case=case, dim=t * draw(st.integers(1, 3)),
                       **{"in": t * draw(st.integers(1, 3)), "out": t * draw(st.integers(1, 3))})
    if case == "column_dim":
        ex["dim"] += draw(st.integers(1, t - 1))
    if case == "row_out":
        ex["out"] += draw(st.integers(1, t - 1))
    return ex


@prop("LORA-ERR-1", needs={"tp"}, min_world=2, strategy=_error_examples)
def lora_errors_are_raised_on_every_rank_before_any_collective(ctx, backend, ex):
    """A LoRA dim not divisible by t on a column base, a row base's out not divisible by t, or a bad
    config value: the same ValueError on every rank (naming the module, or the field), and the TP
    group is still in step afterwards."""
    t, case = ex["tp"], ex["case"]
    base = build_base(ctx, backend, ex)
    name = NAMES[ex["kind"]]
    if case == "config":
        raises_everywhere(ctx, lambda: backend.validate_config(layer_lora(ex, name, dim=-ex["dim"])),
                          (ValueError,), f"a LoRA config with dim={-ex['dim']}", mentions=("dim",))
    else:
        config = backend.validate_config(layer_lora(ex, name))
        what = (f"LoRA dim={ex['dim']} on a column base at tp={t}" if case == "column_dim"
                else f"LoRA on a row base with out={ex['out']} at tp={t}")
        raises_everywhere(ctx, lambda: backend.apply_lora(base.container, config, training=True), (ValueError,),
                          what, mentions=(name,))
    check_group_in_step(ctx, base.groups.tp_group, t)
