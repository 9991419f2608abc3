"""Merging LoRA into the base weights: W' = W + (alpha/d) B A, against full-matrix float64 math."""

import pytest
import torch
from torch import nn

from reference import (ColumnParallelLinear, LoRA, LoRALinear, LoRAMerge, RowParallelLinear, TinyGPT,
                       TinyGPTConfig, merge_lora, unmerge_lora)

from ..conftest import WORLD_SIZES
from ..distributed import run_distributed
from ..helpers import (NoCollectives, all_reduce_sum, assert_close, chunk, device, gather_full, init_tp,
                      seeded, strided_chunk)

IN, OUT, DIM, ALPHA = 12, 16, 4, 8.0


def _adapt(base, **lora):
    holder = nn.Module()
    holder.layer = base
    LoRA(target_modules=["layer"], **lora)(holder)
    assert isinstance(holder.layer, LoRALinear)
    return holder.layer


def _full_base_weight(module):
    """The full base weight of a column/row-parallel layer, gathered here."""
    group = module.tp_group
    if isinstance(module, ColumnParallelLinear):
        return gather_full(module.weight, 0, group, module.stride)
    return gather_full(module.weight, 1, group)


def _full_adapter(wrapper):
    """The full (A, B) of a wrapper's adapter, gathered here from the local shards."""
    base, adapter = wrapper.to_wrap, wrapper.adapter
    A, Bm = adapter.linear_in.weight, adapter.linear_out.weight
    if isinstance(base, ColumnParallelLinear):
        return gather_full(A, 0, base.tp_group), gather_full(Bm, 0, base.tp_group, base.stride)
    if isinstance(base, RowParallelLinear):
        return gather_full(A, 1, base.tp_group), gather_full(Bm, 0, base.tp_group)
    return A.detach().clone(), Bm.detach().clone()


# ---- [LORA-MERGE-1] the tensor helper ---------------------------------------------------------------

