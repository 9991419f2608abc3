"""The conformance suite, end to end: the real entry point in subprocesses.

    python -m conformance ...                                        (world 1)
    python -m torch.distributed.run --standalone --nproc-per-node N -m conformance ...

- the reference passes every property at worlds 1, 2 and 4 (quick profile; README's first command
  runs the default profile at world 2) and every SPEC.md clause is covered;
- every mutant of tests/suite/mutant_backends.py is caught: its `expected_clause` comes out "failed";
- a hung collective becomes a failed "HANG" property and the run goes on; a dying rank ends the run;
- deviations (xfail / xpass / skip / unmatched / malformed), CLI usage errors, the JSON, Markdown
  and JUnit reports, --replay and determinism under a fixed seed.

Every run has a subprocess timeout (the whole process group is killed past it). Runs are shared
between tests through small caches so that the file stays within a few minutes on 2 CPU cores:
mutants run at world 2 only, with `-k` selections and `--profile quick`.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree

import pytest

from conformance.declared import example_values
from tests.suite import mutant_backends

REPO = Path(__file__).resolve().parents[2]
SPEC_CLAUSES = re.findall(r"^### \[([A-Z]+(?:-[A-Z0-9]+)+)\]", (REPO / "SPEC.md").read_text(), flags=re.M)
OK_CLAUSE_STATUSES = ("passed", "not applicable")
TMP = Path(tempfile.mkdtemp(prefix="conformance-tests-"))
atexit.register(shutil.rmtree, TMP, ignore_errors=True)
TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT")
DEFAULT_RUN_TIMEOUT_S = 300


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Run:
    cmd: list
    rc: int
    output: str
    seconds: float
    report: dict | None
    rcs: list = field(default_factory=list)     # every launched process's exit code

    def props(self) -> dict:
        return {p["id"]: p for p in (self.report or {}).get("properties", [])}

    def explain(self) -> str:
        return f"$ {shlex.join(self.cmd)}\nexit {self.rc} after {self.seconds:.1f} s\n{self.output[-6000:]}"


_counter = iter(range(10**6))


def conformance(*args: str, world: int = 2, backend: str | None = None, timeout: float = DEFAULT_RUN_TIMEOUT_S,
                report: bool = True, torchrun: bool = False) -> Run:
    """Run the suite; returns exit code, merged stdout/stderr, wall time and the JSON report (if written).

    world > 1: the ranks are started by hand (RANK, WORLD_SIZE, MASTER_* set here), which saves
    torchrun's own start-up on every run; `torchrun=True` uses torchrun (its handling of a dead rank
    is what some tests check). The exit code is the first non-zero one, rank 0's first; the output is
    rank 0's, then the other ranks'."""
    args = list(args)
    if backend is not None:
        args = ["--backend", backend, *args]
    json_path = None
    if report and "--report-json" not in args:
        json_path = TMP / f"report-{next(_counter)}.json"
        args += ["--report-json", str(json_path)]
    elif "--report-json" in args:
        json_path = Path(args[args.index("--report-json") + 1])
    if world == 1:
        launches = [([sys.executable, "-m", "conformance", *args], _env())]
    elif torchrun:
        launches = [([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
                      "-m", "conformance", *args], _env())]
    else:
        port = _free_port()
        launches = [([sys.executable, "-m", "conformance", *args],
                     dict(_env(), RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))) for r in range(world)]
    start = time.monotonic()
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for cmd, env in launches]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=max(1.0, timeout - (time.monotonic() - start)))[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)      # the sessions this test started, and only them
        outputs = [proc.communicate()[0] for proc in procs]
        pytest.fail(f"conformance run did not finish within {timeout} s:\n$ {shlex.join(launches[0][0])}\n"
                    f"{outputs[0][-6000:]}")
    seconds = time.monotonic() - start
    data = json.loads(json_path.read_text()) if json_path is not None and json_path.is_file() else None
    rc = next((proc.returncode for proc in procs if proc.returncode != 0), 0)
    output = outputs[0] + "".join(f"\n--- rank {r} ---\n{o}" for r, o in enumerate(outputs[1:], start=1) if o.strip())
    return Run(launches[0][0], rc, output, seconds, data, [proc.returncode for proc in procs])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _mutant_spec(cls) -> str:
    return f"tests.suite.mutant_backends:{cls.__name__}"


# ---- the reference ---------------------------------------------------------------------------------

_reference_runs: dict = {}


def reference_run(world: int, profile: str = "quick") -> Run:
    key = (world, profile)
    if key not in _reference_runs:
        extra = []
        if world == 2 and profile == "quick":
            extra = ["--report-md", str(TMP / "reference.md"), "--junitxml", str(TMP / "reference.xml")]
        _reference_runs[key] = conformance("--profile", profile, *extra, world=world, timeout=480)
    return _reference_runs[key]


def _assert_reference_passes(run: Run) -> None:
    assert run.rc == 0, run.explain()
    assert run.report is not None, run.explain()
    failed = [p["id"] for p in run.report["properties"] if p["status"] not in ("passed", "not applicable")]
    assert not failed, f"properties not passed: {failed}\n{run.explain()}"
    assert run.report["summary"]["failed"] == 0
    clauses = run.report["clauses"]
    missing = [c for c in SPEC_CLAUSES if c not in clauses]
    assert not missing, f"SPEC clauses no property checks: {missing}"
    bad = {c: clauses[c]["status"] for c in SPEC_CLAUSES if clauses[c]["status"] not in OK_CLAUSE_STATUSES}
    assert not bad, f"clauses neither passed nor not applicable: {bad}"
    assert any(p["status"] == "passed" for p in run.report["properties"])
    assert run.report["header"]["complete"] is True


def test_spec_clauses_are_parsed():
    assert len(SPEC_CLAUSES) >= 40 and "LORA-FWD-1" in SPEC_CLAUSES and "VLM-FREEZE-3" in SPEC_CLAUSES
    assert len(set(SPEC_CLAUSES)) == len(SPEC_CLAUSES)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_reference_passes_quick(world):
    run = reference_run(world)
    _assert_reference_passes(run)
    assert run.report["header"]["world_size"] == world
    assert run.report["header"]["examples_per_property"] == 4
    if world == 1:
        assert run.cmd[1:3] == ["-m", "conformance"]     # plain python, no torchrun


# ---- mutants -----------------------------------------------------------------------------------------

_mutant_runs: dict = {}


def mutant_run(cls) -> Run:
    if cls not in _mutant_runs:
        _mutant_runs[cls] = conformance("-k", cls.select, "--profile", "quick",
                                        "--junitxml", str(TMP / f"{cls.__name__}.xml"),
                                        "--report-md", str(TMP / f"{cls.__name__}.md"),
                                        backend=_mutant_spec(cls), timeout=240)
    return _mutant_runs[cls]


def test_there_are_enough_mutants():
    assert len(mutant_backends.MUTANTS) >= 18
    for cls in mutant_backends.MUTANTS:
        assert cls.__doc__ and cls.select, cls
        assert cls.expected_clause in SPEC_CLAUSES, f"{cls.__name__}: unknown clause {cls.expected_clause}"


@pytest.mark.parametrize("cls", mutant_backends.MUTANTS, ids=lambda c: c.__name__)
def test_mutant_is_detected(cls):
    run = mutant_run(cls)
    assert run.report is not None, f"no report written\n{run.explain()}"
    assert run.report["properties"], f"-k {cls.select!r} selected no property\n{run.explain()}"
    clause = run.report["clauses"].get(cls.expected_clause)
    assert clause is not None, (f"{cls.expected_clause} checked by no selected property "
                                f"(selected: {list(run.props())})\n{run.explain()}")
    assert clause["status"] == "failed", f"{cls.__name__} not detected: {clause}\n{run.explain()}"
    failed_clauses = {c for c, v in run.report["clauses"].items() if v["status"] == "failed"}
    intended = {cls.expected_clause, *cls.also_failing} & set(run.report["clauses"])   # those -k selected
    assert failed_clauses == intended, (
        f"{cls.__name__}: one bug must fail its clause (and the clauses its failing property shares), "
        f"not others: {sorted(failed_clauses)}\n{run.explain()}")
    assert run.rc != 0, run.explain()
    assert "minimal example" in run.output and "reproduce:" in run.output, run.explain()
    failed = [p for p in run.report["properties"] if p["status"] == "failed"]
    assert all(p["reproduce"] for p in failed)
    junit = ElementTree.parse(TMP / f"{cls.__name__}.xml").getroot()      # well-formed, with the failures
    assert len(junit.findall(".//failure")) == len(failed)
    messages = "\n".join(p["message"] for p in failed)
    stale = [m for m in ("positional argument", "unexpected keyword argument") if m in messages]
    assert not stale, f"{cls.__name__} fails by calling the reference wrongly, not by its bug:\n{messages}"
    if cls.diagnosis:
        assert cls.diagnosis.lower() in messages.lower(), f"diagnosis {cls.diagnosis!r} missing:\n{messages}"


@pytest.mark.parametrize("cls, words", [
    (mutant_backends.NaNForwardBackend, ["non-finite"]),
    (mutant_backends.WrongShapeBackend, ["shape", "expected"]),
    (mutant_backends.RaisesInApplyBackend, ["RuntimeError", "mutant: apply_lora is broken"]),
], ids=["nan", "wrong-shape", "raises"])
def test_robustness_failures_are_diagnosed(cls, words):
    run = mutant_run(cls)
    assert run.rc != 0, run.explain()
    assert run.report is not None
    failed = [p for p in run.report["properties"] if p["status"] == "failed"]
    assert failed, run.explain()
    for p in failed:
        for word in words:
            assert word in p["message"], f"{p['id']}: {word!r} not in {p['message']!r}"


def test_same_seed_gives_the_same_report():
    cls = mutant_backends.WrongScaleBackend
    first = mutant_run(cls)
    second = conformance("-k", cls.select, "--profile", "quick", backend=_mutant_spec(cls), timeout=240)

    def digest(run):
        return [(p["id"], p["status"], p["examples"], p["minimal_example"], p["reproduce"])
                for p in run.report["properties"]]

    assert first.report and second.report
    assert digest(first) == digest(second)
    assert first.report["clauses"] == second.report["clauses"]


# ---- hangs and dying ranks -------------------------------------------------------------------------------

HANG_SELECT = "forward.parallel_forward_matches_full_math or forward.linear_forward_matches_full_math"


def test_hanging_collective_fails_the_property_and_the_run_goes_on():
    run = conformance("-k", HANG_SELECT, "--max-examples", "10", "--timeout", "10",
                      backend=_mutant_spec(mutant_backends.HangingCollectiveBackend), timeout=150, torchrun=True)
    assert run.seconds < 90, f"the hang took {run.seconds:.0f} s to be reported\n{run.explain()}"
    assert run.rc == 1, run.explain()
    assert run.report is not None, f"the run did not finish with a report\n{run.explain()}"
    props = run.props()
    hung = props["forward.parallel_forward_matches_full_math"]
    assert hung["status"] == "failed" and hung["message"].startswith("HANG"), hung
    later = props["forward.linear_forward_matches_full_math"]
    assert later["status"] == "passed" and later["examples"] > 0, later   # ran after the hang, on fresh groups
    assert "ran past" not in run.output, "the watchdog had to stop a rank"


def test_one_rank_raising_ends_its_property_in_seconds():
    """Rank 1 raises while rank 0 waits in a collective with it, at --timeout 120: rank 1 releases rank
    0 (closes the backend's groups), so the property fails in seconds with rank 1's error, not as a
    HANG after the timeout; the next property runs on fresh groups and passes."""
    run = conformance("-k", HANG_SELECT, "--max-examples", "10", "--timeout", "120",
                      backend=_mutant_spec(mutant_backends.OneRankRaisesBackend), timeout=150, torchrun=True)
    assert run.rc == 1 and run.report is not None, run.explain()
    props = run.props()
    failed = props["forward.parallel_forward_matches_full_math"]
    assert failed["status"] == "failed" and not failed["message"].startswith("HANG"), failed
    assert "rank 1: RuntimeError: mutant: rank 1 of the TP group fails" in failed["message"], failed
    assert "rank 0, inside a collective with the failing rank, released" in failed["message"], failed
    assert failed["seconds"] <= 5, f"the property took {failed['seconds']:.1f} s"
    later = props["forward.linear_forward_matches_full_math"]
    assert later["status"] == "passed" and later["examples"] > 0, later


def test_watchdog_stop_is_in_the_report():
    """A rank stuck outside any collective is stopped by the watchdog (3 x --timeout) with exit code 3;
    the report, written before the first property, records which rank, which property and where."""
    run = conformance("-k", "forward.linear_forward_matches_full_math", "--timeout", "1",
                      backend=_mutant_spec(mutant_backends.StuckBackend), world=1, timeout=60)
    assert run.rc == 3, run.explain()
    assert run.report is not None, f"no report\n{run.explain()}"
    header = run.report["header"]
    assert header["complete"] is False and run.report["properties"] == []
    (stop,) = header["stopped"]
    assert stop["rank"] == 0 and stop["property"] == "forward.linear_forward_matches_full_math", stop
    assert stop["exit_code"] == 3 and any("sleep" in line for line in stop["stack"]), stop


def test_every_rank_exits_with_the_verdict():
    """Ranks started by hand (no torchrun): a failed run exits 1 on every rank, not only on rank 0."""
    cls = mutant_backends.WrongScaleBackend
    run = conformance("-k", "forward.scale_is_alpha_over_dim", "--profile", "quick", backend=_mutant_spec(cls))
    assert run.rcs == [1, 1], run.explain()


def test_dying_rank_ends_the_run():
    """A rank that dies ends the run; what ran before it stays in the JSON report (written after every
    property, marked incomplete)."""
    run = conformance("-k", "config_has_the_spec_fields_and_defaults or forward.linear_forward_matches_full_math",
                      "--timeout", "10", backend=_mutant_spec(mutant_backends.DyingRankBackend), timeout=120,
                      torchrun=True)
    assert run.rc != 0, run.explain()
    assert run.seconds < 90, run.explain()
    assert re.search(r"exitcode\s*:\s*5\b", run.output), run.explain()     # torchrun names the dead rank
    assert run.report is not None, f"no partial report\n{run.explain()}"
    assert run.report["header"]["complete"] is False, run.report["header"]
    assert [p["id"] for p in run.report["properties"]] == ["config.config_has_the_spec_fields_and_defaults"]
    assert run.report["properties"][0]["status"] == "passed"


def test_survivor_of_a_dead_rank_says_so_once():
    """Ranks started by hand (no torchrun to stop the others): rank 0 finds its peer gone, says so once,
    records it and exits 4 without a traceback; no later property is misreported."""
    run = conformance("-k", "config_has_the_spec_fields_and_defaults or forward.linear_forward_matches_full_math "
                      "or forward.scale_is_alpha_over_dim", "--timeout", "10",
                      backend=_mutant_spec(mutant_backends.DyingRankBackend), timeout=120)
    assert run.rcs == [4, 5], run.explain()
    assert run.seconds < 60, run.explain()
    survivor = run.output.split("--- rank 1 ---")[0]
    assert survivor.count("another rank died or left during forward.linear_forward_matches_full_math") == 1, survivor
    assert "Traceback" not in survivor and "the property itself raised" not in survivor, survivor
    assert [p["id"] for p in run.report["properties"]] == ["config.config_has_the_spec_fields_and_defaults"]
    (stop,) = run.report["header"]["stopped"]
    assert stop["rank"] == 0 and stop["exit_code"] == 4 and stop["property"] == "forward.linear_forward_matches_full_math"


# ---- deviations ----------------------------------------------------------------------------------------

def _deviations(text: str) -> str:
    path = TMP / f"deviations-{next(_counter)}.txt"
    path.write_text(text)
    return str(path)


def test_xfail_deviation_makes_a_known_failure_pass():
    cls = mutant_backends.WrongScaleBackend
    failing = [p["id"] for p in mutant_run(cls).report["properties"] if p["status"] == "failed"]
    assert failing
    path = _deviations("# known bugs of this backend\n" + "".join(
        f"xfail {pid}: scales by alpha, not alpha/dim\n" for pid in failing))
    run = conformance("-k", cls.select, "--profile", "quick", "--deviations", path, backend=_mutant_spec(cls))
    assert run.rc == 0, run.explain()
    props = run.props()
    for pid in failing:
        assert props[pid]["status"] == "xfailed", props[pid]
        assert props[pid]["reason"] == "scales by alpha, not alpha/dim"
    assert run.report["clauses"][cls.expected_clause]["status"] == "xfailed"


XPASS_SELECT = "forward.linear_forward_matches_full_math or forward.scale_is_alpha_over_dim"
XPASS_DEVIATIONS = ("xfail forward.linear_forward_matches_full_math: stale entry\n"
                    "skip  forward.scale_is_*: not wired up yet\n"
                    "xfail no.such_property: matches nothing\n")


def test_stale_xfail_is_xpassed_and_unmatched_entries_warn():
    run = conformance("-k", XPASS_SELECT, "--profile", "quick", "--deviations", _deviations(XPASS_DEVIATIONS))
    assert run.rc == 0, run.explain()
    props = run.props()
    assert props["forward.linear_forward_matches_full_math"]["status"] == "xpassed"
    assert props["forward.scale_is_alpha_over_dim"]["status"] == "skipped"
    assert props["forward.scale_is_alpha_over_dim"]["examples"] == 0
    assert "XPASSED" in run.output
    assert any("no.such_property" in w and "line 3" in w for w in run.report["warnings"]), run.report["warnings"]
    assert re.search(r"warning: .*no\.such_property", run.output), run.explain()


def test_strict_deviations_fail_on_xpass():
    run = conformance("-k", XPASS_SELECT, "--profile", "quick", "--strict-deviations",
                      "--deviations", _deviations(XPASS_DEVIATIONS))
    assert run.rc == 1, run.explain()
    assert run.props()["forward.linear_forward_matches_full_math"]["status"] == "xpassed"


SCOPED_SELECT = "forward.gathered_output_or_full_input_matches_full_math"


@pytest.mark.parametrize("scope, status", [
    ("kind = row", "xfailed"),                   # exactly where the bug is: inside fails, outside passes
    ("kind = row and tp > 1 and world = 2", "xfailed"),
    ("kind = column", "failed"),                 # the row failures fall outside the scope
    ("world > 2", "failed"),                     # a scope never drawn at world 2: the failure counts
])
def test_scoped_xfail_holds_inside_its_scope_only(scope, status):
    """A deviation scoped to some examples: the property must fail inside the scope and pass outside."""
    cls = mutant_backends.RowFullInputWrongSliceBackend
    path = _deviations(f"xfail {SCOPED_SELECT} [{scope}]: the adapter reads the wrong slice of a full input\n")
    run = conformance("-k", SCOPED_SELECT, "--profile", "quick", "--deviations", path, backend=_mutant_spec(cls))
    prop = run.props()[SCOPED_SELECT]
    assert prop["status"] == status, run.explain()
    assert run.rc == (0 if status == "xfailed" else 1), run.explain()
    if status == "xfailed":
        assert example_values(prop["minimal_example"])["kind"] == "row"      # the failure it stands for
        assert prop["reason"].endswith(f"[scope: {scope}]")
    else:
        assert "outside the declared scope" in prop["message"]


def test_scoped_xfail_that_passes_inside_is_xpassed():
    """The reference passes inside a declared scope: an XPASS, which --strict-deviations fails."""
    path = _deviations(f"xfail {SCOPED_SELECT} [kind = row]: stale\n")
    run = conformance("-k", SCOPED_SELECT, "--profile", "quick", "--strict-deviations", "--deviations", path)
    assert run.props()[SCOPED_SELECT]["status"] == "xpassed" and run.rc == 1, run.explain()
    assert "passed inside the declared scope [kind = row]" in run.output


def test_malformed_deviation_line_is_a_usage_error():
    path = _deviations("# fine\nxfail forward.linear_forward_matches_full_math no colon here\n")
    run = conformance("-k", "forward.linear", "--deviations", path, world=1, timeout=120)
    assert run.rc == 2, run.explain()
    assert f"{path}:2" in run.output and "no colon here" in run.output, run.explain()
    bad_scope = conformance("--deviations", _deviations("xfail forward.x [tp >> 1]: r\n"), world=1, timeout=120)
    assert bad_scope.rc == 2 and "key OP value" in bad_scope.output, bad_scope.explain()
    missing = conformance("--deviations", str(TMP / "no-such-file.txt"), world=1, timeout=120)
    assert missing.rc == 2 and "no such file" in missing.output, missing.explain()


# ---- CLI usage errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--profile", "nope"], "invalid choice: 'nope'"),
    (["--max-examples", "0"], "--max-examples: must be a positive integer"),
    (["-k", "and ("], "-k: cannot parse 'and ('"),
    (["--replay", "forward.linear_forward_matches_full_math"], "--replay expects PROPERTY_ID=JSON_EXAMPLE"),
    (["--replay", "forward.linear_forward_matches_full_math={not json"], "--replay"),
    (["--replay", "no.such_property={}"], "no property 'no.such_property'"),
    (["--backend", "no_such_package.module:Backend"], "no_such_package"),
    (["--backend", "tests.suite.mutant_backends:NoSuchBackend"], "NoSuchBackend"),
    (["--backend", "not-a-spec"], "pkg.module:ClassName"),
    (["--backend", "tests.suite.mutant_backends:MUTANTS"], "not a subclass of conformance.backend.Backend"),
    (["--timeout", "inf"], "--timeout: must be a positive, finite number of seconds, got inf"),
    (["--timeout", "nan"], "--timeout: must be a positive, finite number of seconds, got nan"),
    (["--report-json", "/no/such/dir/r.json"], "--report-json: the directory of '/no/such/dir/r.json' does not exist"),
    (["--junitxml", "/no/such/dir/r.xml"], "--junitxml: the directory"),
    (["--deviations", "__non_utf8__"], "cannot read"),
], ids=["profile", "max-examples", "k-expression", "replay-no-equals", "replay-bad-json", "replay-unknown-id",
        "backend-module", "backend-class", "backend-spec", "backend-not-a-class", "timeout-inf", "timeout-nan",
        "report-dir", "junit-dir", "deviations-not-utf8"])
def test_usage_errors_exit_2(args, message):
    if "__non_utf8__" in args:
        path = TMP / "latin1-deviations.txt"
        path.write_bytes("xfail forward.x: caf\xe9 au lait\n".encode("latin-1"))
        args = [str(path) if a == "__non_utf8__" else a for a in args]
    run = conformance(*args, world=1, timeout=120, report=False)
    assert run.rc == 2, run.explain()
    assert message in run.output, run.explain()
    assert "Traceback" not in run.output, run.explain()


def test_k_selecting_nothing_exits_5():
    """-k that selects no property says so and exits 5 (pytest's code for no tests), before any process
    group is made; under torchrun the ranks say so and the run fails."""
    run = conformance("-k", "no_such_words_anywhere", world=1, timeout=120, report=False)
    assert run.rc == 5, run.explain()
    assert "selects no property" in run.output and "Traceback" not in run.output, run.explain()
    both = conformance("-k", "no_such_words_anywhere", world=2, timeout=120, report=False)
    assert both.rc != 0 and "selects no property" in both.output, both.explain()   # a rank may be stopped first


# ---- reports ----------------------------------------------------------------------------------------------

def test_markdown_and_junit_reports_are_well_formed():
    run = reference_run(2)
    assert run.rc == 0, run.explain()
    n = len(run.report["properties"])
    md = (TMP / "reference.md").read_text()
    assert md.startswith("### Conformance: `reference` (world 2")
    assert "| clause | verdict | properties |" in md
    for clause in run.report["clauses"]:
        assert f"| {clause} |" in md
    root = ElementTree.parse(TMP / "reference.xml").getroot()
    assert root.tag == "testsuites"
    cases = root.findall("./testsuite/testcase")
    assert len(cases) == n
    assert not root.findall(".//failure")
    assert sum(int(s.get("tests")) for s in root.findall("testsuite")) == n
    assert {c.get("name") for c in cases} == set(run.props())

    # and with failures: a mutant's failure carries its message and minimal example
    cls = mutant_backends.WrongScaleBackend
    bad = mutant_run(cls)
    assert bad.rc == 1, bad.explain()
    root = ElementTree.parse(TMP / f"{cls.__name__}.xml").getroot()
    failures = root.findall(".//failure")
    assert len(failures) == sum(p["status"] == "failed" for p in bad.report["properties"]) > 0
    assert all("minimal example" in (f.text or "") and f.get("message") for f in failures)
    mutant_md = (TMP / f"{cls.__name__}.md").read_text()
    assert f"| {cls.expected_clause} | failed |" in mutant_md
    assert "| property | status | why |" in mutant_md


# ---- replay ---------------------------------------------------------------------------------------------

def test_replay_of_the_minimal_example():
    cls = mutant_backends.WrongScaleBackend
    first = mutant_run(cls)
    failed = [p for p in first.report["properties"] if p["status"] == "failed"]
    assert failed, first.explain()
    prop = failed[0]
    replay = f"{prop['id']}={json.dumps(prop['minimal_example'], sort_keys=True)}"
    printed = shlex.split(prop["reproduce"])
    assert printed[printed.index("--replay") + 1] == replay
    assert f"minimal example: {json.dumps(prop['minimal_example'], sort_keys=True)}" in first.output

    again = conformance("--replay", replay, backend=_mutant_spec(cls))
    assert again.rc == 1, again.explain()
    (only,) = again.report["properties"]
    assert only["id"] == prop["id"] and only["status"] == "failed" and only["examples"] == 1
    assert only["minimal_example"] == prop["minimal_example"]

    reference = conformance("--replay", replay)
    assert reference.rc == 0, reference.explain()
    (only,) = reference.report["properties"]
    assert only["status"] == "passed" and only["examples"] == 1
