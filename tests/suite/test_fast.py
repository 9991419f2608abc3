"""The fast path (reference/fast) through the suite as a backend of its own, at world 2 on gloo.

Strict mode (FastStrictBackend) makes any call that would take the reference's forward an error, so
a pass here was earned by the fused step; the parts the fast path takes from the reference unchanged
are "not applicable", never passed. Two mutants of the fused step fail exactly their clauses."""

import pytest

from tests.suite.test_backends import _run

# The sections where the fused step shows (the mutants change nothing else).
MATH = "forward or backward or dtype"
# What the fused step owns, and must pass.
OWN = ("forward.parallel_forward_matches_full_math", "forward.gathered_output_or_full_input_matches_full_math",
       "forward.linear_forward_matches_full_math", "forward.sequence_parallel_forward_matches_full_math",
       "forward.a2a_forward_matches_full_math", "forward.scale_is_alpha_over_dim",
       "forward.lora_adds_no_activation_sized_collective", "forward.dropout_acts_at_its_position_in_train_mode",
       "forward.base_path_never_sees_dropout", "backward.parallel_gradients_match_full_math",
       "backward.sequence_parallel_gradients_match_full_math", "backward.linear_gradients_match_full_math",
       "backward.gathered_output_or_full_input_gradients_match_full_math",
       "dtype.output_has_the_base_dtype_and_lora_dtype_math", "injection.adapted_model_is_tp_invariant")


def _failed(report) -> set[str]:
    return {c for c, v in report["clauses"].items() if v["status"] == "failed"}


def test_fast_backend_passes_with_every_verdict_earned_by_the_fused_step(tmp_path):
    """[LORA-FWD-1] [LORA-FWD-3] [LORA-FWD-7] [LORA-BWD-1] [LORA-INJ-5] the fast path at TP 2 (strict: no
    call took the reference's forward): its own properties pass; what it borrows is not applicable."""
    done, report = _run(["--backend", "conformance.backends.fast:FastStrictBackend"], tmp_path, nproc=2)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    statuses = {p["id"]: p["status"] for p in report["properties"]}
    assert "failed" not in statuses.values() and "not checked" not in statuses.values()
    for own in OWN:
        assert statuses[own] == "passed", own
    reasons = {p["id"]: p.get("reason", "") for p in report["properties"]}
    for borrowed in ("init.zero_B_leaves_the_layer_unchanged", "merge.merged_tiny_gpt_gives_the_same_logits",
                     "matching.full_names_are_dotted_module_paths", "parallel.column_base_matches_full_math"):
        assert statuses[borrowed] == "not applicable" and "reference" in reasons[borrowed], borrowed
    assert statuses["forward.sp_input_regather_forward_matches_full_math"] == "not applicable"   # not fused


@pytest.mark.parametrize("mutant, clauses", [
    ("FastGatherOrderBackend", {"LORA-FWD-1"}),
    # The gradient properties check these clauses together (a property fails all it checks).
    ("FastGradHNotReducedBackend", {"LORA-BWD-1", "LORA-BWD-2", "LORA-FWD-3", "LORA-FWD-4", "TP-COLL-1"}),
])
def test_a_bug_in_the_fused_step_fails_its_clauses(tmp_path, mutant, clauses):
    """[LORA-FWD-1] [LORA-BWD-1] a wrong gather order in the fused forward, and an unreduced dL/dh in
    its backward, each fail exactly the clauses of the properties that catch them."""
    done, report = _run(["--backend", f"tests.suite.fast_mutants:{mutant}", "--profile", "quick", "-k", MATH],
                        tmp_path, nproc=2)
    assert done.returncode == 1, done.stdout[-3000:]
    assert _failed(report) == clauses, done.stdout[-3000:]
