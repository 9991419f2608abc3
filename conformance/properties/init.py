"""SPEC section 6: the adapter's initialization, judged on the full (gathered) A and B."""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

from ..backend import ModelSpec
from ..model_case import DEFAULT_TARGETS, full_names, returned_model
from ..configs import lora
from ..layer_case import (adapter_tensors, add_lora, build, build_base, fit_layout, fit_to_backend, layer_examples,
                          plain_example, run)
from ..layout import gather
from ..registry import FORWARD_MATH, prop, tupled, with_explicit

METHODS = ["xavier", "kaiming", "normal", "zero"]


def _full_adapter(ctx, backend, built) -> tuple[torch.Tensor, torch.Tensor]:
    """The full A and B (gathered from this rank's SPEC shards unless the backend gives them whole)."""
    group = built.groups.tp_group
    return tuple(gather(t, shard, group).double() for t, shard in adapter_tensors(backend, built))


def _layer(kind: str, t: int, seed: int, **sizes) -> dict:
    """A layer example with the plain layout (no SP, no gather, no stride, no bias)."""
    ex = {"kind": kind, "tp": t, "sp": False, "a2a": False, "gather_output": False, "input_is_parallel": True,
          "stride": 1, "bias": False, "skip_bias_add": False, "s": t, "b": 1, "in": 8 * t, "out": 8 * t,
          "dim": 2 * t, "alpha": 8, "dtype": "float32", "seed": seed}
    ex.update(sizes)
    return ex


def _check_distribution(ctx, W: torch.Tensor, method: str, fan_in: int, fan_out: int, what: str) -> None:
    """Loose statistical bounds (many standard errors wide) for a matrix drawn by `method`."""
    n = W.numel()
    what = f"{what} ({method}, full shape {tuple(W.shape)})"
    if method == "zero":
        ctx.check(not W.any(), f"{what}: {int((W != 0).sum())} non-zero values")
        return
    if method == "kaiming":
        bound = 1 / math.sqrt(fan_in)
        largest = W.abs().max().item()
        ctx.check(largest <= bound * (1 + 1e-6),
                  f"{what}: max |x| = {largest:.5f} exceeds the bound 1/sqrt(fan_in={fan_in}) = {bound:.5f}")
        ctx.check(largest >= 0.95 * bound,
                  f"{what}: max |x| = {largest:.5f}, far below the bound 1/sqrt(fan_in={fan_in}) = {bound:.5f}")
        std = bound / math.sqrt(3)
    else:
        std = math.sqrt(2 / (fan_in + fan_out)) if method == "xavier" else 0.2
        # A normal distribution, not another of the same std: in n >= 1000 draws some |x| exceeds 3 std
        # all but surely (P = 1 - 0.9973^n), which no uniform (max sqrt(3) std) reaches.
        largest = W.abs().max().item()
        ctx.check(n < 1000 or largest > 3 * std,
                  f"{what}: max |x| = {largest:.5f} <= 3 std = {3 * std:.5f}: not normally distributed "
                  f"(a uniform distribution of that std stops at {math.sqrt(3) * std:.5f})")
    mean, sample_std = W.mean().item(), W.std().item()
    ctx.check(abs(mean) <= 6 * std / math.sqrt(n), f"{what}: mean {mean:.5f}, expected 0 (std {std:.5f}, n={n})")
    ctx.check(abs(sample_std / std - 1) <= 0.05,
              f"{what}: std {sample_std:.5f}, expected {std:.5f} "
              f"(fans of the full matrix: in {fan_in}, out {fan_out})")


