"""The LoRA adapter beside column, row and plain linear bases, against full-matrix float64 math.

Every rank knows the FULL tensors (weights, adapter factors, input, output gradient) in float64; the
expectation is computed from them and compared with this rank's shard of the result, in the layout
the base uses (replicated, sequence shard or hidden shard). Gathers in this file use
torch.distributed directly, never the reference's own helpers.
"""

import itertools

import pytest
import torch
import torch.distributed as dist
from torch import nn

from conformance.layout import piece, shard_of
import reference.parallel as P
from reference import ColumnParallelLinear, LoRA, LoRALinear, RowParallelLinear, TinyGPT, TinyGPTConfig
from reference.lora import build_adapter

from ..conftest import WORLD_SIZES
from ..distributed import run_distributed
from ..helpers import (NoCollectives, all_reduce_sum, assert_close, device, gather_full, init_tp,
                      seeded, strided_chunk)

S, BATCH, IN, OUT, DIM = 8, 2, 12, 16, 4
ALPHA = 8.0


# ---- helpers (module level: rank functions are pickled by name) ----------------------------------

def _base(kind, *, sp=False, gather_output=False, stride=1, skip_bias_add=False, input_is_parallel=True,
          dtype=torch.float64, in_features=IN, out_features=OUT):
    if kind == "column":
        return ColumnParallelLinear(in_features, out_features, gather_output=gather_output,
                                    sequence_parallel=sp, skip_bias_add=skip_bias_add,
                                    params_dtype=dtype, stride=stride)
    if kind == "row":
        return RowParallelLinear(in_features, out_features, input_is_parallel=input_is_parallel,
                                 sequence_parallel=sp, skip_bias_add=skip_bias_add, params_dtype=dtype)
    return nn.Linear(in_features, out_features, dtype=dtype, device=device())


def _load_base(base, W, b):
    if isinstance(base, nn.Linear):
        with torch.no_grad():
            base.weight.copy_(W)
            base.bias.copy_(b)
    else:
        base.load_full_weight(W, b)


def _adapt(base, **lora):
    """Apply LoRA(**lora) to a holder module whose only child is `base`; return the wrapper."""
    holder = nn.Module()
    holder.layer = base
    LoRA(target_modules=["layer"], **lora)(holder)
    wrapper = holder.layer
    assert isinstance(wrapper, LoRALinear), type(wrapper)
    return wrapper


def _rt(kind, state):
    """(rank, size) of the base's sharding: a plain nn.Linear is not sharded."""
    return (0, 1) if kind == "none" else (state.tp_rank, state.tp_size)


def _x_layout(kind, X, r, t, sp=False, input_is_parallel=True):
    """column: (s/t, b, in) under SP else (s, b, in); row: (s, b, in/t) or the full input."""
    return piece(X, shard_of("input", kind, sp=sp, input_is_parallel=input_is_parallel), r, t)


def _y_layout(kind, Y, r, t, sp=False, gather_output=False, stride=1):
    """column: (s, b, out/t) strided, or the full output; row: (s/t, b, out) under SP else (s, b, out)."""
    return piece(Y, shard_of("output", kind, sp=sp, gather_output=gather_output, stride=stride), r, t)


def _A_shard(kind, A, r, t):
    return piece(A, shard_of("A", kind), r, t)


def _B_shard(kind, Bm, r, t, stride=1):
    return piece(Bm, shard_of("B", kind, stride=stride), r, t)


def _out(result, kind):
    """(output, bias) from a wrapper's result, checking the calling convention of the base kind."""
    if kind == "none":
        assert isinstance(result, torch.Tensor), f"nn.Linear base must return a tensor, got {type(result)}"
        return result, None
    assert isinstance(result, tuple) and len(result) == 2, f"parallel base must return (out, bias), got {type(result)}"
    return result


# ---- [LORA-FWD-1..5] [LORA-BWD-1..3]: forward and backward of one layer --------------------------

