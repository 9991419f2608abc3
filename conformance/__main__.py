"""torchrun --standalone --nproc-per-node N -m conformance [--backend pkg.module:Class] [options]

Checks a LoRA backend against SPEC.md with hypothesis properties, SPMD over the ranks torchrun
started (or one process without torchrun). Exit code: 0 when nothing failed, 1 on any failure (or
XPASS with --strict-deviations), 2 on bad usage, 3 when a rank had to be stopped by the watchdog,
5 when -k selects no property.
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import importlib
import json
import math
import os
import platform
import re
import sys
import threading
import time
import traceback
from pathlib import Path

import hypothesis
import torch
import torch.distributed as dist

from reference.parallel import init_distributed

from . import declared
from . import report
from .backend import ASPECTS, Backend, capability_values, not_its_own
from .backends.reference import ReferenceBackend
from .context import Context
from .layout import DTYPES
from .registry import explicit_examples, load_all
from .runner import (FAIL, NA, NOT_CHECKED, SKIP, XFAIL, XPASS, Outcome, PeerLost, Progress, RunOptions, abandon_groups,
                     run_property)

PROFILES = {"quick": 4, "default": 25, "thorough": 100}
NOTHING_SELECTED = 5          # as pytest's exit code when no test was collected
DEFAULT_TIMEOUT_S = 120.0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m conformance",
        description="Check a LoRA backend against the tensor-parallel LoRA reference (SPEC.md).")
    parser.add_argument("--backend", default="reference",
                        help="'reference' (default) or 'pkg.module:ClassName' of a conformance.backend.Backend")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="default",
                        help="example budget per property: quick=%(quick)d, default=%(default)d, "
                             "thorough=%(thorough)d" % PROFILES)
    parser.add_argument("--max-examples", type=_positive_int, default=None,
                        help="examples per property (overrides --profile)")
    parser.add_argument("--seed", type=_nonnegative_int, default=0, help="hypothesis seed (default 0)")
    parser.add_argument("-k", dest="keyword", default=None,
                        help="select properties: words match id, section or clause; 'and', 'or', 'not', ()")
    parser.add_argument("--deviations", default=None,
                        help="declared deviations (skip/xfail with reasons): a file, or the name of a shipped "
                             "one (see --list-deviations)")
    parser.add_argument("--list-deviations", action="store_true",
                        help="list the deviations files shipped with the package and exit")
    parser.add_argument("--strict-deviations", action="store_true", help="an XPASS fails the run")
    parser.add_argument("--report-json", default=None, help="write the full report as JSON")
    parser.add_argument("--junitxml", default=None, help="write a JUnit XML report")
    parser.add_argument("--report-md", default=None, help="write the summary as a Markdown table")
    parser.add_argument("--timeout", type=_positive_float, default=DEFAULT_TIMEOUT_S,
                        help="seconds a collective may block before it counts as a hang; a property that "
                             "runs past 3x this is stopped on every rank (default %(default)s)")
    parser.add_argument("--dtypes", default=None,
                        help="comma list of extra dtypes to draw besides float32 (default: bfloat16,float16 "
                             "on CUDA, none on CPU)")
    parser.add_argument("--replay", default=None, metavar="ID=JSON", help="run one example of one property")
    parser.add_argument("--list", action="store_true", help="list the properties and exit")
    parser.add_argument("--coverage", type=int, default=None, metavar="WORLD",
                        help="list the layout combinations each property always runs at world size WORLD "
                             "(for --backend; CPU dtypes unless --dtypes) and exit")
    args = parser.parse_args(argv)
    if args.keyword is not None:
        try:
            keyword_matcher(args.keyword)
        except ValueError as e:
            parser.error(f"-k: {e}")
    if args.replay is not None:
        _, sep, example = args.replay.partition("=")
        try:
            if not sep:
                raise ValueError("no '='")
            json.loads(example)
        except ValueError as e:
            parser.error(f"--replay expects PROPERTY_ID=JSON_EXAMPLE ({e})")
    for flag, path in (("--report-json", args.report_json), ("--junitxml", args.junitxml),
                       ("--report-md", args.report_md)):
        # Checked before anything runs: a report that cannot be written would be lost at the end.
        if path is not None and not Path(path).resolve().parent.is_dir():
            parser.error(f"{flag}: the directory of {path!r} does not exist")
    if args.dtypes is not None:
        bad = [d for d in args.dtypes.split(",") if d and d not in DTYPES]
        if bad:
            parser.error(f"--dtypes: unknown {bad}; allowed: {sorted(DTYPES)}")
    return args


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _nonnegative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive, finite number of seconds, got {text}")
    return value


def keyword_matcher(expression: str):
    """pytest-style -k: words (substrings of id/section/clauses) joined by and/or/not and parentheses."""
    tokens = re.findall(r"\(|\)|[^\s()]+", expression)
    if not tokens:
        raise ValueError("empty expression")
    words, python = [], []
    for token in tokens:
        if token in ("and", "or", "not", "(", ")"):
            python.append(token)
        else:
            python.append(f"_w[{len(words)}]")
            words.append(token.lower())
    code = " ".join(python)
    try:
        compile(code, "-k", "eval")
    except SyntaxError:
        raise ValueError(f"cannot parse {expression!r}") from None

    def matches(prop) -> bool:
        haystack = " ".join([prop.id, prop.section, *prop.clauses]).lower()
        return bool(eval(code, {"__builtins__": {}}, {"_w": [w in haystack for w in words]}))

    return matches


def load_backend(spec: str):
    if spec == "reference":
        return ReferenceBackend()
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        _usage_exit(f"--backend must be 'reference' or 'pkg.module:ClassName', got {spec!r}")
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        _usage_exit(f"cannot load backend {spec!r}: {e}")
    if not (isinstance(target, type) and issubclass(target, Backend)):
        _usage_exit(f"--backend {spec!r} is a {type(target).__name__}, not a subclass of conformance.backend.Backend")
    return target()


def _usage_exit(message: str) -> None:
    print(f"conformance: {message}", file=sys.stderr)
    raise SystemExit(2)


WATCHDOG_EXIT = 3
STOP_KEY = "conformance/watchdog-stop/"     # + rank: a stopped rank's record, in the rendezvous store


def start_watchdog(limit_s: float, what: dict, on_stop) -> None:
    """If one property runs past limit_s on this rank, print where every thread is, record the stop
    (`on_stop(record)`: the report, and the rendezvous store for rank 0 to read) and stop."""
    main = threading.main_thread()

    def watch():
        while True:
            time.sleep(1.0)
            started = what.get("started")
            if started is not None and time.monotonic() - started > limit_s:
                print(f"\nconformance: rank {what['rank']}: property {what['property']} ran past {limit_s:.0f} s "
                      f"(a hang the collective timeout did not catch); stopping this rank. Stacks:",
                      file=sys.stderr, flush=True)
                faulthandler.dump_traceback(file=sys.stderr)
                frame = sys._current_frames().get(main.ident)
                stack = [line.strip() for line in traceback.format_stack(frame)[-6:]] if frame is not None else []
                record = {"rank": what["rank"], "property": what["property"], "after_s": round(limit_s),
                          "exit_code": WATCHDOG_EXIT, "stack": stack}
                try:
                    on_stop(record)
                finally:
                    sys.stderr.flush()
                    os._exit(WATCHDOG_EXIT)

    threading.Thread(target=watch, daemon=True, name="conformance-watchdog").start()


PEER_LOST_EXIT = 4


def peer_lost(rank: int, prop, error: str, header: dict, outcomes, warnings, args) -> int:
    """Another rank died or left during `prop`: say so once, record it, stop without a traceback."""
    print(f"conformance: rank {rank}: another rank died or left during {prop.id} ({' '.join(error.split())}); "
          f"the remaining properties were not run", file=sys.stderr, flush=True)
    header["stopped"] = [*header["stopped"], {"rank": rank, "property": prop.id, "peer_lost": error,
                                             "exit_code": PEER_LOST_EXIT}]
    if rank == 0 and args.report_json:
        report.write_json(args.report_json, outcomes, header, warnings)
    return PEER_LOST_EXIT


def _rendezvous_store():
    """The default process group's store, or None (an initialisation without one)."""
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError):
        return None


