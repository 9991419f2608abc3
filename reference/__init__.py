"""A readable reference for tensor-parallel LoRA (Megatron-style), in plain PyTorch."""

from .layers import ColumnParallelLinear, RowParallelLinear
from .lora import LoRA, LoRALinear, ParallelLinearAdapter, finalize_lora_grads
from .merge import LoRAMerge, merge_lora, unmerge_lora
from .models import TinyGPT, TinyGPTConfig, TinyVLM
from .moe import MoELayer
from .vlm import VLMLoRA
from .parallel import (
    ParallelState,
    destroy_model_parallel,
    get_parallel_state,
    init_distributed,
    initialize_model_parallel,
)

__all__ = [
    "LoRA", "VLMLoRA", "TinyVLM", "MoELayer", "finalize_lora_grads", "LoRALinear", "ParallelLinearAdapter", "LoRAMerge", "merge_lora", "unmerge_lora",
    "ColumnParallelLinear", "RowParallelLinear", "TinyGPT", "TinyGPTConfig", "ParallelState",
    "init_distributed", "initialize_model_parallel", "get_parallel_state", "destroy_model_parallel",
]
