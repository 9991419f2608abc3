"""Process-group layout and its errors."""

import pytest
import torch.distributed as dist

import reference.parallel as P

from ..distributed import run_distributed


def layout(tp, ep, etp):
    state = P.initialize_model_parallel(tp, ep, etp)
    ranks = lambda g: dist.get_process_group_ranks(g)  # noqa: E731
    return {"tp": ranks(state.tp_group), "dp": ranks(state.dp_group), "ep": ranks(state.ep_group),
            "etp": ranks(state.expert_tp_group),
            "sizes": (state.tp_size, state.dp_size, state.ep_size, state.expert_tp_size),
            "ranks": (state.tp_rank, state.dp_rank, state.ep_rank, state.expert_tp_rank)}


@pytest.mark.parametrize("world_size", [4])
def test_group_layout(world_size):
    """[TP-GROUP-1] world 4: TP=2 -> TP {0,1} {2,3}, DP {0,2} {1,3}; EP=2 with expert TP=2 -> EP {0,2}."""
    by_rank = run_distributed(layout, 4, 2, 2, None)
    assert [r["tp"] for r in by_rank] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["dp"] for r in by_rank] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert [r["etp"] for r in by_rank] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [r["ep"] for r in by_rank] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert by_rank[3]["sizes"] == (2, 2, 2, 2) and by_rank[3]["ranks"] == (1, 1, 1, 1)
    # EP=4 with expert TP=1: one EP group of everyone, expert-TP groups of one.
    by_rank = run_distributed(layout, 4, 1, 4, 1)
    assert all(r["ep"] == [0, 1, 2, 3] and r["etp"] == [r["ranks"][2]] for r in by_rank)
    assert [r["dp"] for r in by_rank] == [[0, 1, 2, 3]] * 4


def bad_sizes():
    messages = []
    for args, match in [((3,), r"tensor_model_parallel_size \(3\) must divide the world size \(4\)"),
                        ((1, 3), r"expert_model_parallel_size \* expert_tensor_parallel_size \(3 \* 1\)"),
                        ((0,), "tensor_model_parallel_size must be a positive integer")]:
        with pytest.raises(ValueError, match=match) as info:
            P.initialize_model_parallel(*args)
        messages.append(str(info.value))
    return messages


@pytest.mark.parametrize("world_size", [4])
def test_bad_sizes(world_size):
    """[TP-GROUP-1] [TP-ERR-1] sizes that do not divide the world raise ValueError on every rank."""
    messages = run_distributed(bad_sizes, 4)
    assert all(m == messages[0] for m in messages)