def other_ranks_stopped(world: int, rank: int) -> list[dict]:
    """The watchdog records other ranks left in the rendezvous store (none without a store)."""
    store = _rendezvous_store()
    if store is None:
        return []
    records = []
    for other in range(world):
        key = f"{STOP_KEY}{other}"
        if other != rank and store.check([key]):
            records.append(json.loads(store.get(key).decode()))
    return records


# --coverage shows these example keys first, in this order, then every other key but sizes and seeds.
COVERAGE_KEYS = ("kind", "tp", "sp", "a2a", "gather_output", "input_is_parallel", "stride", "dtype", "dropout_position",
                 "ep", "etp")
COVERAGE_HIDDEN = {"seed", "s", "b", "in", "out", "bias", "skip_bias_add", "s_per_tp", "alpha", "dim_factor"}


def print_coverage(properties, backend, world: int, dtypes: str | None) -> int:
    """Each property's always-run examples (layout combinations), as the runner would run them."""
    if world < 1:
        print("conformance: --coverage: the world size must be >= 1", file=sys.stderr)
        return 2
    extra = tuple(d for d in (dtypes or "").split(",") if d)
    ctx = Context(world, 0, torch.device("cpu"), None, dtypes=("float32", *extra),
                  tp_sizes=[t for t in backend.tp_sizes(world) if world % t == 0] or [1],
                  capabilities=capability_values(backend.capabilities))
    for p in properties:
        if not all(backend.supports(need) for need in p.needs) or world < p.min_world:
            print(f"{p.id:<55} not applicable")
            continue
        combos = explicit_examples(p.strategy(ctx))
        print(f"{p.id:<55} {len(combos)} always-run example(s)" + ("" if combos else " (random draws only)"))
        for combo in combos:
            print("    " + describe_combination(combo))
    return 0


