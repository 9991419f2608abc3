"""LoRA on mixture-of-experts layers (reference/moe.py): expert ranks, shared or per-expert adapters.

Expert linears are found by full name: `mlp.` … `experts` … `.linear_fc1|2` at the end, and not under
`.shared_experts.`. Shared experts and the router are dense modules and keep the full rank.

normalize_moe_lora: an expert linear gets rank r_e = dim // moe_router_topk (a token passes through k
experts, so k adapters of rank dim/k match one dense adapter's capacity); alpha is unchanged, so the
scale is alpha / r_e. For column-parallel expert bases r_e is rounded up to a multiple of the
expert-TP size (A is split by rows there).

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

import math
import re

import torch
import torch.distributed as dist
from torch import nn

from ..init import init_full_weight
from ..moe import GroupedLinear, TopKRouter
from ..parallel import gather_shards
from .adapter import LoRAWeight, ParallelLinearAdapter
from .wrapper import LoRALinear

EXPERT_LINEAR = re.compile(r".*mlp\..*experts.*\.linear_fc[12]$")


def is_expert_linear(full_name: str) -> bool:
    return EXPERT_LINEAR.match(full_name) is not None and ".shared_experts." not in full_name


def effective_dim(config, module: nn.Module, full_name: str) -> int:
    """The adapter rank for `module`: dim, or dim // topk (rounded up for column bases) for experts."""
    if not (config.normalize_moe_lora and is_expert_linear(full_name)):
        return config.dim
    topk = getattr(module, "moe_router_topk", None)
    if isinstance(topk, bool) or not isinstance(topk, int) or topk <= 0:
        raise ValueError(f"normalize_moe_lora needs a positive int moe_router_topk on the expert module "
                         f"{full_name}, got {topk!r}")
    if config.dim % topk:
        raise ValueError(f"dim ({config.dim}) must be divisible by moe_router_topk ({topk}) when "
                         f"normalize_moe_lora=True (expert module {full_name})")
    rank = config.dim // topk
    is_column = getattr(module, "parallel_mode", None) == "column"
    if is_column:
        tp_size = module.tp_size
        rank = math.ceil(rank / tp_size) * tp_size
    return rank


class ExpertAdapter(ParallelLinearAdapter):
    """The adapter of a GroupedLinear: forward(x, e) = scale · B_e A_e x (A_e = A when shared)."""

    def __init__(self, base: GroupedLinear, dim: int, config, *, base_name: str, ep_group, local_expert_ids,
                 num_experts: int):
        # Read by _init_weights, which the parent's __init__ calls.
        self.shared = config.share_expert_adapters
        self.local_expert_ids, self.num_experts = list(local_expert_ids), num_experts
        super().__init__(base.input_size, base.output_size, dim, base_kind=base.parallel_mode,
                         alpha=config.alpha, dropout=config.dropout, dropout_position=config.dropout_position,
                         lora_A_init_method=config.lora_A_init_method,
                         lora_B_init_method=config.lora_B_init_method,
                         dtype=config.lora_dtype or base.weight.dtype, device=base.weight.device,
                         tp_group=base.tp_group, stride=base.stride, explicit_expert_comm=True,
                         base_name=base_name)
        self.ep_group = ep_group
        if self.shared and dist.get_world_size(ep_group) > 1:
            src = dist.get_global_rank(ep_group, 0)
            for param in self.parameters():
                dist.broadcast(param.data, src=src, group=ep_group)
            self.grad_sync_group = ep_group   # finalize_lora_grads sums the EP ranks' gradients

    def _init_weights(self, device, dtype):
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
        A, B = self.linear_in.weight, self.linear_out.weight
        return (A, B) if self.shared else (A[expert], B[expert])

    def forward(self, x: torch.Tensor, expert: int) -> torch.Tensor:
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
    """A GroupedLinear and its ExpertAdapter: forward(x, e) = base(x, e) + adapter(x, e)."""

    def forward(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        out = self.to_wrap(x, expert)
        if not self.merged:
            out = out + self.adapter(x, expert).to(out.dtype)
        return out

    def _merged(self, sign: float) -> torch.Tensor:
        from ..merge import LoRAMerge

        weight, adapter = self.to_wrap.weight, self.adapter
        merged = []
        for e in range(weight.shape[0]):
            A, B = adapter.weights_for(e)
            merged.append(LoRAMerge().merge(weight[e], B, A, sign * adapter.alpha, adapter.dim,
                                            tp_size=adapter.tp_size, tp_group=adapter.tp_group))
        return torch.stack(merged)


class LoRATopKRouter(LoRALinear):
    """The router with an adapter on its logits: routing(gating(x) + adapter(x))."""

    def forward(self, x: torch.Tensor):
        logits = self.to_wrap.gating(x)
        if not self.merged:
            logits = logits + self.adapter(x).to(logits.dtype)
        return self.to_wrap.routing(logits)


def wrap_grouped_linear(config, module: GroupedLinear, full_name: str) -> LoRAGroupedLinear:
    adapter = ExpertAdapter(module, effective_dim(config, module, full_name), config, base_name=full_name,
                            ep_group=module.ep_group, local_expert_ids=module.local_expert_ids,
                            num_experts=module.num_experts)
    return LoRAGroupedLinear(module, adapter)


def wrap_router(config, module: TopKRouter, full_name: str) -> LoRATopKRouter:
    adapter = ParallelLinearAdapter(
        module.in_features, module.out_features, config.dim, base_kind="none", alpha=config.alpha,
        dropout=config.dropout, dropout_position=config.dropout_position,
        lora_A_init_method=config.lora_A_init_method, lora_B_init_method=config.lora_B_init_method,
        dtype=config.lora_dtype or module.weight.dtype, device=module.weight.device, base_name=full_name)
    # Under SP each TP rank routes only its sequence shard: the adapter's gradient is partial.
    if module.sequence_parallel and dist.get_world_size(module.tp_group) > 1:
        adapter.grad_sync_group = module.tp_group
    return LoRATopKRouter(module, adapter)


@torch.no_grad()
def finalize_lora_grads(model) -> None:
    """After backward: sum the gradients of adapters whose copies saw different tokens.

    Shared grouped-expert adapters are summed over the EP group; router adapters under sequence
    parallelism over the TP group. (Megatron does the same in finalize_model_grads / grad hooks.)
    """
    from .transform import lora_adapters

    chunks = model if isinstance(model, (list, tuple)) else [model]
    for chunk in chunks:
        for adapter in lora_adapters(chunk):
            group = getattr(adapter, "grad_sync_group", None)
            if group is None:
                continue
            for param in adapter.parameters():
                if not param.requires_grad:
                    continue
                if param.grad is None:   # this rank's experts got no token: a zero contribution
                    param.grad = torch.zeros_like(param)
                dist.all_reduce(param.grad, group=group)


__all__ = ["is_expert_linear", "effective_dim", "ExpertAdapter", "LoRAGroupedLinear", "LoRATopKRouter",
           "finalize_lora_grads"]
