"""Declared deviations: per backend, which properties are expected to fail (xfail) or are skipped.

A deviations file has one entry a line, a reason after the colon being required:

    xfail matching.wildcard_dots_are_literal: Megatron-Bridge turns "." into a regex wildcard
    xfail LORA-INIT-2: shards are initialized independently, so the adapter depends on the TP size
    skip  moe.*: MoE is not wired up in this backend yet
    # comments and blank lines are ignored

The pattern is a property id (shell wildcards allowed) or a clause id (every property checking that
clause). An entry that matches no property is warned about. An xfail entry whose properties pass is
reported as XPASS, so the file cannot quietly go stale.

The files for the shipped backends come with the package (`conformance/deviations/NAME.txt`), so
`--deviations peft` works from an installed wheel as well as from a clone; `shipped()` lists them.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Deviation:
    kind: str        # "xfail" or "skip"
    pattern: str
    reason: str
    line: int

    def matches(self, prop) -> bool:
        return fnmatch.fnmatchcase(prop.id, self.pattern) or self.pattern in prop.clauses


class DeviationError(ValueError):
    pass


def parse(text: str, source: str = "<deviations>") -> list[Deviation]:
    entries = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if not line:
            continue
        head, sep, reason = line.partition(":")
        parts = head.split()
        if not sep or len(parts) != 2 or parts[0] not in ("xfail", "skip") or not reason.strip():
            raise DeviationError(
                f"{source}:{number}: expected '<xfail|skip> <property-or-clause>: <reason>', got {raw.strip()!r}")
        entries.append(Deviation(parts[0], parts[1], reason.strip(), number))
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