def describe_combination(combo) -> str:
    """One always-run example in a line: the layout keys, the other choices, then the tuple's rest."""
    first, rest = (combo[0], combo[1:]) if isinstance(combo, (tuple, list)) else (combo, ())
    if not isinstance(first, dict):
        first, rest = {}, (first, *rest)
    shown_later = [k for k in first if k not in COVERAGE_KEYS and k not in COVERAGE_HIDDEN]
    keys = [k for k in COVERAGE_KEYS if k in first] + shown_later
    return " ".join([*(f"{key}={first[key]}" for key in keys), *(f"+ {value!r}" for value in rest)])


def backend_declaration_problem(backend) -> str:
    """What is wrong with a backend's `capabilities` or `borrowed` ("" if nothing), before any run."""
    try:
        capability_values(backend.capabilities)
    except ValueError as e:
        return f"capabilities: {e}"
    unknown = sorted(name for name in backend.borrowed if name not in ASPECTS and not hasattr(Backend, name))
    if unknown:
        return (f"borrowed: unknown names {unknown}; allowed: the protocol methods of conformance.backend.Backend "
                f"or the aspects {sorted(ASPECTS)}")
    return ""


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list_deviations:
        for name, path in declared.shipped().items():
            entries = declared.parse(path.read_text(encoding="utf-8"), str(path))
            print(f"{name:<20} {len(entries):>3} entries  {path}")
        return 0
    properties = load_all()
    if args.coverage is not None:
        return print_coverage(properties, load_backend(args.backend), args.coverage, args.dtypes)
    if args.list:
        for p in properties:
            print(f"{p.id:<55} [{', '.join(p.clauses)}]  needs: {', '.join(sorted(p.needs)) or '-'}"
                  f"  judges: {', '.join(p.judges)}")
        return 0
    try:
        deviation_list = declared.load(args.deviations) if args.deviations else []
    except declared.DeviationError as e:
        print(f"conformance: {e}", file=sys.stderr)
        return 2
    backend = load_backend(args.backend)
    problem = backend_declaration_problem(backend)
    if problem:
        print(f"conformance: backend {args.backend}: {problem}", file=sys.stderr)
        return 2
    selected = properties
    if args.keyword:
        match = keyword_matcher(args.keyword)
        selected = [p for p in properties if match(p)]
        if not selected:
            print(f"conformance: -k {args.keyword!r} selects no property (see --list)", file=sys.stderr)
            return NOTHING_SELECTED
    replay = None
    if args.replay:
        prop_id, _, example = args.replay.partition("=")
        selected = [p for p in properties if p.id == prop_id]
        if not selected:
            print(f"conformance: --replay: no property {prop_id!r} (see --list)", file=sys.stderr)
            return 2
        replay = json.loads(example)

    init_distributed(timeout_s=args.timeout)
    world, rank = dist.get_world_size(), dist.get_rank()
    control_group = dist.new_group(backend="gloo", timeout=_timedelta(3 * args.timeout + 60))
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    if args.dtypes is not None:
        extra = tuple(d for d in args.dtypes.split(",") if d)
    else:
        extra = ("bfloat16", "float16") if device.type == "cuda" else ()
    ctx = Context(world, rank, device, control_group, dtypes=("float32", *extra),
                  tp_sizes=[t for t in backend.tp_sizes(world) if world % t == 0] or [1],
                  capabilities=capability_values(backend.capabilities))
    ctx.release_groups = lambda: abandon_groups(ctx, backend)

    budget = args.max_examples or PROFILES[args.profile]
    options = RunOptions(budget=budget, seed=args.seed, timeout_s=args.timeout, backend_spec=args.backend,
                         world_size=world, profile=args.profile)
    header = {"backend": args.backend, "backend_description": backend.describe(), "world_size": world,
              "tp_sizes": ctx.tp_sizes, "device": str(device), "dist_backend": dist.get_backend(),
              "dtypes": list(ctx.dtypes), "profile": args.profile, "examples_per_property": budget,
              "seed": args.seed, "timeout_s": args.timeout, "torch": torch.__version__,
              "hypothesis": hypothesis.__version__, "python": platform.python_version(),
              "capabilities": {name: sorted(values) if values is not None else True
                               for name, values in sorted(capability_values(backend.capabilities).items())},
              "borrowed": dict(backend.borrowed)}
    warnings = [f"deviation line {d.line} '{d.pattern}' matches no property"
                for d in declared.unmatched(deviation_list, properties)]
    if rank == 0:
        print(f"conformance: backend {header['backend_description']}\n"
              f"  world {world} ({header['dist_backend']}, {device}), TP sizes {ctx.tp_sizes}, dtypes {list(ctx.dtypes)}\n"
              f"  torch {torch.__version__}, hypothesis {hypothesis.__version__}, profile {args.profile} "
              f"({budget} examples/property), seed {args.seed}, timeout {args.timeout:.0f} s\n"
              f"  {len(selected)} properties selected of {len(properties)}")
        for w in warnings:
            print(f"warning: {w}")

    outcomes = []
    header["complete"], header["stopped"] = False, []

    def record_stop(record: dict) -> None:
        """A watchdog stop: into the store (rank 0 reports it), and into the report on rank 0."""
        store = _rendezvous_store()
        if store is not None:
            store.set(f"{STOP_KEY}{rank}", json.dumps(record))
        if rank == 0 and args.report_json:
            header["stopped"] = [record, *other_ranks_stopped(world, rank)]
            report.write_json(args.report_json, outcomes, header, warnings)

    watch = {"rank": rank, "property": None, "started": None}
    start_watchdog(3 * args.timeout, watch, record_stop)
    if rank == 0 and args.report_json:
        # Written before the first property (and after each one), so a run that dies early or is
        # stopped by the watchdog still leaves a report saying how far it got.
        report.write_json(args.report_json, outcomes, header, warnings)
    progress = Progress(enabled=rank == 0 and sys.stdout.isatty(), total=len(selected))
    failed_clauses: set[str] = set()
    started = time.monotonic()
    for index, prop in enumerate(selected, start=1):
        progress.index = index
        missing = sorted(need for need in prop.needs if not backend.supports(need))
        borrowed = not_its_own(backend, prop.judges)
        deviation = declared.find(deviation_list, prop)
        blocked = [clause for clause in prop.requires if clause in failed_clauses]
        if missing:
            outcome = Outcome(prop, NA, reason=f"backend lacks: {', '.join(missing)}")
        elif borrowed:
            outcome = Outcome(prop, NA, reason=f"not the backend's own code: {borrowed}")
        elif world < prop.min_world:
            outcome = Outcome(prop, NA, reason=f"needs world size >= {prop.min_world}")
        elif deviation is not None and deviation.kind == "skip":
            outcome = Outcome(prop, SKIP, reason=deviation.reason)
        elif blocked:
            outcome = Outcome(prop, NOT_CHECKED, reason=f"not checked: needs {', '.join(blocked)} (failed above)")
        else:
            watch.update(property=prop.id, started=time.monotonic())
            scoped = deviation if deviation is not None and deviation.scope else None
            try:
                outcome = run_property(prop, ctx, backend, options, progress, replay, scoped)
            except PeerLost as lost:
                return peer_lost(rank, prop, str(lost), header, outcomes, warnings, args)
            watch.update(property=None, started=None)
            if deviation is not None:
                outcome.reason = deviation.reason + (f" [scope: {deviation.scope_text()}]" if scoped else "")
                if not scoped:
                    outcome.status = XFAIL if outcome.status == FAIL else XPASS
        outcomes.append(outcome)
        if outcome.status == FAIL:
            failed_clauses.update(prop.clauses)
        if rank == 0:
            line = f"[{index:>3}/{len(selected)}] {prop.id:<55} {outcome.status:<15} {outcome.examples:>4} ex {outcome.seconds:6.2f}s"
            print(("\r" if progress.enabled else "") + line, flush=True)
            if outcome.status == XFAIL and outcome.message:
                # The failure a deviation stands for, as it happened: a run cut short still shows it.
                print(f"      failed as declared: {_one_line(outcome.message)}", flush=True)
            if args.report_json:
                # Written after every property, so a run stopped by the watchdog leaves what it measured.
                header["complete"], header["elapsed_s"] = False, round(time.monotonic() - started, 2)
                report.write_json(args.report_json, outcomes, header, warnings)
    header["elapsed_s"] = round(time.monotonic() - started, 2)
    header["complete"] = True

    if rank == 0:
        header["stopped"] = header["stopped"] or other_ranks_stopped(world, rank)
        print(report.summary_text(outcomes, header))
        if args.report_json:
            report.write_json(args.report_json, outcomes, header, warnings)
        if args.junitxml:
            report.write_junit(args.junitxml, outcomes, header)
        if args.report_md:
            report.write_markdown(args.report_md, outcomes, header)
    failed = any(o.status == FAIL for o in outcomes) or (args.strict_deviations and any(o.status == XPASS for o in outcomes))
    dist.barrier(group=control_group)
    dist.destroy_process_group()
    # Every rank exits with the run's verdict (the outcomes are agreed, so it is the same everywhere).
    if failed and world > 1 and rank == 0:
        time.sleep(1.0)   # let the other ranks exit first, so torchrun need not terminate them
    return 1 if failed else 0


def _one_line(message: str, limit: int = 240) -> str:
    text = " ".join(message.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _timedelta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Leave without the interpreter's shutdown: torch's process-group threads have been seen to abort
    # at exit ("terminate called without an active exception"), which torchrun turns into a failure.
    os._exit(code)
