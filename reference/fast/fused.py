"""One autograd function for a LoRA layer's local step: base GEMM + adapter, in the fewest passes.

What reference/lora/wrapper.py computes between the base's input and output communication
(LoRALinear._forward_sharing_communication), fused (TP size t, n = s*b tokens, w = out/t):

    column:  out_r = x W_rᵀ + b_r + s·gather_last(x_a A_rᵀ) B_rᵀ     x (n, in),   out_r (n, out/t)
    row:     part  = x_r W_rᵀ,  part[:, rank*w:(rank+1)*w] += s·all_reduce(x_a A_rᵀ) B_rᵀ
                                                                  x_r (n, in/t), part (n, out) partial
    none:    out   = x Wᵀ + b + s·(x_a Aᵀ) Bᵀ                        (t = 1)

x_a is the adapter's input: x itself, or dropout(x) ("pre" dropout, applied by the caller so that
autograd owns the mask). The base's own collectives (the input copy / SP gather, the output
all-reduce / reduce-scatter / gather) stay outside, as the reference's autograd functions.

Where it is faster than the reference (same math, same collectives):
  forward   the update s·h B_rᵀ is computed first and the base GEMM accumulates into it (beta = 1:
            the add is in the GEMM's epilogue, no separate pass over the output); for a row base at
            TP > 1 the base GEMM goes first and hides the async all-reduce of h, and the update is
            added into this rank's column slice by a rank-r addmm_;
  backward  the rank-sized reduction of dL/dh is launched async and runs while B's gradient
            computes; then dL/dh A_r is computed and the input-gradient GEMM g W_r accumulates into
            it; A's gradient (and a trainable base's) is queued after that GEMM, so that the GPU is
            not left waiting on Python between small kernels; nothing is cloned (the reduced
            tensors are this function's own).
When A and B have another dtype than the base (lora_dtype), the update is computed in their dtype
and cast once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.autograd import Function

from ..parallel import all_gather_into, reduce_scatter_into


@dataclass(frozen=True)
class Plan:
    """What the fused step needs to know of the layer (fixed per layer).

    Args:
        kind (str): "column", "row" or "none".
        group (dist.ProcessGroup | None): the TP group (None when t = 1).
        tp_size (int): t.
        tp_rank (int): this rank in the group.
        scale (float): alpha / r.
    """

    kind: str
    group: object
    tp_size: int
    tp_rank: int
    scale: float


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., k) -> (n, k), a view of a contiguous tensor."""
    return t.reshape(-1, t.shape[-1])


def _own_columns(t2: torch.Tensor, plan: Plan, width: int) -> torch.Tensor:
    """A row base's (n, out) partial -> this rank's hidden shard (n, out/t), a view; others: t2 itself."""
    return t2 if plan.kind != "row" else t2[:, plan.tp_rank * width:(plan.tp_rank + 1) * width]


def _launch_h(h: torch.Tensor, plan: Plan):
    """Start the forward collective of h (n, r/t) column / (n, r) row partial; returns (buffer, work)."""
    if plan.tp_size == 1 or plan.kind == "none":
        return h, None
    if plan.kind == "column":                                       # gather the last dim: (t, n, r/t) then permute
        buffer = h.new_empty((plan.tp_size,) + tuple(h.shape))
        return buffer, all_gather_into(buffer.view(-1, h.shape[-1]), h, plan.group, async_op=True)
    return h, dist.all_reduce(h, group=plan.group, async_op=True)   # h is our fresh partial: in place


def _finish_h(buffer: torch.Tensor, work, plan: Plan) -> torch.Tensor:
    """Wait for _launch_h; the full h (n, r)."""
    if work is None:
        return buffer
    work.wait()
    if plan.kind == "column":                                       # (t, n, r/t) -> (n, t, r/t) -> (n, r)
        return buffer.permute(1, 0, 2).reshape(buffer.shape[1], -1)
    return buffer


def _launch_grad_h(grad_h: torch.Tensor, plan: Plan):
    """Start the backward reduction of dL/dh (n, r), a partial sum on each rank: column keeps this
    rank's r/t columns of the sum (reduce-scatter), row the whole sum (all-reduce)."""
    if plan.tp_size == 1 or plan.kind == "none":
        return grad_h, None
    if plan.kind == "column":
        t = plan.tp_size
        chunks = grad_h.view(grad_h.shape[0], t, -1).transpose(0, 1).contiguous()   # (t, n, r/t)
        out = grad_h.new_empty(chunks.shape[1:])                                      # (n, r/t)
        return out, reduce_scatter_into(out, chunks.view(-1, chunks.shape[-1]), plan.group, async_op=True)
    return grad_h, dist.all_reduce(grad_h, group=plan.group, async_op=True)        # fresh: in place


def _finish(buffer: torch.Tensor, work) -> torch.Tensor:
    if work is not None:
        work.wait()
    return buffer


def _update(h: torch.Tensor, B: torch.Tensor, scale: float, dtype: torch.dtype, bias) -> torch.Tensor:
    """s·h Bᵀ (+ b), a fresh (n, out/t) tensor in `dtype` for the base GEMM to accumulate into."""
    hs = h * scale                                                                # (n, r): the scale on the small side
    if B.dtype != dtype:                                                          # lora_dtype: B's math, one cast
        update = (hs @ B.t()).to(dtype)
        return update if bias is None else update.add_(bias)
    return hs @ B.t() if bias is None else torch.addmm(bias, hs, B.t())


