"""The matching grammar's always-run examples tell SPEC's matching apart from every plausible other
semantics ([LORA-MATCH-2], [LORA-MATCH-3]): for each alternative, some example selects differently.

A backend implementing one of these alternatives therefore fails on the first examples of the run,
whatever the seed (tests of the suite, no backend involved).
"""

from __future__ import annotations

import fnmatch
import re

import pytest

from conformance.model_case import pattern_selects
from conformance.properties.matching import GRAMMAR_LAYERS, MODULES, PLAIN, WILDCARD, _grammar_examples, grammar_pattern

NAMES = [f"decoder.layers.{i}.{m}" for i in range(GRAMMAR_LAYERS) for m in MODULES] + ["output_layer"]


def _regex(pattern: str, full: str, search: bool = False) -> bool:
    try:
        compiled = re.compile(pattern)
    except re.error:
        return False
    return bool(compiled.search(full) if search else compiled.fullmatch(full))


ALTERNATIVES = {
    "suffix (PEFT)": lambda p, n: n == p or n.endswith("." + p),
    "substring": lambda p, n: p in n,
    "regex fullmatch": lambda p, n: _regex(p, n),
    "regex search": lambda p, n: _regex(p, n, search=True),
    "`*` as .*, dots as regex (Megatron-Bridge)": lambda p, n: _regex(p.replace("*", ".*"), n),
    "fnmatch / glob": lambda p, n: fnmatch.fnmatchcase(n.rsplit(".", 1)[-1], p) or fnmatch.fnmatchcase(n, p),
    "unanchored wildcard": lambda p, n: n.rsplit(".", 1)[-1] == p or _regex(
        "".join(".*" if c == "*" else re.escape(c) for c in p), n, search=True),
    "whole name only": lambda p, n: _regex("".join(".*" if c == "*" else re.escape(c) for c in p), n),
    "case-insensitive": lambda p, n: pattern_selects(p.lower(), n.lower()),
}
PER_CLAUSE = {
    "LORA-MATCH-2": (PLAIN, ["suffix (PEFT)", "substring", "regex fullmatch", "regex search", "fnmatch / glob",
                             "whole name only", "case-insensitive"]),
    "LORA-MATCH-3": (WILDCARD, ["suffix (PEFT)", "substring", "regex search",
                                "`*` as .*, dots as regex (Megatron-Bridge)", "fnmatch / glob", "unanchored wildcard"]),
}


def _selection(select, pattern):
    return {n for n in NAMES if select(pattern, n)}


@pytest.mark.parametrize("clause", sorted(PER_CLAUSE))
def test_always_run_examples_separate_spec_from_each_alternative(clause):
    """[LORA-MATCH-2] [LORA-MATCH-3] every alternative semantics disagrees with SPEC on at least one
    always-run example of the clause's grammar property."""
    transforms, alternatives = PER_CLAUSE[clause]
    patterns = [grammar_pattern(ex) for ex in _grammar_examples(transforms).explicit]
    spec = {p: _selection(pattern_selects, p) for p in patterns}
    for name in alternatives:
        differing = [p for p in patterns if _selection(ALTERNATIVES[name], p) != spec[p]]
        assert differing, f"{clause}: no always-run pattern tells SPEC's matching from {name}"


def test_grammar_patterns_come_from_real_names():
    """The transforms build each pattern from a module the model has (not from invented names)."""
    for transforms in (PLAIN, WILDCARD):
        for ex in _grammar_examples(transforms).explicit:
            assert f"decoder.layers.{ex['layer']}.{ex['module']}" in NAMES
            assert grammar_pattern(ex)
