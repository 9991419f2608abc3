"""Column- and row-parallel linear layers, with Megatron's semantics.

A linear layer computes y = x W^T + b with W of shape (out, in). With TP size t:

ColumnParallelLinear splits W by rows (the output features):
    rank r holds W_r (out/t, in) and b_r (out/t)
    x (s, b, in) replicated             -> y_r = x W_r^T + b_r   (s, b, out/t)
    sequence parallel: x (s/t, b, in)   -> all-gather the sequence first
    gather_output: all-gather y_r on the last dim -> (s, b, out)

RowParallelLinear splits W by columns (the input features):
    rank r holds W_r (out, in/t) and the whole bias b (out)
    x_r (s, b, in/t)                    -> partial_r = x_r W_r^T  (s, b, out)
    y = sum_r partial_r  (all-reduce), or under sequence parallelism reduce-scatter to (s/t, b, out)
    the bias is added once, after the reduction

forward(x) returns (output, bias): bias is None unless skip_bias_add, in which case the caller adds
it (Megatron fuses that add into the next op).

explicit_expert_comm=True (MoE experts, over the expert-TP group): the layer communicates nothing;
the token dispatcher has already gathered the input and its combine step sums the row layer's
partial outputs (and reduces the input gradients). Parameters are initialized on the full matrix (see
init.py) and sharded, so the gathered weight does not depend on t.

Each layer checks its arguments once and keeps them as its `layout` (reference/layout.py); its
tp_group, tp_size, sequence_parallel, ... attributes read the layout, and adapters are built from it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .init import check_init_method, init_full_weight
from .layout import BaseLayout, check_flags, from_layout
from .parallel import (
    check_agreement,
    check_divisible,
    check_positive_int,
    copy_to_tensor_parallel_region,
    default_device,
    gather_from_sequence_parallel_region,
    gather_from_tensor_parallel_region,
    gather_shards,
    reduce_from_tensor_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    resolve_tp_group,
    scatter_to_tensor_parallel_region,
    shard,
)


def _check_input(layer: str, name: str, x: torch.Tensor, expected_last: int,
                 sequence_parallel: bool, tp_size: int, seq_divisible: bool, dtype: torch.dtype, group) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{layer}: {name} must be a torch.Tensor, got {type(x).__name__}")
    # Another floating dtype is the caller's business under autocast (F.linear casts); otherwise the
    # matmul would fail deep inside, or on one rank after another rank's collective started.
    if x.dtype != dtype and not (x.dtype.is_floating_point and torch.is_autocast_enabled(x.device.type)):
        raise ValueError(f"{layer}: {name} must have the layer's dtype {dtype}, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != expected_last:
        raise ValueError(
            f"{layer}: {name} must have last dim {expected_last}, got shape {tuple(x.shape)}"
        )
    if sequence_parallel and x.dim() != 3:
        raise ValueError(
            f"{layer}: with sequence_parallel, {name} must be 3-D (s, b, h), got shape {tuple(x.shape)}"
        )
    if sequence_parallel and seq_divisible:
        check_divisible(f"{layer}: sequence length (dim 0) of {name}", x.shape[0], tp_size, "the TP size")
    if sequence_parallel and tp_size > 1 and dist.get_backend(group) == "gloo":
        # Under SP each rank brings its own sequence shard, whose length the ranks must agree on
        # before they gather it: one small all-gather on CPU. Under NCCL it would stall the stream
        # at every layer, so it is left out there.
        check_agreement(f"the shape of the {layer}'s {name}", x.shape, group)


def _column_layout(input_size, output_size, tp_group, sequence_parallel, gather_output, stride,
                   explicit_expert_comm) -> BaseLayout:
    """A ColumnParallelLinear's checked layout; the TP group is resolved here, once."""
    check_flags(sequence_parallel=sequence_parallel, gather_output=gather_output,
                explicit_expert_comm=explicit_expert_comm)
    group = resolve_tp_group(tp_group)
    check_positive_int("output_size", output_size)
    check_positive_int("stride", stride)        # before it divides anything
    check_divisible("output_size", output_size, dist.get_world_size(group) * stride, "tp_size * stride")
    if gather_output and stride != 1:
        # The gathered output would be [part0_0, part1_0, part0_1, ...], not [part0; part1].
        raise ValueError("gather_output=True requires stride=1 (allowed: gather_output=False with any stride)")
    if explicit_expert_comm and (gather_output or sequence_parallel):
        raise ValueError("explicit_expert_comm=True allows neither gather_output nor sequence_parallel")
    check_positive_int("input_size", input_size)
    return BaseLayout.over("column", input_size, output_size, group, sequence_parallel=sequence_parallel,
                           gather_output=gather_output, stride=stride, explicit_expert_comm=explicit_expert_comm)


