"""A minimal mixture-of-experts MLP with Megatron's names, expert parallelism and expert TP.

    mlp.router                                  TopKRouter (reference/router.py): x Wᵀ, top-k, softmax
    mlp.experts.linear_fc1 / linear_fc2         grouped experts: one module holds all local experts
    mlp.experts.local_experts.N.linear_fc1/fc2  sequential experts: one module per local expert
    mlp.shared_experts.linear_fc1 / linear_fc2  optional dense MLP applied to every token

Layout (reference/parallel/state.py): the ep * etp ranks of one "expert block" share E experts;
EP rank p holds experts [p E/ep, (p+1) E/ep); each expert's fc1 is split by rows and fc2 by columns
over the expert-TP group, like a column/row-parallel pair.

Token dispatch, the simplest correct one (Megatron's "allgather" dispatcher):

    x_local (T, h)        this rank's tokens (under TP > 1 these are sequence shards: SP is required)
    X = all_gather(x)     (T·ep·etp, h) over the expert block; backward: reduce-scatter
    for each local expert e:  out[tokens routed to e] += p_e · expert_e(X[tokens])   (partial over etp)
    y = reduce_scatter(out)   (T, h): sums the experts of every EP rank and the etp partial sums

Initialization draws, for global expert 0, 1, …, E-1 in turn, the full fc1 then the full fc2 weight,
and each rank keeps its local experts' shards: the same seed gives the same experts at every
(TP, EP, expert-TP), grouped or sequential.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .init import init_full_weight
from .layers import ColumnParallelLinear, RowParallelLinear
from .layout import BaseLayout, check_flags, from_layout
from .parallel import (
    check_positive_int,
    gather_from_sequence_parallel_region,
    gather_shards,
    get_parallel_state,
    reduce_scatter_to_sequence_parallel_region,
    resolve_tp_group,
    shard,
)
from .router import TopKRouter


class GroupedLinear(nn.Module):
    """The same linear for every local expert, weights stacked: weight (E_local, out_shard, in_shard).

    parallel_mode "column" splits each expert's rows (out) over the expert-TP group, "row" its columns
    (in). forward(x, e) = x W_eᵀ with no communication: the dispatcher gathers and combines. Its
    `layout` (an explicit_expert_comm layout over the expert-TP group) is what its adapter is built from.

    Args:
        local_weights (torch.Tensor): (E_local, out/t, in) for column, (E_local, out, in/t) for row.
        input_size, output_size (int): one expert's full in and out.
        parallel_mode (str): "column" or "row".
        tp_group, ep_group (dist.ProcessGroup): the expert-TP and the expert-parallel group.
        local_expert_ids (list[int]), num_experts (int): this rank's global expert ids, and E.
        stride (int): stacked output blocks kept whole per rank (column only). Default: 1.
        moe_router_topk (int | None): k, for the expert adapters' rank. Default: None.
    """

    tp_group, tp_size, tp_rank = from_layout("tp_group"), from_layout("tp_size"), from_layout("tp_rank")
    input_size, output_size, stride = from_layout("input_size"), from_layout("output_size"), from_layout("stride")

    def __init__(self, local_weights: torch.Tensor, *, input_size: int, output_size: int, parallel_mode: str,
                 tp_group, ep_group, local_expert_ids: list[int], num_experts: int, stride: int = 1,
                 moe_router_topk: int | None = None):
        super().__init__()
        # Where the local experts sit among all experts (expert adapters need it).
        self.ep_group, self.local_expert_ids, self.num_experts = ep_group, list(local_expert_ids), num_experts
        self.parallel_mode, self.moe_router_topk = parallel_mode, moe_router_topk
        # The expert-TP group is always given (never the dense TP group that None would mean elsewhere).
        self.layout = BaseLayout(parallel_mode, input_size, output_size, tp_group, dist.get_world_size(tp_group),
                                 dist.get_rank(tp_group), stride=stride if parallel_mode == "column" else 1,
                                 explicit_expert_comm=True)
        self.num_local_experts = local_weights.shape[0]
        self.weight = nn.Parameter(local_weights)

    @property
    def weight_shard_dim(self) -> int:            # of one expert's 2-D weight
        return 0 if self.parallel_mode == "column" else 1

    def forward(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        return F.linear(x, self.weight[expert])

    @torch.no_grad()
    def load_full_weight(self, weights: torch.Tensor) -> None:
        """weights: (E_local, out, in), the full weight of each local expert."""
        expected = (self.num_local_experts, self.output_size, self.input_size)
        if tuple(weights.shape) != expected:
            raise ValueError(f"weights must have shape {expected}, got {tuple(weights.shape)}")
        for e in range(self.num_local_experts):
            self.weight[e].copy_(shard(weights[e].detach().cpu(), self.weight_shard_dim, self.tp_rank,
                                       self.tp_size, self.stride))

    @torch.no_grad()
    def full_weight(self) -> torch.Tensor:
        """(E_local, out, in), gathered over the expert-TP group."""
        return torch.stack([gather_shards(self.weight[e], self.weight_shard_dim, self.tp_group, self.stride)
                            for e in range(self.num_local_experts)])

    def extra_repr(self) -> str:
        return (f"{self.parallel_mode}, experts={self.num_local_experts}, in={self.input_size}, "
                f"out={self.output_size}, tp_size={self.tp_size}")


def _activation(hidden: torch.Tensor, gated: bool) -> torch.Tensor:
    if gated:
        gate, up = hidden.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(hidden)


class _Experts(nn.Module):
    """The dispatch shared by grouped and sequential experts; subclasses define expert_forward."""

    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int, topk: int, gated: bool,
                 device, dtype):
        super().__init__()
        state = get_parallel_state()
        self.ep_group, self.ep_size, self.ep_rank = state.ep_group, state.ep_size, state.ep_rank
        self.expert_tp_group = state.expert_tp_group
        self.block_group = state.expert_tp_ep_group
        if num_experts % self.ep_size:
            raise ValueError(f"num_moe_experts ({num_experts}) must be divisible by expert_model_parallel_size "
                             f"({self.ep_size})")
        self.num_experts, self.topk, self.gated = num_experts, topk, gated
        self.num_local_experts = num_experts // self.ep_size
        self.local_expert_ids = [self.ep_rank * self.num_local_experts + j for j in range(self.num_local_experts)]
        self.hidden_size, self.ffn_hidden_size = hidden_size, ffn_hidden_size
        self.fc1_out = 2 * ffn_hidden_size if gated else ffn_hidden_size

    def _draw_full_weights(self):
        """Full (fc1, fc2) of every global expert in turn; yields (global id, fc1, fc2)."""
        for g in range(self.num_experts):
            fc1 = init_full_weight((self.fc1_out, self.hidden_size), "xavier")
            fc2 = init_full_weight((self.hidden_size, self.ffn_hidden_size), "xavier")
            yield g, fc1, fc2

    def expert_forward(self, x: torch.Tensor, local_expert: int) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, tokens: torch.Tensor, probs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """tokens (T, h), probs and indices (T, k) of this rank -> routed output (T, h)."""
        group = self.block_group
        all_tokens = gather_from_sequence_parallel_region(tokens, group)          # (T·ep·etp, h)
        all_probs = gather_from_sequence_parallel_region(probs, group)            # (T·ep·etp, k)
        all_indices = gather_from_sequence_parallel_region(indices, group)        # (T·ep·etp, k), no grad
        # Zeros that depend on the gathered tokens and probabilities: a rank whose experts get no token
        # must still run the backward of both gathers, or its peers would wait for it forever.
        out = all_tokens * 0 + (all_probs * 0).sum(dim=-1, keepdim=True).to(all_tokens.dtype)
        for local, global_id in enumerate(self.local_expert_ids):
            token_ids, slot = (all_indices == global_id).nonzero(as_tuple=True)
            # Even with no token (n = 0) the expert runs, so that its trainable parameters are in
            # every rank's graph and every rank's backward runs the same collectives.
            y = self.expert_forward(all_tokens[token_ids], local)                  # (n, h), partial over etp
            out = out.index_add(0, token_ids, y * all_probs[token_ids, slot].unsqueeze(-1).to(y.dtype))
        return reduce_scatter_to_sequence_parallel_region(out, group)             # (T, h)

    @torch.no_grad()
    def full_expert_weights(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(fc1 (fc1_out, h), fc2 (h, ffn))] for all E experts, gathered over EP and expert TP."""
        local = self.local_full_weights()                                        # E_local x (fc1, fc2)
        fc1 = torch.stack([w1 for w1, _ in local]).contiguous()
        fc2 = torch.stack([w2 for _, w2 in local]).contiguous()
        fc1_all, fc2_all = gather_shards(fc1, 0, self.ep_group), gather_shards(fc2, 0, self.ep_group)
        return list(zip(fc1_all.unbind(0), fc2_all.unbind(0)))

    def local_full_weights(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError


class GroupedMLP(_Experts):
    """All local experts in two GroupedLinear modules: `linear_fc1`, `linear_fc2`."""

    def __init__(self, num_experts, hidden_size, ffn_hidden_size, topk, gated=False, *, device=None,
                 dtype=torch.float32):
        super().__init__(num_experts, hidden_size, ffn_hidden_size, topk, gated, device, dtype)
        etp, etp_rank = dist.get_world_size(self.expert_tp_group), dist.get_rank(self.expert_tp_group)
        stride = 2 if gated else 1
        fc1_local, fc2_local = [], []
        for g, fc1, fc2 in self._draw_full_weights():
            if g in self.local_expert_ids:
                fc1_local.append(shard(fc1, 0, etp_rank, etp, stride))
                fc2_local.append(shard(fc2, 1, etp_rank, etp))
        common = dict(tp_group=self.expert_tp_group, moe_router_topk=topk, ep_group=self.ep_group,
                      local_expert_ids=self.local_expert_ids, num_experts=num_experts)
        self.linear_fc1 = GroupedLinear(torch.stack(fc1_local).to(device=device, dtype=dtype),
                                        input_size=hidden_size, output_size=self.fc1_out,
                                        parallel_mode="column", stride=stride, **common)
        self.linear_fc2 = GroupedLinear(torch.stack(fc2_local).to(device=device, dtype=dtype),
                                        input_size=ffn_hidden_size, output_size=hidden_size,
                                        parallel_mode="row", **common)

    def expert_forward(self, x, local_expert):
        hidden = _activation(self.linear_fc1(x, local_expert), self.gated)       # (n, ffn/etp)
        return self.linear_fc2(hidden, local_expert)                             # (n, h), partial

    def local_full_weights(self):
        return list(zip(self.linear_fc1.full_weight().unbind(0), self.linear_fc2.full_weight().unbind(0)))


class ExpertMLP(nn.Module):
    """One sequential expert: column-parallel fc1, row-parallel fc2, over the expert-TP group."""

    def __init__(self, hidden_size, ffn_hidden_size, topk, gated, tp_group, device, dtype):
        super().__init__()
        self.gated = gated
        # init "zero": the caller loads weights drawn in the global expert order (no RNG drawn here).
        common = dict(bias=False, tp_group=tp_group, device=device, params_dtype=dtype,
                      explicit_expert_comm=True, init_method="zero")
        self.linear_fc1 = ColumnParallelLinear(hidden_size, 2 * ffn_hidden_size if gated else ffn_hidden_size,
                                               stride=2 if gated else 1, **common)
        self.linear_fc2 = RowParallelLinear(ffn_hidden_size, hidden_size, **common)
        for layer in (self.linear_fc1, self.linear_fc2):
            layer.moe_router_topk = topk

    def forward(self, x):
        hidden, _ = self.linear_fc1(x)
        out, _ = self.linear_fc2(_activation(hidden, self.gated))
        return out


class SequentialMLP(_Experts):
    """One ExpertMLP per local expert: `local_experts.N.linear_fc1`, `local_experts.N.linear_fc2`."""

    def __init__(self, num_experts, hidden_size, ffn_hidden_size, topk, gated=False, *, device=None,
                 dtype=torch.float32):
        super().__init__(num_experts, hidden_size, ffn_hidden_size, topk, gated, device, dtype)
        self.local_experts = nn.ModuleList()
        for g, fc1, fc2 in self._draw_full_weights():
            if g in self.local_expert_ids:
                expert = ExpertMLP(hidden_size, ffn_hidden_size, topk, gated, self.expert_tp_group, device, dtype)
                expert.linear_fc1.load_full_weight(fc1)
                expert.linear_fc2.load_full_weight(fc2)
                self.local_experts.append(expert)

    def expert_forward(self, x, local_expert):
        return self.local_experts[local_expert](x)

    def local_full_weights(self):
        return [(e.linear_fc1.full_weight()[0], e.linear_fc2.full_weight()[0]) for e in self.local_experts]


class SharedExpertMLP(nn.Module):
    """A dense MLP applied to every token, over the dense TP group (with SP when TP > 1)."""

    def __init__(self, hidden_size, ffn_hidden_size, *, tp_group, sequence_parallel, device, dtype):
        super().__init__()
        common = dict(bias=False, tp_group=tp_group, device=device, params_dtype=dtype,
                      sequence_parallel=sequence_parallel)
        self.linear_fc1 = ColumnParallelLinear(hidden_size, ffn_hidden_size, **common)
        self.linear_fc2 = RowParallelLinear(ffn_hidden_size, hidden_size, **common)

    def forward(self, x):
        hidden, _ = self.linear_fc1(x)                                           # (s, b, ffn/t)
        out, _ = self.linear_fc2(F.gelu(hidden))                                 # (s or s/t, b, h)
        return out


class MoELayer(nn.Module):
    """router -> experts (+ shared experts). forward(x (s', b, h)) -> (y (s', b, h), None).

    Args:
        hidden_size, ffn_hidden_size (int): h and the experts' ffn size.
        num_experts (int): E, divisible by the EP size.  topk (int): k in [1, E].
        grouped (bool): GroupedMLP (True) or SequentialMLP (local_experts.N). Default: True.
        gated (bool): SwiGLU experts (fc1 -> [gate; up]). Default: False.
        shared_expert_size (int | None): the ffn size of a shared expert MLP, if any. Default: None.
        tp_group (dist.ProcessGroup | None): the dense TP group; None: the current one. Default: None.
        sequence_parallel (bool): required when the TP size is > 1. Default: False.
        device (torch.device | str | None), dtype (torch.dtype): of the weights. Default: None, float32.
    """

    def __init__(self, hidden_size: int, ffn_hidden_size: int, num_experts: int, topk: int, *,
                 grouped: bool = True, gated: bool = False, shared_expert_size: int | None = None,
                 tp_group=None, sequence_parallel: bool = False, device=None, dtype=torch.float32):
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("ffn_hidden_size", ffn_hidden_size),
                            ("num_moe_experts", num_experts), ("moe_router_topk", topk)):
            check_positive_int(name, value)
        if shared_expert_size is not None:
            check_positive_int("shared_expert_size", shared_expert_size)
        check_flags(grouped=grouped, gated=gated, sequence_parallel=sequence_parallel)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch.dtype (the experts train), got {dtype!r}")
        tp_group = resolve_tp_group(tp_group)
        if dist.get_world_size(tp_group) > 1 and not sequence_parallel:
            # Without SP the TP ranks hold copies of the same tokens and the experts would count each
            # token once per TP rank in their gradients (Megatron requires SP here too).
            raise ValueError("MoE with tensor_model_parallel_size > 1 requires sequence_parallel=True")
        if not 0 < topk <= num_experts:
            raise ValueError(f"moe_router_topk must be in [1, num_moe_experts={num_experts}], got {topk}")
        self.router = TopKRouter(hidden_size, num_experts, topk, tp_group=tp_group,
                                 sequence_parallel=sequence_parallel, device=device, dtype=dtype)
        experts_cls = GroupedMLP if grouped else SequentialMLP
        self.experts = experts_cls(num_experts, hidden_size, ffn_hidden_size, topk, gated, device=device, dtype=dtype)
        self.shared_experts = None
        if shared_expert_size:
            self.shared_experts = SharedExpertMLP(hidden_size, shared_expert_size, tp_group=tp_group,
                                                  sequence_parallel=sequence_parallel, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor):
        tokens = x.reshape(-1, x.shape[-1])                                      # (T, h)
        probs, indices = self.router(tokens)                                     # (T, k)
        out = self.experts(tokens, probs, indices).view_as(x)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out, None
