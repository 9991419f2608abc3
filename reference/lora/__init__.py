"""LoRA: configuration, matching, the parallel adapter, the wrapper and the model transform.

    config.py     LoRAConfig: the fields, defaults and checks
    lora.py       LoRA: the config that applies itself (model = LoRA(...)(model))
    matching.py   which modules get an adapter
    build.py      config + base layout -> the adapter's arguments (and the MoE expert rank)
    adapter.py    ParallelLinearAdapter: scale * B A x, sharded like its base
    regather.py   sequence_parallel_input_regather: A keeps its input's sequence shard for backward
    protocol.py   LoRAWrapper: what a wrapper offers; is_lora_wrapper, lora_adapters
    wrapper.py    LoRALinear: base(x) + adapter(x), with shared communication and merge
    experts.py    the MoE wrappers (grouped experts, router)
    transform.py  apply_lora, finalize_lora_grads, merge_lora / unmerge_lora, set_adapters_enabled /
                  disabled_adapters over a model
    checkpoint.py a wrapper's state dict keeps its base's keys (base checkpoints load)

This file only re-exports.
"""

from .adapter import ADAPTER_ACTIVATIONS, LoRAWeight, ParallelLinearAdapter
from .build import adapter_arguments, build_adapter, effective_dim, is_expert_linear
from .config import DEFAULT_TARGET_MODULES, LoRAConfig
from .experts import ExpertAdapter, LoRAGroupedLinear, LoRATopKRouter
from .lora import LoRA
from .matching import is_linear_like, match, pattern_matches
from .protocol import LoRAWrapper, is_lora_wrapper, lora_adapters, named_lora_wrappers
from .transform import (apply_lora, disabled_adapters, finalize_lora_grads, freeze_all, merge_lora,
                        set_adapters_enabled, transform, unmerge_lora)
from .wrapper import LoRALinear

__all__ = [
    "LoRA", "LoRAConfig", "LoRALinear", "LoRAWeight", "ParallelLinearAdapter", "DEFAULT_TARGET_MODULES",
    "apply_lora", "build_adapter", "freeze_all", "finalize_lora_grads", "transform", "match", "pattern_matches",
    "is_linear_like", "lora_adapters",
    # added with the redesign
    "LoRAWrapper", "is_lora_wrapper", "named_lora_wrappers", "adapter_arguments", "effective_dim",
    "is_expert_linear", "ExpertAdapter", "LoRAGroupedLinear", "LoRATopKRouter", "merge_lora", "unmerge_lora",
    # parity with Megatron-Bridge 0.6.2: adapters off and on
    "set_adapters_enabled", "disabled_adapters", "ADAPTER_ACTIVATIONS",
]
