"""Building blocks for backends without tensor parallelism (TP = 1): Megatron-named models of nn.Linear.

A library that adapts `nn.Linear` (PEFT, loralib, ...) cannot adapt the reference's column/row-parallel
layers. `make_plain_model(spec)` builds the same tiny network as the reference's TinyGPT of the same
seed, at TP = 1, with plain `nn.Linear` layers under Megatron's module names:

    embedding, decoder.layers.<i>.{input_layernorm, self_attention.linear_qkv, self_attention.linear_proj,
    pre_mlp_layernorm, mlp.linear_fc1, mlp.linear_fc2}, decoder.final_layernorm, output_layer

so that the suite's matching, injection, init and merge properties apply to it unchanged.
`PlainBackend` uses it as `make_model`, with nn.Linear bases and the inherited TP = 1
`Backend.init_parallel`: a TP = 1 backend built on it needs no parallel code at all. Only "gpt" models are offered (the MoE and VLM properties need expert
parallelism and the VLM's freezing flags, which a TP = 1 library implements itself if it has them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import reference
from reference import parallel

from .backend import Backend, LinearSpec, ModelSpec, linear_holding, plain_linear


class PlainBackend(Backend):
    """A base for TP = 1 libraries: nn.Linear bases (kind "linear" only) and make_plain_model, with the
    inherited TP = 1 init_parallel. These parts are the suite's, so properties that judge them are
    "not applicable" for a backend built on this class."""

    def make_linear(self, spec: LinearSpec):
        if spec.kind != "linear":
            raise NotImplementedError(f"{self.name} adapts nn.Linear only, not {spec.kind!r} bases")
        return plain_linear(spec)

    def make_model(self, spec: ModelSpec):
        return make_plain_model(spec)


def make_plain_model(spec: ModelSpec) -> "PlainGPT":
    """TinyGPT of `spec` (kind "gpt") at TP = 1, built of nn.Linear layers (same weights as the
    reference's TinyGPT of the same seed); on the CPU, in spec.dtype."""
    if spec.kind != "gpt":
        raise NotImplementedError(f"make_plain_model builds 'gpt' models only, not {spec.kind!r}")
    parallel.initialize_model_parallel(1)
    config = reference.TinyGPTConfig(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
                                     num_layers=spec.num_layers, num_attention_heads=spec.num_attention_heads,
                                     ffn_hidden_size=spec.ffn_hidden_size, gated_linear_unit=spec.gated_linear_unit,
                                     params_dtype=spec.dtype)
    return PlainGPT(reference.TinyGPT(config, seed=spec.seed, device="cpu"))


class PlainGPT(nn.Module):
    """TinyGPT's math with nn.Linear layers, under Megatron's names: at TP = 1, or with its linears
    sharded by a TP plan (whole heads per rank; `sequence_shard` under SP), as the Automodel backend
    does."""

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
        self.head_dim = config.hidden_size // config.num_attention_heads
        # Set by a TP plan with sequence parallelism (conformance/backends/automodel.py): (rank, size);
        # the blocks then run on this rank's sequence shard, as Megatron's do under SP.
        self.sequence_shard: tuple[int, int] | None = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embedding(input_ids)                                   # (s, b, h)
        if self.sequence_shard is not None:
            rank, size = self.sequence_shard
            x = x.chunk(size, dim=0)[rank]                              # (s/t, b, h)
        for layer in self.decoder.layers:
            # Under a TP plan linear_qkv returns whole heads of this rank: (s, b, 3h/t), head-major.
            qkv = layer.self_attention.linear_qkv(layer.input_layernorm(x))
            s, b, width = qkv.shape
            qkv = qkv.view(s, b, width // (3 * self.head_dim), 3, self.head_dim)
            q, k, v = (qkv[:, :, :, i].permute(1, 2, 0, 3) for i in range(3))
            context = F.scaled_dot_product_attention(q, k, v, is_causal=True).permute(2, 0, 1, 3).reshape(s, b, -1)
            x = x + layer.self_attention.linear_proj(context)
            hidden = layer.mlp.linear_fc1(layer.pre_mlp_layernorm(x))
            if self.config.gated_linear_unit:
                gate, up = hidden.chunk(2, dim=-1)                      # a TP plan keeps [gate_r; up_r] per rank
                hidden = F.silu(gate) * up
            else:
                hidden = F.gelu(hidden)
            x = x + layer.mlp.linear_fc2(hidden)
        return self.output_layer(self.decoder.final_layernorm(x)).transpose(0, 1)


def _plain(parallel_layer) -> nn.Linear:
    return linear_holding(*parallel_layer.full_weight())
