"""Running properties SPMD: every rank draws the same examples and sees the same outcome.

Hypothesis runs on every rank with the same seed, no database, no deadline and no timing health
checks, and its shrink phase is limited by a count, not a clock. After each example the ranks
exchange their outcomes over a gloo control group the backend never uses; if any rank failed, every
rank raises the same AssertionError, so generation and shrinking stay in step on all ranks and end
with the same minimal example.

A collective that times out (a hung or mismatched collective) is turned into CollectiveHang, a
BaseException that hypothesis does not catch: the property fails at once with a diagnosis and the
runner rebuilds the process groups before the next property (old ones may be out of step).
"""

from __future__ import annotations

import gc
import json
import re
import time
import traceback
from dataclasses import dataclass, field

import torch.distributed as dist
from hypothesis import HealthCheck, Phase, Verbosity, given, seed, settings
from hypothesis import example as always_run
from hypothesis.errors import Flaky, HypothesisException
from hypothesis.internal.conjecture import engine as _hypothesis_engine

from reference.parallel import destroy_model_parallel

from .agreement import closed_by_peer
from .context import NotOwnCode
from .registry import Property, explicit_examples

# Shrinking must stop at the same point on every rank: by count (MAX_SHRINKS), never by wall clock.
_hypothesis_engine.MAX_SHRINKING_SECONDS = 10**9
_hypothesis_engine.MAX_SHRINKS = 150

PASS, FAIL, XFAIL, XPASS, SKIP, NA = "passed", "failed", "xfailed", "xpassed", "skipped", "not applicable"
NOT_CHECKED = "not checked"   # a clause it requires failed earlier in the run (the root cause is reported there)


class CollectiveHang(BaseException):
    """A collective timed out on some rank: stop this property on every rank."""


class PeerLost(BaseException):
    """The control group itself failed: another rank died or left. Nothing more can be agreed, so the
    run stops (a BaseException, so that hypothesis does not take it for a failing example)."""


@dataclass
class Outcome:
    property: Property
    status: str
    examples: int = 0
    seconds: float = 0.0
    message: str = ""
    example: dict | None = None
    reason: str = ""                       # for skip / xfail / n/a
    reproduce: str = ""
    failures: list = field(default_factory=list)   # each distinct failure kind: message, example, reproduce

    def to_json(self) -> dict:
        return {"id": self.property.id, "section": self.property.section, "clauses": list(self.property.clauses),
                "judges": list(self.property.judges),
                "status": self.status, "examples": self.examples, "seconds": round(self.seconds, 3),
                "message": self.message, "minimal_example": self.example, "reason": self.reason,
                "reproduce": self.reproduce, "failures": self.failures}


def _is_timeout(error: BaseException) -> bool:
    text = f"{type(error).__name__} {error}".lower()
    return "timed out" in text or "timeout" in text or type(error).__name__ == "DistBackendError"


def spmd_call(ctx, fn) -> None:
    """Run fn() on this rank, then agree with every rank on the outcome (collectives on the control
    group). A rank that raised while another is still inside a collective with it releases that rank
    (agreement.meet, ctx.release_groups): the example fails in a second with the raising rank's error,
    not after the collective timeout as a hang."""
    failure = None
    try:
        fn()
    except NotOwnCode as error:
        failure = {"not_own": str(error)}
    except Exception as error:   # noqa: BLE001 - the backend may raise anything; it is a verdict
        summary = "".join(traceback.format_exception_only(type(error), error)).strip()
        failure = {"summary": summary[:4000], "timeout": _is_timeout(error),
                   "where": _innermost_frame(error)}
    try:
        outcomes, releases = ctx.agree(failure, raised=failure is not None and "not_own" not in failure)
    except RuntimeError as error:      # gloo: "Connection closed by peer", "Connection reset by peer", ...
        raise PeerLost(_first_lines(str(error), limit=2)) from None
    releasing = [rank for rank, was in enumerate(releases) if was]
    failed = [(rank, f) for rank, f in enumerate(outcomes) if f is not None and "not_own" not in f]
    waiting = [rank for rank, f in failed if releasing and rank not in releasing and closed_by_peer(f["summary"])]
    failed = [(rank, f) for rank, f in failed if rank not in waiting]
    not_own = [f["not_own"] for f in outcomes if f is not None and "not_own" in f]
    if not failed and not_own:
        raise NotOwnCode(not_own[0])
    if not failed:
        return
    # Ranks that failed the same way are listed together.
    same: dict[tuple, list[int]] = {}
    for rank, f in failed:
        same.setdefault((f["summary"], f["where"]), []).append(rank)
    text = "\n".join(f"  rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}: {summary}"
                     + (f"\n    at {where}" if where else "")
                     for (summary, where), ranks in list(same.items())[:4])
    if len(same) > 4:
        text += f"\n  ... and {len(same) - 4} more distinct failures"
    if waiting:
        text += (f"\n  (rank{'s' if len(waiting) > 1 else ''} {', '.join(map(str, waiting))}, inside a collective "
                 f"with the failing rank, released)")
    if any(f["timeout"] for _, f in failed):
        raise CollectiveHang(f"a collective timed out (hung or mismatched across ranks):\n{text}")
    kind = failure_kind(f["summary"] for _, f in failed)
    raise kind_error(kind)(f"failed on rank(s) {[r for r, _ in failed]}:\n{text}")


