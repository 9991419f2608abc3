"""Counting the torch.distributed collectives a piece of code calls, and their sizes."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist

COLLECTIVES = ("all_reduce", "all_gather_into_tensor", "all_gather_single", "reduce_scatter_tensor",
               "reduce_scatter_single", "all_to_all_single", "all_gather")


@contextmanager
def counting():
    """Record (name, elements) of every collective called while inside."""
    calls = []
    saved = {}
    for name in COLLECTIVES:
        original = getattr(dist, name, None)
        if original is None:
            continue
        saved[name] = original

        def wrapper(*args, _name=name, _original=original, **kwargs):
            tensor = args[1] if _name not in ("all_reduce", "all_gather") else args[0]
            numel = tensor.numel() if isinstance(tensor, torch.Tensor) else sum(t.numel() for t in tensor)
            calls.append((_name, numel))
            return _original(*args, **kwargs)

        setattr(dist, name, wrapper)
    try:
        yield calls
    finally:
        for name, original in saved.items():
            setattr(dist, name, original)
