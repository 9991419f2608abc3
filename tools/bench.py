"""What LoRA costs on top of its base layer: every implementation on the same weights and inputs.

    torchrun --standalone --nproc-per-node 2 tools/bench.py --out bench.json            # GPU (NCCL): the real sizes
    python tools/bench.py --out bench.json                                              # one GPU: TP = 1 rows only
    python tools/bench.py --small                                                       # CPU smoke run

For a column base (H -> FFN) and a row base (FFN -> H), bf16, 8192 tokens, H x FFN in
{4096 x 14336, 8192 x 28672}, r in {16, 64}, TP in {1, 2}, each implementation times forward +
backward of (a) its frozen base alone (the input requires grad, so backward computes the input
gradient only) and (b) the base with LoRA. Fair by construction:

- the same full weights for everyone: W ~ N(0, 0.02), A and B drawn once per row from a seeded
  generator, each implementation given its own shard of them through the conformance protocol
  (make_linear with the full W, then adapter_weights, or load_full_adapter_weights, with SPEC's
  pieces of A and B); GEMM time on a GPU depends on the data (zeros run faster), so no one gets zeros;
- the same inputs and output gradients (this rank's piece of one full x and one full g);
- a `F.linear` row (the local weight shard, no wrapper, no communication) anchors the base speed;
- the implementations are interleaved and the whole set repeated (--rounds), so drift hits all
  alike; within a round an implementation's base and LoRA steps alternate, --repeats pairs (CUDA
  events), and the round's extra ms is the median of the pairs' differences (the clock drifts by as
  much as the difference measured, so separately timed medians are not subtracted); the report gives
  min / median / max over the rounds of the base time, the LoRA time, LoRA's extra ms over its own
  base and the ratio (base + extra) / base. A difference smaller than the spread is "the same".

Implementations: the reference (conformance.backends.reference), its fast path (reference/fast,
strict: every step takes the fused path), Megatron-Bridge when megatron-core
and megatron-bridge import, HF PEFT at TP = 1 when `peft` imports. The floor beside each row is what
LoRA must add at the least: its extra FLOPs over the measured matmul rate plus its extra bytes
(reading x again, writing and adding the update, the gradients) over the measured copy bandwidth.
Also: merge_lora on a 32-layer H=4096 stack of linears at TP = 2 (and TP = 1).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import reference  # noqa: E402
from reference import parallel  # noqa: E402
from reference.layers import ColumnParallelLinear, RowParallelLinear  # noqa: E402
from conformance.backend import Container, LinearSpec  # noqa: E402
from conformance.layout import piece, shard_of  # noqa: E402

TOKENS = 8192
# name -> (backend "module:Class", the base kind it takes at TP = 1, whether it has TP)
IMPLEMENTATIONS = {
    "ours": ("conformance.backends.reference:ReferenceBackend", None, True),
    # The fast path (reference/fast), strict: a step that would take the reference's forward raises.
    "fast": ("conformance.backends.fast:FastStrictBackend", None, True),
    "mb": ("conformance.backends.megatron_bridge:MegatronBridgeBackend", None, True),
    "peft": ("conformance.backends.peft:PeftBackend", "linear", False),
}


def time_once(fn) -> float:
    """Seconds of one fn() (CUDA events on GPU, perf_counter on CPU)."""
    if torch.cuda.is_available():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def slowest_rank(value: float) -> float:
    """The largest value over the ranks (every rank reports the slowest rank's figure)."""
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], device=parallel.default_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor)


def timer(fn, warmup: int, repeats: int) -> float:
    """Median seconds of fn(); the slowest rank's."""
    for _ in range(warmup):
        fn()
    return slowest_rank(statistics.median(time_once(fn) for _ in range(repeats)))


def paired_timer(base_step, lora_step, warmup: int, repeats: int) -> tuple[float, float, float]:
    """(base s, LoRA s, LoRA's extra s): base and LoRA steps alternate, and the extra is the median of
    each pair's difference, so that clock drift between steps (0.1-0.5 ms on an H200 over a round,
    as large as the difference measured) cancels in the difference."""
    for _ in range(warmup):
        base_step()
        lora_step()
    pairs = [(time_once(base_step), time_once(lora_step)) for _ in range(repeats)]
    base = statistics.median(b for b, _ in pairs)
    lora = statistics.median(lo for _, lo in pairs)
    extra = statistics.median(lo - b for b, lo in pairs)
    return slowest_rank(base), slowest_rank(lora), slowest_rank(extra)


