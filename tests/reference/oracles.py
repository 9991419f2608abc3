"""Test oracles: the math of a reference module written again the plain way (one process, float64,
no parallelism), for the tests of tests/reference/ to compare the parallel code with."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _activation(hidden: torch.Tensor, gated: bool) -> torch.Tensor:
    if gated:
        gate, up = hidden.chunk(2, dim=-1)                                 # [gate; up] blocks
        return F.silu(gate) * up
    return F.gelu(hidden)


def dense_moe_reference(x: torch.Tensor, router_weight: torch.Tensor, experts, topk: int, gated: bool,
                        shared=None) -> torch.Tensor:
    """MoELayer's math in one process, float64, no parallelism: top-k routing with softmax over the
    chosen logits, each expert's MLP weighted by its probability, plus the shared expert.

    experts: [(fc1, fc2)] full weights; shared: (fc1, fc2) or None. x: (s, b, h).
    """
    tokens = x.reshape(-1, x.shape[-1]).double()
    logits = tokens @ router_weight.double().T
    top, idx = torch.topk(logits, topk, dim=-1)
    probs = torch.softmax(top, dim=-1)
    out = torch.zeros_like(tokens)
    for e, (fc1, fc2) in enumerate(experts):
        rows, slot = (idx == e).nonzero(as_tuple=True)
        hidden = _activation(tokens[rows] @ fc1.double().T, gated)
        out.index_add_(0, rows, (hidden @ fc2.double().T) * probs[rows, slot].unsqueeze(-1))
    if shared is not None:
        out = out + F.gelu(tokens @ shared[0].double().T) @ shared[1].double().T
    return out.view(x.shape)
