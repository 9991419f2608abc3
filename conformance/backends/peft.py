"""HF PEFT as a backend: PEFT's LoRA on plain nn.Linear bases, TP = 1.

    python -m conformance --backend conformance.backends.peft:PeftBackend \
        --deviations conformance/deviations/peft.txt

Our config maps to `peft.LoraConfig`: dim -> r, alpha -> lora_alpha, dropout -> lora_dropout,
target_modules / exclude_modules as given (PEFT matches a name by suffix, not by our wildcards),
and the init methods to `init_lora_weights` (PEFT has kaiming-uniform A with zero B, or Gaussian;
no xavier and no N(0, 0.2^2)). Adapters are injected in place with `peft.inject_adapter_in_model`, so
module names stay those of the model. PEFT has no tensor parallelism and no dropout position
(dropout is always applied to the adapter input). The differences are declared, with reasons, in
conformance/deviations/peft.txt.

Models: PEFT adapts nn.Linear, so `make_model("gpt")` is the suite's `make_plain_model`
(conformance/plain.py): TinyGPT at TP = 1 with nn.Linear layers under Megatron's names. PEFT has no
tensor parallelism: the backend inherits the suite's TP = 1 `init_parallel`, so TP-GROUP properties
are "not applicable" for it, not passed.
"""

from __future__ import annotations

import torch

from ..backend import import_optional
from ..plain import PlainBackend

ADAPTER = "default"


def _peft():
    return import_optional("peft", "peft", "the PEFT backend")


class PeftBackend(PlainBackend):
    name = "peft"
    capabilities = {"linear": True, "merge_model": True, "unmerge": True, "models": True, "disable_adapters": True,
                    "dropout_position": {"pre"},                # lora_dropout acts on the adapter input
                    "init_methods": {"A:kaiming", "B:zero"}}    # init_lora_weights=True (no xavier / N(0, 0.2^2))

    def describe(self) -> str:
        return f"HF PEFT {_peft().__version__} (LoRA on nn.Linear, TP=1), torch {torch.__version__}"

    def validate_config(self, config):
        peft = _peft()
        init_a, init_b = config.lora_A_init_method, config.lora_B_init_method
        # PEFT: True = kaiming-uniform A and zero B; "gaussian" = N(0, 1/r) A and zero B; False = random B.
        init = False if init_b != "zero" else ("gaussian" if init_a == "normal" else True)
        targets = list(config.target_modules) or "all-linear"
        return peft.LoraConfig(r=config.dim, lora_alpha=config.alpha, lora_dropout=config.dropout,
                               target_modules=targets, exclude_modules=list(config.exclude_modules) or None,
                               init_lora_weights=init, bias="none")

    def apply_lora(self, model, config, training=True):
        peft = _peft()
        chunks = list(model) if isinstance(model, (list, tuple)) else [model]
        for chunk in chunks:
            if not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in chunk.modules()):
                peft.inject_adapter_in_model(config, chunk, adapter_name=ADAPTER)
            for name, param in chunk.named_parameters():
                param.requires_grad_(training and "lora_" in name)
            chunk.train(training)
        return model

    def lora_modules(self, model):
        peft = _peft()
        return {name: m for name, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}

    def adapter_weights(self, wrapped):
        return wrapped.lora_A[ADAPTER].weight, wrapped.lora_B[ADAPTER].weight

    def base_weight(self, wrapped):
        return wrapped.get_base_layer().weight

    def merge_weight(self, base_weight, linear_out, linear_in, alpha, dim, *, tp_size, tp_group):
        raise NotImplementedError("PEFT has no tensor merge helper")

    def set_adapters_enabled(self, model, enabled):
        """PEFT's own switch on each LoRA layer (BaseTunerLayer.enable_adapters; it also sets the
        adapters' requires_grad: off while disabled, on again for the active adapter)."""
        for module in self.lora_modules(model).values():
            module.enable_adapters(enabled)

    def merge_in_place(self, model):
        """PEFT's own merge of each LoRA layer (the layer stays, merged)."""
        for module in self.lora_modules(model).values():
            module.merge(adapter_names=[ADAPTER])
        return model

    def unmerge_model(self, model):
        for module in self.lora_modules(model).values():
            module.unmerge()
        return model

    def merge_model(self, model):
        peft = _peft()
        for name, module in list(model.named_modules()):
            if isinstance(module, peft.tuners.lora.LoraLayer):
                module.merge(adapter_names=[ADAPTER])
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, module.get_base_layer())
        return model
