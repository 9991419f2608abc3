"""Each collective, forward and backward, against full-tensor float64 math.

Convention for gradients (Megatron's): a sharded output contributes L_r = <out_r, G_r> on each rank
and the loss is the sum over ranks; a replicated output has one loss L = <out, G>, the same on every
rank. The expected input gradient is then derived from the full tensors, on every rank.
"""

import pytest
import torch
import torch.distributed as dist

import reference.parallel as P

from ..conftest import WORLD_SIZES
from ..distributed import run_distributed
from ..helpers import assert_close, chunk, seeded

S, B, H = 8, 3, 12  # divisible by 1, 2 and 4


def _setup(dtype):
    state = P.initialize_model_parallel(tensor_model_parallel_size=dist.get_world_size())
    return state.tp_rank, state.tp_size


def _per_rank_full(seed, t, shape, dtype):
    """One full tensor per rank, known to every rank: [X_0, ..., X_{t-1}]."""
    return [seeded(shape, seed + q, dtype) for q in range(t)]


def check_copy_to(dtype):
    r, t = _setup(dtype)
    x = seeded((S, B, H), 1, dtype).requires_grad_()
    grads = _per_rank_full(100, t, (S, B, H), dtype)                      # G_q, one per rank
    out = P.copy_to_tensor_parallel_region(x)
    assert_close(out, x.detach())
    (out * grads[r]).sum().backward()
    assert_close(x.grad, sum(grads))                                      # d/dx sum_q <x, G_q>


def check_reduce_from(dtype):
    r, t = _setup(dtype)
    xs = _per_rank_full(1, t, (S, B, H), dtype)
    x = xs[r].clone().requires_grad_()
    out = P.reduce_from_tensor_parallel_region(x)
    assert_close(out, sum(xs))
    g = seeded((S, B, H), 100, dtype)
    (out * g).sum().backward()
    assert_close(x.grad, g)


def check_scatter_to_tp(dtype):
    r, t = _setup(dtype)
    x = seeded((S, B, H), 1, dtype).requires_grad_()
    g = seeded((S, B, H), 100, dtype)
    out = P.scatter_to_tensor_parallel_region(x)
    assert_close(out, chunk(x.detach(), -1, r, t))
    (out * chunk(g, -1, r, t)).sum().backward()
    assert_close(x.grad, g)


def check_gather_from_tp(dtype):
    r, t = _setup(dtype)
    full = seeded((S, B, H), 1, dtype)
    x = chunk(full, -1, r, t).clone().requires_grad_()
    out = P.gather_from_tensor_parallel_region(x)
    assert_close(out, full)
    g = seeded((S, B, H), 100, dtype)
    (out * g).sum().backward()
    assert_close(x.grad, chunk(g, -1, r, t))


def check_gather_from_sp(dtype, tensor_parallel_output_grad):
    r, t = _setup(dtype)
    full = seeded((S, B, H), 1, dtype)
    x = chunk(full, 0, r, t).clone().requires_grad_()
    out = P.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=tensor_parallel_output_grad)
    assert_close(out, full)
    if tensor_parallel_output_grad:     # each rank's consumer is a TP shard: partial grads, summed
        grads = _per_rank_full(100, t, (S, B, H), dtype)
        (out * grads[r]).sum().backward()
        assert_close(x.grad, chunk(sum(grads), 0, r, t))
    else:                               # the consumer is replicated: one loss
        g = seeded((S, B, H), 100, dtype)
        (out * g).sum().backward()
        assert_close(x.grad, chunk(g, 0, r, t))


def check_scatter_to_sp(dtype):
    r, t = _setup(dtype)
    x = seeded((S, B, H), 1, dtype).requires_grad_()
    g = seeded((S, B, H), 100, dtype)
    out = P.scatter_to_sequence_parallel_region(x)
    assert_close(out, chunk(x.detach(), 0, r, t))
    (out * chunk(g, 0, r, t)).sum().backward()
    assert_close(x.grad, g)


