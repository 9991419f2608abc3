"""Microsoft's loralib as a backend: `loralib.Linear` in place of the model's nn.Linear layers, TP = 1.

    pip install loralib      # or the extra: pip install "tp-lora-reference[loralib]"
    python -m conformance --backend conformance.backends.loralib:LoralibBackend --deviations loralib

loralib has layers, not an injector: a model is written with `lora.Linear` from the start. So that
the suite can check those layers, `apply_lora` replaces each nn.Linear the config selects by a
`lora.Linear` holding the same weights (r = dim, lora_alpha = alpha, lora_dropout = dropout,
merge_weights=True, loralib's default), then freezes with `lora.mark_only_lora_as_trainable`. The
selection uses the reference's name matching and the replacement is this file's glue: both are
declared in `borrowed`, so the matching and injection properties are "not applicable", never passed.
What is loralib's own and checked: the forward and backward of `lora.Linear`, its init (kaiming-uniform
A, zero B), its dropout (on the input: "pre" only), freezing, and its merge on `eval()`.
"""

from __future__ import annotations

from torch import nn

from reference.lora.matching import match

from ..backend import import_optional
from ..plain import PlainBackend


def _loralib():
    return import_optional("loralib", "loralib", "the loralib backend")


class LoralibBackend(PlainBackend):
    name = "loralib"
    capabilities = {"linear": True, "models": True, "merge_model": True, "unmerge": True,
                    "dropout_position": {"pre"},                  # lora_dropout acts on the input
                    "init_methods": {"A:kaiming", "B:zero"}}      # reset_parameters: kaiming-uniform A, zero B
    borrowed = {"matching": "reference.lora.matching.match (loralib has no name matching)",
                "injection": "this backend's glue replaces nn.Linear by lora.Linear (loralib has no injection)"}

    def describe(self) -> str:
        return f"loralib {getattr(_loralib(), '__version__', '0.1.x')} (lora.Linear, TP=1)"

    def apply_lora(self, model, config, training=True):
        lora = _loralib()
        if config.dropout_position != "pre":
            raise NotImplementedError("loralib applies lora_dropout to the layer input only ('pre')")
        for chunk in model if isinstance(model, (list, tuple)) else [model]:
            for name, module in list(chunk.named_modules()):
                if name and type(module) is nn.Linear and match(config, module, name.rsplit(".", 1)[-1], name.rpartition(".")[0]):
                    self._replace(chunk, name, module, config, lora)
            lora.mark_only_lora_as_trainable(chunk)
            if not training:
                for param in chunk.parameters():
                    param.requires_grad_(False)
            chunk.train(training)
        return model

    @staticmethod
    def _replace(chunk, name, linear, config, lora):
        wrapped = lora.Linear(linear.in_features, linear.out_features, r=config.dim, lora_alpha=config.alpha,
                              lora_dropout=config.dropout, bias=linear.bias is not None,
                              dtype=linear.weight.dtype, device=linear.weight.device)
        wrapped.weight.data.copy_(linear.weight.data)        # reset_parameters drew new base weights
        if linear.bias is not None:
            wrapped.bias.data.copy_(linear.bias.data)
        parent, _, child = name.rpartition(".")
        setattr(chunk.get_submodule(parent) if parent else chunk, child, wrapped)

    def lora_modules(self, model):
        return {name: m for name, m in model.named_modules() if isinstance(m, _loralib().Linear)}

    def adapter_weights(self, wrapped):
        return wrapped.lora_A, wrapped.lora_B

    def base_weight(self, wrapped):
        return wrapped.weight

    def merge_in_place(self, model):
        """loralib merges a layer when it is switched to eval mode, and unmerges it in train mode."""
        for module in self.lora_modules(model).values():
            module.train(False)
        return model

    def unmerge_model(self, model):
        for module in self.lora_modules(model).values():
            module.train(True)
        return model

    def merge_model(self, model):
        """loralib merges on eval() (merge_weights=True); the merged layers then become nn.Linear."""
        model.eval()
        for name, module in list(self.lora_modules(model).items()):
            merged = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                               dtype=module.weight.dtype, device=module.weight.device)
            merged.load_state_dict({k: v for k, v in module.state_dict().items() if not k.startswith("lora_")})
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, merged)
        return model
