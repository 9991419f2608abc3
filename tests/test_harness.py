"""The multi-process harness itself: a raising, hanging or dying rank fails the test, named."""

import os
import time

import pytest
import torch
import torch.distributed as dist

from .distributed import RankFailed, run_distributed
from .helpers import device


def raise_on_rank_one():
    if dist.get_rank() == 1:
        raise RuntimeError("boom on purpose")
    return dist.get_rank()


def hang_on_rank_zero():
    if dist.get_rank() == 0:
        time.sleep(3600)
    return 1


def one_rank_skips_the_collective():
    if dist.get_rank() != 0:
        dist.all_reduce(torch.ones(1, device=device()))   # rank 0 never joins: the others block
    return 1


def die_on_rank_one():
    if dist.get_rank() == 1:
        os._exit(3)
    return 1


def ranks():
    return dist.get_rank()


@pytest.mark.parametrize("world_size", [2, 4])
def test_results_in_rank_order(world_size):
    assert run_distributed(ranks, world_size) == list(range(world_size))


def test_a_raising_rank_is_named_with_its_traceback():
    with pytest.raises(RankFailed, match=r"(?s)rank 1 raised.*boom on purpose"):
        run_distributed(raise_on_rank_one, 2, timeout=30)
    assert run_distributed(ranks, 2) == [0, 1]   # a fresh pool serves the next call


def test_a_hanging_rank_fails_by_timeout():
    start = time.monotonic()
    with pytest.raises(RankFailed, match=r"rank\(s\) \[0\] gave no answer within 3 s"):
        run_distributed(hang_on_rank_zero, 2, timeout=3)
    assert time.monotonic() - start < 20


def test_a_stuck_collective_fails_by_timeout():
    with pytest.raises(RankFailed, match=r"rank\(s\) \[1\] gave no answer"):
        run_distributed(one_rank_skips_the_collective, 2, timeout=3)


def test_a_dying_rank_is_reported():
    with pytest.raises(RankFailed, match=r"rank\(s\) \[1\] died \(exit codes \[3\]\)"):
        run_distributed(die_on_rank_one, 2, timeout=30)
