"""A readable reference for tensor-parallel LoRA (Megatron-style), in plain PyTorch.

    parallel/   process groups, sharding helpers, collectives as autograd functions
    layout.py   BaseLayout: how a base layer is split over its TP group (named once, by the layer)
    layers.py   ColumnParallelLinear, RowParallelLinear
    moe.py      a mixture-of-experts MLP (router, grouped and sequential experts)
    models.py   TinyGPT, TinyVLM
    merge.py    the tensor math of folding an adapter into its base weight (LoRAMerge)
    lora/       the LoRA config, adapter, wrappers and model transform
    vlm.py      VLMLoRA: LoRA with per-part freezing for vision-language models
"""

from .layers import ColumnParallelLinear, RowParallelLinear
from .layout import BaseLayout, layout_of
from .lora import (LoRA, LoRALinear, ParallelLinearAdapter, apply_lora, disabled_adapters, finalize_lora_grads,
                   merge_lora, set_adapters_enabled, unmerge_lora)
from .merge import LoRAMerge, merge_lora_shard, merge_lora_weight
from .models import TinyGPT, TinyGPTConfig, TinyVLM
from .moe import MoELayer
from .vlm import VLMLoRA
from .parallel import (
    ParallelState,
    destroy_model_parallel,
    get_parallel_state,
    init_distributed,
    initialize_model_parallel,
    resolve_tp_group,
)

__all__ = [
    "LoRA", "VLMLoRA", "TinyVLM", "MoELayer", "finalize_lora_grads", "LoRALinear", "ParallelLinearAdapter", "LoRAMerge", "merge_lora", "unmerge_lora",
    "ColumnParallelLinear", "RowParallelLinear", "TinyGPT", "TinyGPTConfig", "ParallelState",
    "init_distributed", "initialize_model_parallel", "get_parallel_state", "destroy_model_parallel",
    # added with the redesign
    "BaseLayout", "layout_of", "apply_lora", "merge_lora_shard", "merge_lora_weight", "resolve_tp_group",
    # parity with Megatron-Bridge 0.6.2
    "set_adapters_enabled", "disabled_adapters",
]
