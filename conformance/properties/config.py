"""SPEC section 2: the LoRA configuration and its validation."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from ..configs import SPEC_DEFAULTS, RawLoRAConfig, lora
from ..layer_case import NAMES
from ..layout import DTYPES
from ..registry import each_of, prop, with_explicit

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
    "sequence_parallel_input_regather": ("sp_input_regather", [True]),
    "experts_shared_outer_loras": ("shared_outer_loras", [True]),
}


def _supported(ctx, field: str, value) -> bool:
    """Whether the backend declares support for `value` of config field `field` (CHOICES)."""
    capability = CHOICES[field][0]
    if capability is None:
        return True
    if capability == "init_methods":
        return ctx.supports(capability, f"{field[5]}:{value}")          # lora_A_... -> "A:<method>"
    if capability == "dropout_position":
        return ctx.supports(capability, value)
    return ctx.supports(capability)


def _override_examples(ctx):
    """Overrides of the supported values only, so that the example shown is the config that was built."""
    choices = {field: [v for v in values if _supported(ctx, field, v)] for field, (_, values) in CHOICES.items()}
    every_field = {field: values[-1] for field, values in choices.items() if values}
    return with_explicit(st.fixed_dictionaries({}, optional={field: st.sampled_from(values)
                                                             for field, values in choices.items() if values}),
                         [{}, every_field])     # always: every default, and every field overridden


def _same(got, want) -> bool:
    if isinstance(want, bool) or want is None:
        return got is want
    return got == want and not isinstance(got, bool)


@prop("LORA-CFG-1", strategy=_override_examples)
def config_has_the_spec_fields_and_defaults(ctx, backend, overrides):
    """The config the backend builds (validate_config(LoRA(**overrides))) has Megatron-Bridge's
    fields: the overridden values as given, every other field at its SPEC default."""
    given = dict(overrides)
    if "lora_dtype" in given:
        given["lora_dtype"] = DTYPES[given["lora_dtype"]]
    config = backend.validate_config(lora(**given))
    present = [field for field in SPEC_DEFAULTS if hasattr(config, field)]
    ctx.check(present, f"validate_config returned a {type(config).__name__} with none of LoRA's fields")
    for field in present:
        want = given.get(field, SPEC_DEFAULTS[field])
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
    ("share_expert_adapters", None, (TypeError,)), ("sequence_parallel_input_regather", 1, (TypeError,)),
    ("experts_shared_outer_loras", "yes", (TypeError,)),
]


def _bad_value_examples(ctx):
    """Always run: every bad value of a field the backend validates."""
    cases = [{"case": i, "field": f, "value": repr(v)} for i, (f, v, _) in enumerate(BAD_VALUES)
             if ctx.supports("config_validation", f)]
    return each_of(cases)


@prop("LORA-CFG-2", needs={"config_validation"}, weight=2,
      strategy=lambda ctx: _bad_value_examples(ctx))
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
      strategy=lambda ctx: with_explicit(
          st.tuples(st.lists(st.sampled_from([*NAMES.values(), "*.layers.1.*"]), max_size=2),
                    st.lists(st.sampled_from(["linear_fc2", "output_layer", "*.mlp.*"]), max_size=2)),
          [([], []), (["linear_qkv"], []), ([], ["*.mlp.*"]), (["linear_qkv"], ["linear_fc2"])]))
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
