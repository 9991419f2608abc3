"""Column- and row-parallel linears against full-matrix float64 math on gathered tensors."""

import itertools

import pytest
import torch
import torch.distributed as dist

import reference.parallel as P
from reference import ColumnParallelLinear, RowParallelLinear

from ..conftest import WORLD_SIZES
from ..distributed import run_distributed
from ..helpers import all_reduce_sum, assert_close, chunk, device, seeded, strided_chunk

S, B, IN, OUT = 8, 2, 12, 16


def check_column(tp, sequence_parallel, bias, skip_bias_add, gather_output, stride, dtype):
    state = P.initialize_model_parallel(tensor_model_parallel_size=tp)
    r, t = state.tp_rank, state.tp_size
    layer = ColumnParallelLinear(IN, OUT, bias=bias, gather_output=gather_output,
                                 sequence_parallel=sequence_parallel, skip_bias_add=skip_bias_add,
                                 params_dtype=dtype, stride=stride)
    W, b = seeded((OUT, IN), 1), seeded((OUT,), 2)
    layer.load_full_weight(W.to(dtype), b.to(dtype) if bias else None)
    X, G = seeded((S, B, IN), 3), seeded((S, B, OUT), 4)

    x = (chunk(X, 0, r, t) if sequence_parallel else X).to(dtype).clone().requires_grad_()
    y, returned_bias = layer(x)

    Y = X @ W.T + (b if bias and not skip_bias_add else 0)               # (s, b, out) float64
    if gather_output:
        assert_close(y, Y, dtype)
        (y * G.to(dtype)).sum().backward()                               # replicated output: one loss
    else:
        assert_close(y, strided_chunk(Y, -1, r, t, stride), dtype)
        (y * strided_chunk(G, -1, r, t, stride).to(dtype)).sum().backward()
    if skip_bias_add and bias:
        assert_close(returned_bias, strided_chunk(b, 0, r, t, stride), dtype)
    else:
        assert returned_bias is None

    dX = G @ W                                                            # (s, b, in)
    assert_close(x.grad, chunk(dX, 0, r, t) if sequence_parallel else dX, dtype, scale=4)
    dW = G.reshape(-1, OUT).T @ X.reshape(-1, IN)                         # (out, in)
    assert_close(layer.weight.grad, strided_chunk(dW, 0, r, t, stride), dtype, scale=4)
    if bias and not skip_bias_add:
        assert_close(layer.bias.grad, strided_chunk(G.sum((0, 1)), 0, r, t, stride), dtype, scale=4)
    full_W, full_b = layer.full_weight()
    assert_close(full_W, W.to(dtype).to(full_W.device), dtype)
    if bias:
        assert_close(full_b, b, dtype)


def check_row(tp, sequence_parallel, bias, skip_bias_add, input_is_parallel, dtype):
    state = P.initialize_model_parallel(tensor_model_parallel_size=tp)
    r, t = state.tp_rank, state.tp_size
    layer = RowParallelLinear(IN, OUT, bias=bias, input_is_parallel=input_is_parallel,
                              sequence_parallel=sequence_parallel, skip_bias_add=skip_bias_add,
                              params_dtype=dtype)
    W, b = seeded((OUT, IN), 1), seeded((OUT,), 2)
    layer.load_full_weight(W.to(dtype), b.to(dtype) if bias else None)
    X, G = seeded((S, B, IN), 3), seeded((S, B, OUT), 4)

    x = (chunk(X, -1, r, t) if input_is_parallel else X).to(dtype).clone().requires_grad_()
    y, returned_bias = layer(x)
    Y = X @ W.T + (b if bias and not skip_bias_add else 0)
    if sequence_parallel:
        assert_close(y, chunk(Y, 0, r, t), dtype)
        (y * chunk(G, 0, r, t).to(dtype)).sum().backward()                # sharded output: summed losses
    else:
        assert_close(y, Y, dtype)
        (y * G.to(dtype)).sum().backward()
    if skip_bias_add and bias:
        assert_close(returned_bias, b, dtype)
    else:
        assert returned_bias is None

    dX = G @ W
    assert_close(x.grad, chunk(dX, -1, r, t) if input_is_parallel else dX, dtype, scale=4)
    dW = G.reshape(-1, OUT).T @ X.reshape(-1, IN)
    assert_close(layer.weight.grad, chunk(dW, -1, r, t), dtype, scale=4)
    if bias and not skip_bias_add:
        bias_grad = layer.bias.grad
        if sequence_parallel:   # the bias met only this rank's sequence shard: a partial gradient
            bias_grad = all_reduce_sum(bias_grad, state.tp_group)
        assert_close(bias_grad, G.sum((0, 1)), dtype, scale=4)
    full_W, full_b = layer.full_weight()
    assert_close(full_W, W, dtype)
    if bias:
        assert_close(full_b, b, dtype)


COLUMN_CASES = [c for c in itertools.product([False, True], [False, True], [False, True], [False, True], [1, 2])
                if not (c[2] and not c[1])      # skip_bias_add only matters with a bias
                and not (c[3] and c[4] > 1)]    # a strided output is never gathered
ROW_CASES = [c for c in itertools.product([False, True], [False, True], [False, True], [False, True])
             if not (c[0] and not c[3]) and not (c[2] and not c[1])]


