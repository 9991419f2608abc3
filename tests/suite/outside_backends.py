"""Backends shaped like libraries written outside this project, for tests of the suite's protocol.

Unlike tests/suite/mutant_backends.py (one bug each, to be caught on one clause), most of these are
*correct* backends that use the protocol the way an outside library does: they must pass, and a
failure would be the suite's own (its call order, its bookkeeping). The others check what a verdict
means: which passes the backend's code earned, partial support, and reports of several failure kinds.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn

import reference
from conformance.backend import Backend
from conformance.backends.reference import ReferenceBackend
from conformance.plain import make_plain_model

TP1 = {"linear": True, "models": True, "merge_model": True, "dropout_position": True, "init_methods": True}


class NewModelBackend(ReferenceBackend):
    """apply_lora leaves the model it is given alone and returns an adapted deep copy (chunks too)."""

    name = "outside:new-model"

    def apply_lora(self, model, config, training=True):
        copied = [_copy(chunk) for chunk in model] if isinstance(model, list) else _copy(model)
        return super().apply_lora(copied, config, training)


def _copy(module: nn.Module) -> nn.Module:
    """A deep copy that shares the process groups (they cannot be copied, and need not be)."""
    memo = {}

    def share_groups(value, depth=0):
        if isinstance(value, dist.ProcessGroup):
            memo[id(value)] = value
        elif depth < 4 and isinstance(value, (list, tuple, dict)):
            for item in (value.values() if isinstance(value, dict) else value):
                share_groups(item, depth + 1)
        elif depth < 4 and hasattr(value, "__dict__") and not isinstance(value, (torch.Tensor, nn.Module, type)):
            share_groups(vars(value), depth + 1)

    for m in module.modules():
        share_groups({k: v for k, v in vars(m).items() if k not in ("_parameters", "_buffers", "_modules")})
    return copy.deepcopy(module, memo)


class MergeOnEvalBackend(ReferenceBackend):
    """Like loralib with merge_weights=True, at TP = 1: eval() folds scale * B A into the base weight
    and turns the adapter off; train() takes it out again. Correct only if the suite writes adapter
    weights before it switches to eval (conformance/backend.py, "Lifecycle")."""

    name = "outside:merge-on-eval"
    is_reference = False                                 # an outside library
    capabilities = TP1

    def init_parallel(self, tp, ep=1, etp=None):
        return Backend.init_parallel(self, tp, ep, etp)

    def make_model(self, spec):
        return make_plain_model(spec)

    def apply_lora(self, model, config, training=True):
        model = super().apply_lora(model, config, training)
        for module in self.lora_modules(model).values():
            if not hasattr(module, "merged_on_eval"):
                module.merged_on_eval = False
                module.train = _merging_train(module)
            module.train(training)
        return model

    def merge_model(self, model):
        model.eval()                                     # merges every adapter
        for name, module in list(self.lora_modules(model).items()):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.to_wrap)
        return model


def _merging_train(module):
    plain_train = type(module).train

    def train(mode: bool = True):
        plain_train(module, mode)
        if mode == module.merged_on_eval:                # eval while unmerged, or train while merged
            A, B = module.adapter.linear_in.weight, module.adapter.linear_out.weight
            delta = module.adapter.scale * (B.double() @ A.double())
            with torch.no_grad():
                weight = module.to_wrap.weight
                weight.copy_((weight.double() + (-delta if mode else delta)).to(weight.dtype))
            reference.set_adapters_enabled(module, mode)
            module.merged_on_eval = not mode
        return module

    return train


# ---- what a verdict means ------------------------------------------------------------------------

class DefaultsBackend(ReferenceBackend):
    """The reference, but with the suite's default validate_config and TP = 1 init_parallel inherited,
    and the matching declared borrowed: those properties must be n/a, not passed."""

    name = "outside:defaults"
    is_reference = False                                 # an outside library
    capabilities = {"linear": True, "models": True}
    borrowed = {"matching": "reference.lora.matching (the library has none)"}
    validate_config = Backend.validate_config
    init_parallel = Backend.init_parallel

    def make_model(self, spec):
        return make_plain_model(spec)


class PreDropoutOnlyBackend(ReferenceBackend):
    """A TP = 1 library with input ("pre") dropout only: "post" is broken (it acts as "pre"), which
    is fine because it declares {"pre"}; the suite must check "pre" and never draw "post"."""

    name = "outside:pre-dropout-only"
    is_reference = False                                 # an outside library
    capabilities = {"linear": True, "dropout_position": {"pre"}}

    def init_parallel(self, tp, ep=1, etp=None):
        return Backend.init_parallel(self, tp, ep, etp)

    def apply_lora(self, model, config, training=True):
        model = super().apply_lora(model, config, training)
        for module in self.lora_modules(model).values():
            module.adapter.dropout_position = "pre"      # whatever was asked
        return model


class PreDropoutBrokenBackend(PreDropoutOnlyBackend):
    """The same library with its "pre" dropout broken (it drops the adapter's output instead)."""

    name = "outside:pre-dropout-broken"

    def apply_lora(self, model, config, training=True):
        model = ReferenceBackend.apply_lora(self, model, config, training)
        for module in self.lora_modules(model).values():
            module.adapter.dropout_position = "post"     # BUG: 'pre' was asked
        return model


class MergeTwoBugsBackend(ReferenceBackend):
    """merge_weight with two different bugs on bad shapes: a wrong input size raises RuntimeError
    (not ValueError), and a wrong rank or dim is silently accepted."""

    name = "outside:merge-two-bugs"

    def merge_weight(self, base_weight, linear_out, linear_in, alpha, dim, *, tp_size, tp_group):
        if linear_in.shape[1] != base_weight.shape[1]:
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
        if linear_out.shape[1] != linear_in.shape[0] or dim not in (linear_in.shape[0], linear_in.shape[0] * tp_size):
            return base_weight.clone()                   # BUG: accepted without a word
        return super().merge_weight(base_weight, linear_out, linear_in, alpha, dim, tp_size=tp_size, tp_group=tp_group)


class BadCapabilityBackend(ReferenceBackend):
    """Declares a dropout position that does not exist."""

    capabilities = {"linear": True, "dropout_position": {"middle"}}


class BadBorrowedBackend(ReferenceBackend):
    """Declares a borrowed part that is neither a protocol method nor an aspect."""

    borrowed = {"name_matching": "typo of 'matching'"}
