"""Declared deviations: per backend, which properties are expected to fail (xfail) or are skipped.

A deviations file has one entry a line, a reason after the colon being required:

    xfail matching.wildcard_dots_are_literal: Megatron-Bridge turns "." into a regex wildcard
    xfail LORA-INIT-2: shards are initialized independently, so the adapter depends on the TP size
    skip  moe.*: MoE is not wired up in this backend yet
    # comments and blank lines are ignored

The pattern is a property id (shell wildcards allowed) or a clause id (every property checking that
clause). An entry that matches no property is warned about. An xfail entry whose properties pass is
reported as XPASS, so the file cannot quietly go stale.

An xfail entry may hold only for some examples: a scope in brackets after the pattern,

    xfail init.init_methods_draw_the_full_matrix_distribution [world > 1]: fans of the shard
    xfail forward.parallel_forward_matches_full_math [kind = row and tp > 1]: ...

conditions `key OP value` (OP one of = != < <= > >=) joined by `and`, on the example's values (the
keys `--replay` shows; in a tuple example, those of its dicts) and `world` (the world size). Inside
the scope the property must fail (an example that passes there is an XPASS), outside it must pass
(a failure there is a failure); a run that draws no example inside the scope passes. So one file
stays exact at every world size.

The files for the shipped backends come with the package (`conformance/deviations/NAME.txt`), so
`--deviations peft` works from an installed wheel as well as from a clone; `shipped()` lists them.
"""

from __future__ import annotations

import fnmatch
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path

OPERATORS = {"=": operator.eq, "!=": operator.ne, "<=": operator.le, ">=": operator.ge, "<": operator.lt,
             ">": operator.gt}
SCOPED = re.compile(r"^(\S+\s+\S+)\s+\[(.*)\]\s*$")
CONDITION = re.compile(r"^\s*(\w+)\s*(!=|<=|>=|=|<|>)\s*([\w.+-]+)\s*$")


@dataclass(frozen=True)
class Condition:
    key: str
    op: str
    value: object

    def holds(self, values: dict) -> bool:
        if self.key not in values:
            return False
        try:
            return bool(OPERATORS[self.op](values[self.key], self.value))
        except TypeError:            # e.g. "dtype > 1": a condition that cannot hold
            return False

    def __str__(self) -> str:
        return f"{self.key} {self.op} {self.value}"


@dataclass
class Deviation:
    kind: str        # "xfail" or "skip"
    pattern: str
    reason: str
    line: int
    scope: tuple[Condition, ...] = field(default_factory=tuple)   # empty: every example

    def matches(self, prop) -> bool:
        return fnmatch.fnmatchcase(prop.id, self.pattern) or self.pattern in prop.clauses

    def in_scope(self, example, world: int) -> bool:
        """Whether this entry covers `example` (always, without a scope)."""
        values = {"world": world, **example_values(example)}
        return all(condition.holds(values) for condition in self.scope)

    def scope_text(self) -> str:
        return " and ".join(map(str, self.scope))


def example_values(example) -> dict:
    """The named values of an example: a dict's, or those of the dicts inside a tuple example."""
    if isinstance(example, dict):
        return dict(example)
    values = {}
    if isinstance(example, (list, tuple)):
        for part in example:
            if isinstance(part, dict):
                values.update(part)
    return values


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_scope(text: str, where: str) -> tuple[Condition, ...]:
    conditions = []
    for part in re.split(r"\s+and\s+", text.strip()):
        found = CONDITION.match(part)
        if not found:
            raise DeviationError(f"{where}: a scope condition is 'key OP value' with OP one of "
                                 f"{' '.join(OPERATORS)}, got {part.strip()!r}")
        key, op, value = found.groups()
        conditions.append(Condition(key, op, _value(value)))
    return tuple(conditions)


class DeviationError(ValueError):
    pass


def parse(text: str, source: str = "<deviations>") -> list[Deviation]:
    entries = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if not line:
            continue
        head, sep, reason = line.partition(":")
        scope = ()
        scoped = SCOPED.match(head)        # "<kind> <pattern> [<scope>]": a space before the bracket
        if scoped:
            head = scoped.group(1)
            scope = parse_scope(scoped.group(2), f"{source}:{number}")
        parts = head.split()
        if not sep or len(parts) != 2 or parts[0] not in ("xfail", "skip") or not reason.strip():
            raise DeviationError(
                f"{source}:{number}: expected '<xfail|skip> <property-or-clause> [scope]: <reason>', "
                f"got {raw.strip()!r}")
        if scope and parts[0] == "skip":
            raise DeviationError(f"{source}:{number}: only an xfail entry can have a scope (a skip runs nothing)")
        entries.append(Deviation(parts[0], parts[1], reason.strip(), number, scope))
    return entries


SHIPPED_DIR = Path(__file__).resolve().parent / "deviations"


def shipped() -> dict[str, Path]:
    """The deviations files that ship with the package: name -> path."""
    return {f.stem: f for f in sorted(SHIPPED_DIR.glob("*.txt"))}


def resolve(name_or_path: str) -> Path:
    """An existing file path, else the name of a shipped file (`peft`, `megatron_bridge`)."""
    file = Path(name_or_path)
    if file.is_file():
        return file
    known = shipped()
    if name_or_path in known:
        return known[name_or_path]
    raise DeviationError(f"--deviations: no such file, and no shipped deviations named {name_or_path!r}; "
                         f"shipped: {', '.join(known) or 'none'}")


def load(name_or_path: str) -> list[Deviation]:
    file = resolve(name_or_path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DeviationError(f"--deviations: cannot read {file}: {e}") from None
    return parse(text, str(file))


def find(deviations: list[Deviation], prop) -> Deviation | None:
    for deviation in deviations:
        if deviation.matches(prop):
            return deviation
    return None


def unmatched(deviations: list[Deviation], properties) -> list[Deviation]:
    return [d for d in deviations if not any(d.matches(p) for p in properties)]
