"""Reports: the console summary, JSON, JUnit XML and a Markdown table (for pull requests)."""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from pathlib import Path
from xml.etree import ElementTree

from .registry import SECTIONS
from .runner import FAIL, NA, NOT_CHECKED, PASS, SKIP, XFAIL, XPASS

STATUSES = (PASS, FAIL, XFAIL, XPASS, NOT_CHECKED, SKIP, NA)
CLAUSE_ORDER = (FAIL, XPASS, XFAIL, NOT_CHECKED, PASS, SKIP, NA)   # a clause takes the first status any of its properties has


def by_section(outcomes) -> "OrderedDict[str, dict[str, int]]":
    """section (property module) -> status counts, in SPEC's section order."""
    table: OrderedDict[str, dict[str, int]] = OrderedDict()
    for o in sorted(outcomes, key=lambda o: list(SECTIONS).index(o.property.section)):
        row = table.setdefault(o.property.section, {s: 0 for s in STATUSES})
        row[o.status] += 1
    return table


def clause_verdicts(outcomes) -> "OrderedDict[str, dict]":
    """clause id -> {"status", "properties"}: failed if any property failed, and so on down CLAUSE_ORDER."""
    clauses: dict[str, list] = {}
    for o in outcomes:
        for clause in o.property.clauses:
            clauses.setdefault(clause, []).append(o)
    result = OrderedDict()
    for clause in sorted(clauses, key=_clause_key):
        statuses = {o.status for o in clauses[clause]}
        status = next(s for s in CLAUSE_ORDER if s in statuses)
        result[clause] = {"status": status, "properties": [o.property.id for o in clauses[clause]]}
    return result


def _clause_key(clause: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", clause)]


def summary_text(outcomes, header: dict) -> str:
    lines = ["", "Summary by SPEC section", ""]
    columns = ["section", *STATUSES]
    rows = [[SECTIONS[section], *(str(counts[s]) for s in STATUSES)] for section, counts in by_section(outcomes).items()]
    totals = ["total", *(str(sum(1 for o in outcomes if o.status == s)) for s in STATUSES)]
    widths = [max(len(r[i]) for r in [columns, *rows, totals]) for i in range(len(columns))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines += [fmt.format(*columns), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in rows]
    lines += [fmt.format(*("-" * w for w in widths)), fmt.format(*totals)]
    failures = [o for o in outcomes if o.status in (FAIL, XPASS)]
    for o in failures:
        lines += ["", f"{o.status.upper()}: {o.property.id}  [{', '.join(o.property.clauses)}]"]
        if o.failures:   # several kinds of failure: each with its own minimal example
            lines.append(f"  {len(o.failures)} distinct kinds of failure:")
            for i, failure in enumerate(o.failures, 1):
                lines += [f"  [{i}] " + line if j == 0 else "      " + line
                          for j, line in enumerate(failure["message"].splitlines())]
                lines.append(f"      minimal example: {json.dumps(failure['minimal_example'], sort_keys=True)}")
                lines.append(f"      reproduce: {failure['reproduce']}")
            continue
        if o.message:
            lines += ["  " + line for line in o.message.splitlines()]
        if o.example is not None:
            lines.append(f"  minimal example: {json.dumps(o.example, sort_keys=True)}")
        if o.reproduce:
            lines.append(f"  reproduce: {o.reproduce}")
    verdicts = clause_verdicts(outcomes)
    counts = {s: sum(1 for v in verdicts.values() if v["status"] == s) for s in STATUSES}
    lines += ["", "Clauses: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)]
    lines.append(own_code_line(outcomes))
    lines.append(f"Seed {header.get('seed')}, {header.get('elapsed_s', 0):.1f} s")
    return "\n".join(lines)


NOT_OWN = "not the backend's own code"


def own_code_line(outcomes) -> str:
    """Passes are earned by the backend's own code; properties that would only have run the suite's
    defaults or borrowed code are n/a, and counted apart from those that lack a capability."""
    passed = sum(o.status == PASS for o in outcomes)
    not_own = [o for o in outcomes if o.status == NA and o.reason.startswith(NOT_OWN)]
    lacking = sum(o.status == NA for o in outcomes) - len(not_own)
    parts = sorted({o.reason.split(": ", 2)[1] for o in not_own if o.reason.count(": ") >= 1})
    return (f"Passed on the backend's own code: {passed}; not applicable: {lacking} (capability or world size), "
            f"{len(not_own)} (not the backend's own code" + (f": {', '.join(parts)})" if parts else ")"))


def write_json(path: str, outcomes, header: dict, warnings: list[str]) -> None:
    data = {"header": header, "warnings": warnings,
            "summary": {s: sum(1 for o in outcomes if o.status == s) for s in STATUSES},
            "not_own_code": sum(1 for o in outcomes if o.status == NA and o.reason.startswith(NOT_OWN)),
            "sections": by_section(outcomes), "clauses": clause_verdicts(outcomes),
            "properties": [o.to_json() for o in outcomes]}
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def write_junit(path: str, outcomes, header: dict) -> None:
    suites = ElementTree.Element("testsuites", name=f"conformance[{header.get('backend')}]")
    for section in by_section(outcomes):
        cases = [o for o in outcomes if o.property.section == section]
        suite = ElementTree.SubElement(suites, "testsuite", name=section, tests=str(len(cases)),
                                       failures=str(sum(o.status in (FAIL, XPASS) for o in cases)),
                                       skipped=str(sum(o.status in (SKIP, NA, XFAIL, NOT_CHECKED) for o in cases)))
        for o in cases:
            case = ElementTree.SubElement(suite, "testcase", classname=f"conformance.{section}",
                                          name=o.property.id, time=f"{o.seconds:.3f}")
            if o.status in (FAIL, XPASS):
                failure = ElementTree.SubElement(case, "failure", message=(o.message or o.status).splitlines()[0][:200])
                failure.text = "\n".join(filter(None, [o.message, f"minimal example: {json.dumps(o.example)}"
                                                       if o.example is not None else "", o.reproduce]))
            elif o.status in (SKIP, NA, XFAIL, NOT_CHECKED):
                ElementTree.SubElement(case, "skipped", message=f"{o.status}: {o.reason}")
    ElementTree.indent(suites)
    ElementTree.ElementTree(suites).write(path, encoding="utf-8", xml_declaration=True)


def markdown(outcomes, header: dict) -> str:
    lines = [f"### Conformance: `{header.get('backend')}` (world {header.get('world_size')}, "
             f"profile {header.get('profile')}, seed {header.get('seed')})", "",
             "| section | " + " | ".join(STATUSES) + " |", "|---|" + "---|" * len(STATUSES)]
    for section, counts in by_section(outcomes).items():
        lines.append(f"| {SECTIONS[section]} | " + " | ".join(str(counts[s]) for s in STATUSES) + " |")
    lines += ["", "| clause | verdict | properties |", "|---|---|---|"]
    for clause, verdict in clause_verdicts(outcomes).items():
        lines.append(f"| {clause} | {verdict['status']} | {', '.join(verdict['properties'])} |")
    failing = [o for o in outcomes if o.status in (FAIL, XPASS, XFAIL)]
    if failing:
        lines += ["", "| property | status | why |", "|---|---|---|"]
        for o in failing:
            why = (o.reason or o.message.splitlines()[0] if (o.reason or o.message) else "").replace("|", "\\|")
            lines.append(f"| {o.property.id} | {o.status} | {why[:160]} |")
    return "\n".join(lines) + "\n"


def write_markdown(path: str, outcomes, header: dict) -> None:
    Path(path).write_text(markdown(outcomes, header))
