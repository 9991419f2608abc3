"""The backend protocol: what a LoRA implementation provides so that the suite can check it.

A backend is one small class. The suite never looks inside a backend's modules except through
these methods; everything else (inputs, expected values, gathering shards) it does itself, from
SPEC.md and full-matrix float64 math. conformance/backends/loralib.py is a complete example.

    class MyBackend(Backend):
        name = "my-lora"
        capabilities = {"linear": True, "models": True, "dropout_position": {"pre"}}
        borrowed = {"matching": "reference.lora.matching (my library has no name matching)"}

        def make_linear(self, spec): ...                      # -> a base layer holding spec's weights
        def apply_lora(self, model, config, training=True): ... # -> the adapted model (or chunks)
        def adapter_weights(self, wrapped): ...               # -> (A, B) this rank's parameters
        ...

Lifecycle: the order in which the suite calls a backend, for one example
------------------------------------------------------------------------
1. `init_parallel(tp, ep, etp)` for the example's layout (layer examples on a plain nn.Linear skip
   it). A TP = 1 backend may inherit the default, which makes a TP = 1 layout with the reference's
   groups; properties that judge `init_parallel` are then "not applicable" for it.
2. `make_linear(spec)` (wrapped by the suite in a `Container` that holds it under `spec.name`) or
   `make_model(spec)` (or `make_plain_model`, conformance/plain.py). Models come in train mode.
3. `validate_config(config)`, then `apply_lora(model, config, training)`. `model` is one module or a
   *list of pipeline chunks* (VLM properties pass two); apply LoRA to every chunk. Return the adapted
   model (the same object adapted in place, or a new one; for a list, a list of the same length):
   the suite uses the returned value from then on and never the argument again. `training` says
   which parameters require grad (SPEC [LORA-INJ-1], [LORA-INJ-2]); set the module's train/eval mode
   to match if your library does that, but do nothing that depends on adapter values at that point.
4. The suite writes its adapter weights through `adapter_weights(wrapped)` (in-place copies), and
   only then switches modes itself: `module.train(mode)` on each chunk, for properties that need
   eval. A library that merges on `eval()` (loralib with merge_weights=True) therefore merges the
   weights the suite wrote. Properties that do not write weights (init, freezing) skip this step.
5. Forward / backward / `finalize_grads(model)` / `set_adapters_enabled(model, on)` /
   `merge_model(model)` (returns the merged model; the suite uses the return value).
Between examples the suite drops every module; `reset_parallel()` is called only after a
collective timed out.

What a verdict means
--------------------
A property *judges* protocol methods or aspects of `apply_lora` (ASPECTS). It passes only on the
backend's own code: when the backend inherits a judged method from this class, or says in `borrowed`
that it takes that part from elsewhere (the reference, the suite's helpers, glue written for the
backend because the library has none), the property is "not applicable" with that reason, never
"passed". A method that *is* a function of `reference` or of the suite (e.g.
`make_linear = staticmethod(plain_linear)`) counts as borrowed too.

Conventions (those of Megatron, see SPEC.md):
- Activations are (s, b, h). A column layer's forward takes the replicated input (or the sequence
  shard under SP) and returns its output shard (s, b, out/t) (or the gathered output); a row layer
  takes the hidden shard (s, b, in/t) and returns the reduced output (or its sequence shard under
  SP). A forward may return a tensor or (output, bias).
- `adapter_weights` returns the adapter's A (linear_in) and B (linear_out) *parameters* on this
  rank, oriented (rank, in) and (out, rank), sharded as SPEC.md [LORA-FWD-2] says (a DTensor
  parameter: its local tensor). Without the capability "full_adapter" the suite loads and reads them
  in place as SPEC shards, so a backend that shards differently fails every property that sees it.
- Layouts are not correctness: a backend that can read and write the *full* A and B whatever its
  shards (DTensor's `full_tensor()` / `distribute_tensor`, say) declares "full_adapter" and provides
  `full_adapter_weights` and `load_full_adapter_weights`. The suite then loads and reads adapters
  (and their gradients) through them, and only the layout clause [LORA-FWD-2] (its own property,
  `forward.adapter_shards_follow_the_spec_layout`) compares this rank's parameters with SPEC's shard.
- `plain_linear(spec)` builds the nn.Linear of a kind "linear" spec; `RawLoRAConfig` is what
  `validate_config` receives in the config properties (conformance/configs.py).
- `capabilities` says what the backend supports: a set of names, or a mapping name -> True or the
  set of supported values (CAPABILITY_VALUES), e.g. {"dropout_position": {"pre"}}: the suite then
  draws only "pre" and checks it fully. Properties that need something else are "not applicable".
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import skip_init

from reference import parallel

from .configs import RawLoRAConfig  # noqa: F401 - part of the protocol: what validate_config may receive

CAPABILITIES = {
    "tp": "tensor parallelism (TP > 1) for column/row-parallel bases",
    "sp": "sequence parallelism",
    "a2a": "a2a_experimental for row bases under sequence parallelism",
    "linear": "plain nn.Linear bases (non-parallel adapters)",
    "skip_bias_add": "column/row bases that return (output, bias) instead of adding their bias (Megatron's option)",
    "dropout_position": "dropout 'pre' and/or 'post' (values: the positions supported)",
    "init_methods": "lora_A_init_method / lora_B_init_method (values: 'A:<method>' / 'B:<method>' supported)",
    "lora_dtype": "lora_dtype",
    "merge": "the tensor merge helper (merge_weight)",
    "merge_model": "whole-model merge (merge_model)",
    "unmerge": "merging in place and taking the update out again (merge_in_place, unmerge_model)",
    "models": "tiny Megatron-named models (make_model 'gpt') for matching and injection",
    "moe": "mixture-of-experts models (make_model 'moe'), expert parallelism, expert LoRA",
    "vlm": "vision-language models (make_model 'vlm') and VLMLoRA freezing",
    "config_validation": "rejects bad LoRA configs at construction (validate_config) (values: the fields "
                         "it validates)",
    "relayout": "switching TP sizes within one run (properties that compare TP=1 with TP=world)",
    "disable_adapters": "turning a model's adapters off and on again (set_adapters_enabled)",
    "sp_input_regather": "sequence_parallel_input_regather: column adapters under SP keep only the input's "
                         "sequence shard for backward",
    "full_adapter": "the full A and B, read and written whatever the shards (full_adapter_weights, "
                    "load_full_adapter_weights): only [LORA-FWD-2] then judges the layout",
    "shared_outer_loras": "experts_shared_outer_loras: grouped experts share fc1's A and fc2's B, the other "
                          "factor per expert (with 'moe')",
}


# Capabilities that may name the values a backend supports; True (or a plain name) means all of them.
CAPABILITY_VALUES = {
    "dropout_position": frozenset({"pre", "post"}),
    "init_methods": frozenset({f"{factor}:{method}" for factor in "AB"
                               for method in ("xavier", "kaiming", "normal", "zero")}),
    "config_validation": frozenset({"dim", "alpha", "dropout", "dropout_position", "lora_A_init_method",
                                    "lora_B_init_method", "lora_dtype", "target_modules", "exclude_modules",
                                    "a2a_experimental", "normalize_moe_lora", "share_expert_adapters",
                                    "sequence_parallel_input_regather", "experts_shared_outer_loras"}),
}

# What a property may judge besides the protocol methods: parts of apply_lora.
ASPECTS = {
    "matching": "which modules apply_lora selects from the config's patterns (SPEC section 3)",
    "injection": "how apply_lora wraps the selected modules: in place, once, state-dict keys (section 8)",
    "freezing": "which parameters apply_lora leaves trainable, and train/eval modes (section 8, 11)",
    "init": "how apply_lora draws the adapters' initial weights (section 6)",
    "build_checks": "the sizes apply_lora checks before it builds an adapter (section 12)",
}


def capability_values(capabilities) -> dict[str, frozenset | None]:
    """name -> the supported values (None: no values to choose, or all of them), from a set of names
    or a mapping name -> True / iterable of values; an unknown value is an error."""
    if isinstance(capabilities, dict):
        items = capabilities.items()
    else:
        items = ((name, True) for name in capabilities)
    result = {}
    for name, value in items:
        if value is False or value is None:
            continue
        allowed = CAPABILITY_VALUES.get(name)
        if value is True or allowed is None:
            result[name] = None if allowed is None else allowed
            continue
        values = frozenset(value)
        unknown = sorted(values - allowed)
        if unknown:
            raise ValueError(f"capability {name!r}: unknown values {unknown}; allowed: {sorted(allowed)}")
        if values:
            result[name] = values
    return result


def supports(values: dict, capability: str, value: str | None = None) -> bool:
    """Whether `values` (capability_values' result) has `capability`, and that value of it if given."""
    if capability not in values:
        return False
    return value is None or values[capability] is None or value in values[capability]


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
    capabilities: frozenset[str] | dict = frozenset()
    # Judged method or aspect -> where this backend's code for it comes from, when not its library
    # (see "What a verdict means" above). Properties judging it are then "not applicable".
    borrowed: dict[str, str] = {}
    # True only for the reference's own backends: their parts come from `reference` by definition.
    is_reference = False

    def supports(self, capability: str, value: str | None = None) -> bool:
        """Whether the backend has `capability` (and, given a value, that value of it)."""
        return supports(capability_values(self.capabilities), capability, value)

    def describe(self) -> str:
        """One line for the report header (library versions, say)."""
        return self.name

    def tp_sizes(self, world_size: int) -> list[int]:
        """The TP sizes properties may draw (default: every divisor of the world size)."""
        return [t for t in range(1, world_size + 1) if world_size % t == 0]

    # -- parallel state -----------------------------------------------------------------------
    def init_parallel(self, tp: int, ep: int = 1, etp: int | None = None) -> Groups:
        """The groups of a layout. Default, for backends without tensor parallelism: TP = 1 (and
        EP = 1) made with the reference's groups; inheriting it makes TP-GROUP properties n/a."""
        if tp != 1 or ep != 1 or etp not in (None, 1):
            raise NotImplementedError(f"the default init_parallel makes TP = 1 only (asked: tp={tp}, ep={ep}, etp={etp})")
        state = parallel.initialize_model_parallel(1)
        return Groups(state.tp_group, 1, 0)

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

    def full_adapter_weights(self, wrapped: nn.Module, grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The full A (rank, in) and B (out, rank) of a wrapped module, or with grad=True their full
        gradients (None where there is none), the same on every rank of its TP group (a collective).
        Capability "full_adapter"."""
        raise NotImplementedError

    def load_full_adapter_weights(self, wrapped: nn.Module, A: torch.Tensor, B: torch.Tensor) -> None:
        """Write the full A (rank, in) and B (out, rank), given on every rank, into the adapter, each
        rank keeping its own shards (a collective). Capability "full_adapter"."""
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
        """Fold every adapter into its base weight and return the model without adapters."""
        raise NotImplementedError

    def merge_in_place(self, model: nn.Module) -> nn.Module:
        """Fold every adapter into its base weight, keeping the adapted modules (they stop adding the
        update), so that unmerge_model can undo it; merging a merged model changes nothing. Returns
        the model. Capability "unmerge"."""
        raise NotImplementedError

    def unmerge_model(self, model: nn.Module) -> nn.Module:
        """Take every merged update out of its base weight again (up to rounding); a model that is not
        merged is left as it is. Returns the model. Capability "unmerge"."""
        raise NotImplementedError

    def base_weight(self, wrapped: nn.Module) -> torch.Tensor:
        """The base layer's local weight parameter inside a wrapped module."""
        return wrapped.to_wrap.weight


def import_optional(module: str, extra: str, what: str):
    """Import a backend's library (an optional dependency), or stop with how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise SystemExit(f"conformance: {what} needs `pip install {module}` (extra: .[{extra}])") from e


def not_its_own(backend: Backend, judged) -> str:
    """Why a property judging `judged` (method or aspect names) would not be earned by the backend's
    own code: "" when every judged part is the backend's own."""
    for name in judged:
        if name in backend.borrowed:
            return f"{name}: {backend.borrowed[name]}"
        method = getattr(type(backend), name, None)
        if name in ASPECTS or method is None:
            continue
        if method is getattr(Backend, name, None):
            return f"{name}: the backend inherits the suite's default (conformance/backend.py)"
        function = getattr(method, "__func__", method)
        module = getattr(function, "__module__", "") or ""
        if module.split(".")[0] == "reference" or (module.startswith("conformance.")
                                                  and not module.startswith("conformance.backends.")):
            return f"{name}: the backend uses {module}.{getattr(function, '__qualname__', '?')}"
    return ""


def linear_holding(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding copies of `weight` (out, in) and `bias`, on their device and in their dtype.
    skip_init: no draw from the global generator, which adapters' init is seeded on ([LORA-INIT-2])."""
    linear = skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype,
                       device=weight.device)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


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
