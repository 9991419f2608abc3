"""Tiny models with Megatron's module names, for tests and the conformance suite.

TinyGPT (a pre-norm decoder):

    embedding.word_embeddings, embedding.position_embeddings        replicated
    decoder.layers.N.input_layernorm
    decoder.layers.N.self_attention.linear_qkv                      column-parallel, h -> 3h
    decoder.layers.N.self_attention.linear_proj                     row-parallel, h -> h
    decoder.layers.N.pre_mlp_layernorm
    decoder.layers.N.mlp.linear_fc1                                 column-parallel, h -> ffn (2 ffn gated)
    decoder.layers.N.mlp.linear_fc2                                 row-parallel, ffn -> h
    decoder.layers.N.mlp.{router, experts, shared_experts}         with num_moe_experts (reference/moe.py)
    decoder.final_layernorm
    output_layer                                                    column-parallel, h -> vocab, gathered

Everything is built from `seed` inside a forked RNG, so the same config and seed give the same full
weights at every TP size and the caller's generator is left untouched. Activations are (s, b, h);
under sequence parallelism they are (s/t, b, h) between the parallel layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ColumnParallelLinear, RowParallelLinear
from .layout import check_flags
from .moe import MoELayer
from .parallel import (
    check_divisible,
    check_positive_int,
    default_device,
    resolve_tp_group,
    scatter_to_sequence_parallel_region,
)


# What TinyGPT's weights may be (they are trained, and float8 has no matmul on every device).
PARAMS_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class TinyGPTConfig:
    vocab_size: int = 64
    hidden_size: int = 32
    num_layers: int = 2
    num_attention_heads: int = 4
    ffn_hidden_size: int = 64
    max_sequence_length: int = 64
    gated_linear_unit: bool = False      # fc1 -> [gate; up] (2 ffn), SwiGLU
    add_bias_linear: bool = True
    sequence_parallel: bool = False
    init_method: str = "xavier"
    params_dtype: torch.dtype = torch.float32
    # MoE: set num_moe_experts to replace every MLP by a MoE layer (reference/moe.py)
    num_moe_experts: int | None = None
    moe_router_topk: int = 2
    moe_grouped_gemm: bool = True            # grouped experts (True) or sequential local_experts.N
    moe_ffn_hidden_size: int | None = None   # default: ffn_hidden_size
    moe_shared_expert_intermediate_size: int | None = None

    def check(self, tp_size: int) -> None:
        """Raise a ValueError naming the field if this config cannot run at `tp_size`."""
        for name in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads",
                     "ffn_hidden_size", "max_sequence_length"):
            check_positive_int(name, getattr(self, name))
        check_flags(gated_linear_unit=self.gated_linear_unit, add_bias_linear=self.add_bias_linear,
                    sequence_parallel=self.sequence_parallel, moe_grouped_gemm=self.moe_grouped_gemm)
        if not isinstance(self.params_dtype, torch.dtype) or self.params_dtype not in PARAMS_DTYPES:
            raise ValueError(f"params_dtype must be one of {[str(d) for d in PARAMS_DTYPES]}, "
                             f"got {self.params_dtype!r} (the weights train: a floating dtype)")
        check_divisible("hidden_size", self.hidden_size, self.num_attention_heads, "num_attention_heads")
        check_divisible("num_attention_heads", self.num_attention_heads, tp_size, "the TP size")
        check_divisible("ffn_hidden_size", self.ffn_hidden_size, tp_size, "the TP size")
        check_divisible("vocab_size", self.vocab_size, tp_size, "the TP size")


class LanguageModelEmbedding(nn.Module):
    def __init__(self, config: TinyGPTConfig, device, dtype):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, device=device, dtype=dtype)
        self.position_embeddings = nn.Embedding(config.max_sequence_length, config.hidden_size,
                                                device=device, dtype=dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids (b, s) -> (s, b, h)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
        return x.transpose(0, 1).contiguous()


class SelfAttention(nn.Module):
    """Causal multi-head attention; each TP rank owns num_heads/t whole heads.

    linear_qkv's output is laid out per head as [q, k, v], so splitting it by rows hands each rank
    the q, k and v of its own heads.
    """

    def __init__(self, config: TinyGPTConfig, tp_group, device, dtype):
        super().__init__()
        h, sp = config.hidden_size, config.sequence_parallel
        common = dict(tp_group=tp_group, params_dtype=dtype, device=device, init_method=config.init_method)
        self.linear_qkv = ColumnParallelLinear(h, 3 * h, bias=config.add_bias_linear,
                                               sequence_parallel=sp, **common)
        self.linear_proj = RowParallelLinear(h, h, bias=config.add_bias_linear, input_is_parallel=True,
                                             sequence_parallel=sp, skip_bias_add=True, **common)
        self.head_dim = h // config.num_attention_heads
        self.local_heads = config.num_attention_heads // self.linear_qkv.tp_size

    def forward(self, x: torch.Tensor):
        qkv, _ = self.linear_qkv(x)                                      # (s, b, 3h/t)
        s, b = qkv.shape[:2]
        qkv = qkv.view(s, b, self.local_heads, 3, self.head_dim)         # (s, b, nh/t, 3, hd)
        q, k, v = (qkv[:, :, :, i].permute(1, 2, 0, 3) for i in range(3))  # (b, nh/t, s, hd)
        context = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (b, nh/t, s, hd)
        # contiguous: on CUDA a strided input makes F.linear's result depend on whether the weight
        # requires grad, so a frozen base would differ in the last bits from a trainable one.
        context = context.permute(2, 0, 1, 3).reshape(s, b, -1).contiguous()  # (s, b, h/t)
        return self.linear_proj(context)                                 # (out, bias)


class MLP(nn.Module):
    """fc1 -> GELU (or SwiGLU when gated) -> fc2."""

    def __init__(self, config: TinyGPTConfig, tp_group, device, dtype):
        super().__init__()
        h, ffn, sp = config.hidden_size, config.ffn_hidden_size, config.sequence_parallel
        self.gated = config.gated_linear_unit
        common = dict(tp_group=tp_group, params_dtype=dtype, device=device, init_method=config.init_method)
        self.linear_fc1 = ColumnParallelLinear(h, 2 * ffn if self.gated else ffn, bias=config.add_bias_linear,
                                               sequence_parallel=sp, stride=2 if self.gated else 1, **common)
        self.linear_fc2 = RowParallelLinear(ffn, h, bias=config.add_bias_linear, input_is_parallel=True,
                                            sequence_parallel=sp, skip_bias_add=True, **common)

    def forward(self, x: torch.Tensor):
        hidden, _ = self.linear_fc1(x)                                   # (s, b, ffn/t) or (s, b, 2ffn/t)
        if self.gated:
            gate, up = hidden.chunk(2, dim=-1)                           # each (s, b, ffn/t)
            hidden = F.silu(gate) * up
        else:
            hidden = F.gelu(hidden)
        return self.linear_fc2(hidden)                                   # (out, bias)


class TransformerLayer(nn.Module):
    def __init__(self, config: TinyGPTConfig, tp_group, device, dtype):
        super().__init__()
        h = config.hidden_size
        self.input_layernorm = nn.LayerNorm(h, device=device, dtype=dtype)
        self.self_attention = SelfAttention(config, tp_group, device, dtype)
        self.pre_mlp_layernorm = nn.LayerNorm(h, device=device, dtype=dtype)
        if config.num_moe_experts:
            self.mlp = MoELayer(h, config.moe_ffn_hidden_size or config.ffn_hidden_size, config.num_moe_experts,
                                config.moe_router_topk, grouped=config.moe_grouped_gemm,
                                gated=config.gated_linear_unit,
                                shared_expert_size=config.moe_shared_expert_intermediate_size,
                                tp_group=tp_group, sequence_parallel=config.sequence_parallel,
                                device=device, dtype=dtype)
        else:
            self.mlp = MLP(config, tp_group, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, bias = self.self_attention(self.input_layernorm(x))
        x = x + out + (0 if bias is None else bias)
        out, bias = self.mlp(self.pre_mlp_layernorm(x))
        return x + out + (0 if bias is None else bias)


class TransformerBlock(nn.Module):
    def __init__(self, config: TinyGPTConfig, tp_group, device, dtype):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(config, tp_group, device, dtype)
                                    for _ in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.final_layernorm(x)


def _check_config_and_seed(config, seed) -> None:
    if not isinstance(config, TinyGPTConfig):
        raise TypeError(f"config must be a TinyGPTConfig (or None), got {type(config).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")


def _check_token_ids(input_ids, vocab_size: int) -> None:
    """input_ids: a 2-D integer tensor of ids in [0, vocab_size), checked before any collective (the
    same ids on every rank, so the same error on every rank)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a 2-D tensor (b, s) of token ids, got {shape}")
    if input_ids.dtype not in (torch.long, torch.int32):                 # what nn.Embedding takes
        raise ValueError(f"input_ids must hold integer token ids (torch.long or torch.int32), got dtype "
                         f"{input_ids.dtype}")
    if input_ids.numel() and not (0 <= int(input_ids.min()) and int(input_ids.max()) < vocab_size):
        raise ValueError(f"input_ids must be token ids in [0, {vocab_size}) (vocab_size), got values in "
                         f"[{int(input_ids.min())}, {int(input_ids.max())}]")


