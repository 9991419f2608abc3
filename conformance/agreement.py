"""Agreeing across ranks on small values without object collectives.

torch.distributed's object collectives (an all-gather of Python objects) pickle through numpy, which
torch does not depend on (nor do we). The suite only ever exchanges a few short fields (an error's
type and message, where it was raised), so it encodes them as JSON bytes in a uint8 tensor and
gathers those: two all-gathers, the lengths first, then the bytes padded to the longest.
"""

from __future__ import annotations

import json
import time

import torch
import torch.distributed as dist

# A rank that raised waits this long at the agreement for the others before it releases them: one
# still inside a collective with it would otherwise wait there until the collective's timeout.
RELEASE_AFTER_S = 0.5


def all_gather_json(value, group) -> list:
    """Every rank's `value` (anything `json.dumps` takes), in rank order.

    Tuples come back as lists, on the calling rank too, so the entries compare equal across ranks.
    `group` must be a gloo group: the tensors stay on the CPU.
    """
    encoded = json.dumps(value).encode("utf-8")                          # never empty: "null" at least
    size = dist.get_world_size(group)
    if size == 1:
        return [json.loads(encoded)]
    payload = torch.frombuffer(bytearray(encoded), dtype=torch.uint8)   # (n,)
    lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(size)]
    dist.all_gather(lengths, torch.tensor([payload.numel()], dtype=torch.int64), group=group)
    longest = max(int(n.item()) for n in lengths)
    padded = torch.zeros(longest, dtype=torch.uint8)                     # (longest,)
    padded[:payload.numel()] = payload
    parts = [torch.empty(longest, dtype=torch.uint8) for _ in range(size)]
    dist.all_gather(parts, padded, group=group)
    return [json.loads(bytes(part[:int(n.item())].tolist()).decode("utf-8")) for part, n in zip(parts, lengths)]


def meet(group, raised: bool, release, after_s: float = RELEASE_AFTER_S) -> bool:
    """A barrier on `group` (gloo). A rank that `raised` and still waits after `after_s` calls
    `release()` once (it closes the groups a peer may be blocked in, so that peer's collective fails at
    once) and keeps waiting. Returns whether this rank released."""
    if dist.get_world_size(group) == 1:
        return False
    work = dist.barrier(group=group, async_op=True)
    deadline = time.monotonic() + after_s
    while raised and not work.is_completed():
        if time.monotonic() > deadline:
            release()
            work.wait()
            return True
        time.sleep(0.002)
    work.wait()
    return False


def closed_by_peer(summary: str) -> bool:
    """Whether an error is what a collective raises when a peer closed the group (released it, or died)."""
    text = summary.lower()
    return "closed by peer" in text or "reset by peer" in text
