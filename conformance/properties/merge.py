"""SPEC section 9: folding adapters into base weights, against W + (alpha/d) B A in float64."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from ..backend import ModelSpec
from ..context import check_group_in_step, raises_everywhere
from ..configs import lora
from ..layer_case import build, fit_layout
from ..layout import DTYPES, piece, shard_of
from ..model_case import load_model_adapters, plans, returned_model
from ..registry import FORWARD_MATH, paired, prop, with_explicit

TENSOR_OF = {"W": "weight", "A": "A", "B": "B"}
BAD_SHAPES = ["A_in", "B_rank", "dim"]


def _merge_examples(ctx, dtypes=None):
    """Merge examples; always run first: each kind x TP x stride x dtype once."""
    explicit = []
    for t in ctx.tp_sizes:
        for kind, stride in (("column", 1), ("column", 2), ("row", 1)):
            for dtype in list(dtypes or ctx.dtypes):
                sizes = ({"out": 2 * t * stride, "dim": 2 * t, "in": 3} if kind == "column"
                         else {"out": 2 * t, "dim": 3, "in": 2 * t})
                explicit.append({"kind": kind, "tp": t, "stride": stride, "alpha": 8, "dtype": dtype, "seed": 0, **sizes})
    return with_explicit(_draw_merge_example(ctx, dtypes), explicit)


@st.composite
def _draw_merge_example(draw, ctx, dtypes=None):
    t = draw(st.sampled_from(ctx.tp_sizes))
    kind = draw(st.sampled_from(["column", "row"]))
    stride = draw(st.sampled_from([1, 2])) if kind == "column" else 1
    ex = {"kind": kind, "tp": t, "stride": stride, "alpha": draw(st.sampled_from([1, 8, 32, 0.5])),
          "dtype": draw(st.sampled_from(list(dtypes or ctx.dtypes))), "seed": draw(st.integers(0, 2**16))}
    if kind == "column":
        ex.update({"out": t * stride * draw(st.integers(1, 4)), "dim": t * draw(st.integers(1, 4)),
                   "in": draw(st.integers(1, 8))})
    else:
        ex.update({"out": t * draw(st.integers(1, 4)), "dim": draw(st.integers(1, 8)),
                   "in": t * draw(st.integers(1, 4))})
    return ex


def _merge_case(ctx, backend, ex: dict, adapter_dtype=None):
    """Full W, B, A (values the dtypes hold exactly), this rank's SPEC shards of them, and the groups."""
    t = ex["tp"] if backend.supports("tp") else 1
    if t != ex["tp"]:
        ctx.ran(tp=t)
    groups = backend.init_parallel(t)
    dtype = DTYPES[ex["dtype"]]
    adapter_dtype = adapter_dtype or dtype
    out, in_features, dim, seed = ex["out"], ex["in"], ex["dim"], ex["seed"]
    full = {"W": ctx.randn((out, in_features), seed, scale=in_features ** -0.5).to(dtype).double(),
            "B": ctx.randn((out, dim), seed + 1, scale=dim ** -0.5).to(adapter_dtype).double(),
            "A": ctx.randn((dim, in_features), seed + 2, scale=in_features ** -0.5).to(adapter_dtype).double()}
    local = {}
    for name, tensor in full.items():
        shard = shard_of(TENSOR_OF[name], ex["kind"], stride=ex["stride"])
        local[name] = piece(tensor, shard, groups.tp_rank, t).to(dtype if name == "W" else adapter_dtype).contiguous()
    merged_full = full["W"] + (ex["alpha"] / ex["dim"]) * full["B"] @ full["A"]
    want = piece(merged_full, shard_of("weight", ex["kind"], stride=ex["stride"]), groups.tp_rank, t)
    return groups, t, local, want, dtype


def _where(ex: dict, t: int) -> str:
    stride = f", stride={ex['stride']}" if ex["stride"] != 1 else ""
    return (f"{ex['kind']} base W {(ex['out'], ex['in'])}, dim={ex['dim']}, alpha={ex['alpha']}, tp={t}{stride}, "
            f"{ex['dtype']}")


