"""The Automodel (DTensor) backend with one change each: tests of the layout-neutral path.

Importable without nemo-automodel (conformance.backends.automodel imports it when first used).
- `ColumnAReplicatedBackend`: shards differently, computes correctly. After apply_lora the column
  adapters' A is replicated (every rank holds all of it, where SPEC gives each rank d/t rows); the
  update is the same, so every forward and backward is still right. Only [LORA-FWD-2] may fail, now
  for column bases too.
- `RowPartialNotReducedBackend`: shards differently and computes wrongly. The row adapter's A x is a
  partial sum per rank (Partial); the mutant relabels it Replicate without the all-reduce, so each rank
  applies B to its own partial sum. The math clauses fail ([LORA-FWD-1]; what builds on it is "not
  checked").
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from conformance.backends.automodel import STYLE, AutomodelBackend


def _tp_lora_modules(backend, model, style_type):
    """The LoRA modules of `model` (one module or a list of chunks) parallelized with `style_type`."""
    for chunk in model if isinstance(model, list) else [model]:
        for module in backend.lora_modules(chunk).values():
            style = getattr(module, STYLE, (None, None, None))[1]
            if isinstance(style, style_type) and isinstance(module.lora_B.weight, DTensor):
                yield module


class ColumnAReplicatedBackend(AutomodelBackend):
    """Column adapters' A replicated on every rank instead of sharded by rows; the math unchanged."""

    def apply_lora(self, model, config, training=True):
        model = super().apply_lora(model, config, training)
        for module in _tp_lora_modules(self, model, ColwiseParallel):
            A = module.lora_A.weight
            module.lora_A.weight = nn.Parameter(A.detach().redistribute(A.device_mesh, [Replicate()]),
                                                requires_grad=A.requires_grad)
        return model


def _relabel_partial_as_replicate(_module, _args, output):
    if isinstance(output, DTensor) and any(isinstance(p, Partial) for p in output.placements):
        # BUG: each rank's partial sum A_r x_r is taken as the whole A x (no all-reduce).
        return DTensor.from_local(output.to_local(), output.device_mesh, [Replicate()], run_check=False)
    return output


class RowPartialNotReducedBackend(AutomodelBackend):
    """The row adapter skips the reduction of A x: B is applied to each rank's partial sum."""

    def apply_lora(self, model, config, training=True):
        model = super().apply_lora(model, config, training)
        for module in _tp_lora_modules(self, model, RowwiseParallel):
            module.lora_A.register_forward_hook(_relabel_partial_as_replicate)
        return model
