"""A fast path for LoRA layers: the same math as the reference, fused and overlapped.

Not part of the specification (that is the rest of `reference/`): this package is one more
implementation, trusted only because the conformance suite passes it as a backend of its own
(conformance/backends/fast.py, docs/reports/fast_*.json). Use it on a model adapted by the reference:

    model = reference.LoRA(target_modules=["linear_qkv", "linear_fc1"])(model)
    use_fast_wrappers(model)            # every LoRALinear -> FastLoRALinear, same parameters

fused.py is the autograd function (base GEMM + adapter, rank-sized collectives overlapped with the
base GEMMs, update and input-gradient adds fused into the GEMMs); wrapper.py decides, per call,
whether the fused step applies, and otherwise runs the reference's forward.
"""

from .fused import FusedLoRALinear, Plan, fused_lora_linear
from .wrapper import FastLoRALinear, use_fast_wrappers

__all__ = ["FusedLoRALinear", "Plan", "fused_lora_linear", "FastLoRALinear", "use_fast_wrappers"]