def _fwd_bwd_case(kind, *, sp=False, gather_output=False, stride=1, skip_bias_add=False,
                  input_is_parallel=True, a2a=False, alpha=ALPHA, dim=DIM):
    state = P.get_parallel_state()
    r, t = _rt(kind, state)
    tag = (f"{kind} sp={sp} gather={gather_output} stride={stride} skip_bias={skip_bias_add} "
           f"input_is_parallel={input_is_parallel} a2a={a2a} alpha={alpha} dim={dim} tp={state.tp_size}")
    W, b = seeded((OUT, IN), 1), seeded((OUT,), 2)
    A, Bm = seeded((dim, IN), 5), seeded((OUT, dim), 6)                  # non-zero B: the adapter matters
    X, G = seeded((S, BATCH, IN), 3), seeded((S, BATCH, OUT), 4)
    lay_x = dict(sp=sp, input_is_parallel=input_is_parallel)
    lay_y = dict(sp=sp, gather_output=gather_output, stride=stride)

    base = _base(kind, sp=sp, gather_output=gather_output, stride=stride, skip_bias_add=skip_bias_add,
                 input_is_parallel=input_is_parallel)
    _load_base(base, W, b)
    wrapper = _adapt(base, dim=dim, alpha=alpha, a2a_experimental=a2a)
    assert wrapper.training
    wrapper.adapter.load_full_weights(A, Bm)

    x = _x_layout(kind, X, r, t, **lay_x).clone().requires_grad_()
    y, bias = _out(wrapper(x), kind)

    s = alpha / dim
    adds_bias = kind == "none" or not skip_bias_add
    Y = X @ W.T + (b if adds_bias else 0) + s * (X @ A.T) @ Bm.T        # full (s, b, out), float64
    assert_close(y, _y_layout(kind, Y, r, t, **lay_y), msg=tag)
    if kind != "none":
        if skip_bias_add:
            assert bias is base.bias, tag                                 # the base's bias, untouched
            expected_b = strided_chunk(b, 0, r, t, stride) if kind == "column" else b
            assert_close(bias, expected_b, msg=tag)
        else:
            assert bias is None, tag

    (y * _y_layout(kind, G, r, t, **lay_y)).sum().backward()
    Gf, Xf = G.reshape(-1, OUT), X.reshape(-1, IN)
    dB = s * Gf.T @ (Xf @ A.T)                                           # (out, d)
    dA = s * (Gf @ Bm).T @ Xf                                            # (d, in)
    dX = G @ W + s * (G @ Bm) @ A                                        # (s, b, in)
    gA, gB = wrapper.adapter.linear_in.weight.grad, wrapper.adapter.linear_out.weight.grad
    assert_close(gA, _A_shard(kind, dA, r, t), scale=4, msg=f"dA {tag}")
    assert_close(gB, _B_shard(kind, dB, r, t, stride), scale=4, msg=f"dB {tag}")
    assert_close(x.grad, _x_layout(kind, dX, r, t, **lay_x), scale=4, msg=f"dx {tag}")
    for name, p in base.named_parameters():
        assert not p.requires_grad and p.grad is None, f"base {name} is not frozen ({tag})"
    return y.detach(), x.grad, gA, gB


COLUMN_CASES = [dict(sp=sp, gather_output=g, stride=st, skip_bias_add=sk, a2a=a2a)
                for sp, g, st, sk, a2a in itertools.product([False, True], [False, True], [1, 2],
                                                            [False, True], [False, True])
                if not (g and st > 1)]
ROW_CASES = [dict(sp=sp, input_is_parallel=ip, skip_bias_add=sk, a2a=a2a)
             for sp, ip, sk, a2a in itertools.product([False, True], [True, False], [False, True], [False, True])
             if not (sp and not ip)]


def check_column_cases():
    init_tp()
    for case in COLUMN_CASES:
        _fwd_bwd_case("column", **case)


def check_row_cases():
    init_tp()
    for case in ROW_CASES:
        _fwd_bwd_case("row", **case)


def check_linear_cases():
    init_tp()
    for a2a in (False, True):
        _fwd_bwd_case("none", a2a=a2a)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_column_base_forward_backward(world_size):
    """[LORA-FWD-1] [LORA-FWD-2] [LORA-FWD-3] [LORA-FWD-8] [LORA-BWD-1] [LORA-BWD-2] [LORA-BWD-3] a
    column base (SP on/off, gather_output on/off, stride 2, skip_bias_add): output = x W^T + b + (alpha/d) B A x in
    the base's layout, the bias passed through, dA / dB / dx equal the full-math gradients' shards,
    and the frozen base weight and bias get no gradient."""
    run_distributed(check_column_cases, world_size)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_row_base_forward_backward(world_size):
    """[LORA-FWD-1] [LORA-FWD-2] [LORA-FWD-3] [LORA-FWD-8] [LORA-BWD-1] [LORA-BWD-2] [LORA-BWD-3] a row
    base (SP on/off, input_is_parallel on/off, skip_bias_add, a2a): the same against full math."""
    run_distributed(check_row_cases, world_size)


