"""Checkpoint keys of a LoRA wrapper: the base layer's keys, unchanged, and the adapter's beside them.

A wrapper holds its base as the submodule `to_wrap`, so by default its state dict would rename every
base key (`...linear_qkv.weight` -> `...linear_qkv.to_wrap.weight`) and a base checkpoint would no
longer load into the adapted model. As Megatron-Bridge's AdapterWrapper does, a wrapper's state dict
instead has

    <prefix>weight, <prefix>bias, ...                  the base's keys, as the unwrapped model has them
    <prefix>adapter.linear_in.weight                   A (this rank's shard)
    <prefix>adapter.linear_out.weight                  B (this rank's shard)

and `load_state_dict` accepts the base's keys (and the `to_wrap.` ones of older checkpoints). A
checkpoint that has none of a wrapper's adapter keys (a base checkpoint) loads even with strict=True:
that wrapper's adapters keep their values. A checkpoint that has some but not all of them reports
the others missing, as any incomplete checkpoint does.

Two hooks per wrapper, installed by `keep_base_keys(wrapper)`:
    state-dict post-hook       `<prefix>to_wrap.X` -> `<prefix>X` (and the version metadata alike)
    load pre-hook              `<prefix>X` -> `<prefix>to_wrap.X` for every non-adapter key; notes
                               whether any adapter key was given
    load post-hook             if none was: drop this wrapper's adapter keys from the missing keys
"""

from __future__ import annotations

from torch import nn

BASE = "to_wrap."
ADAPTER = "adapter."


def _present_base_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict post-hook: this wrapper's `to_wrap.` keys lose that part, in their order."""
    ours = [key for key in state_dict if key.startswith(prefix)]
    for key in ours:                     # pop and re-insert every key of ours: the order is kept
        value = state_dict.pop(key)
        name = key[len(prefix):]
        state_dict[prefix + name.removeprefix(BASE)] = value
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is None:
        return
    inner = prefix + BASE[:-1]           # the base's own entry replaces the wrapper's
    for key in [k for k in metadata if k == inner or k.startswith(inner + ".")]:
        rest = key[len(inner):]          # "" or ".submodule"
        metadata[(prefix[:-1] + rest) if prefix else rest.removeprefix(".")] = metadata.pop(key)


def _accept_base_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata, strict, missing_keys,
                      unexpected_keys, error_msgs) -> None:
    """Load pre-hook: the base's keys go to `to_wrap.`; remember whether any adapter key was given."""
    ours = [key for key in state_dict if key.startswith(prefix)]
    given = False
    for key in ours:
        name = key[len(prefix):]
        if name.startswith(ADAPTER):
            given = True
        elif not name.startswith(BASE):
            state_dict[prefix + BASE + name] = state_dict.pop(key)
    module._adapter_keys_absent = None if given else prefix + ADAPTER


def _forgive_absent_adapter(module: nn.Module, incompatible_keys) -> None:
    """Load post-hook: a checkpoint without any of this wrapper's adapter keys does not miss them."""
    absent, module._adapter_keys_absent = getattr(module, "_adapter_keys_absent", None), None
    if absent is not None:
        incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if not k.startswith(absent)]


def keep_base_keys(wrapper: nn.Module) -> None:
    """Install the hooks (see the module docstring) on `wrapper`, a module with `to_wrap` and `adapter`.

    Args:
        wrapper (nn.Module): a LoRA wrapper; its state dict then has its base's keys unchanged.
    """
    wrapper._adapter_keys_absent = None
    wrapper.register_state_dict_post_hook(_present_base_keys)
    wrapper.register_load_state_dict_pre_hook(_accept_base_keys)
    wrapper.register_load_state_dict_post_hook(_forgive_absent_adapter)


__all__ = ["keep_base_keys"]