@prop("LORA-MERGE-1", needs={"merge"}, strategy=lambda ctx: _merge_examples(ctx))
def merge_weight_is_the_local_shard_of_the_merged_matrix(ctx, backend, ex):
    """merge_weight(W_r, B_r, A_r, alpha, dim) is this rank's shard of W + (alpha/dim) B A: column
    (A gathered) and row (B gathered) bases, strided column bases included."""
    groups, t, local, want, dtype = _merge_case(ctx, backend, ex)
    merged = backend.merge_weight(local["W"], local["B"], local["A"], ex["alpha"], ex["dim"],
                                  tp_size=t, tp_group=groups.tp_group)
    ctx.assert_close(merged, want, dtype, f"merge_weight for a {_where(ex, t)}")


@prop("LORA-MERGE-1", "LORA-ERR-1", needs={"merge"},
      strategy=lambda ctx: paired(_merge_examples(ctx, dtypes=("float32",)), st.sampled_from(BAD_SHAPES), BAD_SHAPES))
def merge_weight_rejects_shapes_that_cannot_merge(ctx, backend, drawn):
    """A linear_in with a wrong in, a linear_out with a wrong rank, or a dim that fits neither: a
    ValueError on every rank, before any gather (a collective on the TP group still works)."""
    ex, bad = drawn
    groups, t, local, _, _ = _merge_case(ctx, backend, ex)
    W, B, A, dim = local["W"], local["B"], local["A"], ex["dim"]
    if bad == "A_in":
        A = torch.cat([A, A[:, :1]], dim=1)
    elif bad == "B_rank":
        B = torch.cat([B, B[:, :1]], dim=1)
    else:
        dim = ex["dim"] * 2 * t + 1   # neither the local nor the gathered rank of A
    what = (f"merge_weight of W {tuple(W.shape)}, B {tuple(B.shape)}, A {tuple(A.shape)}, dim={dim}, tp={t} "
            f"({ex['kind']} base, {bad} wrong)")
    raises_everywhere(ctx, lambda: backend.merge_weight(W, B, A, ex["alpha"], dim, tp_size=t, tp_group=groups.tp_group),
                      (ValueError,), what)
    check_group_in_step(ctx, groups.tp_group, t)


@prop("LORA-MERGE-2", needs={"merge"},
      requires=("LORA-MERGE-1",),
      strategy=lambda ctx: paired(_merge_examples(ctx, dtypes=(*ctx.dtypes, "float64")),
                                  st.sampled_from([None, "float32"]), [None, "float32"]))
def merged_weight_has_the_base_dtype(ctx, backend, drawn):
    """The merged shard has the base weight's dtype (float32 adapters on a reduced or float64 base
    too) and its values to that dtype's tolerance (float64 bases are merged in float64); a wrapper's
    merged_weight(), where there is one, is the same shard."""
    ex, adapter_name = drawn
    adapter_dtype = DTYPES[adapter_name] if adapter_name else None
    groups, t, local, want, dtype = _merge_case(ctx, backend, ex, adapter_dtype)
    merged = backend.merge_weight(local["W"], local["B"], local["A"], ex["alpha"], ex["dim"],
                                  tp_size=t, tp_group=groups.tp_group)
    what = f"merge_weight for a {_where(ex, t)} with {adapter_name or ex['dtype']} adapters"
    ctx.check(isinstance(merged, torch.Tensor) and merged.dtype == dtype,
              f"{what}: merged weight is {getattr(merged, 'dtype', type(merged).__name__)}, "
              f"expected the base's {dtype}")
    ctx.assert_close(merged, want, dtype, what)
    if adapter_dtype is None and backend.supports("tp"):
        _check_wrapper_merged_weight(ctx, backend, ex, dtype)


def _check_wrapper_merged_weight(ctx, backend, ex: dict, dtype) -> None:
    layer = {"kind": ex["kind"], "tp": ex["tp"], "sp": False, "a2a": False, "gather_output": False,
             "input_is_parallel": True, "stride": ex["stride"], "bias": False, "skip_bias_add": False,
             "s": ex["tp"], "b": 1, "in": ex["in"], "out": ex["out"], "dim": ex["dim"], "alpha": ex["alpha"],
             "dtype": ex["dtype"], "seed": ex["seed"]}
    built = build(ctx, backend, layer)
    if not hasattr(built.wrapped, "merged_weight"):
        return
    merged = built.wrapped.merged_weight()
    full = built.W + built.scale * built.B @ built.A
    want = piece(full, shard_of("weight", ex["kind"], stride=ex["stride"]), built.groups.tp_rank, ex["tp"])
    what = f"merged_weight() of a LoRA-wrapped {_where(ex, ex['tp'])}"
    ctx.check(merged.dtype == dtype, f"{what}: dtype {merged.dtype}, expected the base's {dtype}")
    ctx.assert_close(merged, want, dtype, what)