def _row_layout(input_size, output_size, tp_group, sequence_parallel, input_is_parallel,
                explicit_expert_comm, bias) -> BaseLayout:
    """A RowParallelLinear's checked layout (`bias` only for the expert check); the group resolved once."""
    check_flags(sequence_parallel=sequence_parallel, input_is_parallel=input_is_parallel,
                explicit_expert_comm=explicit_expert_comm, bias=bias)
    group = resolve_tp_group(tp_group)
    check_positive_int("input_size", input_size)
    check_divisible("input_size", input_size, dist.get_world_size(group), "the TP size")
    if sequence_parallel and not input_is_parallel:
        raise ValueError("sequence_parallel=True requires input_is_parallel=True (allowed: "
                         "input_is_parallel=True, or sequence_parallel=False)")
    if explicit_expert_comm and (bias or sequence_parallel or not input_is_parallel):
        raise ValueError("explicit_expert_comm=True requires bias=False, sequence_parallel=False "
                         "and input_is_parallel=True (its output is a partial sum)")
    check_positive_int("output_size", output_size)
    return BaseLayout.over("row", input_size, output_size, group, sequence_parallel=sequence_parallel,
                           input_is_parallel=input_is_parallel, explicit_expert_comm=explicit_expert_comm)


class _ParallelLinear(nn.Module):
    """What both layers share: the layout, parameters and the full/shard conversion."""

    parallel_mode: str  # "column" or "row"
    weight_shard_dim: int  # the dim of W that is split across ranks
    # Read from the layout: it is the one copy of what the layer was built with.
    tp_group, tp_size, tp_rank = from_layout("tp_group"), from_layout("tp_size"), from_layout("tp_rank")
    input_size, output_size = from_layout("input_size"), from_layout("output_size")
    sequence_parallel, stride = from_layout("sequence_parallel"), from_layout("stride")
    explicit_expert_comm = from_layout("explicit_expert_comm")

    def __init__(self, layout: BaseLayout, *, bias, skip_bias_add, init_method, params_dtype, device):
        super().__init__()
        check_init_method("init_method", init_method)
        if not isinstance(params_dtype, torch.dtype) or not params_dtype.is_floating_point:
            raise ValueError(f"params_dtype must be a floating torch.dtype, got {params_dtype!r}")
        self.layout = layout
        self.skip_bias_add = skip_bias_add
        self.init_method = init_method
        output_size, input_size = layout.output_size, layout.input_size
        device = default_device() if device is None else torch.device(device)
        if init_method == "zero":   # draws nothing from the generator: no need for the full matrix
            shape = [output_size, input_size]
            shape[self.weight_shard_dim] //= self.tp_size
            local = torch.zeros(shape, device=device, dtype=params_dtype)
        else:
            full = init_full_weight((output_size, input_size), init_method)
            local = shard(full, self.weight_shard_dim, self.tp_rank, self.tp_size, self._stride(0))
        self.weight = nn.Parameter(local.to(device=device, dtype=params_dtype))
        if bias:
            self.bias = nn.Parameter(torch.zeros(self._bias_shape(), device=device, dtype=params_dtype))
        else:
            self.register_parameter("bias", None)

    # Each layer defines _bias_shape, _local_bias and _full_bias: the bias is split like W's rows or whole.
    def _stride(self, dim: int) -> int:
        return self.stride if dim == 0 else 1

    @torch.no_grad()
    def load_full_weight(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Copy this rank's shard of a full `weight` (out, in) and `bias` (out) into the layer."""
        if tuple(weight.shape) != (self.output_size, self.input_size):
            raise ValueError(
                f"weight must have shape {(self.output_size, self.input_size)}, got {tuple(weight.shape)}"
            )
        dim = self.weight_shard_dim
        self.weight.copy_(shard(weight.detach().cpu(), dim, self.tp_rank, self.tp_size, self._stride(dim)))
        if bias is not None:
            if self.bias is None:
                raise ValueError("bias was given but the layer was built with bias=False")
            if tuple(bias.shape) != (self.output_size,):
                raise ValueError(f"bias must have shape {(self.output_size,)}, got {tuple(bias.shape)}")
            self.bias.copy_(self._local_bias(bias.detach().cpu()))

    @torch.no_grad()
    def full_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The full (weight, bias), gathered on every rank (a collective)."""
        dim = self.weight_shard_dim
        weight = gather_shards(self.weight, dim, self.tp_group, self._stride(dim))
        return weight, self._full_bias()

    def extra_repr(self) -> str:
        return (f"input_size={self.input_size}, output_size={self.output_size}, "
                f"tp_size={self.tp_size}, sequence_parallel={self.sequence_parallel}, "
                f"bias={self.bias is not None}, skip_bias_add={self.skip_bias_add}")


class ColumnParallelLinear(_ParallelLinear):
    """y_r = x W_r^T + b_r, W split by output rows; see the module docstring.

    stride > 1 keeps `stride` stacked blocks of the output (e.g. [gate; up] of a gated MLP) whole on
    each rank: rank r holds [gate_r; up_r], and the full weight stays [gate; up] at any TP size.

    Args:
        input_size (int): in, the full input size.
        output_size (int): out, the full output size; divisible by tp_size * stride.
        bias (bool): add a bias b (out), split like the rows of W. Default: True.
        gather_output (bool): all-gather the output to (s, b, out); needs stride=1. Default: False.
        sequence_parallel (bool): the input is a sequence shard (s/t, b, in), all-gathered first.
            Default: False.
        skip_bias_add (bool): return the bias for the caller to add instead of adding it. Default: False.
        init_method (str): xavier, kaiming, normal or zero, on the full W (reference/init.py).
            Default: "xavier".
        tp_group (dist.ProcessGroup | None): None: the current TP group. Default: None.
        params_dtype (torch.dtype): a floating dtype for W and b. Default: torch.float32.
        device (torch.device | str | None): None: default_device(). Default: None.
        stride (int): stacked output blocks kept whole per rank. Default: 1.
        explicit_expert_comm (bool): a MoE expert over the expert-TP group: no communication (no
            gather_output, no sequence_parallel). Default: False.

    Raises:
        ValueError: naming the argument that is out of range or does not divide.
    """

    parallel_mode = "column"
    weight_shard_dim = 0
    gather_output = from_layout("gather_output")

    def __init__(self, input_size: int, output_size: int, *, bias: bool = True,
                 gather_output: bool = False, sequence_parallel: bool = False,
                 skip_bias_add: bool = False, init_method: str = "xavier", tp_group=None,
                 params_dtype: torch.dtype = torch.float32, device=None, stride: int = 1,
                 explicit_expert_comm: bool = False):
        check_flags(bias=bias, skip_bias_add=skip_bias_add)
        layout = _column_layout(input_size, output_size, tp_group, sequence_parallel, gather_output, stride,
                                explicit_expert_comm)
        super().__init__(layout, bias=bias, skip_bias_add=skip_bias_add, init_method=init_method,
                         params_dtype=params_dtype, device=device)
        self.output_size_per_partition = output_size // self.tp_size

    def _bias_shape(self) -> int:
        return self.output_size // self.tp_size

    def _local_bias(self, full_bias):
        return shard(full_bias, 0, self.tp_rank, self.tp_size, self.stride)

    def _full_bias(self):
        return None if self.bias is None else gather_shards(self.bias, 0, self.tp_group, self.stride)

    # forward = finish_output(local_output(prepare_input(x))); LoRALinear reuses the three steps.
    def forward(self, x: torch.Tensor):
        return self.finish_output(self.local_output(self.prepare_input(x)))

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        _check_input("ColumnParallelLinear", "input", x, self.input_size, self.sequence_parallel,
                     self.tp_size, seq_divisible=False, dtype=self.weight.dtype, group=self.tp_group)
        if self.sequence_parallel:
            return gather_from_sequence_parallel_region(x, self.tp_group)  # (s/t, b, in) -> (s, b, in)
        if self.explicit_expert_comm:
            return x
        return copy_to_tensor_parallel_region(x, self.tp_group)          # (s, b, in); grad all-reduced

    def local_output(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, None if self.skip_bias_add else self.bias)   # (s, b, out/t)

    def finish_output(self, y: torch.Tensor):
        if self.gather_output:
            y = gather_from_tensor_parallel_region(y, self.tp_group)     # (s, b, out)
        return y, (self.bias if self.skip_bias_add else None)


class RowParallelLinear(_ParallelLinear):
    """y = sum_r x_r W_r^T + b, W split by input columns; see the module docstring.

    Args:
        input_size (int): in, the full input size; divisible by the TP size.
        output_size (int): out, the full output size.
        bias (bool): add a bias b (out), whole on every rank, once after the reduction. Default: True.
        input_is_parallel (bool): the input is already split (s, b, in/t); False: it is (s, b, in) and
            each rank takes its slice. Default: True.
        sequence_parallel (bool): reduce-scatter the output to (s/t, b, out) instead of all-reducing;
            needs input_is_parallel. Default: False.
        skip_bias_add (bool): return the bias for the caller to add instead of adding it. Default: False.
        init_method (str): xavier, kaiming, normal or zero, on the full W. Default: "xavier".
        tp_group (dist.ProcessGroup | None): None: the current TP group. Default: None.
        params_dtype (torch.dtype): a floating dtype for W and b. Default: torch.float32.
        device (torch.device | str | None): None: default_device(). Default: None.
        explicit_expert_comm (bool): a MoE expert: the output stays a partial sum for the MoE combine
            (needs bias=False, no sequence_parallel, input_is_parallel). Default: False.

    Raises:
        ValueError: naming the argument that is out of range or does not divide.
    """

    parallel_mode = "row"
    weight_shard_dim = 1
    input_is_parallel = from_layout("input_is_parallel")

    def __init__(self, input_size: int, output_size: int, *, bias: bool = True,
                 input_is_parallel: bool = True, sequence_parallel: bool = False,
                 skip_bias_add: bool = False, init_method: str = "xavier", tp_group=None,
                 params_dtype: torch.dtype = torch.float32, device=None, explicit_expert_comm: bool = False):
        check_flags(skip_bias_add=skip_bias_add)
        layout = _row_layout(input_size, output_size, tp_group, sequence_parallel, input_is_parallel,
                             explicit_expert_comm, bias)
        super().__init__(layout, bias=bias, skip_bias_add=skip_bias_add, init_method=init_method,
                         params_dtype=params_dtype, device=device)
        self.input_size_per_partition = input_size // self.tp_size

    def _bias_shape(self) -> int:
        return self.output_size

    def _local_bias(self, full_bias):
        return full_bias

    def _full_bias(self):
        return None if self.bias is None else self.bias.detach().clone()

    # forward = finish_output(local_output(prepare_input(x))); LoRALinear reuses the three steps.
    def forward(self, x: torch.Tensor):
        return self.finish_output(self.local_output(self.prepare_input(x)))

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        expected = self.input_size_per_partition if self.input_is_parallel else self.input_size
        _check_input("RowParallelLinear", "input", x, expected, self.sequence_parallel,
                     self.tp_size, seq_divisible=True, dtype=self.weight.dtype, group=self.tp_group)
        if not self.input_is_parallel:
            x = scatter_to_tensor_parallel_region(x, self.tp_group)      # (s, b, in) -> (s, b, in/t)
        return x

    def local_output(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)                                  # (s, b, out), partial sum

    def finish_output(self, partial: torch.Tensor):
        if self.explicit_expert_comm:
            return partial, None                                         # the MoE combine sums it
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(partial, self.tp_group)  # (s/t, b, out)
        else:
            y = reduce_from_tensor_parallel_region(partial, self.tp_group)          # (s, b, out)
        if self.skip_bias_add:
            return y, self.bias
        return (y if self.bias is None else y + self.bias), None
