"""Properties: a check of one or more SPEC clauses over examples drawn by hypothesis.

    @prop("LORA-FWD-1", "LORA-FWD-2", needs={"tp"},
          strategy=lambda ctx: st.fixed_dictionaries({"tp": st.sampled_from(ctx.tp_sizes), ...}))
    def column_forward_matches_full_math(ctx, backend, ex):
        ...   # raise AssertionError (or use ctx.assert_close) when the backend is wrong

What a property declares besides its clauses:
- `needs`: capabilities (conformance/backend.py); without them it is "not applicable";
- `judges`: the protocol methods / apply_lora aspects its verdict is about (section default: JUDGES);
  inherited or borrowed ones make it "not applicable" — a pass is the backend's own code;
- `requires`: clauses it builds on (FORWARD_MATH for anything that runs an adapter's forward); when
  one failed earlier in the run it is "not checked", so one bug fails one clause;
- its strategy's `.explicit`: examples always run before the random draws (layout combinations);
  they count against the property's budget, of which at least a quarter is still drawn at random.

A property's id is "<section>.<function name>", its section the module it lives in:
conformance/properties/<section>.py, one module per SPEC.md section (`SECTIONS`, in SPEC's order,
which is also the order properties run and reports list them). An example is a dict of plain values
(ints, bools, strings), so a failing one can be printed as JSON and replayed with --replay.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Callable

from hypothesis import strategies as st

PROPERTIES: list["Property"] = []

# Property module -> its SPEC.md section heading ("## N. Title"), in SPEC's order.
SECTIONS = {
    "parallel": "1. Parallel runtime and layers",
    "config": "2. Configuration",
    "matching": "3. Matching",
    "forward": "4. The adapter: forward",
    "backward": "5. The adapter: backward",
    "init": "6. Initialization",
    "dtype": "7. dtype",
    "injection": "8. Injection and freezing",
    "merge": "9. Merge",
    "moe": "10. Mixture of experts",
    "vlm": "11. Vision-language models",
    "errors": "12. Errors",
}


# What a property judges when it does not say (conformance/backend.py, "What a verdict means"): the
# protocol method or apply_lora aspect whose behaviour its verdict is about.
JUDGES = {
    "parallel": ("make_linear",),
    "config": ("validate_config",),
    "matching": ("matching",),
    "forward": ("apply_lora",),
    "backward": ("apply_lora",),
    "init": ("init",),
    "dtype": ("apply_lora",),
    "injection": ("injection",),
    "merge": ("merge_weight",),
    "moe": ("apply_lora",),
    "vlm": ("freezing",),
    "errors": ("build_checks",),
}


# The clauses of an adapter's forward math, basic layouts first: what every other property that runs
# an adapter's forward builds on (`requires`), so that a forward bug is reported once, on its clause.
# Not the layout [LORA-FWD-2]: a backend with the full form computes right whatever its shards, and
# one read through its shards fails LORA-FWD-1 on a wrong layout anyway.
FORWARD_MATH = ("LORA-FWD-1", "LORA-FWD-8", "LORA-FWD-3", "LORA-FWD-5")


@dataclass
class Property:
    id: str
    section: str
    clauses: tuple[str, ...]
    needs: frozenset[str]
    strategy: Callable
    fn: Callable
    doc: str
    weight: float = 1.0          # share of the profile's example budget (heavy properties: less)
    min_world: int = 1
    dtypes: tuple[str, ...] = field(default_factory=tuple)
    judges: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()   # clauses whose failure makes this property "not checked"

    def max_examples(self, budget: int) -> int:
        return max(1, round(budget * self.weight))

    def random_draws(self, budget: int, always_run: int) -> int:
        """Hypothesis draws on top of the `always_run` examples: the always-run ones count against
        the property's budget, but at least a quarter of it is still drawn at random."""
        share = self.max_examples(budget)
        return max(math.ceil(share / 4), share - always_run)


def prop(*clauses: str, needs=(), strategy: Callable, weight: float = 1.0, min_world: int = 1, judges=(),
         requires=()):
    """Register a property checking `clauses`; see the module docstring. `judges`: the protocol
    methods / apply_lora aspects its verdict is about (default: its section's, JUDGES). `requires`:
    clauses it builds on (e.g. the forward math for a gradient check): when one of them has failed
    earlier in the run, this property is "not checked" instead of failing on the same root cause."""

    def register(fn):
        section = fn.__module__.rsplit(".", 1)[-1]
        if section not in SECTIONS:
            raise ValueError(f"property module {section!r} is not a SPEC section; sections: {list(SECTIONS)}")
        PROPERTIES.append(Property(
            id=f"{section}.{fn.__name__}", section=section, clauses=tuple(clauses),
            needs=frozenset(needs), strategy=strategy, fn=fn, doc=(fn.__doc__ or "").strip(),
            weight=weight, min_world=min_world, judges=tuple(judges) or JUDGES[section],
            requires=tuple(requires)))
        return fn

    return register


# ---- always-run examples --------------------------------------------------------------------------
# A strategy may carry `.explicit`: examples the runner runs first, every time, before hypothesis
# draws (SPEC's rare layouts and cases never depend on the seed). `--coverage WORLD` lists them.

def with_explicit(strategy, explicit):
    """`strategy` with the examples the runner always runs first (`.explicit`); returns it."""
    strategy.explicit = list(explicit)
    return strategy


def explicit_examples(strategy) -> list:
    """The examples a property always runs (its strategy's `.explicit`)."""
    return list(getattr(strategy, "explicit", ()))


def each_of(values):
    """st.sampled_from(values) that always runs every one of them (a short list of cases)."""
    return with_explicit(st.sampled_from(list(values)), values)


def paired(first, second, values):
    """st.tuples(first, second) that always runs each of first's explicit examples with each of
    `values` (values `second` can draw)."""
    return with_explicit(st.tuples(first, second), [(ex, v) for ex in explicit_examples(first) for v in values])


def tupled(first, *others, always):
    """st.tuples(first, *others) that always runs each of first's explicit examples, the i-th with
    the rest taken from always[i % len(always)] (tuples of values `others` can draw), so the fixed
    choices vary over the combinations without multiplying them."""
    return with_explicit(st.tuples(first, *others),
                         [(ex, *always[i % len(always)]) for i, ex in enumerate(explicit_examples(first))])


def load_all() -> list[Property]:
    """Import every property module (each registers its properties); SPEC's section order, then the
    order of definition within a module."""
    for section in SECTIONS:
        importlib.import_module(f"{__package__}.properties.{section}")
    order = list(SECTIONS)
    return sorted(PROPERTIES, key=lambda p: order.index(p.section))
