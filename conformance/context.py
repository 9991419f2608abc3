"""What a property sees: the world, the device, seeded tensors and comparisons.

Properties compute expected values from full tensors in float64 on every rank, then compare the
backend's local results with the right piece of the expectation (or gather the backend's shards and
compare with the whole), using SPEC's layouts from conformance/layout.py; these helpers are the
suite's own and never the backend's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .agreement import all_gather_json, closed_by_peer, meet
from .backend import supports
from .layout import TOLERANCES


class NotOwnCode(Exception):
    """Raised by a property (on every rank alike) that finds, while running, that the behaviour it
    judges came from the reference or the suite, not the backend: the property is then n/a."""


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class Context:
    world_size: int
    rank: int
    device: torch.device
    control_group: object                      # gloo group the suite uses for outcomes, never the backend
    dtypes: tuple[str, ...] = ("float32",)     # reduced dtypes this device supports, plus float32
    tp_sizes: list = field(default_factory=list)  # TP sizes to draw: divisors of the world the backend supports
    capabilities: dict = field(default_factory=dict)  # the backend's, as backend.capability_values gives them

    ran_changes: dict = field(default_factory=dict)   # set by `ran` during one example; reset by the runner
    # Closes every process group but the suite's and forgets them (runner.abandon_groups, set by the
    # runner): what a rank that raised calls when the others do not come to the agreement.
    release_groups: Callable[[], None] = lambda: None

    def __post_init__(self):
        if not self.tp_sizes:
            self.tp_sizes = divisors(self.world_size)

    def supports(self, capability: str, value: str | None = None) -> bool:
        """Whether the backend has `capability` (and that value of it): what strategies may draw."""
        return supports(self.capabilities, capability, value)

    def supported(self, capability: str, values) -> list:
        """The values of `values` the backend supports (all of them for a capability without values)."""
        return [v for v in values if self.supports(capability, v)]

    def ran(self, **changes) -> None:
        """Record that this example ran with `changes` (fitted to the backend): the reported minimal
        example is then what ran, and replaying it runs the same."""
        self.ran_changes.update(changes)

    def agree(self, value, raised: bool) -> tuple[list, list[bool]]:
        """Every rank's `value` (JSON, over the control group), after agreement.meet: a rank that
        `raised` releases the ranks still inside a collective with it. Returns (values, which ranks
        released); if any did, every rank has closed its groups (release_groups) for fresh ones."""
        released = meet(self.control_group, raised, self.release_groups)
        pairs = all_gather_json([value, released], self.control_group)
        releases = [was for _, was in pairs]
        if any(releases):
            self.release_groups()
        return [v for v, _ in pairs], releases

    # -- tensors --------------------------------------------------------------------------------
    def randn(self, shape, seed: int, dtype=torch.float64, scale: float = 1.0) -> torch.Tensor:
        """The same tensor on every rank: drawn on the CPU from its own generator, then moved."""
        generator = torch.Generator().manual_seed(seed)
        t = torch.randn(*shape, generator=generator, dtype=torch.float64) * scale
        return t.to(device=self.device, dtype=dtype)

    @staticmethod
    def all_reduce(t: torch.Tensor, group) -> torch.Tensor:
        out = t.detach().clone()
        if dist.get_world_size(group) > 1:
            dist.all_reduce(out, group=group)
        return out

    # -- comparisons ------------------------------------------------------------------------------
    @staticmethod
    def assert_close(actual, expected: torch.Tensor, dtype: torch.dtype, what: str, scale: float = 1.0,
                     terms: float | None = None):
        """Compare with the tolerance of `dtype`; the message says what was compared.

        `terms`: the size of what was summed to get `expected` (the same math on absolute values).
        A reduced-precision result is judged relative to it: a sum of large terms that cancel, or a
        TP sum of partials rounded to the dtype, carries the terms' rounding error, not the result's."""
        if not isinstance(actual, torch.Tensor):
            raise AssertionError(f"{what}: expected a tensor, got {type(actual).__name__}")
        if tuple(actual.shape) != tuple(expected.shape):
            raise AssertionError(f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
        actual64 = actual.detach().to(device=expected.device, dtype=torch.float64)
        if not torch.isfinite(actual64).all():
            bad = (~torch.isfinite(actual64)).sum().item()
            raise AssertionError(f"{what}: {bad} non-finite values (NaN/inf)")
        rtol, atol = TOLERANCES[dtype]
        # Reduced-precision results are judged relative to the size of the values involved.
        reduced = dtype in (torch.bfloat16, torch.float16)
        magnitude = expected.abs().max().item() if expected.numel() else 0.0
        atol = atol * max(scale * max(1.0, magnitude if reduced else 1.0), (terms or 0.0) if reduced else 0.0)
        try:
            torch.testing.assert_close(actual64, expected.to(torch.float64), rtol=rtol * scale, atol=atol)
        except AssertionError as e:
            raise AssertionError(f"{what} ({dtype}): {e}") from None

    @staticmethod
    def check(condition: bool, message: str) -> None:
        if not condition:
            raise AssertionError(message)


def raises_everywhere(ctx: Context, fn, errors: tuple, what: str, mentions: tuple = ()) -> str:
    """Call fn() on every rank: it must raise one of `errors` on every rank with the same message,
    and the message must contain one of `mentions` (case-insensitive; empty: anything). Returns it.

    The ranks' outcomes are compared over ctx.control_group (every rank reaches that collective
    whatever fn did), so the verdict, and its text, is the same on every rank.
    """
    try:
        fn()
        outcome = None
    except Exception as error:   # noqa: BLE001 - which error the backend raised is the verdict
        outcome = [type(error).__name__, isinstance(error, errors), str(error)]
    outcomes, releases = ctx.agree(outcome, raised=outcome is not None)
    if any(releases):              # some rank did not come: it was inside a collective, now closed
        outcomes = [o if o is None or not closed_by_peer(o[2]) else
                    ["no error (it went into a collective, released after the others raised)", False, ""]
                    for o in outcomes]
    wanted = " or ".join(e.__name__ for e in errors)
    distinct = []
    for o in outcomes:
        if o not in distinct:
            distinct.append(o)
    if len(distinct) > 1:
        described = "; ".join("nothing raised" if o is None else f"{o[0]}: {o[2]}".rstrip(": ") for o in distinct)
        raise AssertionError(f"{what}: the ranks did not all raise the same error ({described})")
    if outcome is None:
        raise AssertionError(f"{what}: no {wanted} was raised")
    name, is_wanted, message = outcome
    if not is_wanted:
        raise AssertionError(f"{what}: raised {name}: {message}; expected {wanted}")
    if mentions and not any(m.lower() in message.lower() for m in mentions):
        raise AssertionError(f"{what}: the {name} message does not name {' or '.join(map(repr, mentions))}: "
                             f"{message!r}")
    return message


def check_group_in_step(ctx: Context, group, size: int) -> None:
    """After an error: an all-reduce over `group` must still give `size` (no rank left inside a collective)."""
    total = ctx.all_reduce(torch.ones(1, device=ctx.device), group)
    ctx.check(total.item() == size,
              f"after the error, an all-reduce over the TP group gave {total.item()}, expected {size}")
