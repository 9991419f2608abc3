"""SPEC section 11: VLMLoRA's per-part freezing on the backend's tiny VLM (make_model 'vlm').

A parameter belongs to the part its full name starts with: `vision_model.`, `vision_projection.` or
`language_model.`. Adapter parameters are those backend.adapter_weights returns for the modules
backend.lora_modules lists. Expected: with training=True a base parameter requires grad exactly when
its part's freeze flag is off, every adapter requires grad, and the model is in train mode; with
training=False nothing requires grad and the model is in eval mode.
"""

from __future__ import annotations

from hypothesis import strategies as st

from ..backend import ModelSpec
from ..configs import vlm_lora
from ..model_case import adapter_parameter_names, apply_quietly
from ..registry import prop, with_explicit

PARTS = ("vision_model", "vision_projection", "language_model")
FLAGS = ("freeze_vision_model", "freeze_vision_projection", "freeze_language_model")


def _examples(ctx, training=(True,), chunks=(1,)):
    """VLM examples; always run: no part, each part alone and every part frozen (at the largest TP),
    with each `training` value, and nothing frozen at TP 1."""
    flag_sets = [(False, False, False), (True, False, False), (False, True, False), (False, False, True),
                 (True, True, True)]
    t = max(ctx.tp_sizes)
    explicit = [{"flags": flags, "training": train, "tp": t, "chunks": chunks[0], "dim": 1, "seed": i}
                for train in training for i, flags in enumerate(flag_sets)]
    if t > 1:
        explicit.append({"flags": (False, True, False), "training": training[0], "tp": 1, "chunks": chunks[0],
                         "dim": 2, "seed": 0})
    return with_explicit(st.fixed_dictionaries({
        "flags": st.tuples(st.booleans(), st.booleans(), st.booleans()),
        "training": st.sampled_from(list(training)),
        "tp": st.sampled_from(ctx.tp_sizes),
        "chunks": st.sampled_from(list(chunks)),
        "dim": st.sampled_from([1, 2]),
        "seed": st.integers(0, 2**16)}), explicit)


def _config(ex):
    return vlm_lora(dim=ex["dim"] * ex["tp"], alpha=8, **dict(zip(FLAGS, ex["flags"])))


def _models(ctx, backend, ex):
    tp = ex["tp"] if backend.supports("tp") else 1
    if tp != ex["tp"]:
        ctx.ran(tp=tp)
    backend.init_parallel(tp)
    heads = max(4, ctx.world_size)
    models = []
    for c in range(ex["chunks"]):
        spec = ModelSpec(kind="vlm", seed=ex["seed"] + 7 * c, num_layers=1, hidden_size=4 * heads,
                         ffn_hidden_size=4 * heads, num_attention_heads=heads, vocab_size=16)
        model = backend.make_model(spec)
        model.train(not ex["training"])          # apply_lora must set the mode itself
        models.append(model)
    return models


def _part(name: str) -> str | None:
    head = name.split(".", 1)[0]
    return head if head in PARTS else None


def _describe(ex) -> str:
    return ", ".join(f"{f}={v}" for f, v in zip(FLAGS, ex["flags"])) + f", training={ex['training']}"


def _check_base(ctx, backend, chunk, ex, what=""):
    """[VLM-FREEZE-1]: base parameters require grad exactly in the unflagged parts (training=True)."""
    adapters = adapter_parameter_names(backend, chunk)
    frozen = dict(zip(PARTS, ex["flags"]))
    wrong = []
    for name, param in chunk.named_parameters():
        if id(param) in adapters:
            continue
        part = _part(name)
        want = ex["training"] and not (part is not None and frozen[part])
        if param.requires_grad != want:
            wrong.append(f"{name} requires_grad={param.requires_grad}")
    ctx.check(not wrong, f"{what}{_describe(ex)}: base parameters with the wrong requires_grad: {wrong[:4]}"
                         f"{f' (and {len(wrong) - 4} more)' if len(wrong) > 4 else ''}")
    modes = [n or "<model>" for n, m in chunk.named_modules() if m.training != ex["training"]]
    ctx.check(not modes, f"{what}{_describe(ex)}: modules not in {'train' if ex['training'] else 'eval'} mode: "
                         f"{modes[:4]}")


def _check_adapters(ctx, backend, chunk, ex, what=""):
    """[VLM-FREEZE-2]: every part has adapters; they require grad iff training."""
    modules = backend.lora_modules(chunk)
    missing = [p for p in PARTS if not any(n.startswith(p + ".") for n in modules)]
    ctx.check(not missing, f"{what}{_describe(ex)}: no adapter inside {missing} with the default target_modules")
    params = {id(p): p for p in chunk.parameters()}
    adapters = adapter_parameter_names(backend, chunk)
    stray = [label for param_id, label in adapters.items() if param_id not in params]
    ctx.check(not stray, f"{what}adapter parameters that are not parameters of the model: {stray[:4]}")
    wrong = [label for param_id, label in adapters.items() if params[param_id].requires_grad != ex["training"]]
    ctx.check(not wrong, f"{what}{_describe(ex)}: adapter parameters with requires_grad={not ex['training']}: "
                         f"{wrong[:4]}")


@prop("VLM-FREEZE-1", needs={"vlm"}, requires=("LORA-BWD-3",),
      strategy=lambda ctx: _examples(ctx))
def vlm_freezes_exactly_the_flagged_parts(ctx, backend, ex):
    """training=True: base parameters are frozen exactly in the flagged parts; the model trains."""
    (model,) = _models(ctx, backend, ex)
    model, _ = apply_quietly(backend, model, _config(ex), training=True)
    _check_base(ctx, backend, model, ex)


@prop("VLM-FREEZE-2", "LORA-INJ-2", needs={"vlm"}, requires=("LORA-INJ-2",),
      strategy=lambda ctx: _examples(ctx, training=(True, False)))
def vlm_adapters_stay_trainable(ctx, backend, ex):
    """Adapters inside frozen parts are trainable; training=False freezes everything (eval mode)."""
    (model,) = _models(ctx, backend, ex)
    model, _ = apply_quietly(backend, model, _config(ex), training=ex["training"])
    _check_adapters(ctx, backend, model, ex)
    if not ex["training"]:
        _check_base(ctx, backend, model, ex)


@prop("VLM-FREEZE-3", needs={"vlm"}, weight=0.5,
      requires=("LORA-INJ-2", "LORA-BWD-3"),
      strategy=lambda ctx: _examples(ctx, training=(True, False), chunks=(2,)))
def vlm_chunks_are_frozen_alike(ctx, backend, ex):
    """A list of chunks (two VLMs): each chunk is frozen and adapted the same way."""
    models = _models(ctx, backend, ex)
    models, _ = apply_quietly(backend, models, _config(ex), training=ex["training"])
    for index, chunk in enumerate(models):
        _check_base(ctx, backend, chunk, ex, f"chunk {index}: ")
        _check_adapters(ctx, backend, chunk, ex, f"chunk {index}: ")
