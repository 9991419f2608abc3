"""experts_shared_outer_loras (SPEC [MOE-SHARE-3]): grouped experts share fc1's A and fc2's B.

The MoE layer of tests/reference/test_moe.py with LoRA on its grouped experts, at every (TP, EP,
expert-TP) of worlds 1, 2 and 4. The suite's FULL float64 factors are loaded: A1 (r1, h) and B2
(h, r2) shared, B1 (E, F1, r1) and A2 (E, r2, ffn) per expert. The expectation is the dense math
with W1_e + (alpha/r1) B1_e A1 and W2_e + (alpha/r2) B2 A2_e per expert; gradients are autograd's on
that float64 math over the tokens of this rank's expert block (the shared factors after
finalize_lora_grads, which sums them over EP), never the reference's own helpers.
"""

import pytest
import torch
import torch.distributed as dist
from torch import nn

import reference.parallel as P
from reference import LoRA, finalize_lora_grads, merge_lora, unmerge_lora

from ..distributed import run_distributed
from ..helpers import all_reduce_sum, assert_close, chunk, gather_full, rank_seed, seeded, strided_chunk
from .test_moe import (BATCH, E, EP_LAYOUTS, FFN, H, K, S, base_weights, block_pieces, build_block,
                       dense_moe, grad_of, local_chunk, same_over_ep, sgd_steps, xavier)

CASES = [  # (gated, normalize_moe_lora, share_expert_adapters)
    (False, False, True),
    (True, True, False),
    (True, False, True),
    (False, True, False),
]


