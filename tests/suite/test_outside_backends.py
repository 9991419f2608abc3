"""The protocol as outside authors use it (tests/suite/outside_backends.py), through the real entry point.

- the lifecycle: a backend returning new models, and one merging on eval, pass (the suite uses what
  apply_lora returns and writes adapter weights before it switches to eval);
- a verdict is the backend's own: inherited defaults and borrowed parts are "not applicable";
- partial support (capability values) is checked in full and never drawn beyond;
- several kinds of failure in one property are each reported with their own minimal example;
- the reported minimal example is the one that ran (after fitting to the backend).
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.suite.test_conformance import REPO, _env, conformance

OUTSIDE = "tests.suite.outside_backends"


def _failed(run) -> list:
    return [p["id"] for p in run.report["properties"] if p["status"] == "failed"]


def test_backend_returning_new_models_passes_everything():
    """[LORA-INJ-3] apply_lora returns a deep copy (chunks too): every property passes at world 2."""
    run = conformance("--profile", "quick", backend=f"{OUTSIDE}:NewModelBackend", world=2, timeout=300)
    assert run.rc == 0 and not _failed(run), run.explain()
    assert run.report["summary"]["passed"] == len(run.report["properties"])


def test_backend_merging_on_eval_passes():
    """[LORA-MERGE-3] [LORA-FWD-6] eval() folds B A into the base weight (loralib's merge_weights): the
    forward, dropout, freezing and merge properties pass, because the suite writes the adapter weights
    before it switches to eval."""
    run = conformance("--profile", "quick", "-k", "forward or backward or init or merge or LORA-INJ-1 or LORA-INJ-2",
                      backend=f"{OUTSIDE}:MergeOnEvalBackend", world=1)
    assert run.rc == 0 and not _failed(run), run.explain()
    statuses = {p["id"]: p["status"] for p in run.report["properties"]}
    for prop in ("merge.merged_tiny_gpt_gives_the_same_logits", "forward.no_dropout_in_eval_mode",
                 "injection.inference_freezes_everything"):
        assert statuses[prop] == "passed", run.explain()


def test_inherited_and_borrowed_parts_are_not_applicable():
    """[LORA-CFG-1] [TP-GROUP-1] [LORA-MATCH-2] the default validate_config and init_parallel, and a
    matching declared borrowed, make those properties n/a with the reason, never passed."""
    run = conformance("--profile", "quick", "-k", "config or matching or TP-GROUP or LORA-FWD-1",
                      backend=f"{OUTSIDE}:DefaultsBackend", world=1)
    assert run.rc == 0, run.explain()
    props = run.props()
    reasons = {pid: p["reason"] for pid, p in props.items()}
    assert props["config.config_has_the_spec_fields_and_defaults"]["status"] == "not applicable"
    assert "validate_config" in reasons["config.config_has_the_spec_fields_and_defaults"]
    assert "init_parallel" in reasons["parallel.groups_have_the_spec_layout"]
    matching = [p for pid, p in props.items() if pid.startswith("matching.")]
    assert matching and all(p["status"] == "not applicable" and "matching" in p["reason"] for p in matching)
    assert props["forward.linear_forward_matches_full_math"]["status"] == "passed"     # its own code
    assert run.report["not_own_code"] == 1 + 1 + len(matching)
    assert "Passed on the backend's own code: 1;" in run.output, run.output[-2000:]


def test_groups_borrowed_from_the_reference_are_not_applicable():
    """[TP-GROUP-1] an init_parallel of the backend's own that hands out reference.parallel's groups
    (what a TP = 1 author writes first) is found while running: n/a, not passed."""
    run = conformance("-k", "TP-GROUP", backend=f"{OUTSIDE}:PreDropoutOnlyBackend", world=1)
    assert run.rc == 0, run.explain()
    prop = run.props()["parallel.groups_have_the_spec_layout"]
    assert prop["status"] == "not applicable" and "reference.parallel's" in prop["reason"], prop


def test_partial_dropout_support_is_checked_in_full():
    """[LORA-FWD-6] dropout_position {"pre"}: a broken "post" is never drawn (passes), a broken "pre"
    fails, and its minimal example is what ran: a plain nn.Linear base at TP 1 with "pre"."""
    good = conformance("--profile", "quick", "-k", "LORA-FWD-6", backend=f"{OUTSIDE}:PreDropoutOnlyBackend", world=1)
    assert good.rc == 0 and not _failed(good), good.explain()
    assert {p["status"] for p in good.report["properties"]} == {"passed"}
    bad = conformance("--profile", "quick", "-k", "LORA-FWD-6", backend=f"{OUTSIDE}:PreDropoutBrokenBackend", world=1)
    assert bad.rc == 1, bad.explain()
    failed = bad.props()["forward.dropout_acts_at_its_position_in_train_mode"]
    assert failed["status"] == "failed", bad.explain()
    example = failed["minimal_example"]
    assert (example["dropout_position"], example["kind"], example["tp"]) == ("pre", "linear", 1), example
    assert '"kind": "linear"' in failed["reproduce"]


def test_each_kind_of_failure_gets_its_own_minimal_example():
    """[LORA-MERGE-1] [LORA-ERR-1] a wrong exception type for one bad shape and silent acceptance of
    another are two reports, each with a minimal example whose replay shows that kind alone."""
    prop = "merge.merge_weight_rejects_shapes_that_cannot_merge"
    run = conformance("--profile", "quick", "-k", prop, backend=f"{OUTSIDE}:MergeTwoBugsBackend", world=1)
    assert run.rc == 1, run.explain()
    failures = run.props()[prop]["failures"]
    assert len(failures) >= 2, run.explain()
    messages = [f["message"] for f in failures]
    assert any("raised RuntimeError" in m for m in messages), messages
    assert any("no ValueError was raised" in m for m in messages), messages
    assert run.output.count(f"--replay '{prop}=") >= 2, run.output[-4000:]
    for failure in failures:          # each replay shows its own kind
        replay = conformance("--replay", f"{prop}={json.dumps(failure['minimal_example'])}",
                             backend=f"{OUTSIDE}:MergeTwoBugsBackend", world=1)
        assert replay.rc == 1
        words = "raised RuntimeError" if "raised RuntimeError" in failure["message"] else "no ValueError was raised"
        assert words in replay.props()[prop]["message"], replay.explain()


def test_bad_backend_declarations_are_usage_errors():
    """A capability value or a borrowed name that does not exist: exit 2 before any run, naming it."""
    for cls, words in (("BadCapabilityBackend", "dropout_position"), ("BadBorrowedBackend", "name_matching")):
        done = subprocess.run([sys.executable, "-m", "conformance", "--backend", f"{OUTSIDE}:{cls}"], cwd=REPO,
                              env=_env(), capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stdout + done.stderr
        assert words in done.stderr and "allowed" in done.stderr, done.stderr


def test_a_failed_prerequisite_makes_dependents_not_checked():
    """[LORA-FWD-5] [LORA-BWD-1] one bug, one clause: with a wrong scale the scale property fails and
    the gradient properties (which build on it) are "not checked: needs LORA-FWD-5", not failed."""
    run = conformance("--profile", "quick", "-k", "LORA-FWD-5 or linear_gradients", world=1,
                      backend="tests.suite.mutant_backends:WrongScaleBackend")
    assert run.rc == 1, run.explain()
    props = run.props()
    assert props["forward.scale_is_alpha_over_dim"]["status"] == "failed"
    dependent = props["backward.linear_gradients_match_full_math"]
    assert dependent["status"] == "not checked" and "LORA-FWD-5" in dependent["reason"], dependent
    assert {c for c, v in run.report["clauses"].items() if v["status"] == "failed"} == {"LORA-FWD-5"}


def test_coverage_lists_the_always_run_layouts():
    """[LORA-FWD-2] [MOE-FWD-1] --coverage shows, per property, the combinations it always runs: at
    world 2 the column forward runs TP 1 and 2, strides 1 and 2; the MoE dense-math properties every
    (TP, EP, expert-TP); and no property is left to random draws only."""
    done = subprocess.run([sys.executable, "-m", "conformance", "--coverage", "2"], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    block = done.stdout.split("forward.parallel_forward_matches_full_math", 1)[1].split("\nforward.", 1)[0]
    for combo in ("kind=column tp=2 sp=False a2a=False gather_output=False input_is_parallel=True stride=2",
                  "kind=column tp=1 sp=False a2a=False gather_output=False input_is_parallel=True stride=1",
                  "kind=row tp=2"):
        assert combo in block, block
    assert "random draws only" not in done.stdout, "a property without always-run examples:\n" + done.stdout
    for moe_property in ("moe.per_expert_adapters_match_dense_math", "moe.shared_outer_loras_match_dense_math",
                         "moe.moe_lora_logits_are_the_same_at_every_layout"):
        block = done.stdout.split(moe_property, 1)[1].split("\nmoe.", 1)[0]
        for layout in ("tp=1 ep=1 etp=1", "tp=1 ep=1 etp=2", "tp=1 ep=2 etp=1", "tp=2 ep=1 etp=1", "tp=2 ep=1 etp=2",
                       "tp=2 ep=2 etp=1"):
            assert layout in block, f"{moe_property} does not always run {layout}:\n{block}"