def check_merge_helper():
    state = init_tp()
    r, t, group = state.tp_rank, state.tp_size, state.tp_group
    for dtype in (torch.float64, torch.float32):
        for alpha, dim in ((ALPHA, DIM), (3.0, 8), (32.0, 4 * t)):
            W, A, Bm = seeded((OUT, IN), 1), seeded((dim, IN), 2), seeded((OUT, dim), 3)
            expected = W + (alpha / dim) * Bm @ A
            tag = f"dtype={dtype} alpha={alpha} dim={dim} tp={t}"
            cast = lambda z: z.to(dtype)                                 # noqa: E731
            # column base: W_r rows, B_r rows, A_r rows (gathered inside)
            got = LoRAMerge().merge(cast(chunk(W, 0, r, t)), cast(chunk(Bm, 0, r, t)), cast(chunk(A, 0, r, t)),
                                    alpha, dim, tp_size=t, tp_group=group)
            assert got.dtype == dtype and got.shape == (OUT // t, IN), tag
            assert_close(got, chunk(expected, 0, r, t), dtype, scale=4, msg=f"column {tag}")
            # row base: W_r columns, B_r rows (gathered inside), A_r columns
            got = LoRAMerge().merge(cast(chunk(W, 1, r, t)), cast(chunk(Bm, 0, r, t)), cast(chunk(A, 1, r, t)),
                                    alpha, dim, tp_size=t, tp_group=group)
            assert got.dtype == dtype and got.shape == (OUT, IN // t), tag
            assert_close(got, chunk(expected, 1, r, t), dtype, scale=4, msg=f"row {tag}")
            # the inputs are left alone
            assert torch.equal(W, seeded((OUT, IN), 1))


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_lora_merge_tensor_helper(world_size):
    """[LORA-MERGE-1] LoRAMerge().merge returns this rank's shard of W + (alpha/d) B A for column bases
    (A gathered) and row bases (B gathered), in float64 and float32, for several (alpha, dim)."""
    run_distributed(check_merge_helper, world_size)


def _bad_merges(t, group):
    """(name, call) pairs whose shapes cannot merge, at TP size t."""
    W, A, Bm = seeded((OUT, IN), 1), seeded((DIM, IN), 2), seeded((OUT, DIM), 3)
    merge = LoRAMerge().merge
    cases = [
        ("A in-features", lambda: merge(W, Bm, seeded((DIM, IN + 1), 4), ALPHA, DIM)),
        ("B rank", lambda: merge(W, seeded((OUT, DIM + 1), 4), A, ALPHA, DIM)),
        ("B out-features", lambda: merge(W, seeded((OUT + 2, DIM), 4), A, ALPHA, DIM)),
        ("A for B", lambda: merge(W, A, Bm, ALPHA, DIM)),            # factors swapped
    ]
    if t > 1:
        cases += [
            # column shards whose A does not fit the base shard's in-features
            ("column A in", lambda: merge(chunk(W, 0, 0, t), chunk(Bm, 0, 0, t),
                                          seeded((DIM // t, IN + 1), 5), ALPHA, DIM, tp_size=t, tp_group=group)),
            # column shards with a base shard of the wrong height
            ("column W rows", lambda: merge(seeded((OUT // t + 1, IN), 6), chunk(Bm, 0, 0, t),
                                            chunk(A, 0, 0, t), ALPHA, DIM, tp_size=t, tp_group=group)),
            # row shards whose A does not fit the base shard
            ("row A in", lambda: merge(chunk(W, 1, 0, t), chunk(Bm, 0, 0, t),
                                       seeded((DIM, IN // t + 1), 7), ALPHA, DIM, tp_size=t, tp_group=group)),
            # the full base weight with column shards of the adapter
            ("full W", lambda: merge(W, chunk(Bm, 0, 0, t), chunk(A, 0, 0, t), ALPHA, DIM,
                                     tp_size=t, tp_group=group)),
        ]
    return cases


def check_merge_shape_errors():
    state = init_tp()
    messages = {}
    for name, call in _bad_merges(state.tp_size, state.tp_group):
        with pytest.raises(ValueError, match="merge") as info:
            call()
        messages[name] = str(info.value)
    assert all_reduce_sum(torch.ones(1, device=device())).item() == state.tp_size
    return messages


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_lora_merge_shape_errors(world_size):
    """[LORA-MERGE-1] [LORA-ERR-1] shapes that cannot merge raise ValueError, with the same message on
    every rank, and the group still works afterwards."""
    messages = run_distributed(check_merge_shape_errors, world_size)
    assert all(m == messages[0] for m in messages)


def check_merge_errors_before_collectives():
    state = init_tp()
    failures = []
    for name, call in _bad_merges(state.tp_size, state.tp_group):
        try:
            with NoCollectives():
                call()
        except ValueError:
            continue
        except AssertionError as e:
            failures.append(f"{name}: {e}")
        else:
            failures.append(f"{name}: no error")
    assert all_reduce_sum(torch.ones(1, device=device())).item() == state.tp_size
    assert not failures, "shape errors raised only after a collective started:\n" + "\n".join(failures)


@pytest.mark.parametrize("world_size", [2, 4])
def test_lora_merge_shape_errors_come_before_any_collective(world_size):
    """[LORA-ERR-1] [LORA-MERGE-1] every shape error of LoRAMerge().merge is raised before its first
    collective (the shapes are all known locally), so a bad input cannot leave ranks waiting."""
    run_distributed(check_merge_errors_before_collectives, world_size)


# ---- [LORA-MERGE-2] merged_weight of one wrapper ----------------------------------------------------

def _wrapper_with(kind, dtype, W, b, A, Bm, stride=1):
    if kind == "column":
        base = ColumnParallelLinear(W.shape[1], W.shape[0], params_dtype=dtype, stride=stride)
    elif kind == "row":
        base = RowParallelLinear(W.shape[1], W.shape[0], params_dtype=dtype)
    else:
        base = nn.Linear(W.shape[1], W.shape[0], dtype=dtype, device=device())
    if isinstance(base, nn.Linear):
        with torch.no_grad():
            base.weight.copy_(W)
            base.bias.copy_(b)
    else:
        base.load_full_weight(W.to(dtype), b.to(dtype))
    wrapper = _adapt(base, dim=A.shape[0], alpha=ALPHA)
    wrapper.adapter.load_full_weights(A.to(dtype), Bm.to(dtype))
    return base, wrapper


def _weight_shard(kind, full, r, t, stride=1):
    if kind == "column":
        return strided_chunk(full, 0, r, t, stride)
    if kind == "row":
        return chunk(full, 1, r, t)
    return full


def check_merged_weight():
    state = init_tp()
    r, t = state.tp_rank, state.tp_size
    for kind, stride in (("column", 1), ("column", 2), ("row", 1), ("none", 1)):
        rt = (0, 1) if kind == "none" else (r, t)
        # float64 base: float64 arithmetic (float32 would be ~1e-7 off)
        W, b, A, Bm = seeded((OUT, IN), 1), seeded((OUT,), 2), seeded((DIM, IN), 3), seeded((OUT, DIM), 4)
        base, wrapper = _wrapper_with(kind, torch.float64, W, b, A, Bm, stride)
        got = wrapper.merged_weight()
        expected = _weight_shard(kind, W + (ALPHA / DIM) * Bm @ A, *rt, stride)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12, msg=f"float64 {kind} {stride}")
        assert torch.equal(base.weight, _weight_shard(kind, W, *rt, stride)), "merged_weight changed the base"
        # float32 base
        base, wrapper = _wrapper_with(kind, torch.float32, W, b, A, Bm, stride)
        got = wrapper.merged_weight()
        assert got.dtype == torch.float32
        assert_close(got, expected, torch.float32, scale=4, msg=f"float32 {kind} {stride}")
        # bf16 base and adapter: float32 arithmetic on the bf16 values, then one rounding to bf16
        out, inn, dim = 64, 64, 8
        W, b, A, Bm = seeded((out, inn), 5), seeded((out,), 6), seeded((dim, inn), 7), seeded((out, dim), 8)
        bf = lambda z: z.to(torch.bfloat16).to(torch.float64)            # noqa: E731
        base, wrapper = _wrapper_with(kind, torch.bfloat16, W, b, A, Bm, stride)
        assert wrapper.adapter.linear_in.weight.dtype == torch.bfloat16
        got = wrapper.merged_weight()
        assert got.dtype == torch.bfloat16
        exact = _weight_shard(kind, bf(W) + (ALPHA / dim) * bf(Bm) @ bf(A), *rt, stride)
        once = exact.to(torch.bfloat16)                                  # exact value, rounded once
        assert_close(got, exact, torch.bfloat16, msg=f"bf16 {kind} {stride}")
        mismatches = int((got != once).sum())
        assert mismatches <= max(2, got.numel() // 500), (
            f"bf16 {kind} stride {stride}: {mismatches}/{got.numel()} elements differ from the exact value "
            f"rounded once: the merge is not float32 arithmetic followed by one cast")


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_merged_weight_dtype_and_value(world_size):
    """[LORA-MERGE-2] LoRALinear.merged_weight() is this rank's shard of W + (alpha/d) B A for column
    (stride 1 and 2), row and nn.Linear bases; float64 bases merge in float64, float32 in float32, and
    bf16 bases in float32 arithmetic rounded once to bf16; the base weight is left alone."""
    run_distributed(check_merged_weight, world_size)


# ---- [LORA-MERGE-3] whole-model merge and unmerge ---------------------------------------------------

def _adapted_gpt(sp, gated):
    config = TinyGPTConfig(sequence_parallel=sp, gated_linear_unit=gated)
    model = TinyGPT(config, seed=7)
    ids = torch.randint(0, config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(3)).to(device())
    with torch.no_grad():
        base_logits = model(ids)
    torch.manual_seed(5)
    LoRA(dim=8, alpha=16, lora_B_init_method="normal")(model)
    with torch.no_grad():
        adapted = model(ids)
    assert (adapted - base_logits).abs().max() > 1e-3, "the adapters do not change the logits"
    return model, ids, adapted


def check_merge_model():
    init_tp()
    for sp, gated in [(False, False), (True, False), (False, True), (True, True)]:
        tag = f"sp={sp} gated={gated}"
        model, ids, adapted = _adapted_gpt(sp, gated)
        wrappers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
        assert len(wrappers) == 8
        expected, bases = {}, {}
        for name, w in wrappers.items():
            A, Bm = _full_adapter(w)
            W = _full_base_weight(w.to_wrap)
            expected[name] = W.double() + (w.adapter.alpha / w.adapter.dim) * Bm.double() @ A.double()
            bases[name] = w.to_wrap
        merged = merge_lora(model)
        assert merged is model
        assert not any(isinstance(m, LoRALinear) for m in model.modules()), f"LoRALinear left ({tag})"
        assert not any("adapter" in n for n, _ in model.named_parameters()), f"adapter parameters left ({tag})"
        for name in wrappers:
            module = model.get_submodule(name)
            assert module is bases[name], f"{name} is not its base layer ({tag})"
            assert_close(_full_base_weight(module), expected[name], torch.float32, scale=4, msg=f"{name} {tag}")
        with torch.no_grad():
            logits = model(ids)
        assert_close(logits, adapted, torch.float32, scale=20, msg=f"merged logits {tag}")


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_merge_lora_replaces_wrappers_and_keeps_logits(world_size):
    """[LORA-MERGE-3] merge_lora(TinyGPT + LoRA) at TP=world (SP on/off, gated or not) leaves no
    LoRALinear, every base carries the full-math merged weight W + (alpha/d) B A, and the logits equal
    the adapted model's (float32 tolerance)."""
    run_distributed(check_merge_model, world_size)


def check_merge_keep_wrappers_and_unmerge():
    init_tp()
    for sp, gated in [(False, True), (True, False)]:
        tag = f"sp={sp} gated={gated}"
        model, ids, adapted = _adapted_gpt(sp, gated)
        wrappers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
        original = {n: w.to_wrap.weight.detach().clone() for n, w in wrappers.items()}
        expected = {}
        for name, w in wrappers.items():
            A, Bm = _full_adapter(w)
            expected[name] = (_full_base_weight(w.to_wrap).double()
                              + (w.adapter.alpha / w.adapter.dim) * Bm.double() @ A.double())
        assert merge_lora(model, keep_wrappers=True) is model
        after = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
        assert after.keys() == wrappers.keys() and all(after[n] is wrappers[n] for n in after), tag
        for name, w in wrappers.items():
            assert_close(_full_base_weight(w.to_wrap), expected[name], torch.float32, scale=4, msg=f"{name} {tag}")
        with torch.no_grad():
            assert_close(model(ids), adapted, torch.float32, scale=20, msg=f"merged in place {tag}")
        assert unmerge_lora(model) is model
        for name, w in wrappers.items():
            assert_close(w.to_wrap.weight, original[name], torch.float32, scale=4, msg=f"unmerged {name} {tag}")
        with torch.no_grad():
            assert_close(model(ids), adapted, torch.float32, scale=20, msg=f"unmerged {tag}")


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_merge_keep_wrappers_then_unmerge(world_size):
    """[LORA-MERGE-3] merge_lora(model, keep_wrappers=True) keeps the wrappers, folds the update into
    the base weights (full math) without applying it twice; unmerge_lora restores the base weights and
    the outputs (up to rounding)."""
    run_distributed(check_merge_keep_wrappers_and_unmerge, world_size)


def check_merge_single_wrapper():
    state = init_tp()
    r, t = state.tp_rank, state.tp_size
    W, b, A, Bm = seeded((OUT, IN), 1), seeded((OUT,), 2), seeded((DIM, IN), 3), seeded((OUT, DIM), 4)
    X = seeded((8, 2, IN), 5)
    for kind in ("column", "row", "none"):
        rt = (0, 1) if kind == "none" else (r, t)
        base, wrapper = _wrapper_with(kind, torch.float64, W, b, A, Bm)
        x = chunk(X, -1, r, t) if kind == "row" else X
        with torch.no_grad():
            adapted = wrapper(x)
        merged = merge_lora(wrapper)
        assert merged is base, f"merge_lora(LoRALinear) must return its base ({kind})"
        torch.testing.assert_close(base.weight, _weight_shard(kind, W + (ALPHA / DIM) * Bm @ A, *rt),
                                   rtol=1e-12, atol=1e-12)
        with torch.no_grad():
            out = merged(x)
        if kind == "none":
            assert_close(out, adapted)
        else:
            assert_close(out[0], adapted[0])


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_merge_lora_on_a_single_wrapper_returns_its_base(world_size):
    """[LORA-MERGE-3] merge_lora(LoRALinear) returns the base layer itself, carrying W + (alpha/d) B A,
    with the adapted layer's output."""
    run_distributed(check_merge_single_wrapper, world_size)