# -- whole-model merge --------------------------------------------------------------------------------

MODEL_EXAMPLES = dict(tp=None, sp=st.booleans(), gated=st.booleans(), alpha=st.sampled_from([4, 16, 32]),
                      seed=st.integers(0, 2**16), b=st.integers(1, 2), s_per_tp=st.integers(1, 3))


def _model_examples(ctx):
    """TinyGPT merge examples; always run: every TP size with SP off and (t > 1) on."""
    explicit = [{"tp": t, "sp": sp, "gated": False, "alpha": 16, "seed": 0, "b": 1, "s_per_tp": 1}
                for t in ctx.tp_sizes for sp in ((False, True) if t > 1 else (False,))]
    return with_explicit(st.fixed_dictionaries({**MODEL_EXAMPLES, "tp": st.sampled_from(ctx.tp_sizes)}), explicit)


def _adapted_tiny_gpt(ctx, backend, ex, eval_mode: bool = True):
    """TinyGPT with LoRA (default targets, dim 8, no dropout) and the suite's non-zero A and B, in eval
    mode or left in train mode: (spec, model, inputs, plans, adapted logits, where); the adapters
    change the logits. Train mode keeps a library that merges on eval() (loralib) unmerged."""
    t, sp = fit_layout(ctx, backend, ex)
    groups = backend.init_parallel(t)
    spec = ModelSpec(kind="gpt", seed=ex["seed"], sequence_parallel=sp, gated_linear_unit=ex["gated"],
                     num_attention_heads=max(4, t))
    model = backend.make_model(spec)
    generator = torch.Generator().manual_seed(ex["seed"] + 7)
    ids = torch.randint(0, spec.vocab_size, (ex["b"], t * ex["s_per_tp"]), generator=generator).to(ctx.device)
    inputs = {"input_ids": ids}
    base_logits = backend.model_forward(model, spec, inputs).detach()
    config = backend.validate_config(lora(dim=8, alpha=ex["alpha"]))
    model = returned_model(model, backend.apply_lora(model, config, training=True))
    plan_by_name = plans(backend, model, spec, groups, 8)
    load_model_adapters(ctx, backend, model, plan_by_name, ex["seed"] + 100)
    if eval_mode:
        model.eval()     # after the weights are written (the lifecycle in conformance/backend.py)
    where = f"TinyGPT (tp={t}, sp={sp}, gated={ex['gated']}, alpha={ex['alpha']})"
    ctx.check(len(plan_by_name) > 0, f"{where}: LoRA with the default targets wrapped no module")
    adapted = backend.model_forward(model, spec, inputs).detach()
    ctx.check(not torch.allclose(adapted, base_logits, rtol=1e-3, atol=1e-3),
              f"{where}: the adapters (non-zero A and B) did not change the logits")
    return spec, model, inputs, plan_by_name, adapted, where


@prop("LORA-MERGE-3", needs={"merge_model", "models"}, judges=("merge_model",), weight=0.5, requires=FORWARD_MATH,
      strategy=_model_examples)
def merged_tiny_gpt_gives_the_same_logits(ctx, backend, ex):
    """merge_model on a LoRA-wrapped TinyGPT with non-zero adapters: the same logits as before the
    merge, and no LoRA module left."""
    spec, model, inputs, plan_by_name, adapted, where = _adapted_tiny_gpt(ctx, backend, ex, eval_mode=False)
    before = _base_weights(backend, model)
    model.eval()         # after the weights are written (a library may merge on eval)
    merged_model = returned_model(model, backend.merge_model(model))
    merged = backend.model_forward(merged_model, spec, inputs).detach()
    ctx.assert_close(merged, adapted.double(), torch.float32, f"{where}: logits after merge_model vs before",
                     scale=10)
    left = sorted(backend.lora_modules(merged_model))
    ctx.check(not left, f"{where}: LoRA modules remain after merge_model: {left[:4]}")
    _check_merged_weights(ctx, plan_by_name, before, ex["alpha"] / 8, ex["seed"] + 100, where, "merge_model",
                          lambda name: merged_model.get_submodule(name).weight)