def failure_kind(summaries) -> str:
    """The kind of a failure, from each failing rank's "Type: message" line: the exception type and the
    message with the values taken out (numbers, quoted text, (...) and [...] groups), so that the same
    check failing on other values is one kind. Different kinds are shrunk and reported separately."""
    kinds = set()
    for summary in summaries:
        first = summary.splitlines()[0] if summary else ""
        text = re.sub(r"'[^']*'|\"[^\"]*\"|\([^()]*\)|\[[^\[\]]*\]|[-+]?\d[\w.+-]*", "#", first)
        kinds.add(" ".join(text.split())[:160])
    return "; ".join(sorted(kinds))


_KIND_ERRORS: dict[str, type] = {}
MAX_KINDS = 4   # more distinct kinds in one property share one report, "other" (each kind costs a shrink)


def kind_error(kind: str) -> type:
    """An AssertionError subclass per failure kind: hypothesis tells bugs apart by exception type, so
    with report_multiple_bugs each kind gets its own minimal example."""
    return _KIND_ERRORS.setdefault(kind, type("PropertyFailure", (AssertionError,), {"kind": kind}))


def _innermost_frame(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    return f"{frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""


@dataclass
class RunOptions:
    budget: int = 25                 # examples per property of weight 1
    seed: int = 0
    timeout_s: float = 120.0
    backend_spec: str = "reference"
    world_size: int = 1
    profile: str = "default"


@dataclass
class Progress:
    """Live progress on rank 0: property, examples done of its budget, elapsed."""

    enabled: bool
    index: int = 0
    total: int = 0
    started: float = field(default_factory=time.monotonic)

    def tick(self, prop: Property, done: int, budget: int, start: float) -> None:
        if self.enabled:
            print(f"\r[{self.index:>3}/{self.total}] {prop.id:<55} {done:>4}/{budget} examples "
                  f"{time.monotonic() - start:6.1f}s", end="", flush=True)


def reproduce_command(options: RunOptions, prop: Property, example: dict | None) -> str:
    head = (f"torchrun --standalone --nproc-per-node {options.world_size} -m conformance --backend {options.backend_spec}"
            if options.world_size > 1 else f"python -m conformance --backend {options.backend_spec}")
    if example is None:
        return f"{head} -k {prop.id} --seed {options.seed}"
    return f"{head} --replay '{prop.id}={json.dumps(example, sort_keys=True)}'"


def run_property(prop: Property, ctx, backend, options: RunOptions, progress: Progress,
                 replay: dict | None = None, scoped=None) -> Outcome:
    """Run one property's examples on every rank; the Outcome is the same on every rank.

    scoped: a declared deviation with a scope (conformance/declared.py): examples inside it must
    fail (their failures are recorded, not raised), examples outside it must pass."""
    budget = prop.max_examples(options.budget)     # until the strategy is built: then always-run + draws
    start = time.monotonic()
    # failing: kind -> (the example as it ran, message); hypothesis replays each kind's minimal example last.
    state = {"examples": 0, "budget": budget, "failing": {}, "in_scope_failed": None, "in_scope_passed": None,
             "not_own": ""}

    def check(example: dict) -> None:
        state["examples"] += 1
        progress.tick(prop, state["examples"], state["budget"], start)
        inside = scoped is not None and scoped.in_scope(example, ctx.world_size)   # the same on every rank
        ctx.ran_changes = {}
        try:
            spmd_call(ctx, lambda: prop.fn(ctx, backend, example))
        except NotOwnCode as error:
            state["not_own"] = state["not_own"] or str(error)
            return
        except AssertionError as error:
            ran = as_ran(example, ctx.ran_changes)
            if inside:
                state["in_scope_failed"] = state["in_scope_failed"] or (ran, _first_lines(str(error)))
                return
            kind = getattr(error, "kind", "AssertionError")
            if kind not in state["failing"] and len(state["failing"]) >= MAX_KINDS:
                kind = "other"
                error = kind_error("other")(str(error))
            state["failing"][kind] = (ran, _first_lines(str(error)))
            raise error
        if inside and state["in_scope_passed"] is None:
            state["in_scope_passed"] = as_ran(example, ctx.ran_changes)

    try:
        if replay is not None:
            check(replay)
        else:
            strategy = prop.strategy(ctx)
            explicit = explicit_examples(strategy)
            draws = prop.random_draws(options.budget, len(explicit))
            state["budget"] = len(explicit) + draws
            test = given(strategy)(check)
            for example in reversed(explicit):     # always run, before the draws
                test = always_run(example)(test)
            test = settings(max_examples=draws, derandomize=False, database=None, deadline=None,
                            suppress_health_check=list(HealthCheck), print_blob=False,
                            phases=[Phase.explicit, Phase.generate, Phase.shrink], report_multiple_bugs=True,
                            verbosity=Verbosity.quiet)(test)
            seed(options.seed)(test)()
        status, message = PASS, ""
    except CollectiveHang as hang:
        status, message = FAIL, f"HANG: {hang}"
        recover_groups(ctx, backend)
    except AssertionError as error:
        status, message = FAIL, _first_lines(str(error))
    except BaseExceptionGroup as group:   # several failure kinds (report_multiple_bugs)
        hangs = [e for e in group.exceptions if isinstance(e, CollectiveHang)]
        if hangs:
            status, message = FAIL, f"HANG: {hangs[0]}"
            recover_groups(ctx, backend)
        else:
            status, message = FAIL, f"{len(group.exceptions)} distinct kinds of failure"
    except Flaky as error:
        status, message = FAIL, f"FLAKY: the failure did not reproduce on replay: {_first_lines(str(error))}"
    except HypothesisException as error:
        status, message = FAIL, f"{type(error).__name__}: {_first_lines(str(error))}"
    except Exception as error:   # noqa: BLE001 - e.g. a strategy that raised: report it, run the rest
        status, message = FAIL, f"the property itself raised (not an example): {type(error).__name__}: {error}"
    failures = [{"kind": kind, "message": text, "minimal_example": ran,
                 "reproduce": reproduce_command(options, prop, ran)}
                for kind, (ran, text) in state["failing"].items()] if status == FAIL else []
    example = failures[0]["minimal_example"] if failures else None
    if len(failures) > 1:
        message = f"{len(failures)} distinct kinds of failure, each with its minimal example:\n" + "\n".join(
            f"[{i}] {f['message']}" for i, f in enumerate(failures, 1))
    elif failures and not message.startswith(("HANG", "FLAKY")):
        message = failures[0]["message"]
    if scoped is not None:
        status, message, example = _scoped_verdict(scoped, status, message, example, state)
    if status == PASS and state["not_own"]:
        return Outcome(prop, NA, state["examples"], time.monotonic() - start,
                       reason=f"not the backend's own code: {state['not_own']}")
    return Outcome(prop, status, state["examples"], time.monotonic() - start, message, example,
                   reproduce=reproduce_command(options, prop, example)
                   if status == FAIL or (status in (XFAIL, XPASS) and example is not None) else "",
                   failures=failures if status == FAIL and len(failures) > 1 else [])


def as_ran(example, changes: dict):
    """The example as it ran: a property that fitted it to the backend recorded `changes`
    (Context.ran); for a tuple of parts, they apply to the first part (the layer or model example)."""
    if not changes:
        return example
    if isinstance(example, dict):
        return {**example, **changes}
    if isinstance(example, (tuple, list)) and example and isinstance(example[0], dict):
        return [{**example[0], **changes}, *example[1:]]
    return example


def _scoped_verdict(scoped, status, message, example, state):
    """(status, message, example) of a property run under a scoped deviation: a failure outside the
    scope fails; inside, a passing example is an XPASS and failures are the declared XFAIL."""
    where = f"[{scoped.scope_text()}]"
    if status == FAIL:
        return FAIL, f"failed outside the declared scope {where}:\n{message}", example
    if state["in_scope_passed"] is not None:
        return XPASS, f"passed inside the declared scope {where}", state["in_scope_passed"]
    if state["in_scope_failed"] is not None:
        failing, text = state["in_scope_failed"]
        return XFAIL, text, failing
    return PASS, "", None


def _first_lines(text: str, limit: int = 40) -> str:
    lines = text.strip().splitlines()
    return "\n".join(lines[:limit]) + (f"\n  ... ({len(lines) - limit} more lines)" if len(lines) > limit else "")


def abandon_groups(ctx, backend) -> None:
    """Close every process group but the suite's own (the control group and WORLD) and forget them
    (the reference's cache, the backend's): a gloo group's sockets close with it, so a rank blocked in
    a collective on it gets an error at once. The next layout creates fresh groups. On NCCL a blocked
    peer is not woken this way; the collective timeout ends its wait."""
    destroy_model_parallel(forget_groups=True)
    backend.reset_parallel()
    keep = {ctx.control_group, dist.GroupMember.WORLD}
    for group in list(dist.distributed_c10d._world.pg_map):     # every group made so far
        if group not in keep:
            dist.destroy_process_group(group)
    gc.collect()                    # the last references (cycles through modules) go, and the sockets close


def recover_groups(ctx, backend) -> None:
    """After a timed-out collective: fresh groups for the next layout (the old ones may be out of step)."""
    abandon_groups(ctx, backend)
    dist.barrier(group=ctx.control_group)
