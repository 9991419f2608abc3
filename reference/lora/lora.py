"""LoRA: Megatron-Bridge's LoRA config that applies itself (the user-facing entry point).

    model = LoRA(dim=16, alpha=32)(model)              # freeze base, add trainable adapters
    module = LoRA().transform(module, name, prefix)    # one module: wrapped if selected

The fields and their checks are LoRAConfig's (reference/lora/config.py); the work is done by the
model transform (reference/lora/transform.py) and the matcher (reference/lora/matching.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .config import LoRAConfig
from .matching import match
from .transform import apply_lora, freeze_all, transform


@dataclass
class LoRA(LoRAConfig):
    """Megatron-Bridge's `LoRA`: a config that applies itself.

        model = LoRA(dim=16, alpha=32)(model)              # freeze base, add trainable adapters
        module = LoRA().transform(module, name, prefix)    # one module: wrapped if selected

    Args:
        target_modules (list[str]): short names (exact) or `*` wildcards over full names.
            Default: ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"].
        exclude_modules (list[str]): with target_modules=[]: adapt every linear except these.
            Default: [].
        dim (int): the rank r. Default: 32.
        alpha (float): the update is (alpha / r) B A. Default: 32.
        dropout (float): dropout probability in [0, 1). Default: 0.0.
        dropout_position (str): "pre" (adapter input) or "post" (adapter output). Default: "pre".
        a2a_experimental (bool): one all-to-all instead of gather + scatter for row bases under
            sequence parallelism. Default: False.
        lora_A_init_method (str): xavier, kaiming, normal or zero. Default: "xavier".
        lora_B_init_method (str): xavier, kaiming, normal or zero. Default: "zero".
        lora_dtype (torch.dtype | None): dtype of A and B; None: the base weight's. Default: None.
        normalize_moe_lora (bool): expert adapters get rank dim // moe_router_topk. Default: False.
        share_expert_adapters (bool): one adapter for all local grouped experts (else one per
            expert). Default: True.
        sequence_parallel_input_regather (bool): under sequence parallelism the A of a column
            linear_qkv / linear_fc1 adapter keeps only this rank's sequence shard of its input for
            backward and all-gathers it again there: the same numbers, less activation memory.
            Elsewhere (no SP, row bases, experts, a2a_experimental, eval) it changes nothing.
            Default: False.
        experts_shared_outer_loras (bool): grouped experts' adapters share the outer factors across
            experts (fc1's A, fc2's B; one copy for all experts of all EP ranks) and keep the inner
            ones per expert (fc1's B, fc2's A); share_expert_adapters is then ignored for them.
            Default: False.

    Raises:
        ValueError, TypeError: at construction, naming the field that is out of range.
    """

    def __call__(self, model, training: bool = True):
        """apply_lora(model, self, training): the same model, adapted in place."""
        return apply_lora(model, self, training=training)

    def freeze_model(self, model, training: bool = True) -> None:
        """Freeze every parameter of the model (or of each chunk); train mode when training."""
        freeze_all(model, training)

    def transform(self, module: nn.Module, name: str | None = None, prefix: str | None = None) -> nn.Module:
        """`module` wrapped with an adapter if this config selects it (name, prefix: see match)."""
        return transform(self, module, name, prefix)

    def match(self, module: nn.Module, name: str | None = None, prefix: str | None = None) -> str | None:
        """The pattern that selects `module` (its full name in exclude mode), or None (also when
        `name` is None)."""
        return match(self, module, name, prefix)


__all__ = ["LoRA"]