@pytest.mark.parametrize("world_size", [1, 2])
def test_linear_base_forward_backward(world_size):
    """[LORA-FWD-1] [LORA-FWD-2] [LORA-BWD-1] [LORA-BWD-2] [LORA-BWD-3] a plain nn.Linear base returns a
    tensor, with the full (unsharded) adapter, at any world size."""
    run_distributed(check_linear_cases, world_size)


def check_a2a_matches_gather_scatter():
    init_tp()
    for kind, case in [("row", dict(sp=True)), ("row", dict(sp=True, skip_bias_add=True)),
                       ("row", dict()), ("column", dict()), ("column", dict(sp=True)),
                       ("column", dict(sp=True, stride=2))]:
        plain = _fwd_bwd_case(kind, a2a=False, **case)
        a2a = _fwd_bwd_case(kind, a2a=True, **case)
        for name, p, q in zip(("y", "dx", "dA", "dB"), plain, a2a):
            assert p.shape == q.shape, (kind, case, name)
            assert_close(q, p, msg=f"a2a changes {name} for {kind} {case}")


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_a2a_gives_the_same_output_and_grads(world_size):
    """[LORA-FWD-4] a2a_experimental: for a row base under SP, one all-to-all gives the same output and
    gradients as gather + split (and full math); for non-SP row and column bases it changes nothing."""
    run_distributed(check_a2a_matches_gather_scatter, world_size)


def check_scales():
    t = dist.get_world_size()
    init_tp()
    for alpha, dim in [(1.0, 4), (16.0, 8), (3.5, 4), (64, 8 * t)]:
        _fwd_bwd_case("column", alpha=alpha, dim=dim)
        _fwd_bwd_case("column", sp=True, stride=2, alpha=alpha, dim=dim)
        _fwd_bwd_case("row", sp=True, alpha=alpha, dim=dim)
        _fwd_bwd_case("row", alpha=alpha, dim=dim)
        _fwd_bwd_case("none", alpha=alpha, dim=dim)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_scale_is_alpha_over_dim(world_size):
    """[LORA-FWD-5] [LORA-FWD-1] the update is scaled by alpha/dim, for several (alpha, dim)."""
    run_distributed(check_scales, world_size)


# ---- [LORA-FWD-6] dropout -------------------------------------------------------------------------

DROPOUT_CASES = [("column", dict()), ("column", dict(sp=True)), ("column", dict(gather_output=True)),
                 ("column", dict(stride=2)), ("row", dict()), ("row", dict(sp=True)),
                 ("row", dict(input_is_parallel=False)), ("none", dict())]


