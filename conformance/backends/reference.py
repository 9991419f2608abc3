"""The reference as a backend: the suite's default, and the model for writing one."""

from __future__ import annotations

import torch

import reference
from reference import parallel
from reference.layers import ColumnParallelLinear, RowParallelLinear
from reference.lora import is_lora_wrapper

from ..backend import Backend, Groups, LinearSpec, ModelSpec, plain_linear


class ReferenceBackend(Backend):
    name = "reference"
    is_reference = True
    capabilities = frozenset({"tp", "sp", "a2a", "linear", "skip_bias_add", "dropout_position", "init_methods", "lora_dtype",
                              "merge", "merge_model", "unmerge", "models", "moe", "vlm", "config_validation", "relayout",
                              "disable_adapters", "sp_input_regather", "shared_outer_loras"})

    def describe(self) -> str:
        return f"reference (this repository), torch {torch.__version__}"

    def init_parallel(self, tp, ep=1, etp=None) -> Groups:
        s = parallel.initialize_model_parallel(tp, ep, etp)
        return Groups(s.tp_group, s.tp_size, s.tp_rank, s.ep_group, s.ep_size, s.ep_rank,
                      s.expert_tp_group, s.expert_tp_size, s.expert_tp_rank)

    def make_linear(self, spec: LinearSpec):
        common = dict(bias=spec.bias is not None, sequence_parallel=spec.sequence_parallel,
                      skip_bias_add=spec.skip_bias_add, params_dtype=spec.dtype, init_method="zero",
                      tp_group=spec.groups.tp_group if spec.groups else None)
        if spec.kind == "column":
            layer = ColumnParallelLinear(spec.in_features, spec.out_features, gather_output=spec.gather_output,
                                         stride=spec.stride, **common)
        elif spec.kind == "row":
            layer = RowParallelLinear(spec.in_features, spec.out_features,
                                      input_is_parallel=spec.input_is_parallel, **common)
        else:
            return plain_linear(spec, parallel.default_device())
        layer.load_full_weight(spec.weight, spec.bias)
        return layer

    def make_model(self, spec: ModelSpec):
        config = reference.TinyGPTConfig(
            vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, num_layers=spec.num_layers,
            num_attention_heads=spec.num_attention_heads, ffn_hidden_size=spec.ffn_hidden_size,
            sequence_parallel=spec.sequence_parallel, gated_linear_unit=spec.gated_linear_unit,
            params_dtype=spec.dtype,
            num_moe_experts=spec.num_moe_experts if spec.kind == "moe" else None,
            moe_router_topk=spec.moe_router_topk, moe_grouped_gemm=spec.moe_grouped_gemm,
            moe_shared_expert_intermediate_size=spec.moe_shared_expert_intermediate_size)
        if spec.kind == "vlm":
            return reference.TinyVLM(config, seed=spec.seed)
        return reference.TinyGPT(config, seed=spec.seed)

    def validate_config(self, config):
        if isinstance(config, reference.LoRA):
            return config                        # validated when it was built
        return reference.LoRA(**config.as_dict())  # a RawLoRAConfig: validate it now

    def apply_lora(self, model, config, training=True):
        return config(model, training=training)

    def lora_modules(self, model):
        return {name: m for name, m in model.named_modules() if is_lora_wrapper(m)}

    def adapter_weights(self, wrapped):
        return wrapped.adapter.linear_in.weight, wrapped.adapter.linear_out.weight

    def finalize_grads(self, model):
        reference.finalize_lora_grads(model)

    def merge_weight(self, base_weight, linear_out, linear_in, alpha, dim, *, tp_size, tp_group):
        return reference.LoRAMerge().merge(base_weight, linear_out, linear_in, alpha, dim,
                                           tp_size=tp_size, tp_group=tp_group)

    def merge_model(self, model):
        return reference.merge_lora(model)

    def merge_in_place(self, model):
        return reference.merge_lora(model, keep_wrappers=True)

    def unmerge_model(self, model):
        return reference.unmerge_lora(model)

    def set_adapters_enabled(self, model, enabled):
        reference.set_adapters_enabled(model, enabled)


class SeparateCommunicationReferenceBackend(ReferenceBackend):
    """The reference with each adapter doing its own collectives (share_communication=False), as
    Megatron-Bridge does: the same math, more communication ([LORA-FWD-7] fails, all else passes)."""

    name = "reference-separate-communication"

    def apply_lora(self, model, config, training=True):
        model = super().apply_lora(model, config, training)
        for module in self.lora_modules(model).values():
            module.share_communication = False
        return model
