"""The exported building blocks used directly validate their own arguments: a bad value is a
ValueError or TypeError naming it, raised on every rank before any collective (SPEC [TP-ERR-1],
[LORA-ERR-1]); a misspelt exclude pattern warns; applying again with another rank is an error."""

import math
import warnings

import pytest
import torch
import torch.distributed as dist

import reference.parallel as P
from reference import (ColumnParallelLinear, LoRA, LoRAMerge, ParallelLinearAdapter, RowParallelLinear, TinyGPT,
                       TinyGPTConfig, VLMLoRA, merge_lora, unmerge_lora)

from ..distributed import run_distributed
from ..helpers import device


def _adapter(**overrides):
    return ParallelLinearAdapter(8, 8, overrides.pop("dim", 2), **overrides)


ADAPTER_CASES = [
    (dict(dim=0), ValueError, "dim"),
    (dict(dim=-1), ValueError, "dim"),
    (dict(alpha=math.nan), ValueError, "alpha"),
    (dict(alpha=math.inf), ValueError, "alpha"),
    (dict(dropout=2.0), ValueError, "dropout"),
    (dict(dropout_position="mid"), ValueError, "dropout_position"),
    (dict(lora_A_init_method="orthogonal"), ValueError, "lora_A_init_method"),
    (dict(dtype=torch.int8), ValueError, "dtype"),
    (dict(sequence_parallel="false"), TypeError, "sequence_parallel"),
    (dict(base_kind="row", input_is_parallel=1), TypeError, "input_is_parallel"),
    (dict(a2a_experimental="yes"), TypeError, "a2a_experimental"),
    (dict(tp_group=5), TypeError, "tp_group"),
    (dict(base_kind="diagonal"), ValueError, "base_kind"),
]


