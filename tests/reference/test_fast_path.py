"""reference/fast: what the conformance suite does not reach. The suite (tests/suite/test_fast.py)
judges the fused step's forward and backward against full-matrix float64 math; here:
- a *trainable* base (weight and bias gradients: the suite's bases are frozen), checked per rank
  against first principles (dL/dW_r = G_rᵀ X, dL/db = Σ G) and the rest against the reference's
  LoRALinear on the same weights, inputs and dropout mask (the suite is that comparison's absolute twin);
- which calls take the fused step and which the reference's forward, and strict mode;
- use_fast_wrappers keeps parameters, state dict and merge state."""

import itertools

import pytest
import torch
import torch.distributed as dist

import reference
import reference.parallel as P
from reference import ColumnParallelLinear, RowParallelLinear
from reference.fast import FastLoRALinear, use_fast_wrappers

from ..distributed import run_distributed
from ..helpers import assert_close, chunk, seeded

S, B, IN, OUT, R = 8, 2, 12, 16, 4


def _layer(kind, sp, dtype=torch.float64, **lora):
    common = dict(bias=True, sequence_parallel=sp, params_dtype=dtype)
    base = (ColumnParallelLinear(IN, OUT, **common) if kind == "column" else RowParallelLinear(IN, OUT, **common))
    base.load_full_weight(seeded((OUT, IN), 1, dtype), seeded((OUT,), 2, dtype))
    box = torch.nn.Module()
    box.linear_fc1 = base
    reference.LoRA(target_modules=["linear_fc1"], dim=R, alpha=8, **lora)(box)
    box.linear_fc1.adapter.load_full_weights(seeded((R, IN), 3, torch.float64), seeded((OUT, R), 4, torch.float64))
    return box


def _step(box, kind, sp, dtype=torch.float64, seed=7):
    """(output, input grad, A grad, B grad, W grad, bias grad, the local x and g) of one step."""
    state = P.get_parallel_state()
    wrapped = box.linear_fc1
    X = seeded((S, B, IN), 5, dtype)
    x = chunk(X, 0, state.tp_rank, state.tp_size) if (sp and kind == "column") else (
        chunk(X, -1, state.tp_rank, state.tp_size) if kind == "row" else X)
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)                                        # the same dropout mask for both
    y, _ = wrapped(x)
    g = seeded(tuple(y.shape), 6 + state.tp_rank * sp, dtype)
    (y * g).sum().backward()
    base, adapter = wrapped.to_wrap, wrapped.adapter
    return [y.detach(), x.grad, adapter.linear_in.weight.grad, adapter.linear_out.weight.grad,
            base.weight.grad, base.bias.grad], x.detach(), g


def check_fast_matches_reference_with_a_trainable_base():
    P.initialize_model_parallel(dist.get_world_size())
    state = P.get_parallel_state()
    names = ("output", "input grad", "A grad", "B grad", "W grad", "bias grad")
    for kind, sp, dropout in itertools.product(("column", "row"), (False, True), (0.0, 0.5)):
        boxes = []
        for fast in (False, True):
            box = _layer(kind, sp, dropout=dropout)
            box.linear_fc1.to_wrap.requires_grad_(True)
            if fast:
                assert use_fast_wrappers(box) == 1
            boxes.append(box)
        want, _, _ = _step(boxes[0], kind, sp)
        got, x, g = _step(boxes[1], kind, sp)
        assert boxes[1].linear_fc1.fused_calls == 1 and boxes[1].linear_fc1.reference_calls == 0
        for a, b, what in zip(got, want, names):
            assert_close(a, b, msg=f"{what}: {kind} sp={sp} dropout={dropout}")
        # First principles for the base's gradients (the suite never trains a base).
        if kind == "column":   # y_r = X W_rᵀ + b_r on the full sequence X (gathered under SP); g is (s, b, out/t)
            X = seeded((S, B, IN), 5, torch.float64)
            assert_close(got[4], g.reshape(-1, g.shape[-1]).t() @ X.reshape(-1, IN), msg="column W grad")
            assert_close(got[5], g.reshape(-1, g.shape[-1]).sum(0), msg="column bias grad")
        else:                  # partial_r = x_r W_rᵀ: its gradient is the whole G (under SP, every rank's piece)
            G = torch.cat([seeded(tuple(g.shape), 6 + q, torch.float64) for q in range(state.tp_size)], 0) \
                if sp else g
            assert_close(got[4], G.reshape(-1, OUT).t() @ x.reshape(-1, x.shape[-1]), msg="row W grad")
            # The bias is added after the reduction, to this rank's output (its sequence shard under
            # SP, whose gradient Megatron sums over ranks later, as for every SP-replicated parameter).
            assert_close(got[5], g.reshape(-1, OUT).sum(0), msg="row bias grad")


