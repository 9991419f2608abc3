"""SPEC sections 2 and 12: the LoRA configuration, its validation, and errors raised before any collective."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from ..context import DTYPES, check_group_in_step, raises_everywhere
from ..layer_case import NAMES, build_base, lora_config, plain_example
from ..backend import RawLoRAConfig
from ..registry import prop

DEFAULTS = {
    "target_modules": ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"],
    "exclude_modules": [],
    "dim": 32,
    "alpha": 32,
    "dropout": 0.0,
    "dropout_position": "pre",
    "a2a_experimental": False,
    "lora_A_init_method": "xavier",
    "lora_B_init_method": "zero",
    "lora_dtype": None,
    "normalize_moe_lora": False,
    "share_expert_adapters": True,
}

# Valid non-default values per field, and the capability a backend needs to accept them.
CHOICES = {
    "target_modules": (None, [["linear_qkv"], ["linear_fc1", "linear_fc2"], ["*.layers.0.*"]]),
    "dim": (None, [1, 8, 64]),
    "alpha": (None, [1, 0.5, 16]),
    "dropout": (None, [0.1, 0.5]),
    "dropout_position": ("dropout_position", ["post"]),
    "a2a_experimental": ("a2a", [True]),
    "lora_A_init_method": ("init_methods", ["kaiming", "normal", "zero"]),
    "lora_B_init_method": ("init_methods", ["xavier", "kaiming", "normal"]),
    "lora_dtype": ("lora_dtype", ["bfloat16", "float16", "float32"]),
    "normalize_moe_lora": ("moe", [True]),
    "share_expert_adapters": ("moe", [False]),
}


def _override_examples():
    return st.fixed_dictionaries({}, optional={field: st.sampled_from(values)
                                               for field, (_, values) in CHOICES.items()})


def _same(got, want) -> bool:
    if isinstance(want, bool) or want is None:
        return got is want
    return got == want and not isinstance(got, bool)


@prop("LORA-CFG-1", strategy=lambda ctx: _override_examples())
def config_has_the_spec_fields_and_defaults(ctx, backend, overrides):
    """The config the backend builds (validate_config(LoRA(**overrides))) has Megatron-Bridge's
    fields: the overridden values as given, every other field at its SPEC default."""
    import reference

    overrides = {field: value for field, value in overrides.items()
                 if CHOICES[field][0] is None or CHOICES[field][0] in backend.capabilities}
    given = dict(overrides)
    if "lora_dtype" in given:
        given["lora_dtype"] = DTYPES[given["lora_dtype"]]
    config = backend.validate_config(reference.LoRA(**given))
    present = [field for field in DEFAULTS if hasattr(config, field)]
    ctx.check(present, f"validate_config returned a {type(config).__name__} with none of LoRA's fields")
    for field in present:
        want = given.get(field, DEFAULTS[field])
        got = getattr(config, field)
        if isinstance(want, list):
            got = list(got) if isinstance(got, (list, tuple)) else got
        ctx.check(_same(got, want),
                  f"config field {field} is {got!r}, expected {want!r}"
                  + ("" if field in given else " (the SPEC default)") + f"; overrides {overrides}")


# (field, bad value, exception types allowed): SPEC [LORA-CFG-2].
BAD_VALUES = [
    ("dim", 0, (ValueError,)), ("dim", -4, (ValueError,)), ("dim", 2.5, (ValueError, TypeError)),
    ("dim", "8", (ValueError, TypeError)),
    ("alpha", 0, (ValueError,)), ("alpha", -1.0, (ValueError,)), ("alpha", "32", (ValueError, TypeError)),
    ("dropout", -0.1, (ValueError,)), ("dropout", 1.0, (ValueError,)), ("dropout", 1.5, (ValueError,)),
    ("dropout_position", "middle", (ValueError,)), ("dropout_position", None, (ValueError, TypeError)),
    ("lora_A_init_method", "uniform", (ValueError,)), ("lora_A_init_method", None, (ValueError, TypeError)),
    ("lora_B_init_method", "ones", (ValueError,)),
    ("lora_dtype", torch.int32, (ValueError, TypeError)), ("lora_dtype", "bfloat16", (ValueError, TypeError)),
    ("target_modules", "linear_qkv", (TypeError,)), ("target_modules", [3], (TypeError,)),
    ("target_modules", [""], (ValueError, TypeError)), ("exclude_modules", [None], (TypeError,)),
    ("a2a_experimental", 1, (TypeError,)), ("normalize_moe_lora", "yes", (TypeError,)),
    ("share_expert_adapters", None, (TypeError,)),
]


@prop("LORA-CFG-2", needs={"config_validation"}, weight=2,
      strategy=lambda ctx: st.sampled_from([{"case": i, "field": f, "value": repr(v)}
                                            for i, (f, v, _) in enumerate(BAD_VALUES)]))
def bad_config_values_raise_naming_the_field(ctx, backend, ex):
    """Each bad value raises (ValueError, or TypeError for patterns and flags of the wrong type) when
    the config is built or validated, with a message naming the field."""
    field, value, errors = BAD_VALUES[ex["case"]]
    fields = {field: value}
    if field == "exclude_modules":
        fields["target_modules"] = []   # exclude mode, so that only the bad value is wrong
    try:
        backend.validate_config(RawLoRAConfig(**fields))
    except (ValueError, TypeError) as error:
        ctx.check(isinstance(error, errors),
                  f"LoRA({field}={value!r}) raised {type(error).__name__}, expected "
                  f"{' or '.join(e.__name__ for e in errors)}: {error}")
        ctx.check(field in str(error), f"LoRA({field}={value!r}): the message does not name {field}: {error}")
    else:
        raise AssertionError(f"LoRA({field}={value!r}) was accepted (by the constructor and validate_config)")


@prop("LORA-CFG-3", needs={"config_validation"},
      strategy=lambda ctx: st.tuples(st.lists(st.sampled_from([*NAMES.values(), "*.layers.1.*"]), max_size=2),
                                     st.lists(st.sampled_from(["linear_fc2", "output_layer", "*.mlp.*"]),
                                              max_size=2)))
def target_and_exclude_are_exclusive(ctx, backend, drawn):
    """Non-empty target_modules and exclude_modules together raise a ValueError at construction;
    either alone (exclude mode: target_modules=[]) is accepted."""
    target, exclude = drawn
    def build():
        return backend.validate_config(RawLoRAConfig(target_modules=target, exclude_modules=exclude))

    if target and exclude:
        try:
            build()
        except ValueError as error:
            ctx.check("target_modules" in str(error) or "exclude_modules" in str(error),
                      f"both target_modules and exclude_modules: the message names neither: {error}")
        else:
            raise AssertionError(f"LoRA(target_modules={target}, exclude_modules={exclude}) was accepted")
    else:
        config = build()
        for field, value in (("target_modules", target), ("exclude_modules", exclude)):
            if hasattr(config, field):
                ctx.check(list(getattr(config, field)) == value,
                          f"LoRA(target_modules={target}, exclude_modules={exclude}): {field} became "
                          f"{getattr(config, field)!r}")


@st.composite
def _error_examples(draw, ctx):
    t = draw(st.sampled_from([t for t in ctx.tp_sizes if t > 1]))
    case = draw(st.sampled_from(["column_dim", "row_out", "config"]))
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
        raises_everywhere(ctx, lambda: backend.validate_config(lora_config(ex, name, dim=-ex["dim"])),
                          (ValueError,), f"a LoRA config with dim={-ex['dim']}", mentions=("dim",))
    else:
        config = backend.validate_config(lora_config(ex, name))
        what = (f"LoRA dim={ex['dim']} on a column base at tp={t}" if case == "column_dim"
                else f"LoRA on a row base with out={ex['out']} at tp={t}")
        raises_everywhere(ctx, lambda: backend.apply_lora(base.container, config, training=True), (ValueError,),
                          what, mentions=(name,))
    check_group_in_step(ctx, base.groups.tp_group, t)
