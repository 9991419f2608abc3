"""Distributed runtime: process groups, sharding helpers and the collectives as autograd functions."""

from .collectives import (
    all_gather_into,
    all_to_all_hidden_to_sequence_parallel_region,
    all_to_all_sequence_to_hidden_parallel_region,
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
    reduce_scatter_into,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tensor_parallel_region,
)
from .sharding import check_agreement, check_divisible, check_positive_int, gather_shards, shard, unshard
from .state import (
    ParallelState,
    default_device,
    destroy_model_parallel,
    get_parallel_state,
    init_distributed,
    initialize_model_parallel,
    made_here,
    resolve_tp_group,
)

__all__ = [
    "ParallelState", "default_device", "init_distributed", "initialize_model_parallel", "get_parallel_state",
    "destroy_model_parallel", "made_here", "resolve_tp_group", "shard", "unshard", "gather_shards", "check_divisible",
    "check_agreement", "check_positive_int",
    "copy_to_tensor_parallel_region", "reduce_from_tensor_parallel_region",
    "scatter_to_tensor_parallel_region", "gather_from_tensor_parallel_region",
    "gather_from_sequence_parallel_region", "scatter_to_sequence_parallel_region",
    "reduce_scatter_to_sequence_parallel_region", "all_to_all_hidden_to_sequence_parallel_region",
    "all_to_all_sequence_to_hidden_parallel_region", "all_gather_into", "reduce_scatter_into",
]
