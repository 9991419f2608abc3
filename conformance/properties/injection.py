"""SPEC section 8: putting adapters into a model, freezing, idempotence, and TP invariance.

Adapter parameters are those backend.adapter_weights returns for the modules backend.lora_modules
lists; every other parameter is a base parameter. For TP invariance the suite draws the full A and B
of every LoRA module from the module's name (conformance/model_case.py) and writes this rank's SPEC
shards into it ([LORA-FWD-2]; a backend with "full_adapter": the full A and B); loading A too keeps
[LORA-INIT-2] (the same drawn A at every TP size) out of this check. Modules are selected by full name
(model_case.full_names): selection by bare name is [LORA-MATCH-2]'s, judged in matching.py.

Adapters off and on ([LORA-INJ-6]) and checkpoint keys ([LORA-INJ-7]) are judged on TinyGPT with
non-zero adapters (the suite's A and B, loaded as above): off, the logits are the base model's, bit
for bit; the unwrapped model's state-dict keys and tensors are all still there after apply_lora, and
its state dict loads strictly into the adapted model. The adapter's own keys are, for the suite, the
keys the adapted model has beyond the base's.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from hypothesis import strategies as st
from torch import nn

from ..backend import Container, LinearSpec, ModelSpec
from ..configs import lora
from ..layer_case import fit_layout
from ..model_case import (
    DEFAULT_TARGETS,
    adapter_parameter_names,
    apply_quietly,
    full_adapter_gradients,
    full_names,
    load_model_adapters,
    pattern_selects,
    plans,
    token_ids,
)
from ..registry import FORWARD_MATH, prop, with_explicit

TARGET_SETS = [DEFAULT_TARGETS, ["linear_qkv"], ["linear_proj", "linear_fc2"], [*DEFAULT_TARGETS, "output_layer"],
               ["linear_fc1", "output_layer"]]


def _spec(ctx, ex, sp: bool) -> ModelSpec:
    heads = max(4, ctx.world_size)
    return ModelSpec(kind="gpt", seed=ex["seed"], num_layers=ex["num_layers"], hidden_size=4 * heads,
                     ffn_hidden_size=4 * heads, num_attention_heads=heads, vocab_size=4 * heads,
                     sequence_parallel=sp, gated_linear_unit=ex["gated"])


def model_examples(ctx, tp=None, targets=None):
    """TinyGPT examples; always run: every TP size with SP off and (t > 1) on."""
    explicit = [{"tp": t, "sp": sp, "num_layers": 1, "gated": False, "targets": (targets or [0])[0], "dim": t,
                 "alpha": 1, "seed": 0} for t in (tp or ctx.tp_sizes) for sp in ((False, True) if t > 1 else (False,))]
    return with_explicit(_draw_model_example(ctx, tp, targets), explicit)


@st.composite
def _draw_model_example(draw, ctx, tp=None, targets=None):
    t = draw(st.sampled_from(list(tp or ctx.tp_sizes)))
    return {"tp": t, "sp": draw(st.booleans()) if t > 1 else False, "num_layers": draw(st.integers(1, 2)),
            "gated": draw(st.booleans()), "targets": draw(st.sampled_from(targets or range(len(TARGET_SETS)))),
            "dim": t * draw(st.integers(1, 2)), "alpha": draw(st.sampled_from([0.5, 1, 4])),
            "seed": draw(st.integers(0, 2**16))}




def _config(ex, model, **fields):
    """LoRA on TARGET_SETS[ex["targets"]], named by full name (model_case.full_names)."""
    return lora(target_modules=full_names(model, TARGET_SETS[ex["targets"]]), dim=ex["dim"], alpha=ex["alpha"],
                **fields)


def _build(ctx, backend, ex, tp, sp):
    groups = backend.init_parallel(tp)
    spec = _spec(ctx, ex, sp)
    return groups, spec, backend.make_model(spec)


def _check_modes(ctx, model, training: bool, what: str) -> None:
    wrong = [name or "<model>" for name, m in model.named_modules() if m.training != training]
    ctx.check(not wrong, f"{what}: modules not in {'train' if training else 'eval'} mode: {wrong[:4]}")


@prop("LORA-INJ-1", "LORA-BWD-3", needs={"models"}, judges=("freezing",), requires=("LORA-BWD-3",),
      strategy=model_examples)
def apply_trains_exactly_the_adapters(ctx, backend, ex):
    """training=True: only adapter parameters require grad, and the model is in train mode."""
    tp, sp = fit_layout(ctx, backend, ex)
    _, _, model = _build(ctx, backend, ex, tp, sp)
    model.eval()
    model, _ = apply_quietly(backend, model, _config(ex, model), training=True)
    adapters = adapter_parameter_names(backend, model)
    ctx.check(bool(adapters), f"target_modules={TARGET_SETS[ex['targets']]}: no module got an adapter")
    frozen_adapters = [label for p in model.parameters() if id(p) in adapters and not p.requires_grad
                       for label in [adapters[id(p)]]]
    stray = [adapters[k] for k in adapters if k not in {id(p) for p in model.parameters()}]
    trainable_base = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in adapters]
    ctx.check(not stray, f"adapter parameters that are not parameters of the model: {stray[:4]}")
    ctx.check(not frozen_adapters, f"adapter parameters that do not require grad: {frozen_adapters[:4]}")
    ctx.check(not trainable_base, f"base parameters that still require grad: {trainable_base[:4]}")
    _check_modes(ctx, model, True, "after apply_lora(training=True)")


@prop("LORA-INJ-2", needs={"models"}, judges=("freezing",), strategy=model_examples)
def inference_freezes_everything(ctx, backend, ex):
    """training=False: no parameter (adapters included) requires grad, and the model is in eval mode."""
    tp, sp = fit_layout(ctx, backend, ex)
    _, _, model = _build(ctx, backend, ex, tp, sp)
    model.train()
    model, _ = apply_quietly(backend, model, _config(ex, model), training=False)
    ctx.check(bool(backend.lora_modules(model)), "training=False: no module got an adapter")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    ctx.check(not trainable, f"after apply_lora(training=False) these require grad: {trainable[:4]}")
    _check_modes(ctx, model, False, "after apply_lora(training=False)")


# Re-application configs ([LORA-INJ-3]): full names (TARGET_SETS), wildcards, and exclude mode.
REAPPLY = {"wildcard": [["*.mlp.*"], ["*.layers.0.*"], ["*linear_*"], ["*"]],
           "exclude": [["linear_proj"], ["*.mlp.*"], ["output_layer", "*.layers.0.*"]]}


def _reapply_examples(ctx):
    """Re-application examples; always run: every wildcard and exclude-mode pattern list once."""
    t = max(ctx.tp_sizes)
    base = {"tp": t, "sp": False, "num_layers": 1, "gated": False, "targets": 0, "dim": t, "alpha": 1, "seed": 0}
    explicit = [{**base, "mode": "names", "patterns": 0}]
    explicit += [{**base, "mode": mode, "patterns": i} for mode, lists in REAPPLY.items() for i in range(len(lists))]
    return with_explicit(_draw_reapply_example(ctx), explicit)


@st.composite
def _draw_reapply_example(draw, ctx):
    ex = draw(model_examples(ctx))
    ex["mode"] = draw(st.sampled_from(["names", "wildcard", "exclude"]))
    ex["patterns"] = draw(st.integers(0, len(REAPPLY[ex["mode"]]) - 1)) if ex["mode"] != "names" else 0
    return ex


def _reapply_config(ex, model):
    if ex["mode"] == "names":
        return _config(ex, model)
    patterns = list(REAPPLY[ex["mode"]][ex["patterns"]])
    if ex["mode"] == "wildcard":
        return lora(target_modules=patterns, dim=ex["dim"], alpha=ex["alpha"])
    return lora(target_modules=[], exclude_modules=patterns, dim=ex["dim"], alpha=ex["alpha"])


@prop("LORA-INJ-3", needs={"models"}, weight=0.5, requires=FORWARD_MATH,
      strategy=_reapply_examples)
def applying_twice_changes_nothing(ctx, backend, ex):
    """A second apply_lora with the same config (full names, wildcards or exclude mode): the same
    adapted modules, trainable parameters, adapter values and logits; no wrapper wrapped again and no
    adapter inside an adapted module."""
    tp, sp = fit_layout(ctx, backend, ex)
    groups, spec, model = _build(ctx, backend, ex, tp, sp)
    config = _reapply_config(ex, model)
    model, _ = apply_quietly(backend, model, config, training=True)
    load_model_adapters(ctx, backend, model, plans(backend, model, spec, groups, ex["dim"]), ex["seed"])
    ids = token_ids(ctx, spec, batch=2, seq=4 * tp, seed=ex["seed"] + 1)
    with torch.no_grad():
        logits = backend.model_forward(model, spec, {"input_ids": ids})
    first = dict(backend.lora_modules(model))
    weights = {name: tuple(w.detach().clone() for w in backend.adapter_weights(m)) for name, m in first.items()}
    identities = {name: tuple(id(w) for w in backend.adapter_weights(m)) for name, m in first.items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    again, _ = apply_quietly(backend, model, config, training=True)
    in_place = again is model              # a backend may return a new model: then values, not identities
    second = backend.lora_modules(again)
    ctx.check(set(second) == set(first),
              f"the second apply changed the adapted modules: added {sorted(set(second) - set(first))[:4]}, "
              f"removed {sorted(set(first) - set(second))[:4]}")
    if in_place:
        replaced = [n for n in first if second.get(n) is not first[n]]
        ctx.check(not replaced, f"the second apply replaced (re-wrapped) adapted modules: {replaced[:4]}")
        changed = [n for n, m in second.items() if tuple(id(w) for w in backend.adapter_weights(m)) != identities[n]]
        ctx.check(not changed, f"the second apply replaced the adapter weights of {changed[:4]}")
    nested = sorted(n for n in second if any(n.startswith(m + ".") for m in second))
    ctx.check(not nested, f"adapters inside adapted modules after the second apply: {nested[:4]}")
    changed = [n for n, m in second.items()
               if not all(torch.equal(w, v) for w, v in zip(backend.adapter_weights(m), weights[n]))]
    ctx.check(not changed, f"the second apply changed the adapter weights of {changed[:4]}")
    now = {n for n, p in again.named_parameters() if p.requires_grad}
    ctx.check(now == trainable, f"the second apply changed the trainable set: added {sorted(now - trainable)[:4]}, "
                                f"removed {sorted(trainable - now)[:4]}")
    with torch.no_grad():
        logits_again = backend.model_forward(again, spec, {"input_ids": ids})
    ctx.assert_close(logits_again, logits.double(), torch.float32, "logits after the second apply vs the first")


INJ4_PATTERNS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "{parent}.*", "*.{name}", "mlp.*",
                 "self_attention.*", "*", "{name}.*"]


@prop("LORA-INJ-4", needs={"models"},
      requires=("LORA-INJ-3",),
      strategy=lambda ctx: with_explicit(st.fixed_dictionaries({
          "kind": st.sampled_from(["column", "row", "linear"]),
          "name": st.sampled_from(DEFAULT_TARGETS),
          "parent": st.sampled_from(["self_attention", "mlp"]),
          "pattern": st.sampled_from(INJ4_PATTERNS),
          "chunks": st.integers(1, 2),
          "seed": st.integers(0, 2**16)}),
          # Always: each base kind, selected by its name, by a wildcard, and not selected; one chunk list.
          [{"kind": kind, "name": "linear_fc1", "parent": "mlp", "pattern": pattern, "chunks": chunks, "seed": 0}
           for kind in ("column", "row", "linear")
           for pattern, chunks in (("linear_fc1", 1), ("{parent}.*", 2), ("self_attention.*", 1))]))
def transform_wraps_a_selected_module_only(ctx, backend, ex):
    """A lone base layer named by its parent and attribute name is adapted (wrapped, or patched in
    place) iff a pattern selects it; an unselected one is left as it is; an adapted one is left as it
    is on a second apply; a list of chunks is accepted, each chunk transformed."""
    kind = ex["kind"]
    if kind != "linear" and not backend.supports("tp") and backend.supports("linear"):
        kind = "linear"                      # the point is the transform, not the base kind
    elif kind == "linear" and not backend.supports("linear"):
        kind = "column"
    if kind != ex["kind"]:
        ctx.ran(kind=kind)
    groups = backend.init_parallel(1)
    full_name = f"{ex['parent']}.{ex['name']}"
    pattern = ex["pattern"].format(parent=ex["parent"], name=ex["name"])
    selected = pattern_selects(pattern, full_name)
    chunks, bases = [], []
    for c in range(ex["chunks"]):
        W = ctx.randn((8, 8), ex["seed"] + c, dtype=torch.float32)
        base = backend.make_linear(LinearSpec(kind=kind, in_features=8, out_features=8, weight=W, groups=groups,
                                              name=ex["name"]))
        chunk = nn.Module()
        chunk.add_module(ex["parent"], Container(ex["name"], base))
        chunks.append(chunk)
        bases.append(base)
    given = chunks if ex["chunks"] > 1 else chunks[0]
    config = lora(target_modules=[pattern], dim=2, alpha=4)
    model, _ = apply_quietly(backend, given, config)
    adapted = model if isinstance(model, list) else [model]
    in_place = all(a is c for a, c in zip(adapted, chunks))     # else the backend returned new chunks
    where = f"target_modules=[{pattern!r}], module {full_name} ({kind})"
    wrappers = []
    for chunk, base in zip(adapted, bases):
        layer = getattr(chunk, ex["parent"]).layer()
        names = set(backend.lora_modules(chunk))
        if selected:
            ctx.check(names == {full_name}, f"{where}: adapted modules {sorted(names)}, expected [{full_name!r}]")
            # Wrapped (a new module) or patched in place (Automodel swaps the class): either way the
            # module at that name is the one lora_modules reports.
            ctx.check(backend.lora_modules(chunk).get(full_name) is layer,
                      f"{where}: the module at {full_name} is not the adapted module lora_modules reports")
        else:
            ctx.check(not names, f"{where}: adapted {sorted(names)}, but the pattern does not select it")
            ctx.check(layer is base or not in_place, f"{where}: the unselected module was replaced")
        wrappers.append(layer)
    again, _ = apply_quietly(backend, model, config)
    again = again if isinstance(again, list) else [again]
    for chunk, first, before in zip(again, adapted, wrappers):
        layer = getattr(chunk, ex["parent"]).layer()
        names = set(backend.lora_modules(chunk))
        ctx.check(names == ({full_name} if selected else set()),
                  f"{where}: after a second apply the adapted modules are {sorted(names)}")
        ctx.check(layer is before or chunk is not first,
                  f"{where}: a second apply replaced the {'wrapper' if selected else 'module'}")


# TinyGPT's output_layer gathers its output ([LORA-FWD-8], checked layer by layer): the TP-invariance
# of the adapted model is measured on the other target sets, so that it is measured for every backend.
SHARDED_IO_TARGETS = [i for i, targets in enumerate(TARGET_SETS) if "output_layer" not in targets]


@prop("LORA-INJ-5", "LORA-FWD-2", needs={"relayout", "models", "tp"}, judges=("apply_lora",), weight=0.5, min_world=2,
      requires=FORWARD_MATH,
      strategy=lambda ctx: model_examples(ctx, tp=[t for t in ctx.tp_sizes if t > 1], targets=SHARDED_IO_TARGETS))
def adapted_model_is_tp_invariant(ctx, backend, ex):
    """TinyGPT + LoRA with the same full weights at TP 1 and TP t (SP on or off): the same logits and
    the same gathered adapter gradients."""
    tp, sp = fit_layout(ctx, backend, ex)
    one = _forward_backward(ctx, backend, ex, 1, False)
    many = _forward_backward(ctx, backend, ex, tp, sp)
    where = f"TP {tp} (sp={sp}) vs TP 1"
    ctx.assert_close(many[0], one[0], torch.float32, f"logits at {where}", scale=10)
    ctx.check(set(many[1]) == set(one[1]),
              f"adapted modules differ at {where}: {sorted(set(many[1]) ^ set(one[1]))[:4]}")
    for name, (dA, dB) in one[1].items():
        # float32 sums in a different order through a deep model: judged relative to the largest entry.
        for label, got, want in (("A", many[1][name][0], dA), ("B", many[1][name][1], dB)):
            ctx.assert_close(got, want, torch.float32, f"gathered gradient of {label} of {name} at {where}",
                             scale=20 * max(1.0, want.abs().max().item()))


def _forward_backward(ctx, backend, ex, tp, sp):
    groups, spec, model = _build(ctx, backend, ex, tp, sp)
    model, _ = apply_quietly(backend, model, _config(ex, model), training=True)
    plan_by_name = plans(backend, model, spec, groups, ex["dim"])
    load_model_adapters(ctx, backend, model, plan_by_name, ex["seed"])
    ids = token_ids(ctx, spec, batch=2, seq=8, seed=ex["seed"] + 1)
    logits = backend.model_forward(model, spec, {"input_ids": ids})
    G = ctx.randn(tuple(logits.shape), ex["seed"] + 2)
    (logits.float() * G.float()).sum().backward()
    backend.finalize_grads(model)
    modules = backend.lora_modules(model)
    grads = {}
    for name, plan in plan_by_name.items():
        dA, dB = full_adapter_gradients(ctx, backend, modules[name], plan)
        ctx.check(dA is not None and dB is not None, f"the adapter of {name} got no gradient (TP {tp})")
        grads[name] = (dA.double(), dB.double())
    return logits.detach().double(), grads


def _snapshot(state: dict) -> dict:
    """A state dict's tensors cloned (other values, e.g. an `_extra_state` None, kept as they are)."""
    return {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def _adapted_with_weights(ctx, backend, ex):
    """(spec, model, token ids, base logits, base state dict): TinyGPT's logits and state dict, then
    LoRA (training=True) with the suite's non-zero A and B loaded; the model in eval mode."""
    tp, sp = fit_layout(ctx, backend, ex)
    groups, spec, model = _build(ctx, backend, ex, tp, sp)
    ids = token_ids(ctx, spec, batch=2, seq=8, seed=ex["seed"] + 1)
    base_state = _snapshot(model.state_dict())
    with torch.no_grad():
        base_logits = backend.model_forward(model, spec, {"input_ids": ids})
    model, _ = apply_quietly(backend, model, _config(ex, model, dropout=ex["dropout"]), training=True)
    load_model_adapters(ctx, backend, model, plans(backend, model, spec, groups, ex["dim"]), ex["seed"])
    model.eval()
    return spec, model, ids, base_logits, base_state


def _with_dropout(ctx, rates=(0.0, 0.5)):
    """Model examples with a dropout rate; always run: model_examples' with each rate."""
    models = model_examples(ctx)
    return with_explicit(st.tuples(models, st.sampled_from(rates)).map(lambda drawn: {**drawn[0], "dropout": drawn[1]}),
                         [{**ex, "dropout": rate} for ex in models.explicit for rate in rates])


@prop("LORA-INJ-6", needs={"models", "disable_adapters"}, judges=("set_adapters_enabled",), weight=0.5, requires=FORWARD_MATH,
      strategy=_with_dropout)
def disabled_adapters_give_the_base_logits(ctx, backend, ex):
    """Adapters off: TinyGPT's logits are the base model's exactly (in train mode too, dropout or not)
    and the adapters get no gradient; on again: the adapted logits, and the trainable set as before."""
    spec, model, ids, base_logits, _ = _adapted_with_weights(ctx, backend, ex)
    with torch.no_grad():
        adapted = backend.model_forward(model, spec, {"input_ids": ids})
    ctx.check(not torch.equal(adapted, base_logits), "the non-zero adapters do not change the logits")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    backend.set_adapters_enabled(model, False)
    model.train()
    off = backend.model_forward(model, spec, {"input_ids": ids})
    ctx.check(torch.equal(off, base_logits), f"adapters off (train mode, dropout {ex['dropout']}): the logits "
              f"differ from the base model's by up to {(off - base_logits).abs().max().item():.3g}")
    if off.requires_grad:
        (off.float() * ctx.randn(tuple(off.shape), ex["seed"] + 2, dtype=torch.float32)).sum().backward()
    modules = backend.lora_modules(model)
    graded = [f"{name}.{label}" for name, m in modules.items() for label, w in zip("AB", backend.adapter_weights(m))
              if w.grad is not None and bool(w.grad.any())]
    ctx.check(not graded, f"adapters off: adapter parameters got a gradient: {graded[:4]}")
    backend.set_adapters_enabled(model, True)
    model.eval()
    with torch.no_grad():
        on = backend.model_forward(model, spec, {"input_ids": ids})
    ctx.assert_close(on, adapted.double(), torch.float32, "adapters on again: the adapted logits")
    now = {n for n, p in model.named_parameters() if p.requires_grad}
    ctx.check(now == trainable, f"off and on again changed the trainable set: {sorted(now ^ trainable)[:4]}")


@prop("LORA-INJ-7", needs={"models"}, judges=("apply_lora",), strategy=lambda ctx: _with_dropout(ctx, rates=(0.0,)))
def base_state_dict_keys_survive_apply_lora(ctx, backend, ex):
    """Every key of the unwrapped TinyGPT's state dict is in the adapted model's, with an equal tensor."""
    _, model, _, _, base_state = _adapted_with_weights(ctx, backend, ex)
    state = model.state_dict()
    missing = [k for k in base_state if k not in state]
    ctx.check(not missing, f"base keys missing from the adapted model's state dict: {missing[:4]} "
              f"(it has e.g. {[k for k in state if k not in base_state][:4]})")
    changed = [k for k, v in base_state.items() if isinstance(v, torch.Tensor) and not torch.equal(state[k], v)]
    ctx.check(not changed, f"base tensors changed by apply_lora: {changed[:4]}")


@prop("LORA-INJ-7", needs={"models"}, judges=("apply_lora",), weight=0.5, strategy=lambda ctx: _with_dropout(ctx, rates=(0.0,)))
def base_checkpoint_loads_into_the_adapted_model(ctx, backend, ex):
    """The base state dict of another seed's TinyGPT loads strictly into the adapted model: the base
    weights are then that model's, the adapters keep their values; a checkpoint lacking one adapter
    key is reported as missing it."""
    spec, model, _, _, _ = _adapted_with_weights(ctx, backend, ex)
    other = backend.make_model(replace(spec, seed=spec.seed + 1)).state_dict()
    adapters = {k: v for k, v in _snapshot(model.state_dict()).items() if k not in other}
    ctx.check(any(isinstance(v, torch.Tensor) for v in adapters.values()),
              "the adapted model's state dict has no tensor beyond the base model's")
    try:
        model.load_state_dict(other, strict=True)
    except RuntimeError as e:
        raise AssertionError(f"a base checkpoint does not load strictly: {str(e)[:400]}") from None
    state = model.state_dict()
    stale = [k for k, v in other.items() if isinstance(v, torch.Tensor) and not torch.equal(state[k], v)]
    ctx.check(not stale, f"after loading the base checkpoint these differ from it: {stale[:4]}")
    tensors = sorted(k for k, v in adapters.items() if isinstance(v, torch.Tensor))
    moved = [k for k in tensors if not torch.equal(state[k], adapters[k])]
    ctx.check(not moved, f"loading a base checkpoint changed adapter tensors: {moved[:4]}")
    dropped = tensors[ex["seed"] % len(tensors)]
    partial = {k: v for k, v in state.items() if k != dropped}
    result = model.load_state_dict(partial, strict=False)
    ctx.check(list(result.missing_keys) == [dropped], f"a checkpoint without {dropped!r}: missing keys "
              f"{list(result.missing_keys)[:4]}, expected exactly that key")
