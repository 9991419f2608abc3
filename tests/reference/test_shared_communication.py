"""LoRALinear shares its base's collectives: the same math as the adapter communicating on its own,
and no activation-sized collective beyond the base's."""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import reference
import reference.parallel as P
from reference import ColumnParallelLinear, RowParallelLinear

from ..distributed import run_distributed
from ..helpers import assert_close, chunk, seeded

ROOT = Path(__file__).resolve().parents[2]

S, B, IN, OUT, R = 8, 2, 12, 16, 4


def _run(kind, sp, a2a, flag, share, dtype=torch.float64):
    """(output, input grad, A grad, B grad) of one step, all local."""
    state = P.get_parallel_state()
    r, t = state.tp_rank, state.tp_size
    common = dict(bias=True, sequence_parallel=sp, params_dtype=dtype)
    if kind == "column":
        base = ColumnParallelLinear(IN, OUT, gather_output=flag and not sp, stride=1 if flag else 2, **common)
    else:
        base = RowParallelLinear(IN, OUT, input_is_parallel=not flag or sp, skip_bias_add=flag, **common)
    base.load_full_weight(seeded((OUT, IN), 1, dtype), seeded((OUT,), 2, dtype))
    box = torch.nn.Module()
    box.linear_fc1 = base
    reference.LoRA(target_modules=["linear_fc1"], dim=R, alpha=8, a2a_experimental=a2a)(box)
    wrapped = box.linear_fc1
    wrapped.share_communication = share
    wrapped.adapter.load_full_weights(seeded((R, IN), 3, dtype), seeded((OUT, R), 4, dtype))
    X = seeded((S, B, IN), 5, dtype)
    if kind == "column":
        x = chunk(X, 0, r, t) if sp else X
    else:
        x = chunk(X, -1, r, t) if base.input_is_parallel else X
    x = x.clone().requires_grad_()
    y, _ = wrapped(x)
    (y * seeded(tuple(y.shape), 6, dtype)).sum().backward()
    return [y.detach(), x.grad, wrapped.adapter.linear_in.weight.grad, wrapped.adapter.linear_out.weight.grad]


def check_shared_equals_separate():
    P.initialize_model_parallel(dist.get_world_size())
    for kind, sp, a2a, flag in itertools.product(("column", "row"), (False, True), (False, True), (False, True)):
        if a2a and not (kind == "row" and sp):
            continue
        shared, separate = _run(kind, sp, a2a, flag, True), _run(kind, sp, a2a, flag, False)
        for got, want, what in zip(shared, separate, ("output", "input grad", "A grad", "B grad")):
            assert_close(got, want, msg=f"{what}: {kind} sp={sp} a2a={a2a} flag={flag}")


@pytest.mark.parametrize("world_size", [2, 4])
def test_shared_communication_gives_the_same_math(world_size):
    """[LORA-FWD-7] [LORA-FWD-1] [LORA-BWD-1] [LORA-BWD-2] shared and separate communication agree
    (output, input and adapter gradients) for column and row bases, with and without SP and a2a."""
    run_distributed(check_shared_equals_separate, world_size)


def _count_steps(world_size: int) -> dict:
    """tools/count_collectives.py --json under torchrun: (kind, sp, lora) -> counts."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={world_size}", str(ROOT / "tools" / "count_collectives.py"), "--json"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    return {(row["kind"], row["sp"], row["lora"]): row for row in rows}


@pytest.mark.parametrize("world_size", [2])
def test_lora_adds_no_activation_sized_collective(world_size):
    """[LORA-FWD-7] with shared communication LoRA adds only rank-sized collectives; separately it doubles
    the activation-sized ones (the check can fail)."""
    counts = _count_steps(world_size)
    for kind in ("column", "row"):
        for sp in (False, True):
            base = counts[(kind, sp, "none")]["activation_sized"]
            assert counts[(kind, sp, "shared")]["activation_sized"] == base, (kind, sp)
            assert counts[(kind, sp, "separate")]["activation_sized"] == 2 * base, (kind, sp)
