"""Count the collectives (and their sizes) of one forward + backward step of a LoRA layer.

    torchrun --standalone --nproc-per-node 2 tools/count_collectives.py [--json]

For each base kind and layout it prints, for the frozen base alone, for LoRA with the adapter
communicating on its own (Megatron-Bridge's way), and for LoRA sharing the base's collectives (the
reference's default, LoRALinear.share_communication): the number of collectives and the elements
they move. "Activation-sized" ones move at least s·b·min(in, out)/t elements; the others move
rank-sized tensors (s·b·r). With --json, rank 0 prints the rows as one JSON list instead (the
project's test of [LORA-FWD-7] reads it).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import reference  # noqa: E402
from reference import parallel  # noqa: E402
from reference.layers import ColumnParallelLinear, RowParallelLinear  # noqa: E402
from conformance.collectives_counter import counting  # noqa: E402

def one_step(kind: str, sequence_parallel: bool, lora: str, s=8, b=2, h=16, ffn=32, r=4, tp_group=None):
    """Collectives of one fwd+bwd step. lora: "none", "separate" or "shared"."""
    t = dist.get_world_size(tp_group)
    common = dict(bias=False, sequence_parallel=sequence_parallel, init_method="xavier", tp_group=tp_group)
    base = ColumnParallelLinear(h, ffn, **common) if kind == "column" else RowParallelLinear(ffn, h, **common)
    container = torch.nn.Module()
    container.linear_fc1 = base
    if lora != "none":
        reference.LoRA(target_modules=["linear_fc1"], dim=r, lora_B_init_method="normal")(container)
        container.linear_fc1.share_communication = lora == "shared"
    device = parallel.default_device()
    in_local = h if kind == "column" else ffn // t
    seq = s // t if (kind == "column" and sequence_parallel) else s
    x = torch.randn(seq, b, in_local, device=device, requires_grad=True)
    with counting() as calls:
        out, _ = container.linear_fc1(x)
        out.sum().backward()
    threshold = s * b * min(h, ffn) // t
    big = sum(1 for _, n in calls if n >= threshold)
    return {"collectives": len(calls), "activation_sized": big, "elements": sum(n for _, n in calls),
            "by_op": dict(Counter(name for name, _ in calls))}


def main() -> int:
    parallel.init_distributed()
    state = parallel.initialize_model_parallel(dist.get_world_size())
    rows = []
    for kind in ("column", "row"):
        for sp in (False, True):
            for lora in ("none", "separate", "shared"):
                rows.append((kind, sp, lora, one_step(kind, sp, lora, tp_group=state.tp_group)))
    if dist.get_rank() == 0 and "--json" in sys.argv[1:]:
        print(json.dumps([{"kind": kind, "sp": sp, "lora": lora, **c} for kind, sp, lora, c in rows]))
    elif dist.get_rank() == 0:
        print(f"TP = {state.tp_size}; s=8, b=2, h=16, ffn=32, r=4")
        print(f"{'base':<7} {'SP':<5} {'LoRA':<9} {'collectives':>11} {'activation-sized':>16} {'elements':>9}  ops")
        for kind, sp, lora, c in rows:
            print(f"{kind:<7} {str(sp):<5} {lora:<9} {c['collectives']:>11} {c['activation_sized']:>16} "
                  f"{c['elements']:>9}  {c['by_op']}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
