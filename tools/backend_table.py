"""Markdown tables for docs/backends.md, from conformance JSON reports (nothing typed by hand).

    python tools/backend_table.py clauses "reference (gloo)=docs/reports/reference_gloo_world2.json" ...
    python tools/backend_table.py deviations docs/reports/megatron_bridge_world2.json \
        conformance/deviations/megatron_bridge.txt

`clauses`: one row per SPEC clause, one column per report: passed / deviates (declared) / failed /
not applicable / not run. `deviations`: every property a report marks xfailed, with its clauses, the
reason the deviations file declares for it today and the failure the run measured (first line).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from spec_trace import spec_clauses  # noqa: E402

from conformance import declared as deviations  # noqa: E402
from conformance.registry import load_all  # noqa: E402

WORDS = {"passed": "passed", "xfailed": "deviates (declared)", "failed": "**failed**", "xpassed": "**xpassed**",
         "skipped": "skipped", "not applicable": "not applicable"}


def clause_table(columns: list[tuple[str, dict]]) -> str:
    clauses = spec_clauses((ROOT / "SPEC.md").read_text())
    lines = ["| clause | " + " | ".join(label for label, _ in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for clause in clauses:
        cells = [WORDS.get(report["clauses"].get(clause, {}).get("status"), "not run") for _, report in columns]
        lines.append(f"| {clause} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _first_failure_line(message: str) -> str:
    for line in message.splitlines():
        line = line.strip()
        if line and not line.startswith("failed on rank"):
            return re.sub(r"^ranks? [\d, ]+: ", "", line).replace("|", "\\|")
    return ""


def deviation_table(report: dict, deviations_path: str) -> str:
    entries = deviations.load(deviations_path)
    props = {p.id: p for p in load_all()}
    lines = ["| property | clauses | declared reason | measured failure |", "|---|---|---|---|"]
    for p in report["properties"]:
        if p["status"] == "xfailed":
            entry = deviations.find(entries, props[p["id"]]) if p["id"] in props else None
            reason = (entry.reason if entry else "(no entry today)").replace("|", "\\|")
            lines.append(f"| `{p['id']}` | {', '.join(p['clauses'])} | {reason} | {_first_failure_line(p['message'])} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("clauses", "deviations"):
        print(__doc__, file=sys.stderr)
        return 2
    if argv[0] == "deviations":
        if len(argv) != 3:
            print(__doc__, file=sys.stderr)
            return 2
        print(deviation_table(json.loads(Path(argv[1]).read_text()), argv[2]))
        return 0
    columns = []
    for item in argv[1:]:
        label, sep, path = item.partition("=")
        if not sep:
            print(f"expected LABEL=PATH, got {item!r}", file=sys.stderr)
            return 2
        columns.append((label, json.loads(Path(path).read_text())))
    print(clause_table(columns))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
