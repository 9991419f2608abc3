"""SPEC.md traceability: every clause has a test and a property, and every named clause exists."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import spec_trace  # noqa: E402


def test_every_clause_is_checked_by_a_test_and_a_property():
    """Each SPEC.md clause id is named by at least one test docstring and one conformance property."""
    clauses = spec_trace.spec_clauses((ROOT / "SPEC.md").read_text())
    assert len(clauses) == len(set(clauses)), "a clause id appears twice in SPEC.md"
    tests, props = spec_trace.tests_by_clause(), spec_trace.properties_by_clause()
    assert not [c for c in clauses if c not in tests], "clauses no test names"
    assert not [c for c in clauses if c not in props], "clauses no property checks"


def test_no_test_or_property_names_an_unknown_clause():
    """A test or property naming an id that SPEC.md lacks is an error (a typo or a removed clause)."""
    clauses = set(spec_trace.spec_clauses((ROOT / "SPEC.md").read_text()))
    tests, props = spec_trace.tests_by_clause(), spec_trace.properties_by_clause()
    assert sorted(set(tests) - clauses) == []
    assert sorted(set(props) - clauses) == []


def test_checks_lines_are_up_to_date():
    """The '- Checks:' line of each clause lists exactly its tests and properties (tools/spec_trace.py --write)."""
    text = (ROOT / "SPEC.md").read_text()
    expected = spec_trace.rewrite(text, spec_trace.tests_by_clause(), spec_trace.properties_by_clause())
    assert text == expected, "run: python tools/spec_trace.py --write"


def test_the_trace_catches_an_untraced_clause(tmp_path):
    """The checker itself can fail: a clause with no test is reported."""
    text = "### [LORA-FAKE-1] Nothing checks this\n- Checks: NONE\n"
    assert spec_trace.spec_clauses(text) == ["LORA-FAKE-1"]
    assert "LORA-FAKE-1" not in spec_trace.tests_by_clause()
    assert spec_trace.checks_line("LORA-FAKE-1", {}, {}) == "- Checks: NONE"