class TinyGPT(nn.Module):
    """forward(input_ids (b, s)) -> logits (b, s, vocab), the same full logits on every rank.

    Args:
        config (TinyGPTConfig | None): the sizes and options; None: TinyGPTConfig(). Default: None.
        seed (int): every weight is drawn from this seed in a forked RNG. Default: 0.
        tp_group (dist.ProcessGroup | None): None: the current TP group. Default: None.
        device (torch.device | str | None): None: default_device(). Default: None.

    Raises:
        ValueError: a config that cannot run at this TP size (TinyGPTConfig.check).
    """

    def __init__(self, config: TinyGPTConfig | None = None, *, seed: int = 0, tp_group=None, device=None):
        super().__init__()
        config = TinyGPTConfig() if config is None else config
        _check_config_and_seed(config, seed)
        tp_group = resolve_tp_group(tp_group)
        self.tp_size = torch.distributed.get_world_size(tp_group)
        config.check(self.tp_size)
        self.config, self.tp_group = config, tp_group
        device = default_device() if device is None else torch.device(device)
        dtype = config.params_dtype
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embedding = LanguageModelEmbedding(config, "cpu", dtype)
            self.decoder = TransformerBlock(config, tp_group, device, dtype)
            self.output_layer = ColumnParallelLinear(
                config.hidden_size, config.vocab_size, bias=False, gather_output=True,
                sequence_parallel=config.sequence_parallel, tp_group=tp_group, params_dtype=dtype,
                device=device, init_method=config.init_method)
        self.embedding.to(device)

    def forward(self, input_ids: torch.Tensor | None = None, *, decoder_input: torch.Tensor | None = None):
        """Logits (b, s, vocab) of input_ids (b, s), or of ready embeddings decoder_input (s, b, h)."""
        if decoder_input is not None and input_ids is not None:
            raise ValueError("pass input_ids or decoder_input, not both")
        if decoder_input is None:
            _check_token_ids(input_ids, self.config.vocab_size)
            if input_ids.shape[1] > self.config.max_sequence_length:
                raise ValueError(f"sequence length {input_ids.shape[1]} exceeds max_sequence_length "
                                 f"{self.config.max_sequence_length}")
            x = self.embedding(input_ids)                                # (s, b, h)
        else:
            h, dtype = self.config.hidden_size, self.config.params_dtype
            if not isinstance(decoder_input, torch.Tensor) or decoder_input.dim() != 3 \
                    or decoder_input.shape[-1] != h or decoder_input.dtype != dtype:
                got = (tuple(decoder_input.shape), decoder_input.dtype) if isinstance(decoder_input, torch.Tensor) \
                    else type(decoder_input).__name__
                raise ValueError(f"decoder_input must be a 3-D tensor (s, b, {h}) of {dtype}, got {got}")
            x = decoder_input
        if self.config.sequence_parallel:
            check_divisible("sequence length of the input", x.shape[0], self.tp_size, "the TP size")
        if self.config.sequence_parallel:
            x = scatter_to_sequence_parallel_region(x, self.tp_group)    # (s/t, b, h)
        x = self.decoder(x)                                              # (s or s/t, b, h)
        logits, _ = self.output_layer(x)                                 # (s, b, vocab)
        return logits.transpose(0, 1)                                    # (b, s, vocab)