def check_all_column(tp, dtype):
    for case in COLUMN_CASES:
        check_column(tp, *case, dtype)


def check_all_row(tp, dtype):
    for case in ROW_CASES:
        check_row(tp, *case, dtype)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_column_parallel_linear(world_size):
    """[TP-COL-1] [TP-COL-2] [TP-INIT-2] forward, backward and full/shard moves of the column layer,
    with and without SP, bias, skip_bias_add, gather_output and stride 2."""
    run_distributed(check_all_column, world_size, world_size, torch.float64)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_row_parallel_linear(world_size):
    """[TP-ROW-1] [TP-ROW-2] [TP-INIT-2] the same for the row layer."""
    run_distributed(check_all_row, world_size, world_size, torch.float64)


@pytest.mark.parametrize("world_size", [2, 4])
def test_layers_float32_and_smaller_tp(world_size):
    """[TP-COL-1] [TP-ROW-1] float32, and a TP group smaller than the world (TP=2 inside world 4)."""
    run_distributed(check_all_column, world_size, 2, torch.float32)
    run_distributed(check_all_row, world_size, 2, torch.float32)


def check_init_is_tp_invariant(methods):
    fulls = []
    for tp in sorted({1, dist.get_world_size()}):
        P.initialize_model_parallel(tensor_model_parallel_size=tp)
        per_tp = []
        for method in methods:
            torch.manual_seed(1234)
            col = ColumnParallelLinear(IN, OUT, init_method=method, stride=2)
            row = RowParallelLinear(IN, OUT, init_method=method)
            after = torch.rand(1)   # the generator must advance the same at every TP
            per_tp.append((col.full_weight()[0], row.full_weight()[0], after))
        fulls.append(per_tp)
    for per_tp in fulls[1:]:
        for (c, r_, a), (c1, r1, a1) in zip(per_tp, fulls[0]):
            assert torch.equal(c, c1) and torch.equal(r_, r1) and torch.equal(a, a1)
    # Fans come from the full matrix: xavier's std is sqrt(2 / (in + out)).
    return [float(w.std()) for w, _, _ in fulls[-1]]


@pytest.mark.parametrize("world_size", [2, 4])
def test_init_is_the_same_full_matrix_at_every_tp(world_size):
    """[TP-INIT-1] same seed => identical full weights at TP=1 and TP=world, bit for bit."""
    stds = run_distributed(check_init_is_tp_invariant, world_size, ["xavier", "kaiming", "normal", "zero"])[0]
    assert abs(stds[0] - (2 / (IN + OUT)) ** 0.5) < 0.08
    assert abs(stds[2] - 0.2) < 0.05 and stds[3] == 0.0


def check_bad_layer_inputs():
    t = dist.get_world_size()
    P.initialize_model_parallel(tensor_model_parallel_size=t)
    errors = {}

    def expect(key, match, fn):
        with pytest.raises(ValueError, match=match) as info:
            fn()
        errors[key] = str(info.value)

    expect("col_out", r"output_size \(\d\) must be divisible", lambda: ColumnParallelLinear(4, 6 if t == 4 else 3))
    expect("row_in", r"input_size \(\d\) must be divisible", lambda: RowParallelLinear(6 if t == 4 else 3, 4))
    expect("size", "input_size must be a positive integer", lambda: ColumnParallelLinear(0, 8))
    expect("init", r"init_method must be one of \['xavier'", lambda: ColumnParallelLinear(8, 8, init_method="he"))
    expect("sp_row", "requires input_is_parallel=True",
           lambda: RowParallelLinear(8, 8, input_is_parallel=False, sequence_parallel=True))
    col = ColumnParallelLinear(8, 8)
    expect("col_x", "input must have last dim 8", lambda: col(torch.zeros(4, 2, 7)))
    row = RowParallelLinear(8, 8, sequence_parallel=True)
    expect("row_sp_seq", "sequence length", lambda: row(torch.zeros(t * 2 + 1, 2, 8 // t)))
    col_sp = ColumnParallelLinear(8, 8, sequence_parallel=True)
    expect("col_sp_dims", "must be 3-D", lambda: col_sp(torch.zeros(4, 8)))
    expect("load", r"weight must have shape \(8, 8\)", lambda: col.load_full_weight(torch.zeros(8, 4)))
    expect("stride_gather", "gather_output=True requires stride=1",
           lambda: ColumnParallelLinear(8, 8, gather_output=True, stride=2))
    expect("dtype", "params_dtype must be a floating", lambda: ColumnParallelLinear(8, 8, params_dtype=torch.int32))
    expect("stride0", "stride must be a positive integer", lambda: ColumnParallelLinear(8, 8, stride=0))
    # After all those errors the group still works: nothing was left half-communicated.
    assert all_reduce_sum(torch.ones(1, device=device())).item() == t
    return errors


@pytest.mark.parametrize("world_size", [2, 4])
def test_bad_inputs_raise_clear_errors_on_every_rank(world_size):
    """[TP-ERR-1] bad sizes, shapes and options raise ValueError naming the argument, on every rank."""
    errors = run_distributed(check_bad_layer_inputs, world_size)
    assert all(e == errors[0] for e in errors)