def check_dropout(p):
    state = init_tp()
    W, b = seeded((OUT, IN), 1), seeded((OUT,), 2)
    A, Bm = seeded((DIM, IN), 5), seeded((OUT, DIM), 6)
    X = seeded((S, BATCH, IN), 3)
    s = ALPHA / DIM
    Ybase, D = X @ W.T + b, s * (X @ A.T) @ Bm.T                          # full base output and exact delta
    Q, _ = torch.linalg.qr(Bm)                                          # orthonormal basis of B's columns
    for (kind, case), position in itertools.product(DROPOUT_CASES, ("pre", "post")):
        r, t = _rt(kind, state)
        tag = f"{kind} {case} {position} tp={state.tp_size}"
        lay_x = dict(sp=case.get("sp", False), input_is_parallel=case.get("input_is_parallel", True))
        lay_y = dict(sp=case.get("sp", False), gather_output=case.get("gather_output", False),
                     stride=case.get("stride", 1))
        base = _base(kind, **case)
        _load_base(base, W, b)
        wrapper = _adapt(base, dim=DIM, alpha=ALPHA, dropout=p, dropout_position=position)
        wrapper.adapter.load_full_weights(A, Bm)
        x = _x_layout(kind, X, r, t, **lay_x)
        base_y, exact = _y_layout(kind, Ybase, r, t, **lay_y), _y_layout(kind, D, r, t, **lay_y)
        assert exact.abs().min() > 1e-6, tag                             # no exact zeros in the true delta

        torch.manual_seed(100)                                          # the same mask stream on every rank
        with torch.no_grad():
            delta = _out(wrapper(x), kind)[0] - base_y                   # the base path: no dropout
        zero = delta.abs() <= 1e-12
        post_like = zero | ((delta - exact / (1 - p)).abs() <= 1e-9 * (1 + exact.abs()))
        if position == "post":
            assert 0.2 < zero.double().mean() < 0.8, f"dropped fraction {zero.double().mean()} ({tag})"
            assert_close(delta[~zero], exact[~zero] / (1 - p), msg=tag)
        else:
            full = delta
            if kind == "column" and not lay_y["gather_output"]:
                full = gather_full(delta, -1, state.tp_group, lay_y["stride"])   # tokens with all out features
            tokens = full.reshape(-1, OUT)
            residual = tokens - (tokens @ Q) @ Q.T
            assert residual.abs().max() <= 1e-10 * tokens.abs().max(), f"delta not in span(B) ({tag})"
            assert not post_like.all(), f"'pre' dropout looks like 'post' ({tag})"
            assert (delta - exact).abs().max() > 1e-3, f"no dropout happened ({tag})"

        wrapper.eval()                                                    # eval: no dropout at all
        with torch.no_grad():
            delta_eval = _out(wrapper(x), kind)[0] - base_y
        assert_close(delta_eval, exact, msg=f"eval {tag}")

        if position == "pre":                                             # p = 0 in train mode: no dropout
            base0 = _base(kind, **case)
            _load_base(base0, W, b)
            wrapper0 = _adapt(base0, dim=DIM, alpha=ALPHA, dropout=0.0, dropout_position=position)
            wrapper0.adapter.load_full_weights(A, Bm)
            assert wrapper0.training
            with torch.no_grad():
                assert_close(_out(wrapper0(x), kind)[0] - base_y, exact, msg=f"p=0 {tag}")


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_dropout_position(world_size):
    """[LORA-FWD-6] train mode: "post" makes every element of delta 0 or the exact delta/(1-p);
    "pre" keeps each token's delta in the column space of B and is not of the "post" form; eval mode
    and p = 0 give the exact delta; the base output never sees dropout."""
    run_distributed(check_dropout, world_size, 0.5)


# ---- [LORA-INIT-1] [LORA-INIT-2] initialization ---------------------------------------------------

BIG_IN, BIG_OUT, BIG_DIM = 256, 256, 64
INIT_PAIRS = [("xavier", "normal"), ("kaiming", "xavier"), ("normal", "kaiming"), ("zero", "zero"),
              ("xavier", "zero")]


def _init_adapters():
    """For every base kind and (A, B) init pair: the full A, B and the next draw of the generator."""
    bases = {"column": ColumnParallelLinear(BIG_IN, BIG_OUT, stride=2),
             "row": RowParallelLinear(BIG_IN, BIG_OUT),
             "none": nn.Linear(BIG_IN, BIG_OUT, device=device())}
    out = {}
    for (kind, base), (ma, mb) in itertools.product(bases.items(), INIT_PAIRS):
        torch.manual_seed(1234)
        config = LoRA(dim=BIG_DIM, alpha=16, lora_A_init_method=ma, lora_B_init_method=mb)
        adapter = build_adapter(config, base, "layer")
        after = torch.rand(1)                                            # generator advanced equally?
        state = P.get_parallel_state()
        r, t = _rt(kind, state)
        A_loc, B_loc = adapter.linear_in.weight.detach(), adapter.linear_out.weight.detach()
        if kind == "none":
            A, Bm = A_loc, B_loc
        else:
            A = gather_full(A_loc, 0 if kind == "column" else 1, state.tp_group)
            Bm = gather_full(B_loc, 0, state.tp_group, 2 if kind == "column" else 1)
        out[(kind, ma, mb)] = (A.cpu(), Bm.cpu(), after)
    return out