class FusedLoRALinear(Function):
    """out = base_local(x) + s·B·collective(A x_a), in the fewest passes over the big tensors.

    forward(x, x_a, weight, bias, A, B, plan) -> column / none (..., out/t), row (..., out) partial.
    x and x_a may be the same tensor (no dropout): its gradient is then returned once, fused.
    bias: added here for column / none (None for row: the row bias is added after the reduction).

    Order, measured by tools/bench_orders.py on one H200 (bf16, 8192 tokens, 4096 x 14336, r 16, fwd +
    bwd, extra ms over the base; docs/reports/bench_orders_h200.json): autograd's separate ops 0.49;
    base GEMM first, the update added by a rank-r addmm_ 0.42; the update first and the base GEMM
    accumulating into it (beta = 1, in its epilogue) 0.31. So the update goes first wherever it covers
    the whole local output; a row base at TP > 1 adds it into its column slice after the base GEMM,
    which then also hides the all-reduce of h.
    """

    @staticmethod
    def forward(ctx, x, x_a, weight, bias, A, B, plan: Plan):
        shared_input = x_a is x
        xa2 = _rows(x_a.to(A.dtype) if x_a.dtype != A.dtype else x_a)            # (n, in_local)
        h = xa2 @ A.t()                                                           # (n, r/t) or (n, r) partial
        buffer, work = _launch_h(h, plan)
        if plan.kind == "row" and plan.tp_size > 1:
            out = torch.nn.functional.linear(x, weight)                           # overlaps the all-reduce of h
            h = _finish_h(buffer, work, plan)                                     # (n, r)
            target = _own_columns(_rows(out), plan, B.shape[0])                   # this rank's hidden shard
            if B.dtype == out.dtype:
                target.addmm_(h, B.t(), alpha=plan.scale)
            else:
                target += ((h * plan.scale) @ B.t()).to(out.dtype)
        else:
            h = _finish_h(buffer, work, plan)                                     # (n, r); a column gather is
            out = _update(h, B, plan.scale, weight.dtype, bias)                   # rank-sized, latency only
            out.addmm_(_rows(x), weight.t())                                      # + x Wᵀ, the base GEMM
            out = out.view(*x.shape[:-1], out.shape[-1])
        ctx.plan, ctx.shared_input = plan, shared_input
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x if ctx.needs_input_grad[2] else None, xa2 if ctx.needs_input_grad[4] else None,
                              weight, A, B, h if ctx.needs_input_grad[5] else None)
        ctx.input_shapes, ctx.xa_dtype = (x.shape, x_a.shape), x_a.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, xa2, weight, A, B, h = ctx.saved_tensors
        plan, need = ctx.plan, ctx.needs_input_grad
        g2 = _rows(grad_out.contiguous())                                         # (n, out/t) or (n, out)
        g_slice = _own_columns(g2, plan, B.shape[0])
        g_lora = g_slice if g_slice.dtype == B.dtype else g_slice.to(B.dtype)
        need_grad_h = need[1] or need[4]                                          # x's need is x_a's when shared
        grad_x = grad_x_a = grad_A = grad_B = grad_h = None
        if need_grad_h:
            buffer, work = _launch_grad_h(g_lora @ B, plan)                      # (n, r) partial, reduced async
            if work is not None and need[5]:
                grad_B = (g_lora.t() @ h) * plan.scale                           # hides the reduction
            grad_h = _finish(buffer, work) * plan.scale                           # (n, r/t) column, (n, r) row
            if need[1]:                                                           # (x too, when shared)
                grad_through_A = grad_h @ A                                       # (n, in_local), A's dtype
                if ctx.shared_input:
                    grad_x = grad_through_A.to(g2.dtype)
                    grad_x.addmm_(g2, weight)                                     # + g W, the base GEMM
                else:
                    grad_x_a = grad_through_A.to(ctx.xa_dtype)
        if need[0] and grad_x is None:
            grad_x = g2 @ weight                                                  # (n, in_local)
        # The rank-sized rest, queued while the base GEMM above runs.
        if need[5] and grad_B is None:
            grad_B = (g_lora.t() @ h) * plan.scale                               # (out/t, r)
        if need[4]:
            grad_A = grad_h.t() @ xa2                                             # (r/t, in) or (r, in/t)
        grad_weight = g2.t() @ _rows(x).to(g2.dtype) if need[2] else None
        grad_bias = g2.sum(0) if need[3] and ctx.has_bias else None
        x_shape, xa_shape = ctx.input_shapes
        grad_x = None if grad_x is None else grad_x.view(x_shape)
        grad_x_a = None if grad_x_a is None else grad_x_a.view(xa_shape)
        return grad_x, grad_x_a, grad_weight, grad_bias, grad_A, grad_B, None


def fused_lora_linear(x, x_a, weight, bias, A, B, plan: Plan) -> torch.Tensor:
    """FusedLoRALinear.apply, with the arguments of its forward."""
    return FusedLoRALinear.apply(x, x_a, weight, bias, A, B, plan)
