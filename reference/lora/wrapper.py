"""LoRALinear: a base linear layer and its adapter, y = base(x) + adapter(x).

LoRALinear follows the wrapper protocol (reference/lora/protocol.py): `is_lora_wrapper`, `to_wrap`,
`merged`, `adapters_enabled`, `lora_adapters()`, `merge_()`, `unmerge_()`, `check_mergeable()`,
`enable_adapters()`, `disable_adapters()`; apply_lora, merge_lora, set_adapters_enabled and
finalize_lora_grads use nothing else. Its state dict has the base's keys unchanged beside `adapter.linear_in|linear_out.weight`
(reference/lora/checkpoint.py), so a base checkpoint loads into the adapted model.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers import ColumnParallelLinear, RowParallelLinear
from ..merge import merge_lora_weight
from .checkpoint import keep_base_keys


class LoRALinear(nn.Module):
    """Wraps `to_wrap` (frozen) and `adapter`; keeps the base's calling convention.

    Parallel bases return (output, bias): the wrapper returns (output + adapter(x), bias), the bias
    passed through untouched (it is the base's, applied by the caller when skip_bias_add).
    nn.Linear returns a tensor: the wrapper returns a tensor. The adapter's output is cast to the
    base output's dtype before the add.

    merge_() folds (alpha/r) B A into the base weight (float32 arithmetic, cast back) and stops
    calling the adapter; unmerge_() subtracts it again. disable_adapters() makes forward return
    exactly the base's output (the adapter is not called: no dropout, no collective, no gradient);
    enable_adapters() undoes it. A merged wrapper cannot be disabled, nor a disabled one merged: the
    base weight would hold the update.

    The state dict has the base's keys as the unwrapped base has them, and the adapter's under
    `adapter.`; a base checkpoint loads into it (reference/lora/checkpoint.py).

    Args:
        to_wrap (nn.Module): the base layer: ColumnParallelLinear, RowParallelLinear or nn.Linear.
        adapter (nn.Module): its ParallelLinearAdapter, built from the base's layout (build_adapter).
        share_communication (bool): let base and adapter share one set of collectives when they can
            (see shares_communication); False: each communicates on its own, as Megatron-Bridge
            does (the same math, more communication). Default: True.
    """

    is_lora_wrapper = True

    def __init__(self, to_wrap: nn.Module, adapter: nn.Module, share_communication: bool = True):
        super().__init__()
        self.to_wrap = to_wrap
        self.adapter = adapter
        self.merged = False
        self.adapters_enabled = True
        self.share_communication = share_communication
        keep_base_keys(self)

    @property
    def bias(self) -> torch.Tensor | None:
        """The base's bias (`to_wrap.bias`, None if it has none); read-only."""
        return getattr(self.to_wrap, "bias", None)

    def lora_adapters(self) -> list[nn.Module]:
        return [self.adapter]

    def calls_adapters(self) -> bool:
        """Whether forward calls the adapters: enabled and not merged."""
        return self.adapters_enabled and not self.merged

    def enable_adapters(self) -> None:
        """Call the adapters again in forward (a no-op if they are enabled)."""
        self.adapters_enabled = True

    def disable_adapters(self) -> None:
        """Make forward return exactly the base's output, without calling the adapters.

        Raises:
            RuntimeError: the wrapper is merged (its base weight holds the update: unmerge first).
        """
        if self.merged:
            raise RuntimeError("cannot disable the adapters of a merged LoRA wrapper: its base weight holds "
                               "the update; unmerge it first (unmerge_lora)")
        self.adapters_enabled = False

    # Megatron-Bridge's names for the same switches.
    enable_adapter_layers, disable_adapter_layers = enable_adapters, disable_adapters

    def forward(self, x: torch.Tensor, *args, **kwargs):
        """x: the base's input, e.g. (s, b, in) or a shard of it; returns what the base returns."""
        if not self.calls_adapters():
            return self.to_wrap(x, *args, **kwargs)
        if self.shares_communication():
            return self._forward_sharing_communication(x)
        base = self.to_wrap(x, *args, **kwargs)
        returns_tuple = isinstance(base, tuple)
        out, bias = base if returns_tuple else (base, None)
        out = out + self.adapter(x).to(out.dtype)
        return (out, bias) if returns_tuple else out

    def shares_communication(self) -> bool:
        """Whether base and adapter can share one set of collectives: a reference parallel base (it
        exposes prepare_input / local_output / finish_output) that communicates (TP > 1, not an
        expert), and an adapter built for a base of the same kind."""
        base = self.to_wrap
        if not self.share_communication or not self.calls_adapters():
            return False
        if not isinstance(base, (ColumnParallelLinear, RowParallelLinear)):
            return False
        layout = base.layout
        return (layout.tp_size > 1 and not layout.explicit_expert_comm
                and getattr(self.adapter, "base_kind", None) == layout.kind)

    def _forward_sharing_communication(self, x: torch.Tensor):
        """base(x) + adapter(x) with the base's collectives done once for both (same math as forward).

        Done separately, the base and the adapter each all-reduce the input gradient (or gather the
        sequence, under SP) of a column layer, and a row layer's base all-reduces its output while the
        adapter all-gathers its own: two activation-sized collectives where one suffices. Here:
          column: x is prepared once (copy / SP gather); y_r = x W_rᵀ + b_r + Δ_r, gathered if asked.
          row:    partial_r = x_r W_rᵀ with this rank's hidden shard of Δ = s·B h added into its
                  columns; one all-reduce (or SP reduce-scatter) sums the base partials and places
                  every shard of Δ. The adapter's own collectives are then only its rank-sized ones.
        """
        base, adapter, local_input = self.to_wrap, self.adapter, x
        x = base.prepare_input(x)                                              # column (s, b, in); row (s, b, in/t)
        local = base.local_output(x)                                           # (s, b, out/t) or partial (s, b, out)
        # local_input: the sequence shard an adapter that re-gathers its input keeps ([LORA-FWD-10]).
        delta = adapter(x, caller_communicates=True, local_input=local_input).to(local.dtype)   # (s, b, out/t)
        if base.layout.kind == "column":
            local = local + delta
        else:
            width = delta.shape[-1]
            # `local` is this matmul's fresh output, not saved for backward: adding in place is safe.
            local[..., base.tp_rank * width:(base.tp_rank + 1) * width] += delta
        return base.finish_output(local)

    def _merged(self, sign: float) -> torch.Tensor:
        """This rank's shard of W + sign (alpha/r) B A (a collective under TP)."""
        return merge_lora_weight(self.to_wrap.weight, self.adapter, sign=sign)

    def check_mergeable(self) -> None:
        """Raise, before any collective, when merge_() cannot fold the update into the base weight.

        Raises:
            RuntimeError: the adapters are disabled (merging would put the update back into forward).
            ValueError: an adapter has a non-identity activation (B act(A x) is no matrix).
        """
        if not self.adapters_enabled:
            raise RuntimeError("cannot merge a LoRA wrapper whose adapters are disabled: enable them first")
        self._check_linear()

    def _check_linear(self) -> None:
        for adapter in self.lora_adapters():
            if not isinstance(getattr(adapter, "activation", None), (nn.Identity, type(None))):
                raise ValueError(f"cannot merge the adapter of {adapter.base_name}: its activation "
                                 f"({adapter.activation}) is not identity, so B act(A x) is not linear in x")

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """This rank's shard of W + (alpha/r) B A, in the base weight's dtype (a collective under TP)."""
        if self.merged:
            return self.to_wrap.weight.detach().clone()
        self._check_linear()
        return self._merged(1.0)

    @torch.no_grad()
    def merge_(self) -> None:
        """Fold the update into the base weight (a collective under TP) and stop calling the adapter.
        Raises as check_mergeable says."""
        if not self.merged:
            self.check_mergeable()
            self.to_wrap.weight.copy_(self._merged(1.0))
            self.merged = True

    @torch.no_grad()
    def unmerge_(self) -> None:
        """Subtract the update from the base weight again (up to rounding) and call the adapter again."""
        if self.merged:
            self.to_wrap.weight.copy_(self._merged(-1.0))
            self.merged = False


__all__ = ["LoRALinear"]
