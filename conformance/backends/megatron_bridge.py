"""Megatron-Bridge as a backend: its LoRA on megatron-core's Column/RowParallelLinear, under NCCL.

    torchrun --standalone --nproc-per-node 2 -m conformance --backend conformance.backends.megatron_bridge:MegatronBridgeBackend \
        --deviations conformance/deviations/megatron_bridge.txt

Needs an installed `megatron-core` and `megatron-bridge` (Python >= 3.12) and CUDA. Megatron-Bridge's
own LoRA code runs unchanged; this file only builds base layers (and the reference's TinyGPT/TinyVLM
with megatron-core linears), maps our config onto its `LoRA` / `VLMLoRA`, and reads its adapter
parameters. `tools/run_megatron_bridge.sh` runs it the way docs/reports/megatron_bridge_world2.* were made.

Importing `megatron.bridge.peft.lora` without Transformer Engine needs three documented workarounds,
applied only when `transformer_engine` cannot be imported (a real TE is never masked):
1. `megatron/bridge/__init__.py` imports every model bridge (transformers, diffusers, ...): the package
   is registered in sys.modules as a bare namespace so that only `megatron.bridge.peft` is loaded.
2. `megatron/bridge/peft/lora_layers.py` does `import transformer_engine.pytorch as te` and uses only
   `te.ops.Sequential` at import time (in annotations of the TE-fused path, which is built only with
   `use_transformer_engine_op_fuser`): a stub with that one name is present only while that module
   is imported, then removed.
3. megatron-core's TE extension defines MagicMock stand-ins without TE, which makes
   `megatron.bridge.peft.utils.HAVE_TE` and `module_matcher.HAVE_TE_*_LINEAR` True and
   `isinstance(m, <MagicMock>)` raise: they are set False, which is the truth.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import re
import sys
import types

import torch
import torch.distributed as dist

import reference
from reference.layers import ColumnParallelLinear, RowParallelLinear
from reference.parallel import shard

from ..backend import Backend, Groups, LinearSpec, ModelSpec, plain_linear

_MEGATRON = None


def _has_real_transformer_engine() -> bool:
    try:
        return importlib.util.find_spec("transformer_engine") is not None
    except (ImportError, ValueError):
        return False


def megatron():
    """Import megatron-core and Megatron-Bridge's peft package (once); returns a namespace."""
    global _MEGATRON
    if _MEGATRON is not None:
        return _MEGATRON
    import megatron.core  # noqa: F401
    from megatron.core import ModelParallelConfig, parallel_state, tensor_parallel
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    real_te = _has_real_transformer_engine()
    if "megatron.bridge" not in sys.modules:              # workaround 1: skip the heavy package __init__
        spec = importlib.util.find_spec("megatron.bridge")
        package = types.ModuleType("megatron.bridge")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules["megatron.bridge"] = package
        sys.modules["megatron"].bridge = package
    for name in ("megatron.bridge.peft.base", "megatron.bridge.peft.utils", "megatron.bridge.peft.module_matcher"):
        importlib.import_module(name)
    stubbed = []
    if not real_te:                                       # workaround 2: a stub only while lora_layers imports
        te = types.ModuleType("transformer_engine")
        te.__path__ = []
        te_pytorch = types.ModuleType("transformer_engine.pytorch")
        te_pytorch.ops = types.SimpleNamespace(Sequential=type("Sequential", (), {}))
        te.pytorch = te_pytorch
        sys.modules["transformer_engine"], sys.modules["transformer_engine.pytorch"] = te, te_pytorch
        stubbed = ["transformer_engine", "transformer_engine.pytorch"]
    try:
        lora_layers = importlib.import_module("megatron.bridge.peft.lora_layers")
    finally:
        for name in stubbed:
            sys.modules.pop(name, None)
    lora = importlib.import_module("megatron.bridge.peft.lora")
    logging.getLogger("megatron.bridge").setLevel(logging.WARNING)   # one INFO line per adapted module
    lora_merge = importlib.import_module("megatron.bridge.peft.lora_merge")
    utils = importlib.import_module("megatron.bridge.peft.utils")
    matcher = importlib.import_module("megatron.bridge.peft.module_matcher")
    if not real_te:                                       # workaround 3
        utils.HAVE_TE = False
        matcher.HAVE_TE_COL_LINEAR = matcher.HAVE_TE_LN_COL_LINEAR = matcher.HAVE_TE_ROW_LINEAR = False
    import megatron.bridge as bridge_pkg

    _MEGATRON = types.SimpleNamespace(
        ModelParallelConfig=ModelParallelConfig, parallel_state=parallel_state, tensor_parallel=tensor_parallel,
        ColumnParallelLinear=ColumnParallelLinear, RowParallelLinear=RowParallelLinear, LoRA=lora.LoRA,
        VLMLoRA=lora.VLMLoRA,
        LoRALinear=lora_layers.LoRALinear, LinearAdapter=lora_layers.LinearAdapter,
        LoRAMerge=lora_merge.LoRAMerge, shimmed=not real_te,
        version=getattr(bridge_pkg, "__version__", None) or _dist_version("megatron-bridge"),
        core_version=_dist_version("megatron-core"))
    return _MEGATRON


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


