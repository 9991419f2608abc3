"""NeMo Automodel (DTensor TP LoRA) through the suite at world 2 on gloo, and the layout-neutral path
([LORA-FWD-2] alone judges where a backend with the full A and B keeps its shards).

Needs the `automodel` extra and `pip install --no-deps nemo-automodel==0.7.0` (README); skipped
without them. The quick profile: every always-run layout and a few draws per property (CI time)."""

import pytest

from tests.suite.test_backends import _run

pytestmark = pytest.mark.automodel
# The sections where an adapter's layout or math shows (the mutants change nothing else).
MATH = "forward or backward or init or dtype"


def _failed(report) -> set[str]:
    return {c for c, v in report["clauses"].items() if v["status"] == "failed"}


def _automodel(tmp_path, backend, *args):
    pytest.importorskip("nemo_automodel.components._peft.lora")
    return _run(["--backend", backend, "--deviations", "automodel", "--profile", "quick", *args], tmp_path, nproc=2)


def test_automodel_backend_conforms_except_its_declared_deviations(tmp_path):
    """[LORA-FWD-1] [LORA-FWD-2] [LORA-BWD-1] [LORA-INJ-5] Automodel at TP 2: the math passes through the
    full A and B; its row B sharded along the rank is the declared [LORA-FWD-2] deviation; TinyGPT with
    a TP plan is TP-invariant with Automodel's LoRA; every declared entry still fails
    (--strict-deviations)."""
    done, report = _automodel(tmp_path, "conformance.backends.automodel:AutomodelBackend", "--strict-deviations")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    statuses = {p["id"]: p["status"] for p in report["properties"]}
    assert "failed" not in statuses.values() and "xpassed" not in statuses.values()
    for passed in ("forward.parallel_forward_matches_full_math", "forward.sequence_parallel_forward_matches_full_math",
                   "backward.parallel_gradients_match_full_math", "init.same_seed_gives_the_same_full_adapter_at_every_tp",
                   "injection.adapted_model_is_tp_invariant", "injection.apply_trains_exactly_the_adapters",
                   "matching.full_names_are_dotted_module_paths"):
        assert statuses[passed] == "passed", passed
    assert statuses["forward.adapter_shards_follow_the_spec_layout"] == "xfailed"
    assert statuses["config.config_has_the_spec_fields_and_defaults"] == "not applicable"   # glue, not Automodel
    assert statuses["parallel.tiny_gpt_logits_are_the_same_at_every_tp"] == "not applicable"   # the model is glue


def test_a_layout_that_computes_right_fails_only_the_layout_clause(tmp_path):
    """[LORA-FWD-2] column adapters with A replicated (not SPEC's row shards), the same update: only the
    layout clause fails; every forward, backward, init and dtype property passes."""
    done, report = _automodel(tmp_path, "tests.suite.automodel_mutants:ColumnAReplicatedBackend", "-k", MATH)
    assert done.returncode == 1, done.stdout[-3000:]
    assert _failed(report) == {"LORA-FWD-2"}, done.stdout[-3000:]


def test_a_layout_that_computes_wrong_fails_the_math_clauses(tmp_path):
    """[LORA-FWD-1] the row adapter's partial A x not all-reduced: the forward math fails (what builds on
    it is "not checked"), whatever the layout."""
    done, report = _automodel(tmp_path, "tests.suite.automodel_mutants:RowPartialNotReducedBackend", "-k", MATH)
    assert done.returncode == 1, done.stdout[-3000:]
    assert _failed(report) == {"LORA-FWD-1"}, done.stdout[-3000:]
    statuses = {p["id"]: p["status"] for p in report["properties"]}
    assert statuses["backward.parallel_gradients_match_full_math"] == "not checked"