def _check_methods(ctx, backend, kind: str, t: int, shift: int, seed: int) -> None:
    """Every method for A with one for B (shifted by `shift`), on a base of `kind` at TP t."""
    # d large next to `in` (and d next to `out`), so fans of a shard would visibly change xavier and
    # kaiming: a column A shard is (d/t x in), a row A shard (d x in/t), a B shard (out/t x d).
    dim, in_features, out_features = 128, 64, 128
    methods_A = [m for m in METHODS if ctx.supports("init_methods", f"A:{m}")]
    methods_B = [m for m in METHODS if ctx.supports("init_methods", f"B:{m}")]
    # Every supported method of each factor, paired with a supported one of the other (shifted).
    for i in range(max(len(methods_A), len(methods_B)) if methods_A and methods_B else 0):
        method_A = methods_A[i % len(methods_A)]
        method_B = methods_B[(i + shift) % len(methods_B)]
        ex = _layer(kind, t, seed + i, dim=dim, **{"in": in_features, "out": out_features})
        base = build_base(ctx, backend, ex)
        built = add_lora(ctx, backend, base, load_adapter=False, torch_seed=ex["seed"],
                         lora_A_init_method=method_A, lora_B_init_method=method_B)
        A, B = _full_adapter(ctx, backend, built)
        where = f"{kind} base, tp={t}"
        ctx.check(tuple(A.shape) == (dim, in_features) and tuple(B.shape) == (out_features, dim),
                  f"gathered A {tuple(A.shape)} and B {tuple(B.shape)} ({where}); expected "
                  f"{(dim, in_features)} and {(out_features, dim)}")
        _check_distribution(ctx, A, method_A, in_features, dim, f"A ({where})")
        _check_distribution(ctx, B, method_B, dim, out_features, f"B ({where})")


@prop("LORA-INIT-1", needs={"init_methods", "tp"}, weight=0.5,
      strategy=lambda ctx: with_explicit(
          st.fixed_dictionaries({"kind": st.sampled_from(["column", "row"]), "shift": st.integers(0, 3),
                                 "seed": st.integers(0, 2**16)}),
          [{"kind": "column", "shift": 0, "seed": 0}, {"kind": "row", "shift": 1, "seed": 1}]))
def init_methods_draw_the_full_matrix_distribution(ctx, backend, drawn):
    """At TP = world, each method gives the full A (d x in) and B (out x d) its distribution, with
    the fans of the full matrix: xavier normal, kaiming uniform 1/sqrt(fan_in), normal 0.2, zero."""
    _check_methods(ctx, backend, drawn["kind"], ctx.world_size, drawn["shift"], drawn["seed"])


@prop("LORA-INIT-1", needs={"init_methods", "linear"}, weight=0.5,
      strategy=lambda ctx: with_explicit(
          st.fixed_dictionaries({"shift": st.integers(0, 3), "seed": st.integers(0, 2**16)}),
          [{"shift": 0, "seed": 0}]))
def init_methods_on_plain_linear_bases(ctx, backend, drawn):
    """A plain nn.Linear base's adapter: each method gives A and B their distribution, the same
    methods as on parallel bases (xavier normal, kaiming uniform 1/sqrt(fan_in), normal 0.2, zero)."""
    _check_methods(ctx, backend, "linear", 1, drawn["shift"], drawn["seed"])


@prop("LORA-INIT-2", needs={"relayout", "tp"}, min_world=2,
      strategy=lambda ctx: tupled(layer_examples(ctx, kinds=("column", "row"), sp=(False,), a2a=(False,),
                                                 dtypes=("float32",), tp=[t for t in ctx.tp_sizes if t > 1]),
                                  st.sampled_from(["xavier", "kaiming", "normal"]),
                                  st.sampled_from(["xavier", "kaiming", "normal"]),
                                  always=[("xavier", "normal"), ("kaiming", "xavier"), ("normal", "kaiming")]))
