"""SPEC.md traceability: every clause has a test and a property, every named clause exists, every Code
line names real code, and the property modules are SPEC's sections.

The tracing is tools/spec_trace.py's; the tests run it as a program (`--json`) rather than import it,
so that tests/ and tools/ never import each other."""

import json
import re
import subprocess
import sys
from pathlib import Path

from conformance.registry import SECTIONS, load_all

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "SPEC.md"


def _trace(spec: Path = SPEC) -> dict:
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "spec_trace.py"), "--json", "--spec", str(spec)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_every_clause_is_checked_by_a_test_and_a_property():
    """Each SPEC.md clause id is named by at least one test docstring and one conformance property."""
    trace = _trace()
    clauses, tests, props = trace["clauses"], trace["tests"], trace["properties"]
    assert len(clauses) == len(set(clauses)), "a clause id appears twice in SPEC.md"
    assert not [c for c in clauses if c not in tests], "clauses no test names"
    assert not [c for c in clauses if c not in props], "clauses no property checks"


def test_no_test_or_property_names_an_unknown_clause():
    """A test or property naming an id that SPEC.md lacks is an error (a typo or a removed clause)."""
    trace = _trace()
    clauses = set(trace["clauses"])
    assert sorted(set(trace["tests"]) - clauses) == []
    assert sorted(set(trace["properties"]) - clauses) == []


def test_checks_lines_are_up_to_date():
    """The '- Checks:' line of each clause lists exactly its tests and properties (tools/spec_trace.py --write)."""
    assert _trace()["checks_up_to_date"], "run: python tools/spec_trace.py --write"


def test_code_lines_name_existing_files_and_definitions():
    """Each clause's '- Code:' line names files that exist and, in parentheses, definitions they hold."""
    assert _trace()["code_problems"] == []


def test_the_trace_catches_an_untraced_clause_and_missing_code(tmp_path):
    """The checker itself can fail: a clause with no test is reported, and so is a Code line naming a
    file or a definition that does not exist."""
    fake = tmp_path / "SPEC.md"
    fake.write_text("## 1. Fake\n\n### [LORA-FAKE-1] Nothing checks this\n"
                    "- Code: `reference/layers.py` (`NoSuchLayer`), `reference/no_such_file.py`\n- Checks: NONE\n")
    trace = _trace(fake)
    assert trace["clauses"] == ["LORA-FAKE-1"]
    assert "LORA-FAKE-1" not in trace["tests"]
    assert trace["checks_lines"]["LORA-FAKE-1"] == "- Checks: NONE"
    assert trace["code_problems"] == ["[LORA-FAKE-1] reference/layers.py: no definition NoSuchLayer",
                                      "[LORA-FAKE-1] reference/no_such_file.py: no such file"]


def test_property_modules_are_the_spec_sections():
    """conformance/properties/<section>.py is SPEC's section "## N. Title" (conformance.registry.SECTIONS,
    in SPEC's order); every property lives in one, and SPEC states the rule."""
    text = SPEC.read_text()
    headings = re.findall(r"^## (\d+\. .+)$", text, flags=re.M)
    assert list(SECTIONS.values()) == headings
    modules = {p.stem for p in (ROOT / "conformance" / "properties").glob("*.py") if p.stem != "__init__"}
    assert modules == set(SECTIONS)
    assert {p.section for p in load_all()} == set(SECTIONS)
    assert "conformance/properties/<section>.py" in text
