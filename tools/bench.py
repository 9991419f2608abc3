"""What LoRA costs on top of its base layer: the reference, Megatron-Bridge and HF PEFT, side by side.

    torchrun --standalone --nproc-per-node 2 tools/bench.py --out bench.json            # GPU (NCCL): the real sizes
    torchrun --standalone --nproc-per-node 2 tools/bench.py --small                     # CPU smoke run

For a column base (H -> FFN) and a row base (FFN -> H), bf16, 8192 tokens, H x FFN in
{4096 x 14336, 8192 x 28672}, r in {16, 64}, TP in {1, 2}: the median time of forward + backward of
(a) the frozen base alone (its input requires grad, so backward computes the input gradient only),
(b) the base with LoRA, and b / a. Timed with CUDA events after warm-up; each rank of a TP group
runs its shard. Megatron-Bridge runs when megatron-core and megatron-bridge import (see
conformance/backends/megatron_bridge.py); PEFT at TP = 1 when `peft` imports.

The floor beside each row is what LoRA must add at the least: its extra FLOPs over the measured
matmul rate plus its extra bytes (reading x again, writing and adding the update, the gradients)
over the measured copy bandwidth.
Also: merge_lora on a 32-layer H=4096 stack of linears at the current TP, and (with --suite) the
conformance suite's default profile.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import reference  # noqa: E402
from reference import parallel  # noqa: E402
from reference.layers import ColumnParallelLinear, RowParallelLinear  # noqa: E402
from conformance.backend import LinearSpec  # noqa: E402
from conformance.backends.megatron_bridge import MegatronBridgeBackend  # noqa: E402

TOKENS = 8192


def timer(fn, warmup: int, repeats: int) -> float:
    """Median seconds of fn() (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    cuda = torch.cuda.is_available()
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    if dist.is_initialized():   # every rank reports the slowest rank's median
        median = torch.tensor([statistics.median(times)], device=parallel.default_device())
        dist.all_reduce(median, op=dist.ReduceOp.MAX)
        return float(median)
    return statistics.median(times)


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


def base_and_lora_times(base, apply_lora, kind, h, ffn, t, args, device, dtype):
    """Median fwd+bwd seconds of the frozen base alone, then with LoRA applied by apply_lora(container)."""
    in_local = h if kind == "column" else ffn // t
    out_local = ffn // t if kind == "column" else h
    x = torch.randn(TOKENS, 1, in_local, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(TOKENS, 1, out_local, device=device, dtype=dtype)
    base.weight.requires_grad_(False)
    a = timer(fwd_bwd(base, x, grad), args.warmup, args.repeats)
    container = torch.nn.Module()
    container.linear_fc1 = base
    apply_lora(container)
    b = timer(fwd_bwd(container.linear_fc1, x, grad), args.warmup, args.repeats)
    return a, b


def lora_config(r: int):
    return reference.LoRA(target_modules=["linear_fc1"], dim=r, alpha=2 * r, lora_B_init_method="normal")


def bench_reference(kind, h, ffn, r, t, args, device, dtype):
    state = parallel.initialize_model_parallel(t)
    base = make_base(kind, h, ffn, state.tp_group, dtype, device)
    torch.nn.init.normal_(base.weight, std=0.02)
    return base_and_lora_times(base, lora_config(r), kind, h, ffn, t, args, device, dtype)


def bench_megatron_bridge(kind, h, ffn, r, t, args, device, dtype):
    backend = MegatronBridgeBackend()
    groups = backend.init_parallel(t)
    in_f, out_f = (h, ffn) if kind == "column" else (ffn, h)
    spec = LinearSpec(kind=kind, in_features=in_f, out_features=out_f,
                      weight=torch.zeros(out_f, in_f, dtype=dtype), dtype=dtype, groups=groups)
    base = backend.make_linear(spec)
    return base_and_lora_times(base, lambda box: backend.apply_lora(box, lora_config(r)),
                               kind, h, ffn, t, args, device, dtype)


def bench_peft(kind, h, ffn, r, args, device, dtype):
    import peft

    in_f, out_f = (h, ffn) if kind == "column" else (ffn, h)
    container = torch.nn.Module()
    container.linear_fc1 = torch.nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype)
    container.linear_fc1.weight.requires_grad_(False)
    x = torch.randn(TOKENS, 1, in_f, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(TOKENS, 1, out_f, device=device, dtype=dtype)
    a = timer(fwd_bwd(container.linear_fc1, x, grad), args.warmup, args.repeats)
    peft.inject_adapter_in_model(peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["linear_fc1"],
                                                 init_lora_weights=False), container)
    b = timer(fwd_bwd(container.linear_fc1, x, grad), args.warmup, args.repeats)
    return a, b


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


def bench_merge(args, device, dtype, t) -> float:
    """merge_lora on 32 layers of qkv/proj/fc1/fc2 linears (H=4096, FFN=14336) at TP=t."""
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke run)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default=None, help="write the results as JSON")
    parser.add_argument("--peers", default="megatron_bridge,peft", help="comma list of peers to run")
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
    peers = set(filter(None, args.peers.split(",")))
    rows = []
    for h, ffn in shapes:
        for r in (16, 64):
            for t in (1, 2):
                if world % t:
                    continue
                for kind in ("column", "row"):
                    row = {"kind": kind, "H": h, "FFN": ffn, "r": r, "tp": t}
                    row["ours_base_ms"], row["ours_lora_ms"] = (v * 1e3 for v in bench_reference(kind, h, ffn, r, t, args, device, dtype))
                    if "megatron_bridge" in peers:
                        try:
                            row["mb_base_ms"], row["mb_lora_ms"] = (v * 1e3 for v in bench_megatron_bridge(kind, h, ffn, r, t, args, device, dtype))
                        except Exception as e:  # noqa: BLE001 - reported in the row
                            row["mb_error"] = f"{type(e).__name__}: {e}"[:200]
                    if "peft" in peers and t == 1:
                        try:
                            row["peft_base_ms"], row["peft_lora_ms"] = (v * 1e3 for v in bench_peft(kind, h, ffn, r, args, device, dtype))
                        except Exception as e:  # noqa: BLE001
                            row["peft_error"] = f"{type(e).__name__}: {e}"[:200]
                    row["floor_extra_ms"] = lora_floor(kind, h, ffn, r, t, rates) * 1e3
                    for who in ("ours", "mb", "peft"):
                        if f"{who}_base_ms" in row:
                            row[f"{who}_ratio"] = row[f"{who}_lora_ms"] / row[f"{who}_base_ms"]
                    row["floor_ratio"] = 1 + row["floor_extra_ms"] / row["ours_base_ms"]
                    rows.append(row)
                    if rank == 0:
                        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
                    torch.cuda.empty_cache() if device.type == "cuda" else None
    merge_s = {f"tp{t}": bench_merge(args, device, dtype, t) for t in (2,) if world % t == 0}
    if args.profile and device.type == "cuda" and world % 2 == 0:
        h, ffn = shapes[0]
        for kind in ("column", "row"):
            for lora in (False, True):
                text = profile_step(kind, h, ffn, 16, 2, device, dtype, lora)
                if rank == 0:
                    print(text, flush=True)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "world": world,
              "torch": torch.__version__, "tokens": TOKENS, "rates": rates, "rows": rows, "merge_lora_s": merge_s}
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
