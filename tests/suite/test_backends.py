"""The shipped backends through the real entry point: PEFT (CPU, TP = 1) and the reference with
separate adapter communication. Each run has a subprocess timeout."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conformance import declared as deviations
from conformance.registry import load_all

ROOT = Path(__file__).resolve().parents[2]


def _run(args, tmp_path, timeout=600, nproc=1):
    report = tmp_path / "report.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    head = ([sys.executable, "-m", "conformance"] if nproc == 1 else
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "conformance"])
    done = subprocess.run(head + args + ["--report-json", str(report)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return done, (json.loads(report.read_text()) if report.exists() else None)


@pytest.mark.peft
def test_peft_backend_conforms_except_its_declared_deviations(tmp_path):
    """[LORA-FWD-1] [LORA-MATCH-3] HF PEFT: every applicable property passes or is a declared deviation,
    and every declared deviation still fails (--strict-deviations: no stale entry)."""
    pytest.importorskip("peft")
    done, report = _run(["--backend", "conformance.backends.peft:PeftBackend", "--deviations",
                         "conformance/deviations/peft.txt", "--strict-deviations"], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    statuses = {p["id"]: p["status"] for p in report["properties"]}
    assert "failed" not in statuses.values() and "xpassed" not in statuses.values()
    assert statuses["forward.linear_forward_matches_full_math"] == "passed"
    assert statuses["matching.wildcard_dots_are_literal"] == "xfailed"
    assert statuses["forward.parallel_forward_matches_full_math"] == "not applicable"   # no TP: never "passed"
    assert report["warnings"] == []


@pytest.mark.peft
def test_peft_without_its_deviations_fails_on_the_declared_clauses(tmp_path):
    """[LORA-MATCH-3] [LORA-CFG-1] without the file, PEFT's differences are failures on those clauses;
    its dropout ("pre" only, declared as a capability value) passes."""
    pytest.importorskip("peft")
    done, report = _run(["--backend", "conformance.backends.peft:PeftBackend", "-k", "matching or config or dropout",
                         "--profile", "quick"], tmp_path)
    assert done.returncode == 1
    assert report["clauses"]["LORA-MATCH-3"]["status"] == "failed"
    assert report["clauses"]["LORA-CFG-1"]["status"] == "failed"
    assert report["clauses"]["LORA-FWD-6"]["status"] == "passed"


@pytest.mark.loralib
def test_loralib_backend_conforms_except_its_declared_deviations(tmp_path):
    """[LORA-FWD-1] [LORA-MERGE-3] loralib (README's example backend): every applicable property passes
    or is a declared deviation (strict); matching and injection are borrowed, so n/a, never passed."""
    pytest.importorskip("loralib")
    done, report = _run(["--backend", "conformance.backends.loralib:LoralibBackend", "--deviations", "loralib",
                         "--strict-deviations"], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    statuses = {p["id"]: p["status"] for p in report["properties"]}
    assert "failed" not in statuses.values() and "xpassed" not in statuses.values()
    assert statuses["merge.merged_tiny_gpt_gives_the_same_logits"] == "passed"      # merges on eval()
    assert statuses["forward.dropout_acts_at_its_position_in_train_mode"] == "passed"  # "pre" only
    assert statuses["injection.base_state_dict_keys_survive_apply_lora"] == "xfailed"
    not_own = {pid for pid, p in ((p["id"], p) for p in report["properties"]) if "own code" in p["reason"]}
    assert {pid.split(".")[0] for pid in not_own} >= {"matching", "config"}, not_own
    assert report["warnings"] == []


def test_readme_backend_example_is_the_loralib_backend():
    """README's "Writing a backend" example is conformance/backends/loralib.py byte for byte (the file
    test_loralib_backend_conforms_except_its_declared_deviations runs)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### Writing a backend"):]
    example = section[section.index("```python\n") + len("```python\n"):section.index("\n```\n") + 1]
    assert example == (ROOT / "conformance" / "backends" / "loralib.py").read_text(encoding="utf-8")


def test_separate_communication_is_correct_but_costs_more(tmp_path):
    """[LORA-FWD-7] [LORA-FWD-3] the reference with the adapter communicating on its own passes every
    correctness property of the layer sections and fails only the communication clause."""
    done, report = _run(["--backend", "conformance.backends.reference:SeparateCommunicationReferenceBackend",
                         "-k", "forward or backward or dropout or init or dtype", "--profile", "quick"],
                        tmp_path, nproc=2)
    assert done.returncode == 1, done.stdout[-2000:]
    failed = {c for c, v in report["clauses"].items() if v["status"] == "failed"}
    assert failed == {"LORA-FWD-7"}, failed


# ---- the committed results: deviation files, reports and docs/backends.md agree -------------------------

DEVIATION_FILES = sorted((ROOT / "conformance" / "deviations").glob("*.txt"))
REPORTS = ROOT / "docs" / "reports"