def _parallel_state_globals(state) -> dict:
    """megatron-core's parallel_state keeps its layout in module globals named like _TENSOR_MODEL_PARALLEL_GROUP."""
    return {name: value for name, value in vars(state).items()
            if re.fullmatch(r"_[A-Z][A-Z0-9_]*", name) and not callable(value)}


def _shard(full: torch.Tensor, dim: int, rank: int, size: int, stride: int = 1) -> torch.Tensor:
    return shard(full.detach().cpu(), dim, rank, size, stride)


class MegatronBridgeBackend(Backend):
    name = "megatron-bridge"
    capabilities = frozenset({"tp", "sp", "a2a", "linear", "skip_bias_add", "dropout_position", "init_methods", "lora_dtype",
                              "merge", "models", "relayout", "config_validation", "vlm", "disable_adapters"})

    def __init__(self):
        self._layout = None
        self._saved_layouts = {}    # (tp, ep, etp) -> megatron-core's parallel_state globals for it

    def describe(self) -> str:
        m = megatron()
        shim = " (no Transformer Engine: import workarounds on)" if m.shimmed else ""
        return f"Megatron-Bridge {m.version} on megatron-core {m.core_version}{shim}, torch {torch.__version__}"

    # -- parallel state -------------------------------------------------------------------------
    def init_parallel(self, tp, ep=1, etp=None) -> Groups:
        """megatron-core keeps one layout in module globals. Each layout is initialized once, on every
        rank (it creates process groups collectively), and its globals are saved; switching back
        restores them. Re-initializing instead would create a new set of NCCL communicators at every
        switch, and the properties that compare TP sizes switch twice per example."""
        m = megatron()
        layout = (tp, ep, etp)
        if self._layout != layout:
            state = m.parallel_state
            if layout in self._saved_layouts:
                vars(state).update(self._saved_layouts[layout])
            else:
                # A failed initialization (bad sizes) leaves the globals cleared: no layout is current.
                self._layout = None
                state.destroy_model_parallel()   # also clears what a half-finished initialization left
                state.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                                                expert_tensor_parallel_size=etp, create_gloo_process_groups=False)
                self._saved_layouts[layout] = _parallel_state_globals(state)
            m.tensor_parallel.model_parallel_cuda_manual_seed(1234)
            self._layout = layout
        group = m.parallel_state.get_tensor_model_parallel_group()
        return Groups(group, dist.get_world_size(group), dist.get_rank(group))

    def reset_parallel(self) -> None:
        """After a timed-out collective the saved groups may be broken: forget them all."""
        self._layout = None
        self._saved_layouts.clear()

    def tp_sizes(self, world_size: int) -> list[int]:
        return [t for t in range(1, world_size + 1) if world_size % t == 0]

    def _config(self, tp: int, sequence_parallel: bool, dtype: torch.dtype):
        m = megatron()
        return m.ModelParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel and tp > 1,
                                     params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16)

    # -- layers ---------------------------------------------------------------------------------
    def make_linear(self, spec: LinearSpec):
        m = megatron()
        groups = spec.groups or self.init_parallel(1)
        device = torch.device("cuda", torch.cuda.current_device())
        if spec.kind == "linear":
            return plain_linear(spec, device)
        config = self._config(groups.tp_size, spec.sequence_parallel, spec.dtype)
        zeros = torch.nn.init.zeros_
        if spec.kind == "column":
            layer = m.ColumnParallelLinear(spec.in_features, spec.out_features, config=config, init_method=zeros,
                                           bias=spec.bias is not None, gather_output=spec.gather_output,
                                           stride=spec.stride, skip_bias_add=spec.skip_bias_add, tp_group=groups.tp_group)
            weight = _shard(spec.weight, 0, groups.tp_rank, groups.tp_size, spec.stride)
            bias = None if spec.bias is None else _shard(spec.bias, 0, groups.tp_rank, groups.tp_size, spec.stride)
        else:
            layer = m.RowParallelLinear(spec.in_features, spec.out_features, config=config, init_method=zeros,
                                        bias=spec.bias is not None, input_is_parallel=spec.input_is_parallel,
                                        skip_bias_add=spec.skip_bias_add, tp_group=groups.tp_group)
            weight = _shard(spec.weight, 1, groups.tp_rank, groups.tp_size)
            bias = spec.bias
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def make_model(self, spec: ModelSpec):
        """The reference's TinyGPT (or TinyVLM) network with every parallel linear replaced by
        megatron-core's, carrying the same full weights."""
        if spec.kind not in ("gpt", "vlm"):
            raise NotImplementedError(f"no {spec.kind} model for Megatron-Bridge here")
        groups = self.init_parallel(self._layout[0] if self._layout else 1)
        config = reference.TinyGPTConfig(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
                                         num_layers=spec.num_layers, num_attention_heads=spec.num_attention_heads,
                                         ffn_hidden_size=spec.ffn_hidden_size, sequence_parallel=spec.sequence_parallel,
                                         gated_linear_unit=spec.gated_linear_unit, params_dtype=spec.dtype)
        if spec.kind == "vlm":
            model = reference.TinyVLM(config, seed=spec.seed, tp_group=groups.tp_group)
        else:
            model = reference.TinyGPT(config, seed=spec.seed, tp_group=groups.tp_group)
        for name, module in list(model.named_modules()):
            if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
                weight, bias = module.full_weight()
                kind = "column" if isinstance(module, ColumnParallelLinear) else "row"
                layer = self.make_linear(LinearSpec(
                    kind=kind, in_features=module.input_size, out_features=module.output_size, weight=weight,
                    bias=bias, sequence_parallel=module.sequence_parallel, skip_bias_add=module.skip_bias_add,
                    gather_output=getattr(module, "gather_output", False), stride=getattr(module, "stride", 1),
                    input_is_parallel=getattr(module, "input_is_parallel", True), dtype=spec.dtype, groups=groups))
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        return model

    # -- LoRA -----------------------------------------------------------------------------------
    def validate_config(self, config):
        """Megatron-Bridge's own LoRA (VLMLoRA when the config has freeze flags), built from our fields as
        they are (bad values included): what its constructor checks is what LORA-CFG-2/3 measure."""
        m = megatron()

        def as_given(patterns):   # lists stay lists; a bad value (a str, say) is passed as it is
            return list(patterns) if isinstance(patterns, (list, tuple)) else patterns

        fields = dict(target_modules=as_given(config.target_modules), exclude_modules=as_given(config.exclude_modules),
                      dim=config.dim, alpha=config.alpha, dropout=config.dropout,
                      dropout_position=config.dropout_position, lora_A_init_method=config.lora_A_init_method,
                      lora_B_init_method=config.lora_B_init_method, a2a_experimental=config.a2a_experimental,
                      lora_dtype=config.lora_dtype, normalize_moe_lora=config.normalize_moe_lora,
                      share_expert_adapters=config.share_expert_adapters,
                      sequence_parallel_input_regather=config.sequence_parallel_input_regather,
                      experts_shared_outer_loras=config.experts_shared_outer_loras)
        if hasattr(config, "freeze_vision_model"):
            return m.VLMLoRA(**fields, freeze_vision_model=config.freeze_vision_model,
                             freeze_vision_projection=config.freeze_vision_projection,
                             freeze_language_model=config.freeze_language_model)
        return m.LoRA(**fields)

    def apply_lora(self, model, config, training=True):
        m = megatron()
        lora = config if isinstance(config, m.LoRA) else self.validate_config(config)
        if isinstance(lora, m.VLMLoRA) and not isinstance(model, list):
            # VLMLoRA.freeze_model indexes its argument (unwrap_model(model)[0]): Megatron-Bridge passes
            # the list of pipeline chunks, so a bare model goes in as a list of one (docs/backends.md).
            lora([model], training=training)
            return model
        return lora(model, training=training)

    def lora_modules(self, model):
        m = megatron()
        return {name: mod for name, mod in model.named_modules() if isinstance(mod, (m.LoRALinear, m.LinearAdapter))}

    def adapter_weights(self, wrapped):
        m = megatron()
        adapter = wrapped if isinstance(wrapped, m.LinearAdapter) else wrapped.adapter
        return adapter.linear_in.weight, adapter.linear_out.weight

    def base_weight(self, wrapped):
        m = megatron()
        return wrapped.weight if isinstance(wrapped, m.LinearAdapter) else wrapped.to_wrap.weight

    def set_adapters_enabled(self, model, enabled):
        """Megatron-Bridge's own switches: enable_adapter_layers / disable_adapter_layers of each
        AdapterWrapper (LoRALinear, LoRATopKRouter) and LinearAdapter, as its PEFT.enable_adapter_layers
        and disable_adapter_layers call them."""
        for chunk in model if isinstance(model, (list, tuple)) else [model]:
            for module in chunk.modules():
                switch = getattr(module, "enable_adapter_layers" if enabled else "disable_adapter_layers", None)
                if callable(switch):
                    switch()

    def merge_weight(self, base_weight, linear_out, linear_in, alpha, dim, *, tp_size, tp_group):
        return megatron().LoRAMerge().merge(base_weight, linear_out, linear_in, alpha, dim, tp_group=tp_group)
