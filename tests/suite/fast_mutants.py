"""The fast backend (reference/fast) with one bug each, in its fused step: tests that the suite
checks the fast path itself (not the reference behind it).

Each mutant replaces one helper of reference/fast/fused.py for its whole run (the suite's process
runs this one backend), so the bug sits exactly where a fast implementation would get it wrong:
- `FastGatherOrderBackend`: the column all-gather of h (t, n, r/t) is reshaped to (n, r) without
  the permute, so rank-major rows are read as token-major ones: the forward is wrong at TP > 1.
- `FastGradHNotReducedBackend`: dL/dh is used as this rank's partial sum, never reduced over the TP
  ranks (nor reduce-scattered for a column base): A's gradient and the input gradient are wrong.
"""

from __future__ import annotations

from reference.fast import fused

from conformance.backends.fast import FastStrictBackend


def _gather_without_permute(buffer, work, plan):
    if work is None:
        return buffer
    work.wait()
    # BUG: (t, n, r/t) -> (n, r) needs the permute to (n, t, r/t) first.
    return buffer.reshape(buffer.shape[1], -1) if plan.kind == "column" else buffer


def _grad_h_not_reduced(grad_h, plan):
    if plan.tp_size == 1 or plan.kind == "none":
        return grad_h, None
    if plan.kind == "column":   # BUG: this rank's columns of its own partial sum, not of the sum
        return grad_h.view(grad_h.shape[0], plan.tp_size, -1)[:, plan.tp_rank].contiguous(), None
    return grad_h, None         # BUG: the row partial sum is not all-reduced


class FastGatherOrderBackend(FastStrictBackend):
    """The fused column step gathers h in the wrong order (no permute)."""

    def apply_lora(self, model, config, training=True):
        fused._finish_h = _gather_without_permute
        return super().apply_lora(model, config, training)


class FastGradHNotReducedBackend(FastStrictBackend):
    """The fused step's backward never reduces dL/dh over the TP ranks."""

    def apply_lora(self, model, config, training=True):
        fused._launch_grad_h = _grad_h_not_reduced
        return super().apply_lora(model, config, training)