@pytest.mark.parametrize("path", DEVIATION_FILES, ids=lambda p: p.name)
def test_shipped_deviation_files_name_existing_properties(path):
    """Every entry of a shipped deviations file parses, has a reason and selects a property that exists
    (a renamed property would otherwise leave a stale entry that silently matches nothing)."""
    entries = deviations.load(str(path))
    assert entries, path
    assert all(d.reason.strip() for d in entries)
    assert not deviations.unmatched(entries, load_all()), [d.pattern for d in deviations.unmatched(entries, load_all())]


MEGATRON_BRIDGE_RUNS = ("megatron_bridge_world1.json", "megatron_bridge_world2.json")


@pytest.mark.parametrize("name", MEGATRON_BRIDGE_RUNS)
def test_megatron_bridge_report_agrees_with_its_deviations(name):
    """A committed GPU run of Megatron-Bridge (it cannot run here) and today's deviations file agree:
    nothing failed or xpassed, and a property is xfailed exactly when an entry covers it (inside its
    scope). No property of the report is missing from today's suite; properties added since the run
    are "not run" there (docs/backends.md says so)."""
    report = json.loads((REPORTS / name).read_text())
    assert report["header"]["complete"] is True and report["header"]["profile"] == "thorough"
    props = {p.id: p for p in load_all()}
    statuses = {p["id"]: p["status"] for p in report["properties"]}
    assert set(statuses) <= set(props), f"properties no longer in the suite: {sorted(set(statuses) - set(props))}"
    entries = deviations.load(str(ROOT / "conformance" / "deviations" / "megatron_bridge.txt"))
    assert not [i for i, s in statuses.items() if s in ("failed", "xpassed")]
    for prop_id, status in statuses.items():
        entry = deviations.find(entries, props[prop_id])
        if status == "not applicable":       # e.g. a world-2 property in a world-1 run: nothing to agree on
            continue
        if entry is None or not entry.scope:
            assert (entry is not None) == (status == "xfailed"), (prop_id, status, entry)
        else:        # a scoped entry: xfailed where the run drew its scope, passed where it did not
            assert status in ("xfailed", "passed"), (prop_id, status)


def test_every_megatron_bridge_deviation_was_measured():
    """Every entry of the Megatron-Bridge file failed in a committed run (world 1 or 2), or says it is
    still "to be measured" on a GPU; the newest run (world 1) covers every property of today's suite."""
    props = {p.id: p for p in load_all()}
    runs = [json.loads((REPORTS / name).read_text()) for name in MEGATRON_BRIDGE_RUNS]
    assert {p["id"] for p in runs[0]["properties"]} == set(props), "re-run tools/run_megatron_bridge.sh (NPROC=1)"
    xfailed = {p["id"] for run in runs for p in run["properties"] if p["status"] == "xfailed"}
    for entry in deviations.load(str(ROOT / "conformance" / "deviations" / "megatron_bridge.txt")):
        measured = any(entry.matches(props[i]) for i in xfailed)
        assert measured or "to be measured" in entry.reason, entry.pattern


@pytest.mark.parametrize("args", [
    ["clauses", "reference (gloo, CPU)=docs/reports/reference_gloo_world2.json",
     "reference (NCCL, 2 × H200)=docs/reports/reference_nccl_world2.json", "HF PEFT (CPU)=docs/reports/peft.json",
     "loralib (CPU)=docs/reports/loralib.json",
     "Megatron-Bridge (NCCL, 2 × H200)=docs/reports/megatron_bridge_world2.json",
     "Megatron-Bridge (NCCL, 1 × H200)=docs/reports/megatron_bridge_world1.json",
     "NeMo Automodel (gloo, CPU)=docs/reports/automodel.json",
     "fast path (gloo, CPU)=docs/reports/fast_gloo_world2.json", "fast path (NCCL, 1 × H200)=docs/reports/fast_nccl_world1.json"],
    ["deviations", "docs/reports/megatron_bridge_world2.json", "conformance/deviations/megatron_bridge.txt"],
    ["deviations", "docs/reports/megatron_bridge_world1.json", "conformance/deviations/megatron_bridge.txt"],
    ["deviations", "docs/reports/peft.json", "conformance/deviations/peft.txt"],
    ["deviations", "docs/reports/loralib.json", "conformance/deviations/loralib.txt"],
    ["deviations", "docs/reports/automodel.json", "conformance/deviations/automodel.txt"],
], ids=["clauses", "megatron-bridge deviations", "megatron-bridge world-1 deviations", "peft deviations",
        "loralib deviations", "automodel deviations"])
def test_docs_backends_tables_are_generated_from_the_reports(args):
    """docs/backends.md carries the tables tools/backend_table.py makes from the reports (and today's
    deviation files)."""
    table = subprocess.run([sys.executable, "tools/backend_table.py", *args], cwd=ROOT,
                           capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    assert table.count("\n") > 2
    assert table in (ROOT / "docs" / "backends.md").read_text(), "regenerate the table in docs/backends.md"

