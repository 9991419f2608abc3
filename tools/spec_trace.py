"""Trace SPEC.md clauses to the tests and conformance properties that check them.

    python tools/spec_trace.py           # print clauses with their checks; exit 1 if any is untraced
    python tools/spec_trace.py --write   # rewrite each clause's "- Checks:" line in SPEC.md
    python tools/spec_trace.py --json [--spec FILE]   # everything traced, as JSON (tests/test_spec.py)

A test checks a clause when its docstring names the id in brackets ("[LORA-FWD-1] ..."); a property
checks the clauses given to @prop. Each clause's "- Code:" line names files and, in parentheses, the
definitions in them (`reference/layers.py` (`ColumnParallelLinear`)): each must exist. tests/test_spec.py
fails when a clause has no test or no property, when a test or property names a clause SPEC.md does not
have, when the Checks lines are out of date, or when a Code line names a missing file or definition.
"""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from conformance.registry import load_all  # noqa: E402

CLAUSE_HEADING = re.compile(r"^### \[([A-Z]+(?:-[A-Z0-9]+)+)\]", re.MULTILINE)
CLAUSE_ID = re.compile(r"\[([A-Z]+(?:-[A-Z0-9]+)+)\]")
CODE_ITEM = re.compile(r"`([\w./]+\.py)`(?: \(([^)]*)\))?")


def spec_clauses(spec_text: str) -> list[str]:
    return CLAUSE_HEADING.findall(spec_text)


def tests_by_clause(tests_dir: Path = ROOT / "tests") -> dict[str, list[str]]:
    """clause id -> ["tests/file.py::test_name", ...] from test docstrings."""
    found: dict[str, list[str]] = {}
    for path in sorted(tests_dir.rglob("test_*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
                for clause in CLAUSE_ID.findall(ast.get_docstring(node) or ""):
                    ref = f"{path.relative_to(tests_dir.parent).as_posix()}::{node.name}"
                    if ref not in found.setdefault(clause, []):
                        found[clause].append(ref)
    return found


def properties_by_clause() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for prop in load_all():
        for clause in prop.clauses:
            found.setdefault(clause, []).append(prop.id)
    return found


def code_references(spec_text: str) -> list[tuple[str, str, list[str]]]:
    """(clause, file, [definitions]) for every item of every clause's "- Code:" line."""
    refs, current = [], None
    for line in spec_text.splitlines():
        heading = CLAUSE_HEADING.match(line)
        if heading:
            current = heading.group(1)
        elif line.startswith("## "):
            current = None
        if current and line.startswith("- Code:"):
            for path, names in CODE_ITEM.findall(line):
                refs.append((current, path, re.findall(r"`(\w+)`", names)))
    return refs


def defined_names(path: Path) -> set[str]:
    """Every class, function and assigned name defined anywhere in a Python file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def code_problems(spec_text: str, root: Path = ROOT) -> list[str]:
    """Code lines that name a file or a definition that does not exist."""
    problems = []
    for clause, path, names in code_references(spec_text):
        file = root / path
        if not file.is_file():
            problems.append(f"[{clause}] {path}: no such file")
            continue
        missing = sorted(set(names) - defined_names(file))
        if missing:
            problems.append(f"[{clause}] {path}: no definition {', '.join(missing)}")
    return problems


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
    args = sys.argv[1:]
    spec_path = Path(args[args.index("--spec") + 1]) if "--spec" in args else ROOT / "SPEC.md"
    text = spec_path.read_text()
    tests, props = tests_by_clause(), properties_by_clause()
    if "--json" in args:
        clauses = spec_clauses(text)
        print(json.dumps({"clauses": clauses, "tests": tests, "properties": props,
                          "checks_lines": {c: checks_line(c, tests, props) for c in clauses},
                          "checks_up_to_date": rewrite(text, tests, props) == text,
                          "code_problems": code_problems(text)}, indent=1))
        return 0
    if "--write" in args:
        spec_path.write_text(rewrite(text, tests, props))
        text = spec_path.read_text()
    problems = code_problems(text)
    for problem in problems:
        print(f"Code line: {problem}")
    missing = len(problems)
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
