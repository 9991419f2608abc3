"""HF PEFT as a backend: PEFT's LoRA on plain nn.Linear bases, TP = 1.

    python -m conformance --backend conformance.backends.peft:PeftBackend \
        --deviations conformance/deviations/peft.txt

Our config maps to `peft.LoraConfig`: dim -> r, alpha -> lora_alpha, dropout -> lora_dropout,
target_modules / exclude_modules as given (PEFT matches a name by suffix, not by our wildcards),
and the init methods to `init_lora_weights` (PEFT has kaiming-uniform A with zero B, or Gaussian;
no xavier and no N(0, 0.2^2)). Adapters are injected in place with `peft.inject_adapter_in_model`, so
module names stay those of the model. PEFT has no tensor parallelism and no dropout position
(dropout is always applied to the adapter input). The differences are declared, with reasons, in
conformance/deviations/peft.txt.

Models: PEFT adapts nn.Linear, and the reference's TinyGPT is built of column/row-parallel layers,
so `make_model("gpt")` builds `PlainGPT`, the same network at TP = 1 with nn.Linear layers under the
same Megatron names and the same weights (copied from a reference TinyGPT of the same seed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import reference
from reference import parallel

from ..backend import Backend, Groups, LinearSpec, ModelSpec, plain_linear

ADAPTER = "default"


def _peft():
    try:
        import peft
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise SystemExit("conformance: the PEFT backend needs `pip install peft` (extra: .[peft])") from e
    return peft


class PlainGPT(nn.Module):
    """TinyGPT's math at TP = 1 with nn.Linear layers, under Megatron's names."""

    def __init__(self, reference_model):
        super().__init__()
        config = reference_model.config
        self.config = config
        self.embedding = reference_model.embedding                     # replicated nn.Embeddings
        self.decoder = nn.Module()
        self.decoder.layers = nn.ModuleList()
        for ref_layer in reference_model.decoder.layers:
            layer = nn.Module()
            layer.input_layernorm = ref_layer.input_layernorm
            layer.pre_mlp_layernorm = ref_layer.pre_mlp_layernorm
            layer.self_attention = nn.Module()
            layer.self_attention.linear_qkv = _plain(ref_layer.self_attention.linear_qkv)
            layer.self_attention.linear_proj = _plain(ref_layer.self_attention.linear_proj)
            layer.mlp = nn.Module()
            layer.mlp.linear_fc1 = _plain(ref_layer.mlp.linear_fc1)
            layer.mlp.linear_fc2 = _plain(ref_layer.mlp.linear_fc2)
            self.decoder.layers.append(layer)
        self.decoder.final_layernorm = reference_model.decoder.final_layernorm
        self.output_layer = _plain(reference_model.output_layer)
        self.heads = config.num_attention_heads

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embedding(input_ids)                                   # (s, b, h)
        s, b, h = x.shape
        for layer in self.decoder.layers:
            qkv = layer.self_attention.linear_qkv(layer.input_layernorm(x)).view(s, b, self.heads, 3, h // self.heads)
            q, k, v = (qkv[:, :, :, i].permute(1, 2, 0, 3) for i in range(3))
            context = F.scaled_dot_product_attention(q, k, v, is_causal=True).permute(2, 0, 1, 3).reshape(s, b, h)
            x = x + layer.self_attention.linear_proj(context)
            hidden = layer.mlp.linear_fc1(layer.pre_mlp_layernorm(x))
            if self.config.gated_linear_unit:
                gate, up = hidden.chunk(2, dim=-1)
                hidden = F.silu(gate) * up
            else:
                hidden = F.gelu(hidden)
            x = x + layer.mlp.linear_fc2(hidden)
        return self.output_layer(self.decoder.final_layernorm(x)).transpose(0, 1)


def _plain(parallel_layer) -> nn.Linear:
    weight, bias = parallel_layer.full_weight()
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


class PeftBackend(Backend):
    name = "peft"
    capabilities = frozenset({"linear", "dropout_position", "init_methods", "merge_model", "models",
                              "disable_adapters"})

    def describe(self) -> str:
        return f"HF PEFT {_peft().__version__} (LoRA on nn.Linear, TP=1), torch {torch.__version__}"

    def init_parallel(self, tp, ep=1, etp=None) -> Groups:
        state = parallel.initialize_model_parallel(1)   # PEFT has no tensor parallelism
        return Groups(state.tp_group, 1, 0)

    def make_linear(self, spec: LinearSpec):
        if spec.kind != "linear":
            raise NotImplementedError("PEFT adapts nn.Linear only")
        return plain_linear(spec)

    def make_model(self, spec: ModelSpec):
        if spec.kind != "gpt":
            raise NotImplementedError(f"no {spec.kind} model for PEFT")
        parallel.initialize_model_parallel(1)
        config = reference.TinyGPTConfig(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
                                         num_layers=spec.num_layers, num_attention_heads=spec.num_attention_heads,
                                         ffn_hidden_size=spec.ffn_hidden_size, gated_linear_unit=spec.gated_linear_unit,
                                         params_dtype=spec.dtype)
        return PlainGPT(reference.TinyGPT(config, seed=spec.seed, device="cpu"))

    def validate_config(self, config):
        peft = _peft()
        init_a, init_b = config.lora_A_init_method, config.lora_B_init_method
        # PEFT: True = kaiming-uniform A and zero B; "gaussian" = N(0, 1/r) A and zero B; False = random B.
        init = False if init_b != "zero" else ("gaussian" if init_a == "normal" else True)
        targets = list(config.target_modules) or "all-linear"
        return peft.LoraConfig(r=config.dim, lora_alpha=config.alpha, lora_dropout=config.dropout,
                               target_modules=targets, exclude_modules=list(config.exclude_modules) or None,
                               init_lora_weights=init, bias="none")

    def apply_lora(self, model, config, training=True):
        peft = _peft()
        chunks = list(model) if isinstance(model, (list, tuple)) else [model]
        for chunk in chunks:
            if not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in chunk.modules()):
                peft.inject_adapter_in_model(config, chunk, adapter_name=ADAPTER)
            for name, param in chunk.named_parameters():
                param.requires_grad_(training and "lora_" in name)
            chunk.train(training)
        return model

    def lora_modules(self, model):
        peft = _peft()
        return {name: m for name, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}

    def adapter_weights(self, wrapped):
        return wrapped.lora_A[ADAPTER].weight, wrapped.lora_B[ADAPTER].weight

    def base_weight(self, wrapped):
        return wrapped.get_base_layer().weight

    def merge_weight(self, base_weight, linear_out, linear_in, alpha, dim, *, tp_size, tp_group):
        raise NotImplementedError("PEFT has no tensor merge helper")

    def set_adapters_enabled(self, model, enabled):
        """PEFT's own switch on each LoRA layer (BaseTunerLayer.enable_adapters; it also sets the
        adapters' requires_grad: off while disabled, on again for the active adapter)."""
        for module in self.lora_modules(model).values():
            module.enable_adapters(enabled)

    def merge_model(self, model):
        peft = _peft()
        for name, module in list(model.named_modules()):
            if isinstance(module, peft.tuners.lora.LoraLayer):
                module.merge(adapter_names=[ADAPTER])
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, module.get_base_layer())
        return model
