"""BaseLayout: how a base linear layer is split over its tensor-parallel group, named once.

Everything an adapter must match about its base follows from the base's layout: which factor of the
adapter is sharded, which collectives the adapter runs, and which factor a merge must gather. So the
layer builds its layout once (ColumnParallelLinear.layout, RowParallelLinear.layout,
GroupedLinear.layout), `layout_of` builds one for a plain nn.Linear, and the adapter and the merge are
handed it whole instead of re-deriving it from the layer's attributes or the weights' shapes.

    kind     rank r holds            input             output
    column   W_r (out/t, in)         (s, b, in)        (s, b, out/t); (s, b, out) with gather_output
    row      W_r (out, in/t)         (s, b, in/t)      (s, b, out) all-reduced; (s/t, b, out) under SP
    none     W   (out, in)           (s, b, in)        (s, b, out)

A layer's layout keeps each flag only where its kind has it (gather_output and stride for column,
input_is_parallel for row); elsewhere the flag holds its neutral value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.distributed as dist
from torch import nn

from .parallel import check_positive_int, resolve_tp_group

BASE_KINDS = ("column", "row", "none")


def check_flags(**flags) -> None:
    """Each flag is True or False (a string "false" is truthy: it would silently turn the flag on)."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")


@dataclass(frozen=True)
class BaseLayout:
    """The split of one base layer's weight W (out, in) over its TP group.

    Args:
        kind (str): "column" (W split by output rows), "row" (by input columns) or "none" (not split).
        input_size (int): the full input size `in` of W.
        output_size (int): the full output size `out` of W.
        tp_group (dist.ProcessGroup | None): the group W is split over; None for "none". Default: None.
        tp_size (int): the number of ranks in tp_group (t). Default: 1.
        tp_rank (int): this rank's index in tp_group (r). Default: 0.
        sequence_parallel (bool): activations outside the layer are sequence shards (s/t, b, h).
            Default: False.
        gather_output (bool): a column layer all-gathers its output to (s, b, out). Default: False.
        input_is_parallel (bool): a row layer's input is already split (s, b, in/t); True for the
            other kinds. Default: True.
        stride (int): a column layer keeps `stride` stacked output blocks whole on each rank (e.g.
            [gate; up]); 1 for the other kinds. Default: 1.
        explicit_expert_comm (bool): a MoE expert layer: the token dispatcher communicates, the layer
            does not. Default: False.
    """

    kind: Literal["column", "row", "none"]
    input_size: int
    output_size: int
    tp_group: dist.ProcessGroup | None = None
    tp_size: int = 1
    tp_rank: int = 0
    sequence_parallel: bool = False
    gather_output: bool = False
    input_is_parallel: bool = True
    stride: int = 1
    explicit_expert_comm: bool = False

    def __post_init__(self):
        # A layout is how every layer and adapter is described: a bad value is named here, before
        # anything is built or communicated (a string "false" would otherwise read as True).
        if self.kind not in BASE_KINDS:
            raise ValueError(f"base kind must be one of {list(BASE_KINDS)}, got {self.kind!r}")
        for name in ("input_size", "output_size", "stride"):
            check_positive_int(name, getattr(self, name))
        check_flags(sequence_parallel=self.sequence_parallel, gather_output=self.gather_output,
                    input_is_parallel=self.input_is_parallel, explicit_expert_comm=self.explicit_expert_comm)

    @classmethod
    def over(cls, kind: str, input_size: int, output_size: int, tp_group: dist.ProcessGroup | None = None,
             **flags) -> BaseLayout:
        """A `kind` layout over `tp_group` (None: the current TP group), its size and rank read once.

        Args:
            kind (str): "column" or "row".
            input_size (int): the full input size of W.
            output_size (int): the full output size of W.
            tp_group (dist.ProcessGroup | None): resolved with resolve_tp_group. Default: None.
            **flags: the remaining fields (sequence_parallel, gather_output, ...), as given.
        """
        group = resolve_tp_group(tp_group)
        return cls(kind, input_size, output_size, group, dist.get_world_size(group), dist.get_rank(group),
                   **flags)

    @classmethod
    def plain(cls, input_size: int, output_size: int) -> BaseLayout:
        """An unsplit layer (nn.Linear, the MoE router): no group, every flag neutral."""
        return cls("none", input_size, output_size)


def layout_of(module: nn.Module) -> BaseLayout:
    """The layout of a base layer: its own `layout`, else an unsplit one from in/out_features.

    Args:
        module (nn.Module): a layer with a `layout` (the reference's parallel layers), or one with
            `in_features` and `out_features` (nn.Linear, TopKRouter).

    Returns:
        BaseLayout: the layer's layout (the layer's own object, when it has one).
    """
    layout = getattr(module, "layout", None)
    if isinstance(layout, BaseLayout):
        return layout
    return BaseLayout.plain(module.in_features, module.out_features)


def from_layout(field: str) -> property:
    """A read-only attribute that reads `self.layout.<field>`: the layout stays the one copy."""
    return property(lambda self: getattr(self.layout, field), doc=f"`self.layout.{field}` (read-only).")


__all__ = ["BASE_KINDS", "BaseLayout", "layout_of", "from_layout"]