def _ranks(etp, normalize, dim):
    r2 = dim // K if normalize else dim
    r1 = -(-r2 // etp) * etp if normalize else dim          # column bases: a multiple of expert TP
    return r1, r2


def _adapters(moe):
    return moe.experts.linear_fc1.adapter, moe.experts.linear_fc2.adapter


def _full_factors(r1, r2, gated):
    f1 = 2 * FFN if gated else FFN
    return (seeded((r1, H), 31), seeded((E, f1, r1), 32), seeded((E, r2, FFN), 33), seeded((H, r2), 34))


def _check_local_shards(moe, state, factors, gated, where):
    """The adapters hold SPEC's shards: fc1 A rows and B_e rows (stride 2 when gated) over expert TP,
    fc2 A_e columns and B rows; per-expert factors stacked for the local experts."""
    A1, B1, A2, B2 = factors
    r, t, ids = state.expert_tp_rank, state.expert_tp_size, moe.experts.local_expert_ids
    a1, a2 = _adapters(moe)
    want = [(a1.linear_in.weight, chunk(A1, 0, r, t)),
            (a1.linear_out.weight, torch.stack([strided_chunk(B1[g], 0, r, t, 2 if gated else 1) for g in ids])),
            (a2.linear_in.weight, torch.stack([chunk(A2[g], 1, r, t) for g in ids])),
            (a2.linear_out.weight, chunk(B2, 0, r, t))]
    for i, (param, expected) in enumerate(want):
        assert param.shape == expected.shape and torch.equal(param.detach(), expected), (where, i)


def _dense(x, fc1s, fc2s, router_w, gated, factors, scales):
    A1, B1, A2, B2 = factors
    s1, s2 = scales
    w1 = [fc1s[e] + s1 * B1[e] @ A1 for e in range(E)]
    w2 = [fc2s[e] + s2 * B2 @ A2[e] for e in range(E)]
    return dense_moe(x, router_w, w1, w2, gated)


def _gathered_grads(moe, state, gated):
    """The full gradients (A1, B1 (E, ...), A2 (E, ...), B2), gathered over expert TP and EP."""
    a1, a2 = _adapters(moe)
    etp, ep = state.expert_tp_group, state.ep_group
    return (gather_full(grad_of(a1.linear_in.weight), 0, etp),
            gather_full(gather_full(grad_of(a1.linear_out.weight), 1, etp, 2 if gated else 1), 0, ep),
            gather_full(gather_full(grad_of(a2.linear_in.weight), 2, etp), 0, ep),
            gather_full(grad_of(a2.linear_out.weight), 0, etp))


# Layouts of each world, each with two of the cases (every case runs at several layouts).
OUTER_LAYOUTS = {1: [(1, 1, 1), (1, 1, 1)], 2: [(1, 2, 1), (2, 1, 2), (2, 2, 1), (1, 1, 2)],
                 4: [(2, 2, 2), (1, 4, 1), (4, 1, 4), (1, 2, 2)]}


def check_shared_outer(layouts):
    X, G = seeded((S, BATCH, H), 21), seeded((S, BATCH, H), 22)
    alpha = 12.0
    for i, (tp, ep, etp) in enumerate(layouts):
        state = P.initialize_model_parallel(tp, ep, etp)
        for gated, normalize, share in (CASES[(2 * i) % len(CASES)], CASES[(2 * i + 1) % len(CASES)]):
            where = f"layout={(tp, ep, etp)} gated={gated} normalize={normalize} share={share}"
            block = build_block(tp, gated=gated)
            moe = block.mlp
            router_w, fc1s, fc2s, _ = base_weights(moe)
            dim = (6 if max(tp, etp) <= 2 else 12) if normalize else 8
            r1, r2 = _ranks(etp, normalize, dim)
            LoRA(target_modules=["linear_fc1", "linear_fc2"], dim=dim, alpha=alpha, normalize_moe_lora=normalize,
                 share_expert_adapters=share, experts_shared_outer_loras=True)(block)
            a1, a2 = _adapters(moe)
            assert (a1.dim, a2.dim) == (r1, r2), where
            assert a1.per_expert == (False, True) and a2.per_expert == (True, False), where
            factors = _full_factors(r1, r2, gated)
            ids = moe.experts.local_expert_ids
            a1.load_full_weights(factors[0], factors[1][ids])
            a2.load_full_weights(factors[2][ids], factors[3])
            _check_local_shards(moe, state, factors, gated, where)
            scales = (alpha / r1, alpha / r2)

            x = local_chunk(X, state).clone().requires_grad_()
            y = block(x)
            want = _dense(local_chunk(X, state), fc1s, fc2s, router_w, gated, factors, scales)
            assert_close(y, want, torch.float64, scale=10, msg=where)
            (y * local_chunk(G, state)).sum().backward()
            before = [grad_of(p).clone() for p in (a1.linear_in.weight, a1.linear_out.weight,
                                                   a2.linear_in.weight, a2.linear_out.weight)]
            finalize_lora_grads(block)
            after = [grad_of(p) for p in (a1.linear_in.weight, a1.linear_out.weight,
                                          a2.linear_in.weight, a2.linear_out.weight)]
            # finalize_lora_grads sums the shared factors (fc1 A, fc2 B) over EP, nothing else.
            for i in (0, 3):
                assert_close(after[i], all_reduce_sum(before[i], state.ep_group), torch.float64, msg=where)
            for i in (1, 2):
                assert torch.equal(after[i], before[i]), where

            # Expected: autograd of the dense float64 math over this rank's expert block's tokens.
            pieces, me = block_pieces(X, state)
            g_pieces, _ = block_pieces(G, state)
            pieces = [p.clone().requires_grad_() for p in pieces]
            leaves = [f.clone().requires_grad_() for f in factors]
            loss = sum((_dense(p, fc1s, fc2s, router_w, gated, leaves, scales) * gp).sum()
                       for p, gp in zip(pieces, g_pieces))
            expected = torch.autograd.grad(loss, [pieces[me]] + leaves)
            assert_close(x.grad, expected[0], torch.float64, scale=10, msg=where)
            for name, got, want_g in zip(("A1", "B1", "A2", "B2"), _gathered_grads(moe, state, gated), expected[1:]):
                assert want_g.abs().max() > 1e-3, (where, name)
                assert_close(got, want_g, torch.float64, scale=100, msg=f"{where} grad {name}")

            # Merged per expert (W_e + scale B_e A_e), the layer computes the same.
            merge_lora(block, keep_wrappers=True)
            with torch.no_grad():
                assert_close(block(local_chunk(X, state)), want, torch.float64, scale=10, msg=f"merged {where}")
            unmerge_lora(block)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_shared_outer_loras_match_dense_math(world_size):
    """[MOE-SHARE-3] [MOE-FWD-1] [MOE-RANK-1] [LORA-MERGE-3] experts_shared_outer_loras on grouped experts
    (gated or not, with and without rank normalization, share_expert_adapters True or False, which it
    overrides): fc1's A (r1, h) and fc2's B (h, r2) are one shared tensor each, fc1's B_e and fc2's A_e
    are stacked per local expert, all sharded over expert TP as SPEC says; the output, the input
    gradient and the gathered gradients of the four factors (the shared ones after
    finalize_lora_grads, which sums only them over EP) equal autograd of the dense float64 math with
    W1_e + (alpha/r1) B1_e A1 and W2_e + (alpha/r2) B2 A2_e, at (TP, EP, expert-TP) layouts of
    worlds 1, 2 and 4 (expert TP up to 4); merged per expert the layer computes the same."""
    run_distributed(check_shared_outer, world_size, OUTER_LAYOUTS[world_size])


def normal(shape):
    w = torch.empty(*shape, dtype=torch.float32)
    nn.init.normal_(w, mean=0.0, std=0.2)
    return w


def check_init_and_sync(layouts):
    for tp, ep, etp in layouts:
        state = P.initialize_model_parallel(tp, ep, etp)
        where = f"layout={(tp, ep, etp)}"
        dim = 4
        # The draws: fc1's A once, then B_g for every global expert; fc2's A_g for every expert, then B.
        torch.manual_seed(9)
        A1, B1 = xavier((dim, H)), torch.stack([normal((FFN, dim)) for _ in range(E)])
        A2, B2 = torch.stack([xavier((dim, FFN)) for _ in range(E)]), normal((H, dim))
        after_draws = torch.rand(1)
        block = build_block(tp, dtype=torch.float32)
        torch.manual_seed(9)
        config = LoRA(target_modules=["linear_fc1", "linear_fc2"], dim=dim, alpha=8, lora_B_init_method="normal",
                      experts_shared_outer_loras=True)
        config(block)
        assert torch.equal(torch.rand(1), after_draws), where
        a1, a2 = _adapters(block.mlp)
        ids = block.mlp.experts.local_expert_ids
        _check_local_shards(block.mlp, state, (A1, B1, A2, B2), False, where)
        full1, full2 = a1.full_weights(), a2.full_weights()
        for got, want in zip(full1 + full2, (A1, B1[ids], A2[ids], B2)):
            assert torch.equal(got.cpu(), want), where

        # Ranks seeded differently: the shared factors are still identical over EP (broadcast), and
        # stay so through SGD steps with finalize_lora_grads (without it they drift apart).
        for finalize in (True, False):
            block = build_block(tp)
            torch.manual_seed(rank_seed(17))
            LoRA(target_modules=["linear_fc1", "linear_fc2"], dim=dim, alpha=8, lora_B_init_method="normal",
                 experts_shared_outer_loras=True)(block)
            a1, a2 = _adapters(block.mlp)
            shared = [a1.linear_in.weight, a2.linear_out.weight]
            assert all([same_over_ep(p, state) for p in shared]), where
            sgd_steps(block, tp, 2, finalize)
            same = [same_over_ep(p, state) for p in shared]
            assert all(same) if finalize else not all(same), (where, finalize, same)


@pytest.mark.parametrize("world_size", [2, 4])
def test_shared_outer_init_and_ep_sync(world_size):
    """[MOE-SHARE-3] [MOE-INIT-1] the factors are the global generator's draws (fc1's A, then its B_g for
    every global expert; fc2's A_g for every expert, then its B), the same full tensors at every
    layout; with ranks seeded differently the shared factors are identical across EP after
    apply_lora and after SGD steps with finalize_lora_grads, and drift apart without it."""
    run_distributed(check_init_and_sync, world_size, EP_LAYOUTS[world_size])


def check_where_it_does_not_apply():
    state = P.initialize_model_parallel(1, dist.get_world_size(), 1)
    e_local = E // state.ep_size
    for share in (True, False):
        block = build_block(1, grouped=False)
        LoRA(target_modules=["linear_fc1", "linear_fc2", "router"], dim=4, experts_shared_outer_loras=True,
             share_expert_adapters=share)(block)
        # Sequential experts keep one ordinary adapter each; the router keeps its full-rank one.
        for j in range(e_local):
            expert = block.mlp.experts.local_experts[j]
            assert expert.linear_fc1.adapter.linear_in.weight.shape == (4, H)
            assert expert.linear_fc1.adapter.linear_out.weight.shape == (FFN, 4)
            assert expert.linear_fc2.adapter.linear_in.weight.shape == (4, FFN)
            assert expert.linear_fc2.adapter.linear_out.weight.shape == (H, 4)
        assert block.mlp.router.adapter.linear_in.weight.shape == (4, H)
        # The default B init (zero: fc1's B_e and fc2's shared B) leaves the layer unchanged.
        plain, adapted = build_block(1), build_block(1)
        LoRA(target_modules=["linear_fc1", "linear_fc2"], experts_shared_outer_loras=True,
             share_expert_adapters=share)(adapted)
        x = seeded((S, BATCH, H), 5)
        with torch.no_grad():
            assert torch.equal(adapted(x), plain(x))
        assert adapted.mlp.experts.linear_fc1.adapter.linear_out.weight.shape[0] == e_local


@pytest.mark.parametrize("world_size", [1, 2])
def test_shared_outer_only_changes_grouped_experts(world_size):
    """[MOE-SHARE-3] [MOE-SHARE-2] [LORA-INIT-3] sequential experts keep one 2-D adapter each and the
    router a full-rank one, whatever share_expert_adapters says; with B zero-initialized the adapted
    grouped layer computes exactly the base layer."""
    run_distributed(check_where_it_does_not_apply, world_size)
