"""LoRA on mixture-of-experts layers (reference/moe.py): shared or per-expert adapters, the router.

The expert rank (normalize_moe_lora) and which linears are experts are decided where every adapter's
arguments are (reference/lora/build.py: effective_dim, is_expert_linear, re-exported here).

Grouped experts (one GroupedLinear for all local experts):
    share_expert_adapters=True   one adapter for every local expert on this EP rank. It is made
                                 identical across the EP group at init (broadcast from EP rank 0) and
                                 `finalize_lora_grads` sums its gradients across EP, so it stays so.
    share_expert_adapters=False  one adapter per local expert, parameters stacked (E_local, ...);
                                 expert e's tokens meet only adapter e.
Sequential experts (local_experts.N.linear_fc*) get one ordinary adapter each.

Expert adapters communicate only inside the expert-TP group, like their bases; the MoE dispatcher
does the rest (reference/moe.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..init import init_full_weight
from ..merge import merge_lora_shard
from ..moe import GroupedLinear
from ..parallel import gather_shards
from ..router import TopKRouter
from .adapter import LoRAWeight, ParallelLinearAdapter
from .build import adapter_arguments, build_adapter, effective_dim, is_expert_linear
from .wrapper import LoRALinear


class ExpertAdapter(ParallelLinearAdapter):
    """The adapter of a GroupedLinear: forward(x, e) = scale · B_e A_e x (A_e = A when shared).

    Args:
        base (GroupedLinear): the grouped experts' linear; its layout (expert-TP split, no
            communication) is the adapter's.
        dim (int): the adapter rank (effective_dim).
        config (LoRAConfig): the LoRA configuration; share_expert_adapters picks one adapter for
            all local experts (A (r, in), B (out, r) shards) or one per expert (stacked
            (E_local, ...)).
        base_name (str): the base's full name.
        ep_group (dist.ProcessGroup): the expert-parallel group (shared adapters are broadcast over
            it at init and their gradients summed over it by finalize_lora_grads).
        local_expert_ids (list[int]): the global ids of this rank's experts.
        num_experts (int): E, the number of experts over all EP ranks (every rank draws all E).
    """

    def __init__(self, base: GroupedLinear, dim: int, config, *, base_name: str, ep_group, local_expert_ids,
                 num_experts: int):
        # Read by _init_weights, which the parent's __init__ calls.
        self.shared = config.share_expert_adapters
        self.local_expert_ids, self.num_experts = list(local_expert_ids), num_experts
        super().__init__(**adapter_arguments(config, base.layout, base_name, dim=dim, weight=base.weight))
        self.ep_group = ep_group
        if self.shared and dist.get_world_size(ep_group) > 1:
            src = dist.get_global_rank(ep_group, 0)
            for param in self.parameters():
                dist.broadcast(param.data, src=src, group=ep_group)
            self.grad_sync_group = ep_group   # finalize_lora_grads sums the EP ranks' gradients

    def _init_weights(self, device, dtype):
        """Shared: as a dense adapter. Per expert: every expert's full A, B drawn in turn, local ones kept."""
        if self.shared:
            return super()._init_weights(device, dtype)
        A_local, B_local = [], []
        for g in range(self.num_experts):   # every rank draws every expert's A, B: EP-invariant
            full_A = init_full_weight((self.dim, self.in_features), self.init_methods[0], field="lora_A_init_method")
            full_B = init_full_weight((self.out_features, self.dim), self.init_methods[1], field="lora_B_init_method")
            if g in self.local_expert_ids:
                A_local.append(self._shard_A(full_A))
                B_local.append(self._shard_B(full_B))
        return (LoRAWeight(torch.stack(A_local).to(device=device, dtype=dtype)),
                LoRAWeight(torch.stack(B_local).to(device=device, dtype=dtype)))

    def weights_for(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (A, B) shards for local expert `expert` (the shared pair when shared)."""
        A, B = self.linear_in.weight, self.linear_out.weight
        return (A, B) if self.shared else (A[expert], B[expert])

    def forward(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """x (n, in or in/t): local expert `expert`'s tokens -> its adapter's part of the output."""
        return self._adapt(x, *self.weights_for(expert))

    @torch.no_grad()
    def load_full_weights(self, A: torch.Tensor, B: torch.Tensor) -> None:
        """Shared: A (r, in), B (out, r). Per expert: A (E_local, r, in), B (E_local, out, r)."""
        if self.shared:
            return super().load_full_weights(A, B)
        n = len(self.local_expert_ids)
        if tuple(A.shape) != (n, self.dim, self.in_features):
            raise ValueError(f"A must have shape {(n, self.dim, self.in_features)}, got {tuple(A.shape)}")
        if tuple(B.shape) != (n, self.out_features, self.dim):
            raise ValueError(f"B must have shape {(n, self.out_features, self.dim)}, got {tuple(B.shape)}")
        for e in range(n):
            self.linear_in.weight[e].copy_(self._shard_A(A[e].detach().cpu()))
            self.linear_out.weight[e].copy_(self._shard_B(B[e].detach().cpu()))

    @torch.no_grad()
    def full_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Shared: (A, B) full; per expert: stacked (E_local, ...) full, gathered over expert TP."""
        if self.shared:
            return super().full_weights()
        pairs = [self._gather_pair(self.linear_in.weight[e], self.linear_out.weight[e])
                 for e in range(len(self.local_expert_ids))]
        return torch.stack([a for a, _ in pairs]), torch.stack([b for _, b in pairs])

    def _gather_pair(self, A_local, B_local):
        return (gather_shards(A_local, self._A_shard_dim(), self.tp_group),
                gather_shards(B_local, 0, self.tp_group, self.stride))


class LoRAGroupedLinear(LoRALinear):
    """A GroupedLinear and its ExpertAdapter: forward(x, e) = base(x, e) + adapter(x, e).

    Args:
        to_wrap (GroupedLinear): the grouped experts' linear, frozen.
        adapter (ExpertAdapter): its adapter.
    """

    def forward(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """x (n, in or in/t): the tokens routed to local expert `expert` -> (n, out/t) or partial (n, out)."""
        out = self.to_wrap(x, expert)
        if not self.merged:
            out = out + self.adapter(x, expert).to(out.dtype)
        return out

    def _merged(self, sign: float) -> torch.Tensor:
        """Each local expert's W_e + sign (alpha/r) B_e A_e, stacked (a collective under expert TP)."""
        weight, adapter = self.to_wrap.weight, self.adapter     # (E_local, out/t, in) or (E_local, out, in/t)
        merged = []
        for e in range(weight.shape[0]):
            A, B = adapter.weights_for(e)
            merged.append(merge_lora_shard(weight[e], B, A, sign * adapter.alpha, adapter.dim, adapter.layout))
        return torch.stack(merged)


class LoRATopKRouter(LoRALinear):
    """The router with an adapter on its logits: routing(gating(x) + adapter(x)).

    Args:
        to_wrap (TopKRouter): the router, frozen.
        adapter (ParallelLinearAdapter): an unsplit ("none") adapter h -> E on the logits.
    """

    def forward(self, x: torch.Tensor):
        """x (T, h) -> probs (T, k), expert indices (T, k)."""
        logits = self.to_wrap.gating(x)                                         # (T, E)
        if not self.merged:
            logits = logits + self.adapter(x).to(logits.dtype)
        return self.to_wrap.routing(logits)


def wrap_grouped_linear(config, module: GroupedLinear, full_name: str) -> LoRAGroupedLinear:
    """`module` with an ExpertAdapter (shared or per expert, as config.share_expert_adapters says)."""
    adapter = ExpertAdapter(module, effective_dim(config, module, full_name), config, base_name=full_name,
                            ep_group=module.ep_group, local_expert_ids=module.local_expert_ids,
                            num_experts=module.num_experts)
    return LoRAGroupedLinear(module, adapter)


def wrap_router(config, module: TopKRouter, full_name: str) -> LoRATopKRouter:
    """The router with an unsplit adapter (full rank: the router is not an expert)."""
    adapter = build_adapter(config, module, full_name)
    # Under SP each TP rank routes only its sequence shard: the adapter's gradient is partial.
    if module.sequence_parallel and dist.get_world_size(module.tp_group) > 1:
        adapter.grad_sync_group = module.tp_group
    return LoRATopKRouter(module, adapter)


__all__ = ["is_expert_linear", "effective_dim", "ExpertAdapter", "LoRAGroupedLinear", "LoRATopKRouter",
           "wrap_grouped_linear", "wrap_router"]