def check_reduce_scatter_to_sp(dtype):
    r, t = _setup(dtype)
    xs = _per_rank_full(1, t, (S, B, H), dtype)
    x = xs[r].clone().requires_grad_()
    g = seeded((S, B, H), 100, dtype)
    out = P.reduce_scatter_to_sequence_parallel_region(x)
    assert_close(out, chunk(sum(xs), 0, r, t))
    (out * chunk(g, 0, r, t)).sum().backward()
    assert_close(x.grad, g)


def check_all_to_all_hidden_to_sequence(dtype):
    r, t = _setup(dtype)
    full = seeded((S, B, H), 1, dtype)
    x = chunk(full, -1, r, t).clone().requires_grad_()                    # (s, b, h/t)
    out = P.all_to_all_hidden_to_sequence_parallel_region(x)              # (s/t, b, h)
    assert_close(out, chunk(full, 0, r, t))
    g = seeded((S, B, H), 100, dtype)
    (out * chunk(g, 0, r, t)).sum().backward()
    assert_close(x.grad, chunk(g, -1, r, t))


def check_all_to_all_sequence_to_hidden(dtype):
    r, t = _setup(dtype)
    full = seeded((S, B, H), 1, dtype)
    x = chunk(full, 0, r, t).clone().requires_grad_()                     # (s/t, b, h)
    out = P.all_to_all_sequence_to_hidden_parallel_region(x)              # (s, b, h/t)
    assert_close(out, chunk(full, -1, r, t))
    g = seeded((S, B, H), 100, dtype)
    (out * chunk(g, -1, r, t)).sum().backward()
    assert_close(x.grad, chunk(g, 0, r, t))


CHECKS = {
    "copy_to_tensor_parallel_region": (check_copy_to, ()),
    "reduce_from_tensor_parallel_region": (check_reduce_from, ()),
    "scatter_to_tensor_parallel_region": (check_scatter_to_tp, ()),
    "gather_from_tensor_parallel_region": (check_gather_from_tp, ()),
    "gather_from_sequence_parallel_region[reduce_scatter_grad]": (check_gather_from_sp, (True,)),
    "gather_from_sequence_parallel_region[split_grad]": (check_gather_from_sp, (False,)),
    "scatter_to_sequence_parallel_region": (check_scatter_to_sp, ()),
    "reduce_scatter_to_sequence_parallel_region": (check_reduce_scatter_to_sp, ()),
    "all_to_all_hidden_to_sequence_parallel_region": (check_all_to_all_hidden_to_sequence, ()),
    "all_to_all_sequence_to_hidden_parallel_region": (check_all_to_all_sequence_to_hidden, ()),
}


def check_all(dtype):
    for fn, args in CHECKS.values():
        fn(dtype, *args)


@pytest.mark.parametrize("name", sorted(CHECKS))
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_collective_forward_backward(world_size, name):
    """[TP-COLL-1] each collective and its backward match the full-tensor math."""
    fn, args = CHECKS[name]
    run_distributed(fn, world_size, torch.float64, *args)


@pytest.mark.parametrize("world_size", [2])
def test_collectives_float32(world_size):
    """[TP-COLL-1] the same checks in float32."""
    run_distributed(check_all, world_size, torch.float32)


def check_bad_shapes():
    _setup(torch.float32)
    t = dist.get_world_size()
    odd = torch.zeros(t * 2 + 1, 2, t * 2 + 1)
    messages = []
    for fn in (P.scatter_to_tensor_parallel_region, P.scatter_to_sequence_parallel_region,
               P.reduce_scatter_to_sequence_parallel_region, P.all_to_all_hidden_to_sequence_parallel_region,
               P.all_to_all_sequence_to_hidden_parallel_region):
        with pytest.raises(ValueError, match="must be divisible by the") as info:
            fn(odd)
        messages.append(str(info.value))
    return messages


@pytest.mark.parametrize("world_size", [2, 4])
def test_collective_bad_shape_raises_on_every_rank(world_size):
    """[TP-ERR-1] a shape that does not divide raises ValueError on every rank, before communicating."""
    messages = run_distributed(check_bad_shapes, world_size)
    assert all(m == messages[0] for m in messages)   # the same error on every rank
    assert "sequence length (dim 0)" in messages[0][1]