def check_building_blocks():
    P.initialize_model_parallel(tensor_model_parallel_size=2)
    rank = dist.get_rank()
    for overrides, error, field in ADAPTER_CASES:
        with pytest.raises(error, match=field):
            _adapter(**dict(overrides))
    for make, error, field in [
        (lambda: ColumnParallelLinear(8, 8, sequence_parallel="false"), TypeError, "sequence_parallel"),
        (lambda: ColumnParallelLinear(8, 8, gather_output="no"), TypeError, "gather_output"),
        (lambda: RowParallelLinear(8, 8, bias="yes"), TypeError, "bias"),
        (lambda: RowParallelLinear(8, 8, tp_group="tp"), TypeError, "tp_group"),
        (lambda: ColumnParallelLinear(8, 8, skip_bias_add=0), TypeError, "skip_bias_add"),
    ]:
        with pytest.raises(error, match=field):
            make()

    # Inputs: the layer's dtype, token ids of the vocabulary.
    layer = ColumnParallelLinear(8, 8, device=device())
    for x in (torch.ones(2, 1, 8, dtype=torch.float64, device=device()),
              torch.ones(2, 1, 8, dtype=torch.long, device=device())):
        with pytest.raises(ValueError, match="must have the layer's dtype torch.float32"):
            layer(x)
    model = TinyGPT(TinyGPTConfig(), seed=0)
    with pytest.raises(ValueError, match="integer token ids"):
        model(torch.zeros(1, 4, device=device()))
    with pytest.raises(ValueError, match=r"token ids in \[0, 64\) \(vocab_size\)"):
        model(torch.full((1, 4), 64, dtype=torch.long, device=device()))

    # The merge helper: arguments, the group's size, and a broken adapter on one rank only.
    W, B, A = torch.zeros(4, 8), torch.ones(4, 2), torch.ones(1, 8)        # a column shard at tp 2, dim 2
    merge = LoRAMerge().merge
    for call, error, field in [
        (lambda: merge(W, B, A, 1.0, 2, tp_size=4), ValueError, "tp_size=4 but tp_group has 2"),
        (lambda: merge(W, B, A, 1.0, 2, tp_size=0), ValueError, "tp_size"),
        (lambda: merge(W, B, A, math.nan, 2, tp_size=2), ValueError, "alpha"),
        (lambda: merge(W, B, A.tolist(), 1.0, 2, tp_size=2), TypeError, "linear_in"),
        (lambda: merge(W, B, A, 1.0, 0, tp_size=2), ValueError, "dim"),
    ]:
        with pytest.raises(error, match=field):
            call()
    broken = A.clone()
    if rank == 1:
        broken[0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN or inf"):                 # on both ranks
        merge(W, B, broken, 1.0, 2, tp_size=2)
    assert torch.equal(merge(W, B, A, 1.0, 2, tp_size=2), torch.full((4, 8), 1.0))

    # Models: what apply_lora and merge_lora accept, re-application, exclude warnings, VLM parts.
    for bad in (None, {"chunk": model}, [model, 5], []):
        with pytest.raises(TypeError, match="model must be an nn.Module"):
            LoRA(dim=2)(bad)
        if bad is not None and not isinstance(bad, list):
            with pytest.raises(TypeError, match="model must be an nn.Module"):
                merge_lora(bad)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        unmerge_lora(None)
    with pytest.raises(TypeError, match="training"):
        LoRA(dim=2)(model, training="yes")
    LoRA(dim=2)(model)
    with pytest.raises(ValueError, match="already has a LoRA adapter of dim 2; this config gives it dim 4"):
        LoRA(dim=4)(model)
    LoRA(dim=2)(model)                                  # the same rank again: nothing changes, no error
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        LoRA(target_modules=[], exclude_modules=["linear_qvk", "output_layer"], dim=2)(TinyGPT(TinyGPTConfig()))
    assert [str(r.message) for r in records] == ["LoRA exclude_modules matched no module: ['linear_qvk']"]
    with pytest.raises(ValueError, match="none of the VLM parts"):
        VLMLoRA(dim=2)(TinyGPT(TinyGPTConfig()))


def check_ranks_that_disagree():
    P.initialize_model_parallel(tensor_model_parallel_size=2)
    rank = dist.get_rank()
    for make, what in [
        (lambda: ParallelLinearAdapter(8, 8, 2 + 2 * rank), r"the \(dim, in_features"),
        (lambda: ColumnParallelLinear(8, 8, sequence_parallel=True)(torch.ones(2 + rank, 1, 8)),
         r"the shape of the ColumnParallelLinear's input \(rank 0: \(2, 1, 8\), rank 1: \(3, 1, 8\)\)"),
        (lambda: RowParallelLinear(8, 8, sequence_parallel=True)(torch.ones(4 + 2 * rank, 1, 4)),
         "the shape of the RowParallelLinear's input"),
    ]:
        with pytest.raises(ValueError, match="the ranks of the TP group disagree on " + what):
            make()
    # Nothing was left half-done: the group still sums in step.
    total = torch.ones(1)
    dist.all_reduce(total, group=P.get_parallel_state().tp_group)
    assert total.item() == 2


@pytest.mark.parametrize("world_size", [2])
def test_ranks_that_disagree_get_the_same_error(world_size):
    """[TP-ERR-1] [LORA-ERR-1] adapter sizes, or sequence-shard shapes under SP, that differ between
    the ranks are the same ValueError on every rank (before the collective that would fail on one rank
    only)."""
    run_distributed(check_ranks_that_disagree, world_size)


@pytest.mark.parametrize("world_size", [2])
def test_building_blocks_validate_their_arguments(world_size):
    """[TP-ERR-1] [LORA-ERR-1] [LORA-MATCH-5] [LORA-INJ-3] [VLM-FREEZE-1] bad arguments to the adapter,
    the layers, the merge helper, apply_lora / merge_lora and VLMLoRA are named errors on every rank
    (a NaN in one rank's shard too); a misspelt exclude pattern warns."""
    run_distributed(check_building_blocks, world_size)
