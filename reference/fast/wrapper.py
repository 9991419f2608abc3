"""FastLoRALinear: LoRALinear whose forward is the fused step of reference/fast/fused.py.

Same parameters, state dict, merge / unmerge / enable / disable (inherited): only forward changes,
and only where the fused step computes what the reference computes. Everything else takes the
reference's forward (reference/lora/wrapper.py), which is the specification:

    fused                                    the reference's forward
    ColumnParallelLinear, RowParallelLinear  explicit_expert_comm bases (MoE experts), other bases
    nn.Linear (t = 1)                        an adapter activation other than identity
    TP, SP, a2a_experimental, gather_output, "post" dropout with p > 0 in train mode
      input_is_parallel=False, skip_bias_add sequence_parallel_input_regather (A keeps the shard)
    "pre" dropout, lora_dtype, eval mode     autocast, extra forward arguments, merged / disabled

(a2a_experimental changes nothing here: the update is added to the base's partial output before
its one reduce-scatter, as the reference does when base and adapter share their communication.)
`fused_calls` / `reference_calls` count which forward ran, for tests and benchmarks; with
`strict = True` a forward that would take the reference's (while the adapter is called) raises.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers import ColumnParallelLinear, RowParallelLinear
from ..lora.adapter import ParallelLinearAdapter
from ..lora.transform import model_chunks, replace_children
from ..lora.wrapper import LoRALinear
from .fused import Plan, fused_lora_linear


class FastLoRALinear(LoRALinear):
    """A LoRALinear (same arguments) whose forward fuses base and adapter where it can.

    Args:
        to_wrap (nn.Module): the base layer: ColumnParallelLinear, RowParallelLinear or nn.Linear.
        adapter (nn.Module): its ParallelLinearAdapter.
        share_communication (bool): as LoRALinear's; the fused step always shares. Default: True.
    """

    def __init__(self, to_wrap: nn.Module, adapter: nn.Module, share_communication: bool = True):
        super().__init__(to_wrap, adapter, share_communication)
        self.fused_calls = 0
        self.reference_calls = 0
        self.strict = False

    @classmethod
    def from_wrapper(cls, wrapper: LoRALinear) -> "FastLoRALinear":
        """A FastLoRALinear over the same base and adapter (no copy), in the same state."""
        fast = cls(wrapper.to_wrap, wrapper.adapter, wrapper.share_communication)
        fast.merged, fast.adapters_enabled = wrapper.merged, wrapper.adapters_enabled
        fast.train(wrapper.training)
        return fast

    def fusable(self, x: torch.Tensor, args: tuple, kwargs: dict) -> bool:
        """Whether the fused step computes this forward exactly as the reference would."""
        base, adapter = self.to_wrap, self.adapter
        if args or kwargs or not self.calls_adapters() or not isinstance(x, torch.Tensor):
            return False
        if torch.is_autocast_enabled(x.device.type) or type(adapter) is not ParallelLinearAdapter:
            return False
        if not isinstance(adapter.activation, nn.Identity) or adapter.regather_eligible:
            return False
        if adapter.dropout_position == "post" and adapter.dropout.training and isinstance(adapter.dropout, nn.Dropout):
            return False
        if isinstance(base, (ColumnParallelLinear, RowParallelLinear)):
            return base.layout.kind == adapter.base_kind and not base.layout.explicit_expert_comm
        return type(base) is nn.Linear and adapter.base_kind == "none" and x.dtype == base.weight.dtype

    def forward(self, x: torch.Tensor, *args, **kwargs):
        """x: the base's input; returns what the base returns (see LoRALinear.forward)."""
        if not self.fusable(x, args, kwargs):
            if self.strict and self.calls_adapters():
                raise NotImplementedError(f"{self.adapter.base_name}: FastLoRALinear (strict) has no fused step for "
                                          f"this call; see reference/fast/wrapper.py for what it fuses")
            self.reference_calls += 1
            return super().forward(x, *args, **kwargs)
        self.fused_calls += 1
        base, adapter = self.to_wrap, self.adapter
        if isinstance(base, nn.Linear):
            plan = Plan("none", None, 1, 0, adapter.scale)
            return self._fused(x, base.weight, base.bias, plan)
        layout = base.layout
        plan = Plan(layout.kind, layout.tp_group, layout.tp_size, layout.tp_rank, adapter.scale)
        x = base.prepare_input(x)                                   # the base's checks and input collective
        bias = base.bias if layout.kind == "column" and not base.skip_bias_add else None
        return base.finish_output(self._fused(x, base.weight, bias, plan))

    def _fused(self, x, weight, bias, plan):
        adapter = self.adapter
        x_a = adapter.dropout(x) if adapter.dropout_position == "pre" else x   # "pre": autograd owns the mask
        return fused_lora_linear(x, x_a, weight, bias, adapter.linear_in.weight, adapter.linear_out.weight, plan)


def use_fast_wrappers(model, strict: bool = False) -> int:
    """Replace every LoRALinear of `model` (a module or a list of chunks) by a FastLoRALinear over the
    same base and adapter (strict: see the module docstring); returns how many. Other wrappers (MoE
    experts, routers) stay as they are."""
    replaced = []

    def replace(child):
        if type(child) is not LoRALinear:
            return child
        fast = FastLoRALinear.from_wrapper(child)
        fast.strict = strict
        replaced.append(fast)
        return fast

    for chunk in model_chunks(model):
        replace_children(chunk, replace)
    return len(replaced)
