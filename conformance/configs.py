"""The LoRA configs the suite hands to backends, built in one place.

SPEC [LORA-CFG-1] fixes the fields and their defaults (`SPEC_DEFAULTS`, written here from SPEC.md,
never read from the reference). A backend receives one of two kinds of config in
`Backend.validate_config`:

- a `reference.LoRA` (or `reference.VLMLoRA`): valid values, checked when it was built; every
  property that is not about validation uses these (`lora`, `vlm_lora`, `layer_lora`);
- a `RawLoRAConfig`: the same fields and defaults, nothing checked, so that the config properties
  ([LORA-CFG-2], [LORA-CFG-3]) measure the backend's own validation and not the reference's.
"""

from __future__ import annotations

import dataclasses

from reference import VLMLoRA
from reference.lora import LoRA, LoRAConfig

SPEC_DEFAULTS = {
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
    "sequence_parallel_input_regather": False,
    "experts_shared_outer_loras": False,
}


def lora(**fields) -> LoRA:
    """A valid LoRA config: SPEC's defaults with `fields` on top."""
    return LoRA(**fields)


def vlm_lora(**fields) -> VLMLoRA:
    """A valid VLMLoRA config (SPEC [VLM-FREEZE-1]): SPEC's defaults and the freeze flags in `fields`."""
    return VLMLoRA(**fields)


def layer_lora(ex: dict, name: str, **overrides) -> LoRA:
    """The config of a layer example (conformance/layer_case.py): its module `name` targeted, with the
    example's dim, alpha, dropout and a2a; `overrides` on top."""
    fields = dict(target_modules=[name], dim=ex["dim"], alpha=ex["alpha"], dropout=ex.get("dropout", 0.0),
                  dropout_position=ex.get("dropout_position", "pre"), a2a_experimental=ex.get("a2a", False))
    fields.update(overrides)
    return lora(**fields)


def _unvalidated(config_cls, name: str):
    """A dataclass with config_cls's fields and defaults but none of its validation."""
    fields = []
    for f in dataclasses.fields(config_cls):
        default = (dataclasses.field(default_factory=f.default_factory) if f.default is dataclasses.MISSING
                   else dataclasses.field(default=f.default))
        fields.append((f.name, object, default))
    return dataclasses.make_dataclass(name, fields, namespace={"as_dict": lambda self: dict(vars(self))})


# LoRA's fields as given, not validated (see the module docstring).
RawLoRAConfig = _unvalidated(LoRAConfig, "RawLoRAConfig")
