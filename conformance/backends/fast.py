"""The fast path (reference/fast) as a backend: the reference's model, with FastLoRALinear wrappers.

    python -m conformance --backend conformance.backends.fast:FastBackend

apply_lora applies the reference's LoRA, then swaps every LoRALinear for a FastLoRALinear over the
same base and adapter (reference.fast.use_fast_wrappers). What is the fast path's own, and so
judged: the forward and backward of an adapted layer and of an adapted model, SP, a2a, gather_output,
skip_bias_add, "pre" dropout, lora_dtype, the collectives it runs. Everything else is the reference's
code unchanged and is declared in `borrowed` (those properties are "not applicable", never passed):
the base layers and groups, the model, config validation, matching, injection, freezing, the
adapters' init and size checks, merge and enable / disable (inherited from LoRALinear). The cases
where FastLoRALinear takes the reference's forward are not claimed: "post" dropout and
sequence_parallel_input_regather are left out of the capabilities, and so are MoE and VLM models
(their expert and router adapters are the reference's).

`strict = True` (FastStrictBackend) makes a call that would take the reference's forward an error,
so that a run with it shows every verdict was earned by the fused step.
"""

from __future__ import annotations

from reference.fast import use_fast_wrappers

from .reference import ReferenceBackend

_REFERENCE = "the reference's code, unchanged (the fast path is the LoRA layer's forward and backward)"


class FastBackend(ReferenceBackend):
    name = "fast"
    is_reference = False            # judged like any other backend: borrowed parts are "not applicable"
    strict = False
    capabilities = {"tp": True, "sp": True, "a2a": True, "linear": True, "skip_bias_add": True,
                    "dropout_position": {"pre"}, "init_methods": True, "lora_dtype": True, "merge": True,
                    "merge_model": True, "unmerge": True, "models": True, "config_validation": True,
                    "relayout": True, "disable_adapters": True}
    borrowed = {name: f"{where}: {_REFERENCE}" for name, where in {
        "init_parallel": "reference.parallel", "make_linear": "reference.layers", "make_model": "reference.models",
        "validate_config": "reference.LoRA", "matching": "reference.lora.matching",
        "injection": "reference.lora.transform", "freezing": "reference.lora.transform",
        "init": "reference.lora.adapter", "build_checks": "reference.lora.build",
        "merge_weight": "reference.merge", "merge_model": "reference.lora.transform.merge_lora",
        "merge_in_place": "reference.lora.transform.merge_lora", "unmerge_model": "reference.lora.transform",
        "set_adapters_enabled": "reference.lora.transform"}.items()}

    def describe(self) -> str:
        return super().describe().replace("reference (this repository)", "fast path (reference/fast)")

    def apply_lora(self, model, config, training=True):
        model = super().apply_lora(model, config, training)
        use_fast_wrappers(model, strict=self.strict)
        return model


class FastStrictBackend(FastBackend):
    """The fast path with its fallback to the reference's forward turned into an error."""

    name = "fast-strict"
    strict = True
