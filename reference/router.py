"""TopKRouter: the MoE router, which scores the experts for every token (Megatron's `mlp.router`).

The weight is drawn on construction from the global generator (reference/init.py, xavier), like every
other weight of the reference, so it is the same at every parallel layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .init import init_full_weight
from .parallel import resolve_tp_group


class TopKRouter(nn.Module):
    """Scores E experts per token: logits = x Wᵀ, keep the top k, softmax over those k.

    The weight (E, h) is replicated. forward(x (T, h)) -> probs (T, k), expert indices (T, k).
    in_features / out_features make it linear-like (h -> E): LoRA adapts its logits with an unsplit
    adapter (reference/lora/experts.py).

    Args:
        hidden_size (int): h.
        num_experts (int): E.
        topk (int): k, the experts each token is sent to (moe_router_topk).
        tp_group (dist.ProcessGroup | None): the dense TP group; None: the current one. Default: None.
        sequence_parallel (bool): each TP rank routes only its own sequence shard. Default: False.
        device (torch.device | str | None): where the weight goes. Default: None.
        dtype (torch.dtype): the weight's dtype. Default: torch.float32.
    """

    def __init__(self, hidden_size: int, num_experts: int, topk: int, *, tp_group=None,
                 sequence_parallel: bool = False, device=None, dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.moe_router_topk = hidden_size, num_experts, topk
        # Under SP each TP rank routes only its own sequence shard (see finalize_lora_grads).
        self.tp_group = resolve_tp_group(tp_group)
        self.sequence_parallel = sequence_parallel
        self.weight = nn.Parameter(init_full_weight((num_experts, hidden_size), "xavier").to(device=device, dtype=dtype))

    def gating(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)                                     # (T, E)

    def routing(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top_logits, indices = torch.topk(logits, self.moe_router_topk, dim=-1)   # (T, k)
        return torch.softmax(top_logits, dim=-1), indices

    def forward(self, x: torch.Tensor):
        return self.routing(self.gating(x))


__all__ = ["TopKRouter"]