def _check_init_stats(W, method, fan_in, fan_out, what):
    W = W.double()
    if method == "zero":
        assert torch.count_nonzero(W) == 0, what
        return
    std = W.std().item()
    assert abs(W.mean().item()) < 0.05 * std, f"{what}: mean {W.mean().item()}"
    if method == "xavier":
        expected = (2 / (fan_in + fan_out)) ** 0.5
        assert abs(std / expected - 1) < 0.04, f"{what}: xavier std {std}, expected {expected} (full fans)"
    elif method == "kaiming":
        bound = 1 / fan_in ** 0.5
        assert W.abs().max().item() <= bound * (1 + 1e-6), f"{what}: |w| above 1/sqrt(in) = {bound}"
        assert W.abs().max().item() >= 0.97 * bound, f"{what}: max |w| {W.abs().max()} well under {bound}"
        assert abs(std / (bound / 3 ** 0.5) - 1) < 0.04, f"{what}: kaiming std {std}"
    elif method == "normal":
        assert abs(std / 0.2 - 1) < 0.04, f"{what}: normal std {std}, expected 0.2"


def check_init():
    world = dist.get_world_size()
    per_tp = {}
    for tp in sorted({1, world}):
        init_tp(tp)
        per_tp[tp] = _init_adapters()
    for key, (A, Bm, after) in per_tp[world].items():
        A1, B1, after1 = per_tp[1][key]
        assert torch.equal(A, A1) and torch.equal(Bm, B1), f"full adapter differs between TP 1 and {world}: {key}"
        assert torch.equal(after, after1), f"generator advanced differently at TP {world}: {key}"
        kind, ma, mb = key
        assert A.shape == (BIG_DIM, BIG_IN) and Bm.shape == (BIG_OUT, BIG_DIM), key
        _check_init_stats(A, ma, BIG_IN, BIG_DIM, f"A {key}")
        _check_init_stats(Bm, mb, BIG_DIM, BIG_OUT, f"B {key}")
    # one seed, one adapter: a different seed gives a different one (the test could fail).
    A0 = per_tp[world][("column", "xavier", "normal")][0]
    init_tp(world)
    torch.manual_seed(4321)
    other = build_adapter(LoRA(dim=BIG_DIM), ColumnParallelLinear(BIG_IN, BIG_OUT), "layer")
    assert not torch.equal(gather_full(other.linear_in.weight, 0, P.get_parallel_state().tp_group).cpu(), A0)
    return {k: (v[0].sum().item(), v[1].sum().item()) for k, v in per_tp[world].items()}


@pytest.mark.parametrize("world_size", [2, 4])
def test_init_same_full_adapter_at_every_tp(world_size):
    """[LORA-INIT-2] [LORA-INIT-1] the same torch.manual_seed gives bit for bit the same full A and B at
    TP 1 and TP=world (column with stride 2, row, nn.Linear), with the generator advanced equally; the
    methods follow the FULL fans: xavier std sqrt(2/(fan_in+fan_out)), kaiming bound 1/sqrt(in),
    normal std 0.2, zero."""
    sums = run_distributed(check_init, world_size)
    assert all(s == sums[0] for s in sums)                               # every rank has the same adapter


def check_zero_B_model_unchanged():
    t = dist.get_world_size()
    init_tp(t)
    for sp, gated in [(False, False), (True, False), (True, True), (False, True)]:
        config = TinyGPTConfig(sequence_parallel=sp, gated_linear_unit=gated)
        model = TinyGPT(config, seed=7)
        ids = torch.randint(0, config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(3)).to(device())
        with torch.no_grad():
            before = model(ids)
        torch.manual_seed(11)
        LoRA()(model)                                                    # defaults: B zero, A xavier
        wrappers = [m for m in model.modules() if isinstance(m, LoRALinear)]
        assert len(wrappers) == 4 * config.num_layers
        for w in wrappers:
            assert torch.count_nonzero(w.adapter.linear_in.weight) > 0
        with torch.no_grad():
            after = model(ids)
        if not torch.equal(after, before):
            # Say whether freezing the base alone already changes the logits (it can on CUDA, where
            # matmul folds a non-contiguous 3-D input differently when the weight needs no grad).
            fresh = TinyGPT(config, seed=7).requires_grad_(False)
            with torch.no_grad():
                frozen = fresh(ids)
            raise AssertionError(
                f"sp={sp} gated={gated}: zero-B LoRA changed the logits by up to "
                f"{(after - before).abs().max().item():.3g}; freezing the base alone "
                f"{'also changes' if not torch.equal(frozen, before) else 'does not change'} them, and the "
                f"adapted logits {'equal' if torch.equal(after, frozen) else 'differ from'} the frozen base's")


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_zero_B_leaves_the_model_unchanged(world_size):
    """[LORA-INIT-3] with the default lora_B_init_method="zero", TinyGPT + LoRA at TP=world (SP on and
    off, gated or not) gives the base model's logits bit for bit."""
    run_distributed(check_zero_B_model_unchanged, world_size)