def test_fast_path_matches_the_reference_with_a_trainable_base():
    """[LORA-FWD-1] [LORA-BWD-1] [LORA-FWD-6] the fused step with trainable base weights and "pre"
    dropout: output and every gradient (input, A, B, W, bias) as the reference's, W and bias from
    first principles too, column and row, with and without SP, at TP 2."""
    run_distributed(check_fast_matches_reference_with_a_trainable_base, 2)


def check_fallbacks_and_strict():
    P.initialize_model_parallel(dist.get_world_size())
    sp = dist.get_world_size() > 1
    cases = {"post dropout": dict(dropout=0.5, dropout_position="post"),
             "input regather": dict(sequence_parallel_input_regather=True)}
    for what, lora in cases.items():
        want, _, _ = _step(_layer("column", sp, **lora), "column", sp)
        box = _layer("column", sp, **lora)
        use_fast_wrappers(box)
        got, _, _ = _step(box, "column", sp)
        wrapped = box.linear_fc1
        assert (wrapped.fused_calls, wrapped.reference_calls) == (0, 1), what
        for a, b in zip(got[:4], want[:4]):
            assert_close(a, b, msg=what)
        wrapped.strict = True
        with pytest.raises(NotImplementedError, match="no fused step"):
            _step(box, "column", sp)
    # In eval mode "post" dropout is the identity: fused.
    box = _layer("column", sp, **cases["post dropout"])
    use_fast_wrappers(box)
    box.eval()
    box.linear_fc1.strict = True
    box.linear_fc1(seeded((S // (2 if sp else 1), B, IN), 5))
    assert box.linear_fc1.fused_calls == 1


def test_calls_outside_the_fused_step_take_the_reference_forward():
    """What FastLoRALinear does not fuse ("post" dropout in train mode, sequence_parallel_input_regather)
    runs the reference's forward, with the same result; strict mode makes it an error."""
    run_distributed(check_fallbacks_and_strict, 2)


def test_use_fast_wrappers_keeps_parameters_state_dict_and_merge_state():
    P.initialize_model_parallel(1)
    model = reference.TinyGPT(reference.TinyGPTConfig(vocab_size=16, hidden_size=8, num_layers=2,
                                                      num_attention_heads=2, ffn_hidden_size=16), seed=0)
    model = reference.LoRA(dim=2, lora_B_init_method="normal")(model)
    keys, params = list(model.state_dict()), {n: p for n, p in model.named_parameters()}
    ids = torch.randint(0, 16, (2, 6))
    want = model(ids)
    reference.merge_lora(model, keep_wrappers=True)
    count = use_fast_wrappers(model)
    wrappers = [m for m in model.modules() if isinstance(m, FastLoRALinear)]
    assert count == len(wrappers) == 8 and all(w.merged for w in wrappers)
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())
    reference.unmerge_lora(model)
    assert_close(model(ids), want, scale=1e3)
    assert all(w.fused_calls == 1 for w in wrappers)


def test_lora_dtype_other_than_the_base():
    """[LORA-DTYPE-2] float32 adapters on a bfloat16 base: the update in float32, cast once, as the reference."""
    P.initialize_model_parallel(1)
    for kind in ("column", "row"):
        boxes = [_layer(kind, False, dtype=torch.bfloat16, lora_dtype=torch.float32) for _ in range(2)]
        use_fast_wrappers(boxes[1])
        want, _, _ = _step(boxes[0], kind, False, dtype=torch.bfloat16)
        got, _, _ = _step(boxes[1], kind, False, dtype=torch.bfloat16)
        assert boxes[1].linear_fc1.fused_calls == 1
        for a, b in zip(got[:4], want[:4]):
            assert a.dtype == b.dtype
            assert_close(a.float(), b.float(), dtype=torch.bfloat16, msg=kind)
