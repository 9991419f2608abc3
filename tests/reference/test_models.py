"""TinyGPT: Megatron names, and the same logits at every TP size, with and without SP."""

import pytest
import torch
import torch.distributed as dist

import reference.parallel as P
from reference import ColumnParallelLinear, RowParallelLinear, TinyGPT, TinyGPTConfig

from ..distributed import run_distributed
from ..helpers import assert_close, device


def _logits(tp, sequence_parallel, gated, dtype=torch.float32):
    P.initialize_model_parallel(tensor_model_parallel_size=tp)
    config = TinyGPTConfig(sequence_parallel=sequence_parallel, gated_linear_unit=gated, params_dtype=dtype)
    model = TinyGPT(config, seed=7)
    ids = torch.randint(0, config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(3)).to(device())
    return model(ids)


def check_tp_invariance():
    world = dist.get_world_size()
    for gated in (False, True):
        expected = _logits(1, False, gated)
        for tp in sorted({1, 2, world} & set(range(1, world + 1))):
            if world % tp:
                continue
            for sp in (False, True):
                assert_close(_logits(tp, sp, gated), expected, torch.float32, scale=10,
                             msg=f"tp={tp} sp={sp} gated={gated}")


@pytest.mark.parametrize("world_size", [2, 4])
def test_tiny_gpt_logits_are_the_same_at_every_tp(world_size):
    """[TP-MODEL-1] TP=1, 2, 4 (SP on and off, gated or not) give the same logits."""
    run_distributed(check_tp_invariance, world_size)


def check_names_and_kinds():
    P.initialize_model_parallel(tensor_model_parallel_size=dist.get_world_size())
    model = TinyGPT(TinyGPTConfig(num_layers=2), seed=0)
    kinds = {name: type(m).__name__ for name, m in model.named_modules()
             if isinstance(m, (ColumnParallelLinear, RowParallelLinear))}
    # Same seed, same full weights, and the caller's generator is untouched by the build.
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    TinyGPT(TinyGPTConfig(), seed=0)
    assert torch.equal(torch.rand(1), before)
    return kinds


@pytest.mark.parametrize("world_size", [1, 2])
def test_tiny_gpt_has_megatron_names(world_size):
    """[TP-MODEL-1] the parallel linears carry Megatron's names and kinds."""
    kinds = run_distributed(check_names_and_kinds, world_size)[0]
    assert kinds == {
        "decoder.layers.0.self_attention.linear_qkv": "ColumnParallelLinear",
        "decoder.layers.0.self_attention.linear_proj": "RowParallelLinear",
        "decoder.layers.0.mlp.linear_fc1": "ColumnParallelLinear",
        "decoder.layers.0.mlp.linear_fc2": "RowParallelLinear",
        "decoder.layers.1.self_attention.linear_qkv": "ColumnParallelLinear",
        "decoder.layers.1.self_attention.linear_proj": "RowParallelLinear",
        "decoder.layers.1.mlp.linear_fc1": "ColumnParallelLinear",
        "decoder.layers.1.mlp.linear_fc2": "RowParallelLinear",
        "output_layer": "ColumnParallelLinear",
    }


def check_bad_model_config():
    P.initialize_model_parallel(tensor_model_parallel_size=dist.get_world_size())
    with pytest.raises(ValueError, match=r"num_attention_heads \(3\) must be divisible by the TP size"):
        TinyGPT(TinyGPTConfig(num_attention_heads=3, hidden_size=24))
    with pytest.raises(ValueError, match="params_dtype must be one of .*float32.*got torch.int8"):
        TinyGPT(TinyGPTConfig(params_dtype=torch.int8))
    model = TinyGPT(TinyGPTConfig(sequence_parallel=True))
    with pytest.raises(ValueError, match="sequence length of the input"):
        model(torch.zeros(1, 5, dtype=torch.long, device=device()))
    with pytest.raises(ValueError, match="input_ids must be a 2-D tensor"):
        model(torch.zeros(5, dtype=torch.long, device=device()))


@pytest.mark.parametrize("world_size", [2])
def test_tiny_gpt_bad_config(world_size):
    """[TP-ERR-1] a config that cannot run at this TP size names the field."""
    run_distributed(check_bad_model_config, world_size)