class VisionModel(nn.Module):
    """Patches (b, n, patch_dim) -> (n, b, h_v): a linear patch embedding and a transformer block."""

    def __init__(self, config: TinyGPTConfig, patch_dim: int, tp_group, device, dtype):
        super().__init__()
        self.patch_embed = nn.Linear(patch_dim, config.hidden_size, device=device, dtype=dtype)
        self.decoder = TransformerBlock(config, tp_group, device, dtype)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.patch_embed(patches).transpose(0, 1))


class MultimodalProjector(nn.Module):
    """vision_projection.encoder.linear_fc1 (column) -> GELU -> linear_fc2 (row): h_v -> h."""

    def __init__(self, vision_hidden: int, hidden: int, tp_group, device, dtype):
        super().__init__()
        self.encoder = nn.Module()
        common = dict(tp_group=tp_group, device=device, params_dtype=dtype)
        self.encoder.linear_fc1 = ColumnParallelLinear(vision_hidden, hidden, **common)
        self.encoder.linear_fc2 = RowParallelLinear(hidden, hidden, **common)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.encoder.linear_fc1(x)
        out, _ = self.encoder.linear_fc2(F.gelu(hidden))
        return out


class TinyVLM(nn.Module):
    """LLaVA-shaped: vision_model -> vision_projection -> prepended to the text -> language_model.

    forward(patches (b, n, patch_dim), input_ids (b, s)) -> logits (b, n + s, vocab).
    Sequence parallelism is not used here (the parts are small); TP is.

    Args:
        language_config (TinyGPTConfig | None): the language model's config (sequence_parallel off);
            None: TinyGPTConfig(). Default: None.
        vision_hidden_size (int): h_v of the vision model. Default: 16.
        patch_dim (int): the size of one input patch. Default: 12.
        seed (int): vision parts from `seed`, the language model from seed + 1. Default: 0.
        tp_group (dist.ProcessGroup | None): None: the current TP group. Default: None.
        device (torch.device | str | None): None: default_device(). Default: None.
    """

    def __init__(self, language_config: TinyGPTConfig | None = None, *, vision_hidden_size: int = 16,
                 patch_dim: int = 12, seed: int = 0, tp_group=None, device=None):
        super().__init__()
        language_config = TinyGPTConfig() if language_config is None else language_config
        _check_config_and_seed(language_config, seed)
        check_positive_int("vision_hidden_size", vision_hidden_size)
        check_positive_int("patch_dim", patch_dim)
        check_divisible("vision_hidden_size", vision_hidden_size, language_config.num_attention_heads,
                        "num_attention_heads")
        if language_config.sequence_parallel:
            raise ValueError("TinyVLM does not use sequence_parallel (allowed: sequence_parallel=False)")
        tp_group = resolve_tp_group(tp_group)
        device = default_device() if device is None else torch.device(device)
        dtype = language_config.params_dtype
        vision_config = TinyGPTConfig(hidden_size=vision_hidden_size, num_layers=1,
                                      num_attention_heads=language_config.num_attention_heads,
                                      ffn_hidden_size=2 * vision_hidden_size, params_dtype=dtype)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.vision_model = VisionModel(vision_config, patch_dim, tp_group, device, dtype)
            self.vision_projection = MultimodalProjector(vision_hidden_size, language_config.hidden_size,
                                                         tp_group, device, dtype)
        self.language_model = TinyGPT(language_config, seed=seed + 1, tp_group=tp_group, device=device)

    def forward(self, patches: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        _check_token_ids(input_ids, self.language_model.config.vocab_size)
        patch_dim = self.vision_model.patch_embed.in_features
        if not isinstance(patches, torch.Tensor) or patches.dim() != 3 or patches.shape[-1] != patch_dim \
                or patches.shape[0] != input_ids.shape[0]:
            got = tuple(patches.shape) if isinstance(patches, torch.Tensor) else type(patches).__name__
            raise ValueError(f"patches must be a 3-D tensor (b, n, {patch_dim}) with the batch of input_ids "
                             f"({input_ids.shape[0]}), got {got}")
        image = self.vision_projection(self.vision_model(patches))      # (n, b, h)
        text = self.language_model.embedding(input_ids)                  # (s, b, h)
        return self.language_model(decoder_input=torch.cat([image, text], dim=0))