def same_seed_gives_the_same_full_adapter_at_every_tp(ctx, backend, drawn):
    """With the same torch.manual_seed before apply_lora, the gathered A and B at TP t equal those
    at TP 1 (a known Megatron-Bridge deviation: it initializes each shard on its own)."""
    ex, method_A, method_B = drawn
    methods = {}
    if backend.supports("init_methods", f"A:{method_A}") and backend.supports("init_methods", f"B:{method_B}"):
        methods = dict(lora_A_init_method=method_A, lora_B_init_method=method_B)
    full = {}
    for t in (1, ex["tp"]):
        base = build_base(ctx, backend, dict(ex, tp=t))
        built = add_lora(ctx, backend, base, load_adapter=False, torch_seed=ex["seed"], **methods)
        full[t] = _full_adapter(ctx, backend, built)
    where = f"{ex['kind']} base, stride={ex['stride']}, methods {methods or 'default'}"
    for label, index in (("A", 0), ("B", 1)):
        ctx.assert_close(full[ex["tp"]][index], full[1][index], torch.float64,
                         f"full {label} at tp={ex['tp']} vs tp=1, same seed ({where})")


def _zero_B_layer(ctx, backend, ex):
    base = build_base(ctx, backend, ex)
    X = ctx.randn((ex["s"], ex["b"], ex["in"]), ex["seed"] + 10).to(base.dtype).double()
    G = ctx.randn((ex["s"], ex["b"], ex["out"]), ex["seed"] + 11)
    y0, bias0, _ = run(ctx, base, X, G)
    built = add_lora(ctx, backend, base, load_adapter=False, torch_seed=ex["seed"])   # default init
    y1, bias1, _ = run(ctx, built, X, G)
    what = f"{ex['kind']} base (tp={ex['tp']}, sp={ex['sp']})"
    ctx.check(isinstance(y1, torch.Tensor) and y1.dtype == y0.dtype and y1.shape == y0.shape,
              f"{what}: the wrapped output is {getattr(y1, 'dtype', type(y1))} {tuple(getattr(y1, 'shape', ()))}, "
              f"the base's {y0.dtype} {tuple(y0.shape)}")
    diff = (y1.detach().double() - y0.detach().double()).abs().max().item()
    ctx.check(torch.equal(y1.detach(), y0.detach()),
              f"{what}: with B zero (the default) the wrapped output differs from the base's by up to {diff:.3g}")
    ctx.check((bias0 is None) == (bias1 is None) and (bias0 is None or torch.equal(bias0, bias1)),
              f"{what}: the wrapper changed the bias returned with the output")


def _zero_B_examples(ctx):
    """Every layout; always also a column base under SP with a one-column output shard (out = t) and
    an uneven in (6): a matrix-vector product, where a wrapper that recomputes the base another way
    shows (NeMo Automodel: 1 ulp)."""
    layers = layer_examples(ctx, kinds=("column", "row", "linear"))
    t = max(ctx.tp_sizes)
    narrow = [] if t == 1 else [plain_example(kind="column", tp=t, sp=True, bias=False, s=2 * t, dim=t, seed=0,
                                              **{"in": 6, "out": t})]
    return with_explicit(layers, [*layers.explicit, *narrow])


@prop("LORA-INIT-3", requires=FORWARD_MATH, strategy=_zero_B_examples)
def zero_B_leaves_the_layer_unchanged(ctx, backend, ex):
    """With the default lora_B_init_method "zero", the wrapped layer's output is the bare base
    layer's, bit for bit (column, row, nn.Linear; with SP when drawn)."""
    _zero_B_layer(ctx, backend, fit_to_backend(ctx, ex, backend))


@prop("LORA-INIT-3", needs={"models"}, weight=0.5,
      requires=FORWARD_MATH,
      strategy=lambda ctx: with_explicit(
          st.fixed_dictionaries({"tp": st.sampled_from(ctx.tp_sizes), "sp": st.booleans(), "gated": st.booleans(),
                                 "seed": st.integers(0, 2**16), "b": st.integers(1, 2), "s_per_tp": st.integers(1, 3)}),
          [{"tp": t, "sp": sp, "gated": sp, "seed": 0, "b": 1, "s_per_tp": 1}
           for t in ctx.tp_sizes for sp in ((False, True) if t > 1 else (False,))]))
