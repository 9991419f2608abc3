"""VLMLoRA: LoRA for vision-language models, with per-part freezing.

A VLM here has three parts, as in Megatron's LLaVA: `vision_model`, `vision_projection` and
`language_model` (a model may also hold them under `llava_model`). VLMLoRA freezes the parts whose
flag is set *before* the adapters are created, and nothing else:

    freeze_vision_model       (True)  vision_model.requires_grad_(False)
    freeze_vision_projection  (True)  vision_projection.requires_grad_(False)
    freeze_language_model     (True)  language_model.requires_grad_(False)

So a part whose flag is False is trained in full, and adapters inside frozen parts are trainable.
Parts that are None or absent are skipped. `training=False` freezes everything, adapters included.
The model may be a bare module or a list of pipeline chunks (each handled the same way).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .layout import check_flags
from .lora import LoRA

VLM_PARTS = ("vision_model", "vision_projection", "language_model")
FREEZE_FLAGS = ("freeze_vision_model", "freeze_vision_projection", "freeze_language_model")


@dataclass
class VLMLoRA(LoRA):
    """LoRA that freezes only the flagged parts of a VLM (see the module docstring).

        model = VLMLoRA(dim=8, freeze_language_model=False)(model)   # the language model trains in full

    Args:
        freeze_vision_model (bool): freeze `vision_model` before adding adapters. Default: True.
        freeze_vision_projection (bool): freeze `vision_projection`. Default: True.
        freeze_language_model (bool): freeze `language_model`. Default: True.
        **fields: LoRA's fields (target_modules, dim, alpha, ...), with LoRA's defaults.

    Raises:
        TypeError: a freeze flag that is not a bool (and LoRA's own checks).
        ValueError: (when applied) a model with none of the VLM parts.
    """

    freeze_vision_model: bool = True
    freeze_vision_projection: bool = True
    freeze_language_model: bool = True

    def __post_init__(self):
        super().__post_init__()
        check_flags(**{name: getattr(self, name) for name in FREEZE_FLAGS})

    def __setattr__(self, name, value):
        if name in FREEZE_FLAGS:                 # validated on assignment too, as LoRA's fields are
            check_flags(**{name: value})
        super().__setattr__(name, value)

    def validate(self) -> None:
        super().validate()
        check_flags(**{name: getattr(self, name) for name in FREEZE_FLAGS})

    def freeze_model(self, model, training: bool = True) -> None:
        """Freeze the flagged parts of each chunk (looking inside `llava_model` if present).

        Args:
            model (nn.Module | list[nn.Module]): the VLM or its pipeline chunks.
            training (bool): put each chunk in train mode (else leave its mode). Default: True.
        """
        chunks = list(model) if isinstance(model, (list, tuple)) else [model]
        flags = (self.freeze_vision_model, self.freeze_vision_projection, self.freeze_language_model)
        holders = [getattr(chunk, "llava_model", None) or chunk for chunk in chunks]
        if not any(hasattr(holder, part) for holder in holders for part in VLM_PARTS):
            # A model without any VLM part (a plain GPT, say) would be adapted with nothing frozen.
            raise ValueError(f"VLMLoRA: the model has none of the VLM parts {list(VLM_PARTS)} (directly or under "
                             f"llava_model); use LoRA for a model that is not a VLM")
        for chunk in chunks:
            holder: nn.Module = getattr(chunk, "llava_model", None) or chunk
            for part_name, freeze in zip(VLM_PARTS, flags):
                part = getattr(holder, part_name, None)
                if freeze and part is not None:
                    part.requires_grad_(False)
            if training:
                chunk.train()
