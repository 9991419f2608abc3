"""sequence_parallel_input_regather: LoRA's A on the gathered sequence, keeping only the shard.

Under sequence parallelism a column adapter's A reads the whole sequence x (s, b, in), all-gathered
from the TP ranks' shards (s/t, b, in). Autograd would keep that gathered x until backward, for
∂A = ∂hᵀ x. With Megatron-Bridge 0.6.2's `sequence_parallel_input_regather` the adapter keeps only
this rank's shard and all-gathers it again in backward: the same numbers, 1/t of that activation
memory, one more all-gather per step ([LORA-FWD-10]).

    forward    x   = all_gather_seq(x_r)     (s, b, in)    used, then freed
               h_r = x A_rᵀ                  (s, b, r/t)   saved: x_r (s/t, b, in) and A_r
    backward   ∂x  = ∂h_r A_r                (s, b, in)    this rank's part -> reduce-scatter (s/t, b, in)
               x   = all_gather_seq(x_r)     (s, b, in)    gathered again
               ∂A_r = ∂h_rᵀ x                (r/t, in)

When the caller has gathered x already (the wrapper's shared communication, [LORA-FWD-7]) that x is
used in forward instead of a second gather, and ∂x goes back through the caller's gather.

Which adapters do it is Megatron-Bridge's rule (its ParallelLinearAdapter's regather eligibility).
Fixed when the adapter is built (`regather_eligible`): the flag is on, the base is column-parallel
under sequence parallelism at TP > 1 and communicates (not a MoE expert), a2a_experimental is off,
and the base is a `linear_qkv` or `linear_fc1`. Decided at each forward (`regathers_input`): train
mode, grad enabled, A trainable, no activation between A and B. Anywhere else the flag changes nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function

from ..layout import BaseLayout
from ..parallel import gather_from_sequence_parallel_region, reduce_scatter_to_sequence_parallel_region

REGATHER_SURFACES = ("linear_qkv", "linear_fc1")


def regather_eligible(layout: BaseLayout, base_name: str, requested: bool, a2a_experimental: bool) -> bool:
    """Whether an adapter for this base re-gathers A's input when it runs (the conditions fixed at build).

    Args:
        layout (BaseLayout): the base's layout.
        base_name (str): the base's full name; its last part must be linear_qkv or linear_fc1.
        requested (bool): the config's sequence_parallel_input_regather (False for expert linears).
        a2a_experimental (bool): the config's a2a_experimental, as given (it turns regathering off
            for every base kind, as in Megatron-Bridge).
    """
    return (bool(requested) and layout.kind == "column" and layout.sequence_parallel and layout.tp_size > 1
            and not layout.explicit_expert_comm and not a2a_experimental
            and base_name.rsplit(".", 1)[-1] in REGATHER_SURFACES)


def regathers_input(adapter) -> bool:
    """Whether this forward of `adapter` (a ParallelLinearAdapter) keeps only the sequence shard of
    A's input: eligible when built, and now in train mode with grad enabled, A trainable and no
    activation between A and B."""
    return (adapter.regather_eligible and adapter.training and torch.is_grad_enabled()
            and adapter.linear_in.weight.requires_grad and isinstance(adapter.activation, nn.Identity))


def regather_inputs(adapter, x: torch.Tensor, caller_communicates: bool, local_input: torch.Tensor | None):
    """(shard, gathered) when this forward of `adapter` re-gathers A's input, else None.

    shard is the sequence shard A keeps (s/t, b, in): x, or, when the caller communicates, its
    `local_input`. gathered is the caller's all-gather of it, x (s, b, in) in A's dtype, which serves
    the forward unless "pre" dropout must act on the shard before it is gathered (then None).
    """
    if not regathers_input(adapter) or (caller_communicates and local_input is None):
        return None
    if not caller_communicates:
        return x, None
    dropped = adapter.dropout_position == "pre" and not isinstance(adapter.dropout, nn.Identity)
    return local_input, (None if dropped else x.to(adapter.linear_in.weight.dtype))


class _LinearOnRegatheredSequence(Function):
    """h_r = all_gather_seq(x_r) A_rᵀ, saving x_r (not the gathered x) for backward; see the module docstring."""

    @staticmethod
    def forward(ctx, x_shard, A, group, gathered):
        # x_shard (s/t, b, in); A (r/t, in); gathered: the caller's (s, b, in) gather of x_shard, or None.
        ctx.group, ctx.caller_gathered = group, gathered is not None
        if gathered is None:
            gathered = gather_from_sequence_parallel_region(x_shard, group)           # (s, b, in)
        ctx.save_for_backward(x_shard, A)
        return F.linear(gathered, A)                                                  # (s, b, r/t)

    @staticmethod
    def backward(ctx, grad_h):                                                        # (s, b, r/t)
        x_shard, A = ctx.saved_tensors
        grad_x = grad_h @ A                                                           # (s, b, in), partial
        x = gather_from_sequence_parallel_region(x_shard, ctx.group)                  # (s, b, in), again
        grad_A = grad_h.reshape(-1, grad_h.shape[-1]).T @ x.reshape(-1, x.shape[-1])  # (r/t, in)
        if ctx.caller_gathered:
            return None, grad_A, None, grad_x          # the caller's gather reduce-scatters ∂x
        return reduce_scatter_to_sequence_parallel_region(grad_x, ctx.group), grad_A, None, None


def linear_on_regathered_sequence(x_shard: torch.Tensor, A: torch.Tensor, group,
                                  gathered: torch.Tensor | None = None) -> torch.Tensor:
    """x A_rᵀ on the sequence all-gathered from `x_shard`, keeping only `x_shard` for backward.

    Args:
        x_shard (torch.Tensor): this rank's sequence shard (s/t, b, in).
        A (torch.Tensor): this rank's rows of A (r/t, in).
        group (dist.ProcessGroup): the TP group the sequence is split over.
        gathered (torch.Tensor | None): the caller's all-gather of x_shard (s, b, in), used in
            forward instead of gathering again (its backward then reduces ∂x). Default: None.

    Returns:
        torch.Tensor: (s, b, r/t), as F.linear(all_gather_seq(x_shard), A).
    """
    return _LinearOnRegatheredSequence.apply(x_shard, A, group, gathered)


__all__ = ["REGATHER_SURFACES", "regather_eligible", "regathers_input", "regather_inputs",
           "linear_on_regathered_sequence"]
