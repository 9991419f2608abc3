"""LoRA on mixture-of-experts layers (reference/moe.py): shared or per-expert adapters, the router.

The expert rank (normalize_moe_lora) and which linears are experts are decided where every adapter's
arguments are (reference/lora/build.py: effective_dim, is_expert_linear, re-exported here).

Grouped experts (one GroupedLinear for all local experts):
    share_expert_adapters=True   one adapter for every local expert on this EP rank. It is made
                                 identical across the EP group at init (broadcast from EP rank 0) and
                                 `finalize_lora_grads` sums its gradients across EP, so it stays so.
    share_expert_adapters=False  one adapter per local expert, parameters stacked (E_local, ...);
                                 expert e's tokens meet only adapter e.
    experts_shared_outer_loras   fc1's A and fc2's B are shared like the first (the outer factors),
                                 fc1's B_e and fc2's A_e are per expert like the second.
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
    """The adapter of a GroupedLinear: forward(x, e) = scale · B_e A_e x.

    Each factor is either one copy for all experts (2-D: A (r, in), B (out, r) shards) or one per
    local expert (stacked (E_local, ...)), as the config says:

        share_expert_adapters=True       A and B shared
        share_expert_adapters=False      A_e and B_e per expert
        experts_shared_outer_loras=True  the outer factors shared, the inner per expert (whatever
                                         share_expert_adapters is): fc1 (a column base) A and B_e,
                                         fc2 (a row base) A_e and B

    A shared factor is one tensor for the experts of every EP rank: identical across the EP group at
    init (broadcast from EP rank 0), and finalize_lora_grads sums its gradient over the EP group.

    Args:
        base (GroupedLinear): the grouped experts' linear; its layout (expert-TP split, no
            communication) is the adapter's.
        dim (int): the adapter rank (effective_dim).
        config (LoRAConfig): the LoRA configuration (share_expert_adapters,
            experts_shared_outer_loras and the adapter's own fields).
        base_name (str): the base's full name.
        ep_group (dist.ProcessGroup): the expert-parallel group (shared factors are broadcast over
            it at init and their gradients summed over it by finalize_lora_grads).
        local_expert_ids (list[int]): the global ids of this rank's experts.
        num_experts (int): E, the number of experts over all EP ranks (every rank draws all E).
    """

    def __init__(self, base: GroupedLinear, dim: int, config, *, base_name: str, ep_group, local_expert_ids,
                 num_experts: int):
        # Read by _init_weights, which the parent's __init__ calls: which of (A, B) are per expert.
        if config.experts_shared_outer_loras:
            self.per_expert = (base.layout.kind == "row", base.layout.kind == "column")
        else:
            self.per_expert = (not config.share_expert_adapters,) * 2
        self.shared = not any(self.per_expert)
        self.local_expert_ids, self.num_experts = list(local_expert_ids), num_experts
        super().__init__(**adapter_arguments(config, base.layout, base_name, dim=dim, weight=base.weight))
        self.ep_group = ep_group
        if self.grad_sync_parameters() and dist.get_world_size(ep_group) > 1:
            src = dist.get_global_rank(ep_group, 0)
            for param in self.grad_sync_parameters():
                dist.broadcast(param.data, src=src, group=ep_group)
            self.grad_sync_group = ep_group   # finalize_lora_grads sums the EP ranks' gradients

    def grad_sync_parameters(self) -> list[torch.Tensor]:
        """The shared factors: one copy for the experts of every EP rank (finalize_lora_grads sums them)."""
        weights = (self.linear_in.weight, self.linear_out.weight)
        return [w for w, per_expert in zip(weights, self.per_expert) if not per_expert]

    def _init_weights(self, device, dtype):
        """A, then B: a shared factor drawn in full once, a per-expert one for every global expert in
        turn (local ones kept). Per expert in both: expert g's A_g then B_g, for g = 0, 1, ..."""
        if self.shared:
            return super()._init_weights(device, dtype)
        if all(self.per_expert):
            A_local, B_local = [], []
            for g in range(self.num_experts):   # every rank draws every expert's A, B: EP-invariant
                full_A, full_B = self._draw(0), self._draw(1)
                if g in self.local_expert_ids:
                    A_local.append(self._shard_A(full_A))
                    B_local.append(self._shard_B(full_B))
            A, B = torch.stack(A_local), torch.stack(B_local)
        else:
            A, B = self._draw_factor(0, self._shard_A), self._draw_factor(1, self._shard_B)
        return LoRAWeight(A.to(device=device, dtype=dtype)), LoRAWeight(B.to(device=device, dtype=dtype))

    def _draw(self, which: int) -> torch.Tensor:
        """One full A (which=0, (r, in)) or B (which=1, (out, r)) from the global generator."""
        shape = (self.dim, self.in_features) if which == 0 else (self.out_features, self.dim)
        field = ("lora_A_init_method", "lora_B_init_method")[which]
        return init_full_weight(shape, self.init_methods[which], field=field)

    def _draw_factor(self, which: int, shard) -> torch.Tensor:
        """This rank's shard of factor `which`: drawn once if shared, else for every expert (local ones stacked)."""
        if not self.per_expert[which]:
            return shard(self._draw(which))
        drawn = [self._draw(which) for _ in range(self.num_experts)]
        return torch.stack([shard(drawn[g]) for g in self.local_expert_ids])

    def weights_for(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (A, B) shards for local expert `expert` (a shared factor is the same for all)."""
        pair = (self.linear_in.weight, self.linear_out.weight)
        return tuple(w[expert] if per_expert else w for w, per_expert in zip(pair, self.per_expert))

    def forward(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """x (n, in or in/t): local expert `expert`'s tokens -> its adapter's part of the output."""
        return self._adapt(x, *self.weights_for(expert))

    @torch.no_grad()
    def load_full_weights(self, A: torch.Tensor, B: torch.Tensor) -> None:
        """A (r, in), B (out, r); a per-expert factor stacked for the local experts: (E_local, ...)."""
        n = len(self.local_expert_ids)
        factors = (("A", A, (self.dim, self.in_features), self.linear_in.weight, self._shard_A),
                   ("B", B, (self.out_features, self.dim), self.linear_out.weight, self._shard_B))
        for (label, full, shape, _, _), per_expert in zip(factors, self.per_expert):
            expected = (n, *shape) if per_expert else shape
            if tuple(full.shape) != expected:
                raise ValueError(f"{label} must have shape {expected}, got {tuple(full.shape)}")
        for (_, full, _, param, shard), per_expert in zip(factors, self.per_expert):
            if per_expert:
                for e in range(n):
                    param[e].copy_(shard(full[e].detach().cpu()))
            else:
                param.copy_(shard(full.detach().cpu()))

    @torch.no_grad()
    def full_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The full (A, B), gathered over expert TP; a per-expert factor stacked (E_local, ...)."""
        def full(local, per_expert, gather):
            return torch.stack([gather(w) for w in local.unbind(0)]) if per_expert else gather(local)

        A = full(self.linear_in.weight, self.per_expert[0],
                 lambda w: gather_shards(w, self._A_shard_dim(), self.tp_group))
        B = full(self.linear_out.weight, self.per_expert[1], lambda w: gather_shards(w, 0, self.tp_group, self.stride))
        return A, B


class LoRAGroupedLinear(LoRALinear):
    """A GroupedLinear and its ExpertAdapter: forward(x, e) = base(x, e) + adapter(x, e).

    Its state dict (the base's `weight` unchanged, `adapter.linear_in|linear_out.weight`), the
    adapter switches and merge are LoRALinear's.

    Args:
        to_wrap (GroupedLinear): the grouped experts' linear, frozen.
        adapter (ExpertAdapter): its adapter.
    """

    def forward(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """x (n, in or in/t): the tokens routed to local expert `expert` -> (n, out/t) or partial (n, out)."""
        out = self.to_wrap(x, expert)
        if self.calls_adapters():
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

    Its state dict (the router's `weight` unchanged, `adapter.linear_in|linear_out.weight`), the
    adapter switches and merge are LoRALinear's.

    Args:
        to_wrap (TopKRouter): the router, frozen.
        adapter (ParallelLinearAdapter): an unsplit ("none") adapter h -> E on the logits.
    """

    def forward(self, x: torch.Tensor):
        """x (T, h) -> probs (T, k), expert indices (T, k)."""
        logits = self.to_wrap.gating(x)                                         # (T, E)
        if self.calls_adapters():
            logits = logits + self.adapter(x).to(logits.dtype)
        return self.to_wrap.routing(logits)


def wrap_grouped_linear(config, module: GroupedLinear, full_name: str) -> LoRAGroupedLinear:
    """`module` with an ExpertAdapter (shared, per expert or shared outer factors, as the config says)."""
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
