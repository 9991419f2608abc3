"""Where LoRA's extra cost goes: one layer's forward + backward written as bare tensor ops, in the
orders a fused implementation can choose (GPU; the reasoning behind reference/fast/fused.py).

    python tools/bench_orders.py --out orders.json        # one GPU; bf16, 8192 tokens, r = 16

Each variant computes y = x Wᵀ + s·(x Aᵀ) Bᵀ and the gradients of x, A and B (W frozen) from the same
tensors (W ~ N(0, 0.02), A, B, x, g seeded). Its extra time over the bare base step (x Wᵀ and g W) is
measured in pairs: base and variant alternate, and each pair's difference is kept, so that clock
drift cancels; --rounds repeats give min / median / max of the per-round medians.

    separate        autograd's order: x Wᵀ, then s·h Bᵀ as a new tensor, then an add (the reference)
    base_first      x Wᵀ, then the update added by a rank-r GEMM into it (addmm_, beta = 1)
    update_first    s·h Bᵀ first, then the base GEMM accumulates into it (beta = 1: its epilogue adds);
                    backward likewise: dL/dh A first, then g W accumulates into it (the fast path)
    out_of_place    torch.addmm(x Wᵀ, s·h, Bᵀ): a third (n, out) tensor
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import paired_timer  # noqa: E402 - tools/bench.py's pairs: base and variant alternate


def paired_extra(base, variant, warmup: int, repeats: int) -> float:
    """Median over `repeats` pairs of (variant ms - base ms), the two alternating."""
    return paired_timer(base, variant, warmup, repeats)[2] * 1e3


def variants(W, A, B, x, g, s):
    """name -> one forward + backward (no autograd: the ops themselves)."""

    def separate():
        h = x @ A.t()
        y = x @ W.t() + (h * s) @ B.t()
        gh = (g @ B) * s
        gB, gA = g.t() @ (h * s), gh.t() @ x
        gx = g @ W
        gx += gh @ A
        return y, gx, gA, gB

    def base_first():
        h = x @ A.t()
        y = (x @ W.t()).addmm_(h, B.t(), alpha=s)
        gh = (g @ B) * s
        gB, gA = (g.t() @ h) * s, gh.t() @ x
        gx = (g @ W).addmm_(gh, A)
        return y, gx, gA, gB

    def update_first():
        h = x @ A.t()
        y = ((h * s) @ B.t()).addmm_(x, W.t())
        gh = (g @ B) * s
        gx = (gh @ A).addmm_(g, W)
        gB, gA = (g.t() @ h) * s, gh.t() @ x
        return y, gx, gA, gB

    def out_of_place():
        h = x @ A.t()
        y = torch.addmm(x @ W.t(), h, B.t(), alpha=s)
        gh = (g @ B) * s
        gB, gA = (g.t() @ h) * s, gh.t() @ x
        gx = torch.addmm(g @ W, gh, A)
        return y, gx, gA, gB

    return {"separate": separate, "base_first": base_first, "update_first": update_first,
            "out_of_place": out_of_place}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--out", default=None, help="write the results as JSON")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("tools/bench_orders.py needs a GPU", file=sys.stderr)
        return 2
    device, dtype, n, r, s = "cuda", torch.bfloat16, args.tokens, args.rank, 2.0
    rows = []
    for in_f, out_f in ((4096, 14336), (14336, 4096), (8192, 28672), (28672, 8192)):
        gen = torch.Generator().manual_seed(in_f + out_f)
        W = (0.02 * torch.randn(out_f, in_f, generator=gen)).to(device, dtype)
        A = (torch.randn(r, in_f, generator=gen) / in_f ** 0.5).to(device, dtype)
        B = (torch.randn(out_f, r, generator=gen) / r ** 0.5).to(device, dtype)
        x = torch.randn(n, in_f, generator=gen).to(device, dtype)
        g = torch.randn(n, out_f, generator=gen).to(device, dtype)

        def base():
            return x @ W.t(), g @ W

        want = variants(W.double(), A.double(), B.double(), x.double(), g.double(), s)["separate"]()
        row = {"in": in_f, "out": out_f}
        for name, fn in variants(W, A, B, x, g, s).items():
            got = fn()          # the same math as float64, within bf16 rounding
            assert all(torch.allclose(a.double(), b, rtol=5e-2, atol=5e-2 * b.abs().max().item())
                       for a, b in zip(got, want)), name
            extra = [paired_extra(base, fn, 5, args.repeats) for _ in range(args.rounds)]
            row[name] = {"min": min(extra), "median": statistics.median(extra), "max": max(extra)}
        rows.append(row)
        print(json.dumps({k: (round(v["median"], 3) if isinstance(v, dict) else v) for k, v in row.items()}),
              flush=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": n, "rank": r,
              "rounds": args.rounds, "repeats": args.repeats, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
