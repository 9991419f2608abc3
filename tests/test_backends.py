"""The shipped backends through the real entry point: PEFT (CPU, TP = 1) and the reference with
separate adapter communication. Each run has a subprocess timeout."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args, tmp_path, timeout=600, nproc=1):
    report = tmp_path / "report.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    head = ([sys.executable, "-m", "conformance"] if nproc == 1 else
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "conformance"])
    done = subprocess.run(head + args + ["--report-json", str(report)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    return done, (json.loads(report.read_text()) if report.exists() else None)


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


def test_peft_without_its_deviations_fails_on_the_declared_clauses(tmp_path):
    """[LORA-MATCH-3] [LORA-FWD-6] without the file, PEFT's differences are failures on those clauses."""
    pytest.importorskip("peft")
    done, report = _run(["--backend", "conformance.backends.peft:PeftBackend", "-k", "matching or dropout",
                         "--profile", "quick"], tmp_path)
    assert done.returncode == 1
    assert report["clauses"]["LORA-MATCH-3"]["status"] == "failed"
    assert report["clauses"]["LORA-FWD-6"]["status"] == "failed"


def test_separate_communication_is_correct_but_costs_more(tmp_path):
    """[LORA-FWD-7] [LORA-FWD-3] the reference with the adapter communicating on its own passes every
    correctness property of the layer sections and fails only the communication clause."""
    done, report = _run(["--backend", "conformance.backends.reference:SeparateCommunicationReferenceBackend",
                         "-k", "forward or backward or dropout or init or dtype", "--profile", "quick"],
                        tmp_path, nproc=2)
    assert done.returncode == 1, done.stdout[-2000:]
    failed = {c for c, v in report["clauses"].items() if v["status"] == "failed"}
    assert failed == {"LORA-FWD-7"}, failed
