"""LoRALinear: a base linear layer and its adapter, y = base(x) + adapter(x)."""

from __future__ import annotations

import torch
from torch import nn

from ..merge import merge_lora_weight


class LoRALinear(nn.Module):
    """Wraps `to_wrap` (frozen) and `adapter`; keeps the base's calling convention.

    Parallel bases return (output, bias): the wrapper returns (output + adapter(x), bias), the bias
    passed through untouched (it is the base's, applied by the caller when skip_bias_add).
    nn.Linear returns a tensor: the wrapper returns a tensor. The adapter's output is cast to the
    base output's dtype before the add.

    merge_() folds (alpha/r) B A into the base weight (float32 arithmetic, cast back) and stops
    calling the adapter; unmerge_() subtracts it again.
    """

    is_lora_wrapper = True

    def __init__(self, to_wrap: nn.Module, adapter: nn.Module):
        super().__init__()
        self.to_wrap = to_wrap
        self.adapter = adapter
        self.merged = False

    def lora_adapters(self) -> list[nn.Module]:
        return [self.adapter]

    def forward(self, x: torch.Tensor, *args, **kwargs):
        base = self.to_wrap(x, *args, **kwargs)
        returns_tuple = isinstance(base, tuple)
        out, bias = base if returns_tuple else (base, None)
        if not self.merged:
            out = out + self.adapter(x).to(out.dtype)
        return (out, bias) if returns_tuple else out

    def _merged(self, sign: float) -> torch.Tensor:
        """This rank's shard of W + sign (alpha/r) B A (a collective under TP)."""
        return merge_lora_weight(self.to_wrap.weight, self.adapter, sign=sign)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """This rank's shard of W + (alpha/r) B A, in the base weight's dtype (a collective under TP)."""
        if self.merged:
            return self.to_wrap.weight.detach().clone()
        return self._merged(1.0)

    @torch.no_grad()
    def merge_(self) -> None:
        if not self.merged:
            self.to_wrap.weight.copy_(self._merged(1.0))
            self.merged = True

    @torch.no_grad()
    def unmerge_(self) -> None:
        if self.merged:
            self.to_wrap.weight.copy_(self._merged(-1.0))
            self.merged = False