def fwd_bwd(layer, x, grad):
    def step():
        x.grad = None
        out = layer(x)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(grad)
    return step


def device_rates(device) -> dict:
    """Measured bf16 matmul FLOP/s and device copy bandwidth (bytes read + written per second)."""
    if device.type != "cuda":
        return {"matmul_flops": float("nan"), "copy_bytes": float("nan")}
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    t = timer(lambda: a @ a, 3, 10)
    buf = torch.empty(2 * 1024**3 // 2, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(buf)
    c = timer(lambda: dst.copy_(buf), 3, 10)
    return {"matmul_flops": 2 * n**3 / t, "copy_bytes": 2 * buf.numel() * 2 / c}


def lora_floor(kind, h, ffn, r, t, rates) -> float:
    """Seconds LoRA must add on one rank at the least (FLOPs at the matmul rate + bytes at the copy rate)."""
    in_f, out_f = (h, ffn) if kind == "column" else (ffn, h)
    in_local, out_local = (in_f, out_f // t) if kind == "column" else (in_f // t, out_f)
    flops = 3 * 2 * TOKENS * r * (in_local + out_local)          # forward, input grad, weight grads of A and B
    elem = 2                                                      # bf16
    bytes_ = elem * TOKENS * (2 * in_local + 3 * out_local)       # x read twice; update written, added, grad read
    return flops / rates["matmul_flops"] + bytes_ / rates["copy_bytes"]


def make_base(kind, h, ffn, groups_tp, dtype, device):
    common = dict(bias=False, params_dtype=dtype, device=device, init_method="zero", tp_group=groups_tp)
    if kind == "column":
        return ColumnParallelLinear(h, ffn, **common)
    return RowParallelLinear(ffn, h, **common)


def lora_config(r: int):
    return reference.LoRA(target_modules=["linear_fc1"], dim=r, alpha=2 * r, lora_B_init_method="normal")


class Row:
    """One row's full tensors (the same for every implementation), drawn on the CPU from one seed."""

    def __init__(self, kind, h, ffn, r, seed, dtype, device):
        in_f, out_f = (h, ffn) if kind == "column" else (ffn, h)
        g = torch.Generator().manual_seed(seed)
        self.kind, self.in_f, self.out_f, self.r, self.dtype = kind, in_f, out_f, r, dtype
        # Drawn on the CPU (the same numbers on every device), kept on the device (what a backend's
        # make_linear copies from, as the suite's LinearSpec does).
        self.W = (0.02 * torch.randn(out_f, in_f, generator=g)).to(device, dtype)
        self.A = (torch.randn(r, in_f, generator=g) / in_f ** 0.5).to(device, dtype)
        self.B = (torch.randn(out_f, r, generator=g) / r ** 0.5).to(device, dtype)
        self.X = torch.randn(TOKENS, 1, in_f, generator=g).to(device, dtype)
        self.G = torch.randn(TOKENS, 1, out_f, generator=g).to(device, dtype)

    def local(self, name, kind, t, rank, device):
        """This rank's piece of W, A, B, X or G (SPEC's layout, conformance/layout.py)."""
        tensor = {"W": "weight", "A": "A", "B": "B", "X": "input", "G": "output"}[name]
        return piece(getattr(self, name), shard_of(tensor, kind), rank, t).contiguous().to(device)


def anchor_steps(row, t, rank, device):
    """F.linear on this rank's W shard (no wrapper, no communication): the base-speed anchor."""
    W = row.local("W", row.kind, t, rank, device)
    x = row.local("X", row.kind, t, rank, device).requires_grad_(True)
    grad = row.local("G", row.kind, t, rank, device)
    return fwd_bwd(lambda inp: F.linear(inp, W), x, grad), None


def implementation_steps(name, row, t, rank, device):
    """(base step, LoRA step) of one implementation on the row's weights and inputs, or raises."""
    spec_path, plain_kind, has_tp = IMPLEMENTATIONS[name]
    if t > 1 and not has_tp:
        raise NotImplementedError(f"{name} has no tensor parallelism")
    module, _, cls = spec_path.partition(":")
    backend = getattr(importlib.import_module(module), cls)()
    groups = backend.init_parallel(t)
    kind = plain_kind or row.kind
    spec = LinearSpec(kind=kind, in_features=row.in_f, out_features=row.out_f, weight=row.W, dtype=row.dtype,
                      groups=groups, name="linear_fc1")
    box = Container("linear_fc1", backend.make_linear(spec))
    base = box.layer()
    base.requires_grad_(False)
    x = row.local("X", kind, t, rank, device).requires_grad_(True)
    grad = row.local("G", kind, t, rank, device)
    base_step = fwd_bwd(base, x, grad)
    lora_box = Container("linear_fc1", backend.make_linear(spec))
    lora_box = backend.apply_lora(lora_box, backend.validate_config(lora_config(row.r)), training=True)
    wrapped = backend.lora_modules(lora_box)["linear_fc1"]
    A_param, B_param = backend.adapter_weights(wrapped)
    with torch.no_grad():
        if backend.supports("full_adapter"):
            backend.load_full_adapter_weights(wrapped, row.A, row.B)
        else:
            A_param.copy_(row.local("A", kind, t, rank, device))
            B_param.copy_(row.local("B", kind, t, rank, device))
    return base_step, fwd_bwd(lora_box.layer(), x, grad)


def spread(values) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def bench_row(row, t, names, args, device, rank) -> dict:
    """Every implementation of `names` on `row`, interleaved, --rounds times; figures in ms."""
    steps, errors = {"F.linear": anchor_steps(row, t, rank, device)}, {}
    for name in names:
        try:
            steps[name] = implementation_steps(name, row, t, rank, device)
        except (Exception, SystemExit) as e:  # noqa: BLE001 - reported in the row (SystemExit: not installed)
            errors[name] = f"{type(e).__name__}: {e}"[:200]
    per_round = {name: {"base": [], "lora": [], "extra": []} for name in steps}
    for _ in range(args.rounds):
        for name, (base_step, lora_step) in steps.items():
            if lora_step is None:
                per_round[name]["base"].append(timer(base_step, args.warmup, args.repeats) * 1e3)
                continue
            base, lora, extra = paired_timer(base_step, lora_step, args.warmup, args.repeats)
            for key, value in (("base", base), ("lora", lora), ("extra", extra)):
                per_round[name][key].append(value * 1e3)
    result = {"errors": errors}
    for name, times in per_round.items():
        entry = {"base_ms": spread(times["base"])}
        if times["lora"]:
            entry.update(lora_ms=spread(times["lora"]), extra_ms=spread(times["extra"]),
                         ratio=spread([(base + extra) / base for base, extra in zip(times["base"], times["extra"])]))
        result[name] = entry
    return result


def profile_step(kind, h, ffn, r, t, device, dtype, lora: bool) -> str:
    """torch.profiler over 5 forward+backward steps: where the time goes, by op (self CUDA time)."""
    from torch.profiler import ProfilerActivity, profile

    state = parallel.initialize_model_parallel(t)
    base = make_base(kind, h, ffn, state.tp_group, dtype, device)
    base.weight.requires_grad_(False)
    layer = base
    if lora:
        box = torch.nn.Module()
        box.linear_fc1 = base
        lora_config(r)(box)
        layer = box.linear_fc1
    in_local = h if kind == "column" else ffn // t
    out_local = ffn // t if kind == "column" else h
    x = torch.randn(TOKENS, 1, in_local, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(TOKENS, 1, out_local, device=device, dtype=dtype)
    step = fwd_bwd(layer, x, grad)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall = time.perf_counter()
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - wall
    events = prof.key_averages()
    gpu = sum(e.self_device_time_total for e in events) / 5 / 1e3
    table = events.table(sort_by="self_cuda_time_total", row_limit=14, max_name_column_width=48)
    return f"{kind} TP={t} r={r} lora={lora}: wall {wall / 5 * 1e3:.3f} ms/step, GPU busy {gpu:.3f} ms/step\n{table}"


def bench_merge(args, device, dtype, t) -> dict:
    """merge_lora on 32 layers of qkv/proj/fc1/fc2 linears (H=4096, FFN=14336) at TP=t: the first
    merge of the process ("cold": allocator growth, library init) and one more on a fresh model."""
    return {"cold": merge_once(args, device, dtype, t), "warm": merge_once(args, device, dtype, t)}


def merge_once(args, device, dtype, t) -> float:
    state = parallel.initialize_model_parallel(t)
    h, ffn, layers = (4096, 14336, 32) if not args.small else (256, 512, 4)
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList()
    common = dict(bias=False, params_dtype=dtype, device=device, init_method="zero", tp_group=state.tp_group)
    for _ in range(layers):
        layer = torch.nn.Module()
        layer.linear_qkv = ColumnParallelLinear(h, 3 * h, **common)
        layer.linear_proj = RowParallelLinear(h, h, **common)
        layer.linear_fc1 = ColumnParallelLinear(h, 2 * ffn, stride=2, **common)
        layer.linear_fc2 = RowParallelLinear(ffn, h, **common)
        model.layers.append(layer)
    reference.LoRA(dim=16, lora_B_init_method="normal")(model)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    reference.merge_lora(model)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    return time.perf_counter() - start


def _summary(result: dict) -> dict:
    """One line per row: median extra ms and ratio of each implementation."""
    out = {k: result[k] for k in ("kind", "H", "FFN", "r", "tp")}
    for name in ("F.linear", *IMPLEMENTATIONS):
        if name in result and "extra_ms" in result[name]:
            out[name] = (round(result[name]["extra_ms"]["median"], 3), round(result[name]["ratio"]["median"], 3))
        elif name in result:
            out[name] = round(result[name]["base_ms"]["median"], 3)
    out["errors"] = result["errors"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke run)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30, help="timed steps per round (their median)")
    parser.add_argument("--rounds", type=int, default=5, help="times the interleaved set is repeated")
    parser.add_argument("--out", default=None, help="write the results as JSON")
    parser.add_argument("--peers", default="fast,mb,peft", help="comma list of implementations beside ours")
    parser.add_argument("--shapes", default="all", choices=["all", "first"], help="'first': 4096 x 14336 only")
    parser.add_argument("--profile", action="store_true", help="also profile one TP=2 step (GPU)")
    args = parser.parse_args()
    parallel.init_distributed()
    world, rank = dist.get_world_size(), dist.get_rank()
    device = parallel.default_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    global TOKENS
    if args.small:
        TOKENS = 256
    shapes = [(4096, 14336), (8192, 28672)] if not args.small else [(64, 224)]
    if args.shapes == "first":
        shapes = shapes[:1]
    rates = device_rates(device)
    names = [n for n in ("ours", *filter(None, args.peers.split(","))) if n in IMPLEMENTATIONS]
    rows = []
    seed = 0
    for h, ffn in shapes:
        for r in (16, 64):
            for t in (1, 2):
                if world % t:
                    continue
                for kind in ("column", "row"):
                    seed += 1
                    row = Row(kind, h, ffn, r, seed, dtype, device)
                    result = {"kind": kind, "H": h, "FFN": ffn, "r": r, "tp": t, "seed": seed,
                              **bench_row(row, t, [n for n in names if t == 1 or IMPLEMENTATIONS[n][2]], args,
                                          device, rank)}
                    result["floor_extra_ms"] = lora_floor(kind, h, ffn, r, t, rates) * 1e3
                    rows.append(result)
                    if rank == 0:
                        print(json.dumps(_summary(result)), flush=True)
                    del row
                    torch.cuda.empty_cache() if device.type == "cuda" else None
    merge_s = {f"tp{t}": bench_merge(args, device, dtype, t) for t in (1, 2) if world % t == 0}
    if args.profile and device.type == "cuda" and world % 2 == 0:
        h, ffn = shapes[0]
        for kind in ("column", "row"):
            for lora in (False, True):
                text = profile_step(kind, h, ffn, 16, 2, device, dtype, lora)
                if rank == 0:
                    print(text, flush=True)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "world": world,
              "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."), "tokens": TOKENS,
              "rounds": args.rounds, "repeats": args.repeats,
              "rates": rates, "rows": rows, "merge_lora_s": merge_s}
    if rank == 0:
        print(json.dumps({"rates": rates, "merge_lora_s": merge_s}))
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    sys.exit(main())