def _check_merged_weights(ctx, plan_by_name, before, scale, seed, where, how, weight_of) -> None:
    """Every adapted module's weight shard after `how` is W + (alpha/d) B A: float64 math from the
    base shard before and the suite's full A and B (absolute, not the backend against itself)."""
    for name, plan in plan_by_name.items():
        A, B = plan.full_tensors(ctx, seed, name)
        update = piece(scale * (B @ A), shard_of("weight", plan.kind, stride=plan.stride), plan.index, plan.size)
        ctx.assert_close(weight_of(name), before[name].double() + update, before[name].dtype,
                         f"{where}: weight of {name} after {how} vs W + (alpha/d) B A")


def _base_weights(backend, model) -> dict:
    return {name: backend.base_weight(m).detach().clone() for name, m in backend.lora_modules(model).items()}


@prop("LORA-MERGE-3", needs={"unmerge", "models"}, judges=("merge_in_place", "unmerge_model"), weight=0.25,
      requires=FORWARD_MATH,
      strategy=_model_examples)
def merge_in_place_then_unmerge_restores_the_model(ctx, backend, ex):
    """merge_in_place: every base weight shard becomes W + (alpha/d) B A (float64 math from the suite's
    A and B) and the logits stay the adapted ones; unmerge_model: the base weights are W again (to the
    dtype's tolerance) and the logits are the adapted ones."""
    spec, model, inputs, plan_by_name, adapted, where = _adapted_tiny_gpt(ctx, backend, ex, eval_mode=False)
    before = _base_weights(backend, model)
    scale = ex["alpha"] / 8
    model = returned_model(model, backend.merge_in_place(model))
    after = _base_weights(backend, model)
    ctx.check(set(after) == set(before), f"{where}: merge_in_place changed the LoRA modules: "
                                         f"{sorted(set(after) ^ set(before))[:4]}")
    _check_merged_weights(ctx, plan_by_name, before, scale, ex["seed"] + 100, where, "merge_in_place",
                          lambda name: after[name])
    merged = backend.model_forward(model, spec, inputs).detach()
    ctx.assert_close(merged, adapted.double(), torch.float32, f"{where}: logits after merge_in_place", scale=10)
    model = returned_model(model, backend.unmerge_model(model))
    restored = _base_weights(backend, model)
    for name, weight in before.items():
        ctx.assert_close(restored[name], weight.double(), weight.dtype,
                         f"{where}: base weight of {name} after merge_in_place then unmerge_model vs before")
    again = backend.model_forward(model, spec, inputs).detach()
    ctx.assert_close(again, adapted.double(), torch.float32, f"{where}: logits after unmerge_model", scale=10)


@prop("LORA-MERGE-3", needs={"unmerge", "models"}, judges=("merge_in_place", "unmerge_model"), weight=0.25,
      requires=FORWARD_MATH,
      strategy=_model_examples)
def merging_twice_or_unmerging_unmerged_changes_nothing(ctx, backend, ex):
    """unmerge_model on a model that is not merged changes no base weight (bit for bit) and no logit;
    a second merge_in_place changes no base weight of the merged model."""
    spec, model, inputs, _, adapted, where = _adapted_tiny_gpt(ctx, backend, ex, eval_mode=False)
    before = _base_weights(backend, model)
    model = returned_model(model, backend.unmerge_model(model))
    changed = [n for n, w in _base_weights(backend, model).items() if not torch.equal(w, before[n])]
    ctx.check(not changed, f"{where}: unmerge_model without a merge changed the base weights of {changed[:4]}")
    ctx.assert_close(backend.model_forward(model, spec, inputs).detach(), adapted.double(), torch.float32,
                     f"{where}: logits after unmerge_model without a merge")
    model = returned_model(model, backend.merge_in_place(model))
    once = _base_weights(backend, model)
    model = returned_model(model, backend.merge_in_place(model))
    changed = [n for n, w in _base_weights(backend, model).items() if not torch.equal(w, once[n])]
    ctx.check(not changed, f"{where}: a second merge_in_place changed the base weights of {changed[:4]}")