# ---- [LORA-INIT-4] [LORA-FWD-2] full and sharded adapter weights ---------------------------------

def check_full_weights_round_trip():
    state = init_tp()
    for kind, case in [("column", dict()), ("column", dict(stride=2)), ("column", dict(sp=True, gather_output=True)),
                       ("row", dict()), ("row", dict(sp=True)), ("none", dict())]:
        r, t = _rt(kind, state)
        stride = case.get("stride", 1)
        base = _base(kind, dtype=torch.float32, **case)
        wrapper = _adapt(base, dim=DIM, alpha=ALPHA)
        adapter = wrapper.adapter
        A, Bm = seeded((DIM, IN), 21, torch.float32), seeded((OUT, DIM), 22, torch.float32)
        adapter.load_full_weights(A, Bm)
        A_loc, B_loc = adapter.linear_in.weight, adapter.linear_out.weight
        # the shard table of [LORA-FWD-2]
        assert torch.equal(A_loc, _A_shard(kind, A, r, t)), f"A shard {kind} {case}"
        assert torch.equal(B_loc, _B_shard(kind, Bm, r, t, stride)), f"B shard {kind} {case}"
        expected_shapes = {"column": ((DIM // t, IN), (OUT // t, DIM)), "row": ((DIM, IN // t), (OUT // t, DIM)),
                           "none": ((DIM, IN), (OUT, DIM))}[kind]
        assert (tuple(A_loc.shape), tuple(B_loc.shape)) == expected_shapes, (kind, case)
        fa, fb = adapter.full_weights()
        assert torch.equal(fa.to(A.device), A) and torch.equal(fb.to(Bm.device), Bm), f"round trip {kind} {case}"


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_full_weights_round_trip(world_size):
    """[LORA-INIT-4] [LORA-FWD-2] load_full_weights stores the shards of the FWD-2 table (column: A rows,
    B rows strided like the base; row: A columns, B rows; nn.Linear: whole) and full_weights gathers
    them back exactly on every rank."""
    run_distributed(check_full_weights_round_trip, world_size)


def check_bad_sizes_and_shapes():
    state = init_tp()
    t = state.tp_size
    errors = {}

    def expect(key, match, fn):
        with pytest.raises(ValueError, match=match) as info, NoCollectives():
            fn()
        errors[key] = str(info.value)

    col = ColumnParallelLinear(IN, OUT)
    expect("col_dim", r"decoder\.layers\.0\.mlp\.linear_fc1",
           lambda: LoRA(dim=t + 1).transform(col, "linear_fc1", "decoder.layers.0.mlp"))
    assert "dim" in errors["col_dim"]
    row = RowParallelLinear(IN, 2 * t + 1)                               # fine for the base, not the adapter
    expect("row_out", r"decoder\.layers\.1\.self_attention\.linear_proj",
           lambda: LoRA(dim=DIM).transform(row, "linear_proj", "decoder.layers.1.self_attention"))
    assert "out_features" in errors["row_out"]
    model = TinyGPT(TinyGPTConfig(), seed=0)
    expect("model_dim", r"decoder\.layers\.0\.self_attention\.linear_qkv", lambda: LoRA(dim=t + 1)(model))
    # wrong full shapes name A or B
    wrapper = _adapt(ColumnParallelLinear(IN, OUT), dim=DIM, alpha=ALPHA)
    A, Bm = seeded((DIM, IN), 1, torch.float32), seeded((OUT, DIM), 2, torch.float32)
    expect("A_shape", r"\bA\b.*shape", lambda: wrapper.adapter.load_full_weights(A.T.contiguous(), Bm))
    expect("B_shape", r"\bB\b.*shape", lambda: wrapper.adapter.load_full_weights(A, Bm[:, :-1]))
    row_wrapper = _adapt(RowParallelLinear(IN, OUT, sequence_parallel=True), dim=DIM, alpha=ALPHA)
    expect("row_A_shape", r"\bA\b.*shape",
           lambda: row_wrapper.adapter.load_full_weights(seeded((DIM + 1, IN), 1, torch.float32), Bm))
    # a bad input to the wrapper: the base's ValueError, before the adapter's collectives
    expect("row_sp_seq", "sequence length", lambda: row_wrapper(torch.zeros(2 * t + 1, 2, IN // t, device=device())))
    expect("col_x", "last dim", lambda: wrapper(torch.zeros(S, 2, IN + 1, device=device())))
    # nothing was left half-communicated: the group still works.
    assert all_reduce_sum(torch.ones(1, device=device())).item() == t
    return errors


@pytest.mark.parametrize("world_size", [2, 4])
def test_bad_sizes_and_shapes_raise_on_every_rank(world_size):
    """[LORA-ERR-1] [LORA-FWD-2] [LORA-INIT-4] LoRA dim not divisible by TP for a column base and
    out_features not divisible for a row base raise ValueError naming the base module (also through
    LoRA()(model)); wrong full shapes raise ValueError naming A or B; a bad input to a wrapper raises
    the base's ValueError; all before any collective, with the same message on every rank, and the
    group still works afterwards."""
    errors = run_distributed(check_bad_sizes_and_shapes, world_size)
    assert all(e == errors[0] for e in errors)


# ---- [LORA-DTYPE-1] [LORA-DTYPE-2] ------------------------------------------------------------------

def check_lora_dtype():
    state = init_tp()
    W, b = seeded((OUT, IN), 1), seeded((OUT,), 2)
    A, Bm = seeded((DIM, IN), 5), seeded((OUT, DIM), 6)
    X, G = seeded((S, BATCH, IN), 3), seeded((S, BATCH, OUT), 4)
    bf = lambda z: z.to(torch.bfloat16).to(torch.float64)               # noqa: E731
    s = ALPHA / DIM
    D_bf16 = s * (bf(X) @ bf(A).T) @ bf(Bm).T                            # A, B and x rounded to bf16
    Ybase = X.float().double() @ W.float().double().T + b.float().double()
    cases = [("column", dict()), ("column", dict(sp=True)), ("column", dict(gather_output=True)),
             ("column", dict(stride=2)), ("row", dict()), ("row", dict(sp=True)),
             ("row", dict(input_is_parallel=False)), ("none", dict())]
    for kind, case in cases:
        r, t = _rt(kind, state)
        tag = f"{kind} {case}"
        lay_x = dict(sp=case.get("sp", False), input_is_parallel=case.get("input_is_parallel", True))
        lay_y = dict(sp=case.get("sp", False), gather_output=case.get("gather_output", False),
                     stride=case.get("stride", 1))
        base = _base(kind, dtype=torch.float32, **case)
        _load_base(base, W, b)
        wrapper = LoRALinear(base, build_adapter(LoRA(dim=DIM, alpha=ALPHA, lora_dtype=torch.bfloat16), base, "layer"))
        for name, p in wrapper.adapter.named_parameters():
            assert p.dtype == torch.bfloat16, f"{name} is {p.dtype} ({tag})"
        wrapper.adapter.load_full_weights(A, Bm)
        x = _x_layout(kind, X, r, t, **lay_x).float().requires_grad_()
        y, _ = _out(wrapper(x), kind)
        assert y.dtype == torch.float32, f"output {y.dtype} ({tag})"
        delta = y.double() - _y_layout(kind, Ybase, r, t, **lay_y)
        expected = _y_layout(kind, D_bf16, r, t, **lay_y)
        torch.testing.assert_close(delta, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item(), msg=tag)
        # the bf16 adapter does move the result away from float32 math (lora_dtype is not ignored)
        D32 = _y_layout(kind, s * (X @ A.T) @ Bm.T, r, t, **lay_y)
        assert (delta - D32).abs().max() > 1e-4, f"bf16 adapter computed like float32 ({tag})"
        (y * _y_layout(kind, G, r, t, **lay_y).float()).sum().backward()
        assert x.grad.dtype == torch.float32 and wrapper.adapter.linear_in.weight.grad.dtype == torch.bfloat16

        # lora_dtype None: the base weight's dtype; an explicit float64 adapter on a float32 base.
        for base_dtype, lora_dtype, want in [(torch.float32, None, torch.float32),
                                             (torch.bfloat16, None, torch.bfloat16),
                                             (torch.float32, torch.float64, torch.float64)]:
            b2 = _base(kind, dtype=base_dtype, **case)
            w2 = LoRALinear(b2, build_adapter(LoRA(dim=DIM, alpha=ALPHA, lora_dtype=lora_dtype,
                                                   lora_B_init_method="normal"), b2, "layer"))
            assert {p.dtype for p in w2.adapter.parameters()} == {want}, (tag, base_dtype, lora_dtype)
            with torch.no_grad():
                out, _ = _out(w2(_x_layout(kind, X, r, t, **lay_x).to(base_dtype)), kind)
            assert out.dtype == base_dtype, (tag, base_dtype, lora_dtype, out.dtype)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_lora_dtype(world_size):
    """[LORA-DTYPE-1] [LORA-DTYPE-2] lora_dtype=bfloat16 on float32 column, row and nn.Linear bases:
    A and B are bf16, the output is float32 and matches full math with A, B and x rounded to bf16;
    lora_dtype None gives the base weight's dtype."""
    run_distributed(check_lora_dtype, world_size)


# ---- [LORA-INJ-5] TP invariance of TinyGPT + LoRA --------------------------------------------------

def _lora_gpt_logits_and_grads(tp, sp, gated):
    state = init_tp(tp)
    config = TinyGPTConfig(sequence_parallel=sp, gated_linear_unit=gated)
    model = TinyGPT(config, seed=7)
    torch.manual_seed(99)
    # output_layer gathers its output ([LORA-FWD-8]): adapted too, so the model covers every layout
    LoRA(target_modules=["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "output_layer"], dim=8, alpha=16,
         lora_B_init_method="normal")(model)
    ids = torch.randint(0, config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(3)).to(device())
    logits = model(ids)
    logits.sum().backward()
    grads = {}
    for name, m in model.named_modules():
        if not isinstance(m, LoRALinear):
            continue
        gA, gB = m.adapter.linear_in.weight.grad, m.adapter.linear_out.weight.grad
        if isinstance(m.to_wrap, ColumnParallelLinear):
            gA, gB = gather_full(gA, 0, state.tp_group), gather_full(gB, 0, state.tp_group, m.to_wrap.stride)
        else:
            gA, gB = gather_full(gA, 1, state.tp_group), gather_full(gB, 0, state.tp_group)
        grads[name] = (gA, gB)
    for name, p in model.named_parameters():
        if ".adapter." in name:
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, f"base parameter {name} is not frozen"
    return logits.detach(), grads


def check_tinygpt_lora_tp_invariance():
    world = dist.get_world_size()
    for gated in (False, True):
        ref_logits, ref_grads = _lora_gpt_logits_and_grads(1, False, gated)
        # the adapters matter: they change the logits, and their gradients are not all zero
        init_tp(1)
        config = TinyGPTConfig(gated_linear_unit=gated)
        ids = torch.randint(0, config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(3)).to(device())
        with torch.no_grad():
            assert (TinyGPT(config, seed=7)(ids) - ref_logits).abs().max() > 1e-3
        assert len(ref_grads) == 9 and all(gA.abs().max() > 0 and gB.abs().max() > 0 for gA, gB in ref_grads.values())
        for sp in (False, True):
            logits, grads = _lora_gpt_logits_and_grads(world, sp, gated)
            tag = f"tp={world} sp={sp} gated={gated}"
            assert_close(logits, ref_logits, torch.float32, scale=10, msg=f"logits {tag}")
            assert grads.keys() == ref_grads.keys()
            for name, (gA, gB) in grads.items():
                rA, rB = ref_grads[name]
                for what, g, ref in (("dA", gA, rA), ("dB", gB, rB)):
                    torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item(),
                                               msg=f"{what} of {name} ({tag})")


@pytest.mark.parametrize("world_size", [2, 4])
def test_tinygpt_lora_is_tp_invariant(world_size):
    """[LORA-INJ-5] [LORA-FWD-8] [LORA-BWD-1] [LORA-BWD-3] TinyGPT + LoRA (B normal, output_layer
    included) with the same seeds gives the same logits and the same gathered adapter gradients at TP 1 and TP=world, SP on/off, gated or not;
    only adapter parameters get gradients."""
    run_distributed(check_tinygpt_lora_tp_invariance, world_size)