def zero_B_leaves_tiny_gpt_unchanged(ctx, backend, ex):
    """TinyGPT's logits with default-initialized LoRA on every default target (by full name) equal those
    without."""
    t, sp = fit_layout(ctx, backend, ex)
    backend.init_parallel(t)
    spec = ModelSpec(kind="gpt", seed=ex["seed"], sequence_parallel=sp, gated_linear_unit=ex["gated"],
                     num_attention_heads=max(4, t))
    model = backend.make_model(spec)
    generator = torch.Generator().manual_seed(ex["seed"] + 7)
    ids = torch.randint(0, spec.vocab_size, (ex["b"], t * ex["s_per_tp"]), generator=generator).to(ctx.device)
    before = backend.model_forward(model, spec, {"input_ids": ids})
    config = backend.validate_config(lora(target_modules=full_names(model, DEFAULT_TARGETS), dim=8, alpha=16))
    torch.manual_seed(ex["seed"])
    model = returned_model(model, backend.apply_lora(model, config, training=True))
    ctx.check(len(backend.lora_modules(model)) > 0, "LoRA with the default targets wrapped no TinyGPT module")
    after = backend.model_forward(model, spec, {"input_ids": ids})
    diff = (after.detach().double() - before.detach().double()).abs().max().item()
    ctx.check(torch.equal(after.detach(), before.detach()),
              f"TinyGPT (tp={t}, sp={sp}, gated={ex['gated']}): logits with zero-B LoRA differ from the base "
              f"model's by up to {diff:.3g}")


@prop("LORA-INIT-4", strategy=lambda ctx: layer_examples(ctx, kinds=("column", "row", "linear"), sp=(False,)))
def adapter_weights_round_trip_through_spec_shards(ctx, backend, ex):
    """Full A, B written as SPEC shards into adapter_weights gather back to the same full tensors,
    exactly; where the adapter has load_full_weights / full_weights, they agree with the SPEC shards
    and reject wrong shapes with a ValueError naming A or B."""
    ex = fit_to_backend(ctx, ex, backend)
    built = build(ctx, backend, ex)      # writes this rank's SPEC shards of built.A, built.B
    A, B = _full_adapter(ctx, backend, built)
    where = f"{ex['kind']} base, tp={ex['tp']}, stride={ex['stride']}"
    ctx.assert_close(A, built.A, torch.float64, f"full A gathered back from adapter_weights ({where})")
    ctx.assert_close(B, built.B, torch.float64, f"full B gathered back from adapter_weights ({where})")
    adapter = getattr(built.wrapped, "adapter", None)
    if adapter is None or not hasattr(adapter, "load_full_weights") or not hasattr(adapter, "full_weights"):
        return
    got_A, got_B = adapter.full_weights()
    ctx.assert_close(got_A, built.A, torch.float64, f"adapter.full_weights() A ({where})")
    ctx.assert_close(got_B, built.B, torch.float64, f"adapter.full_weights() B ({where})")
    A2 = ctx.randn(tuple(built.A.shape), ex["seed"] + 20).to(built.dtype)
    B2 = ctx.randn(tuple(built.B.shape), ex["seed"] + 21).to(built.dtype)
    adapter.load_full_weights(A2, B2)
    A, B = _full_adapter(ctx, backend, built)
    for label, got, want in (("A", A, A2), ("B", B, B2)):
        ctx.assert_close(got, want.double(), torch.float64,
                         f"{label} after adapter.load_full_weights, read as SPEC shards ({where})")
    for label, bad in (("A", (torch.cat([A2, A2[:, :1]], dim=1), B2)), ("B", (A2, torch.cat([B2, B2[:1]])))):
        try:
            adapter.load_full_weights(*bad)
        except ValueError as error:
            ctx.check(label in str(error), f"load_full_weights with a wrong {label} shape: the message "
                                           f"does not name {label}: {error}")
        else:
            shape = tuple(bad[0 if label == "A" else 1].shape)
            raise AssertionError(f"load_full_weights with a wrong {label} shape {shape} raised nothing ({where})")

