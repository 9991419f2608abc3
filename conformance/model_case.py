"""Tiny Megatron-named models with LoRA, as the model-level properties see them.

What the suite decides on its own, from SPEC.md and the model's module names (never from the
backend's code):

- which modules are candidates for LoRA ([LORA-MATCH-2]): linear-like modules, judged here by
  `is_linear_like` — an `nn.Linear`, or a module whose class name contains "Linear" and that has a
  2-D (or, for grouped experts, 3-D) `weight`, or a module whose name ends in `router` and that has a
  2-D `weight` (the MoE router);
- how a pattern selects a module ([LORA-MATCH-2], [LORA-MATCH-3]): its attribute name equals the
  pattern, or the pattern matches the whole full name with `*` = any run of characters (dots
  included) and every other character literal;
- which modules are expert linears ([MOE-MATCH-1]) and their effective rank ([MOE-RANK-1]);
- how each module's adapter is sharded ([LORA-FWD-2], [MOE-FWD-1]): by the module's name
  (`linear_qkv`, `linear_fc1`, `output_layer` are column-parallel; `linear_proj`, `linear_fc2` are
  row-parallel; `router` is replicated; expert linears shard over the expert-TP group, dense ones
  over the TP group; per-expert grouped adapters are stacked `(E_local, ...)`; with shared outer
  factors ([MOE-SHARE-3]) only fc1's B and fc2's A are stacked).

`AdapterPlan` turns that into full shapes, this rank's shard shapes, the suite's full A and B for a
module (drawn from the module's name, so the same at every layout) and the pieces to load.
"""

from __future__ import annotations

import math
import re
import warnings
import zlib
from dataclasses import dataclass

import torch
from torch import nn

from .backend import ModelSpec
from .layout import Shard, gather, piece, shard_of

DEFAULT_TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
COLUMN_NAMES = ("linear_qkv", "linear_fc1", "output_layer")
ROW_NAMES = ("linear_proj", "linear_fc2")


# ---- candidates and patterns ([LORA-MATCH-1..4]) -----------------------------------------------------

