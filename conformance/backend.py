"""The backend protocol: what a LoRA implementation provides so that the suite can check it.

A backend is one small class. The suite never looks inside a backend's modules except through
these methods; everything else (inputs, expected values, gathering shards) it does itself, from
SPEC.md and full-matrix float64 math.

    class MyBackend(Backend):
        name = "my-lora"
        capabilities = frozenset({"tp", "sp", "merge"})

        def init_parallel(self, tp, ep=1, etp=None): ...     # -> Groups
        def reset_parallel(self): ...                         # forget cached groups (after a hang)
        def make_linear(self, spec): ...                      # -> a base layer holding spec's weights
        def apply_lora(self, model, config, training=True): ...
        def adapter_weights(self, wrapped): ...               # -> (A, B) this rank's parameters
        def merge_weight(self, base_weight, linear_out, linear_in, alpha, dim, *, tp_size, tp_group): ...
        def merge_model(self, model): ...
        def set_adapters_enabled(self, model, enabled): ...  # adapters off (the base model) / on

Conventions (those of Megatron, see SPEC.md):
- Activations are (s, b, h). A column layer's forward takes the replicated input (or the sequence
  shard under SP) and returns its output shard (s, b, out/t) (or the gathered output); a row layer
  takes the hidden shard (s, b, in/t) and returns the reduced output (or its sequence shard under
  SP). A forward may return a tensor or (output, bias).
- `adapter_weights` returns the adapter's A (linear_in) and B (linear_out) *parameters* on this
  rank, oriented (rank, in) and (out, rank), sharded as SPEC.md [LORA-FWD-2] says. The suite loads
  and reads them in place: a backend that shards differently fails the properties that see it.
- `plain_linear(spec)` builds the nn.Linear of a kind "linear" spec; `RawLoRAConfig` is what
  `validate_config` receives in the config properties (conformance/configs.py).
- `capabilities` lists what the backend supports; properties that need something else are reported
  "not applicable", never passed. See CAPABILITIES.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .configs import RawLoRAConfig  # noqa: F401 - part of the protocol: what validate_config may receive

CAPABILITIES = {
    "tp": "tensor parallelism (TP > 1) for column/row-parallel bases",
    "sp": "sequence parallelism",
    "a2a": "a2a_experimental for row bases under sequence parallelism",
    "linear": "plain nn.Linear bases (non-parallel adapters)",
    "dropout_position": "dropout 'pre' and 'post'",
    "init_methods": "lora_A_init_method / lora_B_init_method: xavier, kaiming, normal, zero",
    "lora_dtype": "lora_dtype",
    "merge": "the tensor merge helper (merge_weight)",
    "merge_model": "whole-model merge (merge_model)",
    "models": "tiny Megatron-named models (make_model 'gpt') for matching and injection",
    "moe": "mixture-of-experts models (make_model 'moe'), expert parallelism, expert LoRA",
    "vlm": "vision-language models (make_model 'vlm') and VLMLoRA freezing",
    "config_validation": "rejects bad LoRA configs at construction (validate_config)",
    "relayout": "switching TP sizes within one run (properties that compare TP=1 with TP=world)",
    "disable_adapters": "turning a model's adapters off and on again (set_adapters_enabled)",
    "sp_input_regather": "sequence_parallel_input_regather: column adapters under SP keep only the input's "
                         "sequence shard for backward",
    "shared_outer_loras": "experts_shared_outer_loras: grouped experts share fc1's A and fc2's B, the other "
                          "factor per expert (with 'moe')",
}


@dataclass
class Groups:
    """The process groups of one layout, as the backend made them."""

    tp_group: object
    tp_size: int
    tp_rank: int
    ep_group: object = None
    ep_size: int = 1
    ep_rank: int = 0
    expert_tp_group: object = None
    expert_tp_size: int = 1
    expert_tp_rank: int = 0


@dataclass
class LinearSpec:
    """A base layer to build: kind "column", "row" or "linear" (plain nn.Linear), full weights."""

    kind: str
    in_features: int
    out_features: int
    weight: torch.Tensor                       # (out, in), full
    bias: torch.Tensor | None = None           # (out,), full
    sequence_parallel: bool = False
    skip_bias_add: bool = False
    gather_output: bool = False                # column only
    input_is_parallel: bool = True             # row only
    stride: int = 1                            # column only: [gate; up] blocks kept whole per rank
    dtype: torch.dtype = torch.float32
    groups: Groups | None = None
    name: str = "linear"                       # the attribute name it gets in its container


@dataclass
class ModelSpec:
    """A tiny Megatron-named model to build (see reference/models.py for the names)."""

    kind: str                                  # "gpt", "moe" or "vlm"
    seed: int = 0
    num_layers: int = 2
    hidden_size: int = 32
    ffn_hidden_size: int = 64
    num_attention_heads: int = 4
    vocab_size: int = 64
    sequence_parallel: bool = False
    gated_linear_unit: bool = False
    dtype: torch.dtype = torch.float32
    num_moe_experts: int = 4
    moe_router_topk: int = 2
    moe_grouped_gemm: bool = True
    moe_shared_expert_intermediate_size: int | None = None
    extra: dict = field(default_factory=dict)


class Backend:
    """Base class with the protocol; see the module docstring. Override what you support."""

    name = "unnamed"
    capabilities: frozenset[str] = frozenset()

    def describe(self) -> str:
        """One line for the report header (library versions, say)."""
        return self.name

    def tp_sizes(self, world_size: int) -> list[int]:
        """The TP sizes properties may draw (default: every divisor of the world size)."""
        return [t for t in range(1, world_size + 1) if world_size % t == 0]

    # -- parallel state -----------------------------------------------------------------------
    def init_parallel(self, tp: int, ep: int = 1, etp: int | None = None) -> Groups:
        raise NotImplementedError

    def reset_parallel(self) -> None:
        """Forget every process group made so far: called after a collective timed out (the groups
        may be out of step), before the next property makes fresh ones. Default: nothing cached."""

    # -- layers and models --------------------------------------------------------------------
    def make_linear(self, spec: LinearSpec) -> nn.Module:
        raise NotImplementedError

    def make_model(self, spec: ModelSpec) -> nn.Module:
        raise NotImplementedError

    def model_forward(self, model: nn.Module, spec: ModelSpec, inputs: dict) -> torch.Tensor:
        """Full logits (b, s, vocab) on every rank. inputs: input_ids (b, s) [, patches (b, n, p)]."""
        if spec.kind == "vlm":
            return model(inputs["patches"], inputs["input_ids"])
        return model(inputs["input_ids"])

    # -- LoRA ---------------------------------------------------------------------------------
    def validate_config(self, config) -> object:
        """Build the backend's LoRA config from ours (a reference.LoRA, or a RawLoRAConfig whose
        values may be bad); raise ValueError/TypeError naming the field on bad values."""
        return config

    def apply_lora(self, model: nn.Module, config, training: bool = True) -> nn.Module:
        raise NotImplementedError

    def lora_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        """Full name -> wrapped module, for every module that got an adapter."""
        return {name: m for name, m in model.named_modules() if hasattr(m, "adapter")}

    def adapter_weights(self, wrapped: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def finalize_grads(self, model: nn.Module) -> None:
        """After backward, before the optimizer step (e.g. sum shared-expert adapter grads)."""

    def set_adapters_enabled(self, model: nn.Module, enabled: bool) -> None:
        """Turn every adapter of `model` (a model after apply_lora) off (False: the model computes as
        its base model) or on again (True). Capability "disable_adapters"."""
        raise NotImplementedError

    # -- merge --------------------------------------------------------------------------------
    def merge_weight(self, base_weight, linear_out, linear_in, alpha, dim, *, tp_size, tp_group):
        raise NotImplementedError

    def merge_model(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def base_weight(self, wrapped: nn.Module) -> torch.Tensor:
        """The base layer's local weight parameter inside a wrapped module."""
        return wrapped.to_wrap.weight


def plain_linear(spec: LinearSpec, device=None) -> nn.Linear:
    """An nn.Linear holding `spec`'s full weight and bias (kind "linear": a base without TP)."""
    layer = nn.Linear(spec.in_features, spec.out_features, bias=spec.bias is not None, dtype=spec.dtype,
                      device=device if device is not None else spec.weight.device)
    with torch.no_grad():
        layer.weight.copy_(spec.weight)
        if spec.bias is not None:
            layer.bias.copy_(spec.bias)
    return layer


class Container(nn.Module):
    """Holds one layer under a given attribute name, so that LoRA matching sees that name."""

    def __init__(self, name: str, layer: nn.Module):
        super().__init__()
        self.layer_name = name
        setattr(self, name, layer)

    def layer(self) -> nn.Module:
        return getattr(self, self.layer_name)

    def forward(self, x):
        return self.layer()(x)
