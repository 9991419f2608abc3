"""sequence_parallel_input_regather (SPEC [LORA-FWD-10]): the same math, less retained activation.

At TP 2 with sequence parallelism, column and row bases are run with the flag off and on, from the
same FULL float64 tensors: the outputs and the gradients of A, B and the input must equal each other
and the full-matrix math. What autograd keeps for backward is measured with
torch.autograd.graph.saved_tensors_hooks: with the flag on (where it applies) no saved tensor is as
large as the gathered input (s, b, in); with it off (or where it does not apply) one is.
"""

from collections import Counter

import pytest
import torch
from torch import nn

from conformance.collectives_counter import counting
from conformance.layout import piece, shard_of
import reference.parallel as P
from reference import ColumnParallelLinear, LoRA, LoRALinear, RowParallelLinear, TinyGPT, TinyGPTConfig
from reference.lora import ParallelLinearAdapter, adapter_arguments
from reference.lora.regather import regathers_input

from ..distributed import run_distributed
from ..helpers import assert_close, device, init_tp, seeded

S, BATCH, IN, OUT, DIM = 8, 2, 12, 16, 4
ALPHA = 8.0
FULL_INPUT = S * BATCH * IN          # elements of the gathered input (s, b, in)


def saved_sizes(fn):
    """fn()'s result and the element counts of every tensor autograd saved for backward meanwhile."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sizes


def _wrapped(kind, name, *, sp=True, gather_output=False, stride=1, share=True, **lora):
    """A column/row base named `name` (holding the full W, b) with LoRA(**lora) and the full A, B."""
    if kind == "column":
        base = ColumnParallelLinear(IN, OUT, sequence_parallel=sp, gather_output=gather_output, stride=stride,
                                    params_dtype=torch.float64)
    else:
        base = RowParallelLinear(IN, OUT, sequence_parallel=sp, params_dtype=torch.float64)
    base.load_full_weight(seeded((OUT, IN), 1), seeded((OUT,), 2))
    holder = nn.Module()
    setattr(holder, name, base)
    LoRA(target_modules=[name], dim=DIM, alpha=ALPHA, **lora)(holder)
    wrapper = getattr(holder, name)
    assert isinstance(wrapper, LoRALinear)
    wrapper.adapter.load_full_weights(seeded((DIM, IN), 5), seeded((OUT, DIM), 6))
    wrapper.share_communication = share
    return wrapper


def _run(wrapper, kind, sp, gather_output=False, stride=1, seed=None, grad=True):
    """Forward this rank's input piece and backward this rank's output piece of the full G.
    Returns (y, dx, dA, dB, saved sizes, activation-sized collectives of the step)."""
    state = P.get_parallel_state()
    r, t = state.tp_rank, state.tp_size
    X, G = seeded((S, BATCH, IN), 3), seeded((S, BATCH, OUT), 4)
    x = piece(X, shard_of("input", kind, sp=sp), r, t).clone().requires_grad_()
    g = piece(G, shard_of("output", kind, sp=sp, gather_output=gather_output, stride=stride), r, t)
    if seed is not None:
        torch.manual_seed(seed)                    # the same dropout stream on every rank and run
    with counting() as calls:
        with torch.set_grad_enabled(grad):
            (y, _), sizes = saved_sizes(lambda: wrapper(x))
        if grad:
            (y * g).sum().backward()
    big = [name for name, n in calls if n >= S * BATCH * IN // t]      # a sequence shard of x, or more
    A, B = wrapper.adapter.linear_in.weight, wrapper.adapter.linear_out.weight
    if not grad:
        return y, None, None, None, sizes, big
    return y.detach(), x.grad, A.grad, B.grad, sizes, big


def _full_math(kind, sp, gather_output=False, stride=1):
    """The expected (y, dx, dA, dB) pieces of this rank, from the full float64 tensors."""
    state = P.get_parallel_state()
    r, t = state.tp_rank, state.tp_size
    W, b, A, B = seeded((OUT, IN), 1), seeded((OUT,), 2), seeded((DIM, IN), 5), seeded((OUT, DIM), 6)
    X, G = seeded((S, BATCH, IN), 3), seeded((S, BATCH, OUT), 4)
    s = ALPHA / DIM
    Y = X @ W.T + b + s * (X @ A.T) @ B.T
    Xf, Gf = X.reshape(-1, IN), G.reshape(-1, OUT)
    dA, dB = s * (Gf @ B).T @ Xf, s * Gf.T @ (Xf @ A.T)
    dX = G @ W + s * (G @ B) @ A
    lay = dict(stride=stride)
    return (piece(Y, shard_of("output", kind, sp=sp, gather_output=gather_output, **lay), r, t),
            piece(dX, shard_of("input", kind, sp=sp), r, t),
            piece(dA, shard_of("A", kind), r, t), piece(dB, shard_of("B", kind, **lay), r, t))


ELIGIBLE = [  # (name, base options, wrapper's shared communication)
    ("linear_qkv", dict(), True), ("linear_qkv", dict(), False), ("linear_fc1", dict(stride=2), True),
    ("linear_fc1", dict(stride=2), False), ("linear_qkv", dict(gather_output=True), True),
]


def check_regather_math_and_memory():
    init_tp()
    for name, options, share in ELIGIBLE:
        tag = f"column {name} {options} share_communication={share}"
        runs = {}
        for flag in (False, True):
            wrapper = _wrapped("column", name, share=share, sequence_parallel_input_regather=flag, **options)
            assert regathers_input(wrapper.adapter) == flag, tag
            runs[flag] = _run(wrapper, "column", True, **options)
        off, on = runs[False], runs[True]
        assert torch.equal(on[0], off[0]), f"output changed ({tag})"
        for label, a, b in zip(("dx", "dA", "dB"), on[1:4], off[1:4]):
            assert_close(a, b, msg=f"{label} flag on vs off ({tag})")
        for label, got, want in zip(("y", "dx", "dA", "dB"), on[:4], _full_math("column", True, **options)):
            assert_close(got, want, scale=4, msg=f"{label} vs full math ({tag})")
        # The absolute check: nothing as large as the gathered input is kept with the flag on.
        assert max(on[4]) < FULL_INPUT, f"a saved tensor of {max(on[4])} elements ({tag}): {sorted(on[4])}"
        assert FULL_INPUT in off[4], f"the flag-off run saves no gathered input: the check can't fail ({tag})"
        # The price: one more all-gather of x, in backward (the shared path reuses the base's forward one).
        extra = Counter(on[5]) - Counter(off[5])
        assert len(on[5]) == len(off[5]) + 1 and list(extra)[0].startswith("all_gather"), (tag, off[5], on[5])


@pytest.mark.parametrize("world_size", [2])
def test_regather_gives_the_same_math_and_keeps_only_the_shard(world_size):
    """[LORA-FWD-10] [LORA-FWD-3] [LORA-BWD-1] [LORA-BWD-2] a column linear_qkv / linear_fc1 base under
    SP at TP 2 (stride 2, gather_output, shared or separate communication): with
    sequence_parallel_input_regather the output is bit-identical, dA, dB and dx equal the flag-off
    run and the full float64 math, and no tensor saved for backward is as large as the gathered
    input (s, b, in), which the flag-off run does save; the step runs one more activation-sized
    collective, an all-gather (with shared communication the base's forward gather is reused)."""
    run_distributed(check_regather_math_and_memory, world_size)


def _frozen_A(wrapper):
    wrapper.adapter.linear_in.weight.requires_grad_(False)
    return wrapper


NO_OP = [  # (tag, kind, base name, base options, LoRA options, run options, after building)
    ("row base", "row", "linear_proj", dict(), dict(), dict(), None),
    ("row base, a2a", "row", "linear_fc2", dict(), dict(a2a_experimental=True), dict(), None),
    ("no SP", "column", "linear_qkv", dict(sp=False), dict(), dict(), None),
    ("another name", "column", "output_layer", dict(), dict(), dict(), None),
    ("a2a on a column base", "column", "linear_fc1", dict(), dict(a2a_experimental=True), dict(), None),
    ("eval mode", "column", "linear_qkv", dict(), dict(), dict(), lambda w: w.eval()),
    ("frozen A", "column", "linear_qkv", dict(), dict(), dict(), _frozen_A),
    ("no grad", "column", "linear_qkv", dict(), dict(), dict(grad=False), None),
]


def check_regather_is_a_no_op_elsewhere():
    init_tp()
    for tag, kind, name, base, lora, run, after in NO_OP:
        runs = {}
        for flag in (False, True):
            wrapper = _wrapped(kind, name, **base, **lora, sequence_parallel_input_regather=flag)
            wrapper = after(wrapper) if after else wrapper
            with torch.set_grad_enabled(run.get("grad", True)):
                assert not regathers_input(wrapper.adapter), tag
            runs[flag] = _run(wrapper, kind, base.get("sp", True), **run)
        off, on = runs[False], runs[True]
        assert torch.equal(on[0], off[0]), tag
        for a, b in zip(on[1:4], off[1:4]):
            assert (a is None and b is None) or torch.equal(a, b), tag
        assert sorted(on[4]) == sorted(off[4]), f"what autograd saves changed ({tag})"
    # Expert linears never regather (their layout has no SP here; the flag is not even passed).
    layout = ColumnParallelLinear(IN, OUT, sequence_parallel=True).layout
    weight = torch.zeros(1, device=device())
    config = LoRA(sequence_parallel_input_regather=True)
    for full_name, passed in (("decoder.layers.0.mlp.experts.linear_fc1", False),
                              ("decoder.layers.0.mlp.experts.local_experts.1.linear_fc1", False),
                              ("decoder.layers.0.mlp.shared_experts.linear_fc1", True),
                              ("decoder.layers.0.mlp.linear_fc1", True)):
        assert adapter_arguments(config, layout, full_name, dim=DIM, weight=weight)[
            "sequence_parallel_input_regather"] is passed, full_name
    # An activation between A and B turns it off (Megatron-Bridge's rule), identity keeps it.
    for activation, expected in (("gelu", False), ("identity", True)):
        adapter = ParallelLinearAdapter(IN, OUT, DIM, layout=layout, base_name="decoder.layers.0.mlp.linear_fc1",
                                        activation=activation, sequence_parallel_input_regather=True)
        assert adapter.regather_eligible and regathers_input(adapter) is expected, activation


@pytest.mark.parametrize("world_size", [2])
def test_regather_is_a_no_op_where_megatron_bridge_does_not_regather(world_size):
    """[LORA-FWD-10] at TP 2 the flag changes neither the numbers nor what autograd saves for a row
    base (with or without a2a), a column base without SP, a column base not named linear_qkv /
    linear_fc1, a column base with a2a_experimental, in eval mode, with A frozen or under no_grad;
    expert linears never get it, and an activation between A and B turns it off."""
    run_distributed(check_regather_is_a_no_op_elsewhere, world_size)


def check_regather_with_dropout():
    init_tp()
    for position in ("pre", "post"):
        results = {}
        for share, flag in ((False, False), (False, True), (True, True), (True, False)):
            wrapper = _wrapped("column", "linear_qkv", share=share, dropout=0.5, dropout_position=position,
                               sequence_parallel_input_regather=flag)
            results[share, flag] = _run(wrapper, "column", True, seed=123)
            if flag:
                assert max(results[share, flag][4]) < FULL_INPUT, (position, share)
        # The same masks wherever the dropout acts on the same tensor: "pre" acts on the sequence
        # shard unless the flag-off shared path gathered it first; "post" on the output piece.
        same = [(False, False), (False, True), (True, True)] + ([(True, False)] if position == "post" else [])
        first = results[same[0]]
        for key in same[1:]:
            for label, a, b in zip(("y", "dx", "dA", "dB"), results[key][:4], first[:4]):
                assert_close(a, b, msg=f"{label} dropout {position} share/flag={key}")
        assert (first[0] - _full_math("column", True)[0]).abs().max() > 1e-3, "no dropout happened"


@pytest.mark.parametrize("world_size", [2])
def test_regather_with_dropout(world_size):
    """[LORA-FWD-10] [LORA-FWD-6] with dropout 0.5 "pre" the flag keeps the masks of the adapter's own
    gather (dropout on the sequence shard): the same output and gradients with separate communication,
    flag off or on, and with shared communication, flag on; "post" is unchanged everywhere. Nothing as
    large as the gathered input is saved with the flag on."""
    run_distributed(check_regather_with_dropout, world_size)


def _tiny_gpt_step(regather):
    config = TinyGPTConfig(sequence_parallel=True, gated_linear_unit=True, params_dtype=torch.float64)
    model = TinyGPT(config, seed=7)
    torch.manual_seed(8)
    LoRA(dim=4, alpha=8, lora_B_init_method="normal", sequence_parallel_input_regather=regather)(model)
    ids = torch.randint(0, config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(3)).to(device())
    logits, sizes = saved_sizes(lambda: model(ids))
    (logits * seeded(tuple(logits.shape), 4)).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads, sum(sizes)


def check_tiny_gpt():
    init_tp()
    logits_off, grads_off, saved_off = _tiny_gpt_step(False)
    logits_on, grads_on, saved_on = _tiny_gpt_step(True)
    assert torch.equal(logits_on, logits_off)
    assert grads_on.keys() == grads_off.keys() and len(grads_on) == 16      # 2 layers x 4 linears x (A, B)
    for name, grad in grads_on.items():
        assert_close(grad, grads_off[name], msg=name)
    assert saved_on < saved_off, (saved_on, saved_off)


@pytest.mark.parametrize("world_size", [2])
def test_tiny_gpt_with_regather(world_size):
    """[LORA-FWD-10] [LORA-INJ-5] TinyGPT (gated, SP, TP 2) with LoRA on every linear: the flag gives the
    same logits and adapter gradients and saves fewer elements for backward."""
    run_distributed(check_tiny_gpt, world_size)
