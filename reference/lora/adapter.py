"""The LoRA adapter beside a (tensor-parallel) linear layer.

The adapter adds  delta(x) = (alpha / r) * B A x  to the base layer's output, with
A = linear_in (r x in) and B = linear_out (out x r). It is sharded to match its base, as the base's
BaseLayout (reference/layout.py) says (TP size t):

    base kind   base shard      A shard               B shard          adapter output
    column      (out/t, in)     (r/t, in)  rows       (out/t, r) rows   (s, b, out/t), like the base's
    row         (out, in/t)     (r, in/t)  columns    (out/t, r) rows   (s, b, out) (gathered), like the base's
    none        (out, in)       (r, in)               (out, r)          (s, b, out)

Forward, in order (the shapes are per rank):

    dropout if "pre"
    column:  gather the sequence (SP) or copy      x (s, b, in)
             h = gather_last(act(A_r x))           h (s, b, r)
             y = B_r h                             y (s, b, out/t)   [gathered if the base gathers]
    row:     h = act(all_reduce(A_r x_r))          h (s, b, r)       x_r (s, b, in/t)
             y = B_r h                             y (s, b, out/t)
             no SP:  y = gather_last(y)                              (s, b, out)
             SP:     y = scatter_seq(gather_last(y))                 (s/t, b, out)
             SP+a2a: y = all_to_all(y)   hidden shards -> sequence shards (s/t, b, out)
    dropout if "post"
    (the scale alpha / r is applied to h, which is the same as to the output and r/out as costly)

`act` is the activation between A and B, "identity" unless asked (Megatron-Bridge's
ParallelLinearAdapter has the same option; its LoRA always passes "identity"). It acts on the full
A x: elementwise, so on a column base's shards before the gather, and after a row base's sum.

Under sequence parallelism the column case sees (s/t, b, in) and all-gathers it first; the backward
of that gather reduce-scatters the gradient, which already sums the TP ranks' partial gradients, so
no separate all-reduce is applied. With sequence_parallel_input_regather A keeps only that shard for
backward and gathers it again there (reference/lora/regather.py). Parameters may have their own dtype
(lora_dtype): the input is cast to it and the caller casts the output back to the base output's dtype.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..init import init_full_weight
from ..layout import BASE_KINDS, BaseLayout, check_flags, from_layout
from ..parallel import (
    all_to_all_hidden_to_sequence_parallel_region,
    check_agreement,
    check_divisible,
    check_positive_int,
    copy_to_tensor_parallel_region,
    default_device,
    gather_from_sequence_parallel_region,
    gather_from_tensor_parallel_region,
    gather_shards,
    reduce_from_tensor_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tensor_parallel_region,
    shard,
)
from .config import FIELD_CHECKS, LORA_DTYPES
from .regather import linear_on_regathered_sequence, regather_eligible, regather_inputs

# What the keyword arguments that describe a base default to (used only when no layout is given).
# The activations between A and B, by the names Megatron-Bridge's ParallelLinearAdapter accepts.
ADAPTER_ACTIVATIONS = {"identity": nn.Identity, "relu": nn.ReLU, "gelu": nn.GELU, "swish": nn.SiLU,
                       "silu": nn.SiLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}

_KEYWORD_DEFAULTS = dict(base_kind="column", tp_group=None, sequence_parallel=False, gather_output=False,
                         input_is_parallel=True, stride=1, explicit_expert_comm=False)


def _place_in_hidden_shard(y: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """(..., h/t) -> (..., h): y in slice `rank` of the last dim, zeros elsewhere."""
    pieces = [y if q == rank else torch.zeros_like(y) for q in range(size)]
    return torch.cat(pieces, dim=-1)


class LoRAWeight(nn.Module):
    """A bias-free linear map y = x W^T holding this rank's shard of W (A or B of the adapter).

    Args:
        local_weight (torch.Tensor): this rank's shard, e.g. A (r/t, in) or B (out/t, r); per-expert
            adapters stack one per local expert, (E_local, ...).
    """

    def __init__(self, local_weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(local_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"local_shape={tuple(self.weight.shape)}"


def _keyword_layout(in_features: int, out_features: int, base_kind: str, tp_group, sequence_parallel: bool,
                    gather_output: bool, input_is_parallel: bool, stride: int,
                    explicit_expert_comm: bool) -> BaseLayout:
    """The layout that ParallelLinearAdapter's keyword arguments describe, each flag kept only where
    the base kind has it (as a layer's own layout does)."""
    if base_kind not in BASE_KINDS:
        raise ValueError(f"base_kind must be one of {list(BASE_KINDS)}, got {base_kind!r}")
    check_flags(sequence_parallel=sequence_parallel, gather_output=gather_output,
                input_is_parallel=input_is_parallel, explicit_expert_comm=explicit_expert_comm)
    if base_kind == "none":
        return BaseLayout.plain(in_features, out_features)
    return BaseLayout.over(base_kind, in_features, out_features, tp_group,
                           sequence_parallel=sequence_parallel,
                           gather_output=gather_output and base_kind == "column",
                           input_is_parallel=input_is_parallel or base_kind != "row",
                           stride=stride if base_kind == "column" else 1,
                           explicit_expert_comm=explicit_expert_comm)


class ParallelLinearAdapter(nn.Module):
    """scale * B(A(x)) sharded like its base; see the module docstring for the data flow.

    The base is described either by its `layout` (what build_adapter passes: the layer's own
    BaseLayout) or, when layout is None, by the keywords base_kind ... explicit_expert_comm.

    Args:
        in_features (int): the base's full input size `in`; A is (r, in).
        out_features (int): the base's full output size `out`; B is (out, r).
        dim (int): the rank r; divisible by the TP size for a column base.
        base_kind (str): "column", "row" or "none" (not split). Default: "column".
        alpha (float | None): the update is scaled by alpha / dim; None: alpha = dim (scale 1), as
            Megatron-Bridge's adapter does when built directly (LoRA passes its own alpha). Default: None.
        dropout (float): dropout probability; 0 adds no dropout module. Default: 0.0.
        dropout_position (str): "pre" (on the adapter's input) or "post" (on its output). Default: "pre".
        lora_A_init_method (str): xavier, kaiming, normal or zero, drawn on the full A. Default: "xavier".
        lora_B_init_method (str): the same for the full B. Default: "zero".
        dtype (torch.dtype): the dtype of A and B. Default: torch.float32.
        device (torch.device | str | None): None: default_device(). Default: None.
        tp_group (dist.ProcessGroup | None): the base's TP group; None: the current one (unused for
            "none"). Default: None.
        sequence_parallel (bool): the base runs under SP (not for "none"). Default: False.
        a2a_experimental (bool): one all-to-all instead of gather + scatter; only a row base under SP
            uses it. Default: False.
        gather_output (bool): the column base gathers its output (column only). Default: False.
        input_is_parallel (bool): the row base's input is already split (row only). Default: True.
        stride (int): the column base's stacked output blocks (column only). Default: 1.
        explicit_expert_comm (bool): the base is a MoE expert that communicates nothing. Default: False.
        base_name (str): the base's full name, for messages and repr. Default: "adapter".
        layout (BaseLayout | None): the base's layout; when given, in/out_features must be its sizes
            and base_kind ... explicit_expert_comm must keep their defaults. Default: None.
        activation (str): the function between A and B, one of ADAPTER_ACTIVATIONS: "identity",
            "relu", "gelu" (exact, erf), "swish" / "silu", "tanh", "sigmoid"; the update is then
            (alpha/dim) B act(A x). Default: "identity".
        sequence_parallel_input_regather (bool): a column base's A keeps only the sequence shard of
            its input for backward and all-gathers it again there, where Megatron-Bridge does
            (reference/lora/regather.py). Default: False.

    Raises:
        ValueError: an unknown activation or base_kind, a bad dim / alpha / dropout / dropout_position /
            init method / dtype (LoRA's field checks), sizes that do not match `layout`, or dim / out / in
            not divisible as the base's split needs.
        TypeError: both a layout and base-describing keywords; a flag that is not a bool; a tp_group
            that is not a process group.
    """

    # The base's layout, read-only: `self.layout` is the one copy.
    base_kind, in_features, out_features = from_layout("kind"), from_layout("input_size"), from_layout("output_size")
    tp_group, tp_size, tp_rank = from_layout("tp_group"), from_layout("tp_size"), from_layout("tp_rank")
    sequence_parallel, gather_output = from_layout("sequence_parallel"), from_layout("gather_output")
    input_is_parallel, stride = from_layout("input_is_parallel"), from_layout("stride")
    explicit_expert_comm = from_layout("explicit_expert_comm")

    def __init__(self, in_features: int, out_features: int, dim: int, *, base_kind: str = "column",
                 alpha: float | None = None, dropout: float = 0.0, dropout_position: str = "pre",
                 lora_A_init_method: str = "xavier", lora_B_init_method: str = "zero",
                 dtype: torch.dtype = torch.float32, device=None, tp_group=None,
                 sequence_parallel: bool = False, a2a_experimental: bool = False,
                 gather_output: bool = False, input_is_parallel: bool = True, stride: int = 1,
                 explicit_expert_comm: bool = False, base_name: str = "adapter", layout: BaseLayout | None = None,
                 activation: str = "identity", sequence_parallel_input_regather: bool = False):
        super().__init__()
        if activation not in ADAPTER_ACTIVATIONS:
            raise ValueError(f"activation must be one of {list(ADAPTER_ACTIVATIONS)}, got {activation!r}")
        # The same checks as LoRA's fields (reference/lora/config.py): built directly, the adapter
        # validates its own arguments, before anything is drawn or communicated.
        check_positive_int("in_features", in_features)
        check_positive_int("out_features", out_features)
        dim = FIELD_CHECKS["dim"](dim)
        alpha = None if alpha is None else FIELD_CHECKS["alpha"](alpha)
        FIELD_CHECKS["dropout"](dropout)
        FIELD_CHECKS["dropout_position"](dropout_position)
        FIELD_CHECKS["lora_A_init_method"](lora_A_init_method)
        FIELD_CHECKS["lora_B_init_method"](lora_B_init_method)
        if dtype not in LORA_DTYPES:
            raise ValueError(f"dtype must be one of {[str(d) for d in LORA_DTYPES]} (the adapter's A and B), "
                             f"got {dtype!r}")
        check_flags(a2a_experimental=a2a_experimental,
                    sequence_parallel_input_regather=sequence_parallel_input_regather)
        described = dict(base_kind=base_kind, tp_group=tp_group, sequence_parallel=sequence_parallel,
                         gather_output=gather_output, input_is_parallel=input_is_parallel, stride=stride,
                         explicit_expert_comm=explicit_expert_comm)
        if layout is None:
            layout = _keyword_layout(in_features, out_features, **described)
        elif described != _KEYWORD_DEFAULTS:
            raise TypeError("pass the base either as layout= or as keywords (base_kind, tp_group, ...), not both")
        elif (in_features, out_features) != (layout.input_size, layout.output_size):
            raise ValueError(f"in_features, out_features ({in_features}, {out_features}) must be the layout's "
                             f"input_size, output_size ({layout.input_size}, {layout.output_size})")
        self.layout, self.base_name = layout, base_name
        alpha = dim if alpha is None else alpha
        self.dim, self.alpha, self.scale = dim, alpha, alpha / dim
        self.dropout_position = dropout_position
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.activation = ADAPTER_ACTIVATIONS[activation]()
        # a2a only changes the row case under sequence parallelism; elsewhere there is nothing to trade.
        self.a2a_experimental = a2a_experimental and layout.kind == "row" and layout.sequence_parallel
        self.sequence_parallel_input_regather = sequence_parallel_input_regather
        self.regather_eligible = regather_eligible(layout, base_name, sequence_parallel_input_regather,
                                                   a2a_experimental)
        self._check_divisibility()
        check_agreement(f"the (dim, in_features, out_features, stride, sequence_parallel) of the adapter {base_name}",
                        (dim, layout.input_size, layout.output_size, layout.stride, layout.sequence_parallel),
                        layout.tp_group if layout.tp_size > 1 else None)
        self.init_methods = (lora_A_init_method, lora_B_init_method)
        device = default_device() if device is None else torch.device(device)
        self.linear_in, self.linear_out = self._init_weights(device, dtype)

    def _init_weights(self, device, dtype) -> tuple[LoRAWeight, LoRAWeight]:
        """Draw the full A, then the full B, from the global generator (reference/init.py); shard."""
        full_A = init_full_weight((self.dim, self.in_features), self.init_methods[0], field="lora_A_init_method")
        full_B = init_full_weight((self.out_features, self.dim), self.init_methods[1], field="lora_B_init_method")
        return (LoRAWeight(self._shard_A(full_A).to(device=device, dtype=dtype)),
                LoRAWeight(self._shard_B(full_B).to(device=device, dtype=dtype)))

    def _check_divisibility(self) -> None:
        t, where = self.tp_size, f"for the {self.base_kind}-parallel base {self.base_name}"
        if self.base_kind == "column":
            check_divisible(f"LoRA dim {where}", self.dim, t, "the TP size")
            check_divisible(f"out_features {where}", self.out_features, t * self.stride, "tp_size * stride")
        elif self.base_kind == "row":
            check_divisible(f"out_features {where}", self.out_features, t, "the TP size")
            check_divisible(f"in_features {where}", self.in_features, t, "the TP size")

    # ---- full <-> shard ------------------------------------------------------------------------

    def _A_shard_dim(self) -> int | None:
        return {"column": 0, "row": 1, "none": None}[self.base_kind]

    def _shard_A(self, full_A: torch.Tensor) -> torch.Tensor:
        dim = self._A_shard_dim()
        return full_A if dim is None else shard(full_A, dim, self.tp_rank, self.tp_size)

    def _shard_B(self, full_B: torch.Tensor) -> torch.Tensor:
        if self.base_kind == "none":
            return full_B
        return shard(full_B, 0, self.tp_rank, self.tp_size, self.stride)

    @torch.no_grad()
    def load_full_weights(self, A: torch.Tensor, B: torch.Tensor) -> None:
        """Copy this rank's shards of the full A (r, in) and B (out, r) into the adapter."""
        if tuple(A.shape) != (self.dim, self.in_features):
            raise ValueError(f"A must have shape {(self.dim, self.in_features)}, got {tuple(A.shape)}")
        if tuple(B.shape) != (self.out_features, self.dim):
            raise ValueError(f"B must have shape {(self.out_features, self.dim)}, got {tuple(B.shape)}")
        self.linear_in.weight.copy_(self._shard_A(A.detach().cpu()))
        self.linear_out.weight.copy_(self._shard_B(B.detach().cpu()))

    @torch.no_grad()
    def full_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The full (A, B), gathered on every rank (a collective)."""
        A_dim = self._A_shard_dim()
        A = self.linear_in.weight.detach().clone() if A_dim is None else gather_shards(
            self.linear_in.weight, A_dim, self.tp_group)
        B = self.linear_out.weight.detach().clone() if self.base_kind == "none" else gather_shards(
            self.linear_out.weight, 0, self.tp_group, self.stride)
        return A, B

    # ---- forward -------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, caller_communicates: bool = False,
                local_input: torch.Tensor | None = None) -> torch.Tensor:
        """scale * B A x. With caller_communicates (see LoRALinear), x is what the base layer computes
        on after its own input communication, and the result is this rank's piece for the base's
        local output: (s, b, out/t), the row case's being this rank's hidden shard of B h. local_input
        is then the input before that communication (under SP the sequence shard, which A keeps when
        it re-gathers)."""
        split = self.base_kind == "row" and (self.input_is_parallel or caller_communicates)
        expected = self.in_features // self.tp_size if split else self.in_features
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != expected:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{self.base_name}: the adapter's input x must be a tensor with last dim {expected} "
                             f"({self.base_kind} base, tp={self.tp_size}), got {got}")
        if not caller_communicates and self.sequence_parallel and self.tp_size > 1 \
                and dist.get_backend(self.tp_group) == "gloo":
            check_agreement(f"the shape of {self.base_name}'s adapter input", x.shape, self.tp_group)   # as the layers
        return self._adapt(x, self.linear_in.weight, self.linear_out.weight, caller_communicates, local_input)

    def _adapt(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, caller_communicates: bool = False,
               local_input: torch.Tensor | None = None) -> torch.Tensor:
        """scale * B A x for this rank's shards A, B (the data flow of the module docstring)."""
        regather = regather_inputs(self, x, caller_communicates, local_input)   # (shard, gathered) or None
        if regather is not None:
            x = regather[0]                                                     # A keeps this shard
        if self.dropout_position == "pre":
            x = self.dropout(x)
        x = x.to(A.dtype)
        if self.base_kind == "column":
            y = self._column_forward(x, A, B, caller_communicates, regather)
        elif self.base_kind == "row":
            y = self._row_forward(x, A, B, caller_communicates)
        else:
            y = F.linear(self._down(x, A), B)                                  # (s, b, out)
        if self.dropout_position == "post":
            y = self.dropout(y)
        return y

    def _down(self, x: torch.Tensor, A: torch.Tensor, sum_over=None) -> torch.Tensor:
        """h = scale * act(A x). With `sum_over` (a row base's TP group) A x is this rank's partial
        sum: the partials are all-reduced first, and the activation acts on the sum. The scale
        multiplies the rank-sized h, not the output: s·B h = B(s·h), and h has r columns where the
        output has `out` (one pass over (s, b, r) saved per step)."""
        h = F.linear(x, A)
        if sum_over is not None:
            h = reduce_from_tensor_parallel_region(h, sum_over)                # (s, b, r), summed over ranks
        return self.activation(h) * self.scale

    def _column_forward(self, x, A, B, caller_communicates=False, regather=None):
        group = self.tp_group
        if regather is not None:                                                # x is (s/t, b, in)
            h = linear_on_regathered_sequence(x, A, group, regather[1]) * self.scale   # (s, b, r/t)
        else:
            if caller_communicates or self.explicit_expert_comm:
                pass                                                            # x is (s, b, in) already
            elif self.sequence_parallel:
                x = gather_from_sequence_parallel_region(x, group)              # (s/t, b, in) -> (s, b, in)
            else:
                x = copy_to_tensor_parallel_region(x, group)                    # (s, b, in), grad all-reduced
            h = self._down(x, A)                                                # (s, b, r/t)
        h = gather_from_tensor_parallel_region(h, group)                        # (s, b, r/t) -> (s, b, r)
        h = copy_to_tensor_parallel_region(h, group)                            # every B shard reads all of h
        y = F.linear(h, B)                                                      # (s, b, out/t)
        if self.gather_output and not caller_communicates:
            y = gather_from_tensor_parallel_region(y, group)                    # (s, b, out)
        return y

    def _row_forward(self, x, A, B, caller_communicates=False):
        group = self.tp_group
        if not self.input_is_parallel and not caller_communicates:
            x = scatter_to_tensor_parallel_region(x, group)                     # (s, b, in) -> (s, b, in/t)
        h = self._down(x, A, sum_over=group)                                    # (s, b, r)
        h = copy_to_tensor_parallel_region(h, group)                            # every B shard reads all of h
        y = F.linear(h, B)                                                      # (s, b, out/t)
        if caller_communicates:
            return y                                                            # the caller adds it in place
        if self.explicit_expert_comm:
            # The base expert's output is a partial sum that the MoE combine adds over expert-TP
            # ranks: contribute our hidden shard in place and zeros elsewhere, so the sum is B h.
            return _place_in_hidden_shard(y, self.tp_rank, self.tp_size)        # (s, b, out)
        if self.a2a_experimental:
            return all_to_all_hidden_to_sequence_parallel_region(y, group)      # (s/t, b, out)
        y = gather_from_tensor_parallel_region(y, group)                        # (s, b, out)
        if self.sequence_parallel:
            y = scatter_to_sequence_parallel_region(y, group)                   # (s/t, b, out)
        return y

    def extra_repr(self) -> str:
        return (f"base={self.base_name} ({self.base_kind}), in={self.in_features}, out={self.out_features}, "
                f"dim={self.dim}, alpha={self.alpha}, tp_size={self.tp_size}, "
                f"sequence_parallel={self.sequence_parallel}, a2a={self.a2a_experimental}")