def is_linear_like(name: str, module: nn.Module) -> bool:
    """The suite's idea of a linear-like module (see the module docstring)."""
    if isinstance(module, nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return False
    if "Linear" in type(module).__name__ and weight.dim() in (2, 3):
        return True
    return name.rsplit(".", 1)[-1] == "router" and weight.dim() == 2


def linear_candidates(model: nn.Module) -> list[str]:
    """Full names of the linear-like modules, from model.named_modules() (call before applying LoRA)."""
    return [name for name, module in model.named_modules() if name and is_linear_like(name, module)]


def full_names(model: nn.Module, short_names) -> list[str]:
    """The full names of the model's linear-like modules whose attribute name is one of `short_names`:
    target_modules for properties that do not judge matching, so that a library's handling of bare
    names ([LORA-MATCH-2], judged by its own properties) does not decide what they adapt."""
    return [name for name in linear_candidates(model) if name.rsplit(".", 1)[-1] in short_names]


def wildcard_regex(pattern: str) -> re.Pattern:
    """SPEC [LORA-MATCH-3]: `*` is any run of characters, dots included; everything else literal."""
    return re.compile("".join(".*" if ch == "*" else re.escape(ch) for ch in pattern))


def pattern_selects(pattern: str, full_name: str) -> bool:
    """SPEC [LORA-MATCH-2]: the attribute name equals the pattern, or the pattern matches the whole name."""
    return full_name.rsplit(".", 1)[-1] == pattern or wildcard_regex(pattern).fullmatch(full_name) is not None


def expected_selection(candidates, targets=(), excludes=()) -> set[str]:
    """The full names SPEC [LORA-MATCH-2] (target mode) or [LORA-MATCH-4] (exclude mode) selects."""
    if targets:
        return {n for n in candidates if any(pattern_selects(p, n) for p in targets)}
    return {n for n in candidates if not any(pattern_selects(p, n) for p in excludes)}


def unmatched_targets(candidates, targets) -> list[str]:
    return [p for p in targets if not any(pattern_selects(p, n) for n in candidates)]


def apply_quietly(backend, model, config, training=True):
    """apply_lora with warnings recorded (unmatched patterns warn, [LORA-MATCH-5]); returns (the model
    apply_lora returned, the records). The suite uses only the returned model from then on (a backend
    may return a new one; conformance/backend.py, "Lifecycle")."""
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        adapted = backend.apply_lora(model, backend.validate_config(config), training=training)
    return returned_model(model, adapted), records


def returned_model(given, returned):
    """What apply_lora returned, checked against what it was given: a module for a module, a list of
    the same length for a list of chunks."""
    if isinstance(given, (list, tuple)):
        if not isinstance(returned, (list, tuple)) or len(returned) != len(given):
            raise AssertionError(f"apply_lora was given {len(given)} chunks and returned {type(returned).__name__}"
                                 + (f" of {len(returned)}" if isinstance(returned, (list, tuple)) else "")
                                 + " (it must return the adapted chunks, a list of the same length)")
        return list(returned)
    if not isinstance(returned, nn.Module):
        raise AssertionError(f"apply_lora returned {type(returned).__name__}, not the adapted model "
                             f"(return the model, adapted in place or new)")
    return returned


# ---- experts ([MOE-MATCH-1], [MOE-RANK-1]) ---------------------------------------------------------------

EXPERT_LINEAR = re.compile(r".*mlp\..*experts.*\.linear_fc[12]$")


def is_expert_linear(full_name: str) -> bool:
    """SPEC [MOE-MATCH-1]."""
    return EXPERT_LINEAR.match(full_name) is not None and ".shared_experts." not in full_name


def effective_rank(full_name: str, dim: int, topk: int, etp: int, normalize: bool) -> int:
    """SPEC [MOE-RANK-1]: dim, or dim // topk for expert linears (rounded up to etp for column ones)."""
    if not (normalize and is_expert_linear(full_name)):
        return dim
    rank = dim // topk
    if full_name.endswith("linear_fc1"):
        rank = math.ceil(rank / etp) * etp
    return rank


# ---- base layouts ([TP-COL-1], [TP-ROW-1]) ---------------------------------------------------------------

def base_shard(full_name: str, tensor: str, gated: bool) -> Shard:
    """Where a rank's piece of the weight or bias of a dense TinyGPT module lies, by the module's name
    (see the module docstring): linear_fc1 of a gated MLP keeps its [gate; up] blocks (stride 2)."""
    short = full_name.rsplit(".", 1)[-1]
    kind = "column" if short in COLUMN_NAMES else "row" if short in ROW_NAMES else "none"
    return shard_of(tensor, kind, stride=2 if gated and short == "linear_fc1" else 1)


# ---- adapter layouts -------------------------------------------------------------------------------------

@dataclass
class AdapterPlan:
    """One LoRA module's adapter as SPEC lays it out on this rank."""

    name: str
    kind: str                      # "column", "row" or "none" (replicated)
    in_features: int
    out_features: int
    rank: int
    stride: int
    group: object                  # the group the adapter is sharded over (None: replicated)
    size: int
    index: int
    experts: list | None = None    # global ids of the stacked local experts (per-expert grouped adapters)
    expert_id: int | None = None   # the global id of a sequential expert
    shared_factor: str | None = None   # with `experts`: "A" or "B", one tensor for all experts ([MOE-SHARE-3])

    @property
    def full_shapes(self) -> tuple[tuple, tuple]:
        return (self.rank, self.in_features), (self.out_features, self.rank)

    def stacked(self, which: str) -> bool:
        """Whether factor `which` ("A" or "B") is stacked per local expert on this rank."""
        return self.experts is not None and which != self.shared_factor

    def shard(self, which: str) -> Shard:
        """Where this rank's piece of A or B lies (SPEC [LORA-FWD-2])."""
        return shard_of(which, self.kind, stride=self.stride)

    def _piece(self, full: torch.Tensor, which: str) -> torch.Tensor:
        return piece(full, self.shard(which), self.index, self.size)

    def local_shapes(self) -> tuple[tuple, tuple]:
        (r, i), (o, _) = self.full_shapes
        A = torch.empty(r, i, device="meta")
        B = torch.empty(o, r, device="meta")
        a, b = tuple(self._piece(A, "A").shape), tuple(self._piece(B, "B").shape)
        n = () if self.experts is None else (len(self.experts),)
        return (n + a if self.stacked("A") else a), (n + b if self.stacked("B") else b)

    def keys(self) -> list[str]:
        """Names the full tensors are drawn from: one per module, one per global expert if per expert
        (`...mlp.experts.expert{g}.linear_fc1` for grouped and sequential experts alike)."""
        if self.expert_id is not None:
            return [re.sub(r"local_experts\.\d+\.", f"expert{self.expert_id}.", self.name)]
        if self.experts is not None:
            return [self.expert_key(g) for g in self.experts]
        return [self.name]

    def expert_key(self, g: int) -> str:
        """The name global expert g's tensors of a grouped module are drawn from."""
        return re.sub(r"experts\.(linear_fc[12])$", rf"experts.expert{g}.\1", self.name)

    def all_experts_full(self, ctx, seed: int, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A grouped module's full A and B for all `num_experts` experts: a per-expert factor stacked
        (E, ...), a shared one 2-D (float64, as local_pieces draws them)."""
        if self.experts is None:                  # one adapter shared by every expert ([MOE-SHARE-1])
            return self.full_tensors(ctx, seed, self.name)
        pairs = [self.full_tensors(ctx, seed, self.expert_key(g)) for g in range(num_experts)]
        shared = self.full_tensors(ctx, seed, self.name) if self.shared_factor else None
        return tuple(torch.stack([pair[i] for pair in pairs]) if self.stacked(which) else shared[i]
                     for i, which in enumerate("AB"))

    def full_tensors(self, ctx, seed: int, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The suite's full A (r, in) and B (out, r) for `key`, float64, the same on every rank and layout."""
        base = (seed * 1_000_003 + zlib.crc32(key.encode())) % 2**31
        (r, i), (o, _) = self.full_shapes
        return (ctx.randn((r, i), base, scale=i ** -0.5), ctx.randn((o, r), base + 1, scale=r ** -0.5))

    def local_pieces(self, ctx, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's A and B; a shared outer factor is drawn from the module's own name."""
        pairs = [self.full_tensors(ctx, seed, key) for key in self.keys()]
        shared = self.full_tensors(ctx, seed, self.name) if self.shared_factor else None
        pieces = []
        for i, which in enumerate("AB"):
            if self.stacked(which):
                pieces.append(torch.stack([self._piece(pair[i], which) for pair in pairs]))
            else:
                pieces.append(self._piece((pairs[0] if shared is None else shared)[i], which))
        return tuple(pieces)

    def gather(self, ctx, local: torch.Tensor, which: str) -> torch.Tensor:
        """The full tensor (or stack) from this rank's shard `local` of A or B."""
        if self.size == 1:
            return local.detach().clone()
        return gather(local, self.shard(which), self.group, offset=1 if self.stacked(which) else 0)


def adapter_plan(name: str, spec: ModelSpec, groups, dim: int, *, normalize: bool = False,
                 share: bool = True, outer: bool = False) -> AdapterPlan:
    """The SPEC layout of the adapter of module `name` in a model built from `spec` (see the docstring)."""
    short = name.rsplit(".", 1)[-1]
    h, ffn, E, k = spec.hidden_size, spec.ffn_hidden_size, spec.num_moe_experts, spec.moe_router_topk
    gated = spec.gated_linear_unit
    tp = (groups.tp_group, groups.tp_size, groups.tp_rank)
    if short == "router":
        return AdapterPlan(name, "none", h, E, dim, 1, None, 1, 0)
    if is_expert_linear(name):
        etp = (groups.expert_tp_group, groups.expert_tp_size, groups.expert_tp_rank)
        rank = effective_rank(name, dim, k, groups.expert_tp_size, normalize)
        e_local = E // groups.ep_size
        first = groups.ep_rank * e_local
        plan = (AdapterPlan(name, "column", h, 2 * ffn if gated else ffn, rank, 2 if gated else 1, *etp)
                if short == "linear_fc1" else AdapterPlan(name, "row", ffn, h, rank, 1, *etp))
        sequential = re.search(r"local_experts\.(\d+)\.", name)
        if sequential:
            plan.expert_id = first + int(sequential.group(1))
        elif outer:                    # experts_shared_outer_loras: fc1's A and fc2's B shared
            plan.experts = list(range(first, first + e_local))
            plan.shared_factor = "A" if short == "linear_fc1" else "B"
        elif not share:
            plan.experts = list(range(first, first + e_local))
        return plan
    if ".shared_experts." in name:
        S = spec.moe_shared_expert_intermediate_size
        return (AdapterPlan(name, "column", h, S, dim, 1, *tp) if short == "linear_fc1"
                else AdapterPlan(name, "row", S, h, dim, 1, *tp))
    sizes = {"linear_qkv": (h, 3 * h, 1), "linear_proj": (h, h, 1), "output_layer": (h, spec.vocab_size, 1),
             "linear_fc1": (h, 2 * ffn if gated else ffn, 2 if gated else 1), "linear_fc2": (ffn, h, 1)}
    if short not in sizes:
        raise AssertionError(f"the suite does not know the layout of LoRA module {name}")
    in_f, out_f, stride = sizes[short]
    return AdapterPlan(name, "column" if short in COLUMN_NAMES else "row", in_f, out_f, dim, stride, *tp)


def plans(backend, model, spec: ModelSpec, groups, dim: int, **kwargs) -> dict[str, AdapterPlan]:
    return {name: adapter_plan(name, spec, groups, dim, **kwargs) for name in backend.lora_modules(model)}


def check_adapter_shapes(backend, model, plan_by_name: dict) -> None:
    """Every LoRA module's A and B have this rank's SPEC shard shapes (for a backend with
    "full_adapter": the full shapes, its shards being [LORA-FWD-2]'s business alone)."""
    modules = backend.lora_modules(model)
    full = backend.supports("full_adapter")
    for name, plan in plan_by_name.items():
        A, B = backend.full_adapter_weights(modules[name]) if full else backend.adapter_weights(modules[name])
        want_A, want_B = plan.full_shapes if full else plan.local_shapes()
        for label, param, want in (("A", A, want_A), ("B", B, want_B)):
            if tuple(param.shape) != want:
                (fa, fb) = plan.full_shapes
                where = "in full" if full else "on this rank"
                raise AssertionError(
                    f"adapter {label} of {name} has shape {tuple(param.shape)} {where}; SPEC gives {want} "
                    f"(a {plan.kind} base, rank {plan.rank}, full A {fa}, full B {fb}, sharded over "
                    f"{plan.size} rank(s){', stacked per local expert' if plan.experts is not None else ''})")


def load_model_adapters(ctx, backend, model, plan_by_name: dict, seed: int) -> None:
    """Write the suite's full A and B of every LoRA module (drawn by name): whole through
    load_full_adapter_weights for a backend with "full_adapter", else as this rank's SPEC shards."""
    check_adapter_shapes(backend, model, plan_by_name)
    modules = backend.lora_modules(model)
    for name, plan in plan_by_name.items():
        A, B = backend.adapter_weights(modules[name])
        if backend.supports("full_adapter"):
            full_A, full_B = plan.full_tensors(ctx, seed, _dense_key(plan))
            backend.load_full_adapter_weights(modules[name], full_A.to(A.dtype), full_B.to(B.dtype))
            continue
        A_local, B_local = plan.local_pieces(ctx, seed)
        with torch.no_grad():
            A.copy_(A_local.to(A.dtype))
            B.copy_(B_local.to(B.dtype))


def full_adapter_gradients(ctx, backend, module, plan: AdapterPlan) -> tuple:
    """The full gradients of a LoRA module's A and B (None where there is none): the backend's own
    full form with "full_adapter", else this rank's gradients gathered as SPEC shards."""
    if backend.supports("full_adapter"):
        return backend.full_adapter_weights(module, grad=True)
    A, B = backend.adapter_weights(module)
    return tuple(None if p.grad is None else plan.gather(ctx, p.grad, which) for p, which in ((A, "A"), (B, "B")))


def _dense_key(plan: AdapterPlan) -> str:
    """The one key a non-stacked adapter's full A and B are drawn from (the full form of a per-expert
    stack is not in the protocol: a backend with "full_adapter" and "moe" would need it)."""
    if plan.experts is not None:
        raise NotImplementedError(f"full adapters of per-expert stacks ({plan.name}) are not in the protocol")
    return plan.keys()[0]


def adapter_parameter_names(backend, model) -> dict[int, str]:
    """id(parameter) -> 'module name.A|B' for every adapter parameter the backend reports."""
    names = {}
    for name, module in backend.lora_modules(model).items():
        A, B = backend.adapter_weights(module)
        names[id(A)], names[id(B)] = f"{name}.A", f"{name}.B"
    return names


def token_ids(ctx, spec: ModelSpec, batch: int, seq: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, spec.vocab_size, (batch, seq), generator=generator).to(ctx.device)
