"""Trace SPEC.md clauses to the tests and conformance properties that check them.

    python tools/spec_trace.py           # print clauses with their checks; exit 1 if any is untraced
    python tools/spec_trace.py --write   # rewrite each clause's "- Checks:" line in SPEC.md

A test checks a clause when its docstring names the id in brackets ("[LORA-FWD-1] ..."); a property
checks the clauses given to @prop. tests/test_spec.py fails when a clause has no test or no
property, when a test or property names a clause SPEC.md does not have, or when the Checks lines are
out of date.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLAUSE_HEADING = re.compile(r"^### \[([A-Z]+(?:-[A-Z0-9]+)+)\]", re.MULTILINE)
CLAUSE_ID = re.compile(r"\[([A-Z]+(?:-[A-Z0-9]+)+)\]")


def spec_clauses(spec_text: str) -> list[str]:
    return CLAUSE_HEADING.findall(spec_text)


def tests_by_clause(tests_dir: Path = ROOT / "tests") -> dict[str, list[str]]:
    """clause id -> ["tests/file.py::test_name", ...] from test docstrings."""
    found: dict[str, list[str]] = {}
    for path in sorted(tests_dir.glob("test_*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
                for clause in CLAUSE_ID.findall(ast.get_docstring(node) or ""):
                    ref = f"tests/{path.name}::{node.name}"
                    if ref not in found.setdefault(clause, []):
                        found[clause].append(ref)
    return found


def properties_by_clause() -> dict[str, list[str]]:
    sys.path.insert(0, str(ROOT))
    from conformance.registry import load_all

    found: dict[str, list[str]] = {}
    for prop in load_all():
        for clause in prop.clauses:
            found.setdefault(clause, []).append(prop.id)
    return found


def checks_line(clause: str, tests: dict, props: dict) -> str:
    parts = [f"`{t}`" for t in tests.get(clause, [])] + [f"property `{p}`" for p in props.get(clause, [])]
    return "- Checks: " + (", ".join(parts) if parts else "NONE")


def rewrite(spec_text: str, tests: dict, props: dict) -> str:
    out, current = [], None
    for line in spec_text.splitlines():
        heading = CLAUSE_HEADING.match(line)
        if heading:
            current = heading.group(1)
        elif line.startswith("### ") or line.startswith("## "):
            current = None
        if current and line.startswith("- Checks:"):
            line = checks_line(current, tests, props)
        out.append(line)
    return "\n".join(out) + "\n"


def main() -> int:
    spec_path = ROOT / "SPEC.md"
    text = spec_path.read_text()
    tests, props = tests_by_clause(), properties_by_clause()
    if "--write" in sys.argv:
        spec_path.write_text(rewrite(text, tests, props))
        text = spec_path.read_text()
    missing = 0
    for clause in spec_clauses(text):
        n_tests, n_props = len(tests.get(clause, [])), len(props.get(clause, []))
        flag = "" if n_tests and n_props else "   <-- untraced"
        missing += bool(flag)
        print(f"{clause:<16} tests {n_tests:>2}  properties {n_props:>2}{flag}")
    unknown = sorted((set(tests) | set(props)) - set(spec_clauses(text)))
    if unknown:
        print(f"named but not in SPEC.md: {unknown}")
    return 1 if missing or unknown else 0


if __name__ == "__main__":
    sys.exit(main())
