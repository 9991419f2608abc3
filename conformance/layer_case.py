"""One base layer with LoRA, built by the backend from full tensors the suite chose.

A layer example (a dict drawn by `layer_examples`) fixes the base kind, the TP size, the layout
flags, the sizes, the dtype and the seeds of every full tensor. `build` asks the backend for the
layer and its LoRA, then writes this rank's shards of the full A and B into the backend's adapter
parameters *using SPEC.md's sharding* ([LORA-FWD-2]); a backend that shards differently is caught
there or by the forward check. `expected` gives the full-matrix float64 answers.

Which piece of the input, output, weights and adapter a rank holds is SPEC's table in
conformance/layout.py (`example_shard(tensor, ex)`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from hypothesis import strategies as st

from .backend import Container, Groups, LinearSpec
from .configs import layer_lora
from .layout import DTYPES, WHOLE, Shard, example_shard, piece
from .model_case import returned_model
from .registry import with_explicit

NAMES = {"column": "linear_qkv", "row": "linear_proj", "linear": "linear_fc1"}
# A plain nn.Linear needs no TP group, so none is set up for it (switching layouts can be costly).
NO_TP = Groups(None, 1, 0)


def layer_examples(ctx, kinds=("column", "row", "linear"), sp=(False, True), a2a=(False, True),
                   bias=(False, True), dtypes=None, tp=None, dropout=False, alpha=None, dim_multiple=None,
                   unsharded_io=(False,)):
    """Layer examples (see _draw_layer_example) with `.explicit`: one small example per layout
    combination the arguments allow (kind x TP x SP x a2a x gather/input-parallel x stride x dtype),
    which the runner always runs before the random draws (SPEC's rare layouts never depend on the seed)."""
    kwargs = dict(kinds=kinds, sp=sp, a2a=a2a, bias=bias, dtypes=dtypes, tp=tp, dropout=dropout, alpha=alpha,
                  dim_multiple=dim_multiple, unsharded_io=unsharded_io)
    strategy = _draw_layer_example(ctx, **kwargs)
    return with_explicit(strategy, layer_combinations(ctx, **kwargs))


def layer_combinations(ctx, kinds, sp, a2a, bias, dtypes, tp, dropout, alpha, dim_multiple, unsharded_io) -> list:
    """Every layout combination `layer_examples` can draw, each once with small sizes."""
    combos = []
    for kind in kinds:
        for t in ([1] if kind == "linear" else list(tp or ctx.tp_sizes)):
            for with_sp in ([False] if kind == "linear" or t == 1 else list(sp)):
                for with_a2a in (list(a2a) if kind == "row" and with_sp else [False]):
                    for unsharded in ([False] if kind == "linear" or with_sp else list(unsharded_io)):
                        gather_output = unsharded and kind == "column"
                        for stride in ([1, 2] if kind == "column" and not gather_output else [1]):
                            for dtype in list(dtypes or ctx.dtypes):
                                ex = {"kind": kind, "tp": t, "sp": with_sp, "a2a": with_a2a,
                                      "gather_output": gather_output,
                                      "input_is_parallel": not (unsharded and kind == "row"), "stride": stride,
                                      "bias": True in bias, "skip_bias_add": False, "s": 2 * t, "b": 1,
                                      "in": 2 * t, "out": 2 * t * stride,
                                      "dim": 2 * (dim_multiple or t) if kind == "column" else 3,
                                      "alpha": alpha if alpha is not None else 8, "dtype": dtype, "seed": 0}
                                if dropout:
                                    for position in ctx.supported("dropout_position", ["pre", "post"]):
                                        combos.append({**ex, "dropout": 0.5, "dropout_position": position})
                                else:
                                    combos.append(ex)
    return combos


@st.composite
def _draw_layer_example(draw, ctx, kinds=("column", "row", "linear"), sp=(False, True), a2a=(False, True),
                        bias=(False, True), dtypes=None, tp=None, dropout=False, alpha=None, dim_multiple=None,
                        unsharded_io=(False,)):
    """A layer example: plain values only (so it prints as JSON and replays with --replay).

    Column bases return their hidden shard and row bases take theirs unless `unsharded_io` allows
    True: a gathered output (gather_output) and a full input (input_is_parallel=False) are
    [LORA-FWD-8]'s and have properties of their own, so that a backend deviating there is still
    measured everywhere else."""
    kind = draw(st.sampled_from(list(kinds)))
    t = draw(st.sampled_from(list(tp or ctx.tp_sizes))) if kind != "linear" else 1
    ex = {"kind": kind, "tp": t}
    ex["sp"] = draw(st.sampled_from(list(sp))) if kind != "linear" and t > 1 else False
    ex["a2a"] = draw(st.sampled_from(list(a2a))) if kind == "row" and ex["sp"] else False
    unsharded = draw(st.sampled_from(list(unsharded_io))) if kind != "linear" and not ex["sp"] else False
    ex["gather_output"] = unsharded and kind == "column"
    ex["input_is_parallel"] = not (unsharded and kind == "row")
    ex["stride"] = draw(st.sampled_from([1, 2])) if kind == "column" and not ex["gather_output"] else 1
    ex["bias"] = draw(st.sampled_from(list(bias)))
    ex["skip_bias_add"] = draw(st.booleans()) if ex["bias"] and kind != "linear" and ctx.supports("skip_bias_add") else False
    ex["s"] = t * draw(st.integers(1, 3))
    ex["b"] = draw(st.integers(1, 2))
    ex["in"] = t * draw(st.integers(1, 4))
    ex["out"] = t * ex["stride"] * draw(st.integers(1, 4))
    ex["dim"] = (dim_multiple or t) * draw(st.integers(1, 4)) if kind == "column" else draw(st.integers(1, 8))
    ex["alpha"] = alpha if alpha is not None else draw(st.sampled_from([1, 8, 16, 32, 0.5]))
    ex["dtype"] = draw(st.sampled_from(list(dtypes or ctx.dtypes)))
    ex["seed"] = draw(st.integers(0, 2**16))
    if dropout:
        ex["dropout"] = draw(st.sampled_from([0.25, 0.5]))
        # Only the positions the backend supports (capability values): each is then checked in full.
        ex["dropout_position"] = draw(st.sampled_from(ctx.supported("dropout_position", ["pre", "post"])))
    return ex


@dataclass
class Built:
    ex: dict
    groups: object
    container: Container
    wrapped: object
    W: torch.Tensor          # full, float64 (values exactly representable in the example's dtype)
    bias: torch.Tensor | None
    A: torch.Tensor
    B: torch.Tensor
    dtype: torch.dtype

    scale_override: float | None = None     # a fitted scale ([LORA-FWD-1]'s check; see properties/forward.py)

    @property
    def scale(self) -> float:
        return self.ex["alpha"] / self.ex["dim"] if self.scale_override is None else self.scale_override


def _rounded(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 values that the dtype holds exactly, so the full math uses what the backend stores."""
    return t.to(dtype).to(torch.float64)


def build(ctx, backend, ex: dict, load_adapter: bool = True, **lora_overrides) -> Built:
    """The example's base layer with LoRA, A and B loaded as SPEC shards (see build_base, add_lora)."""
    return add_lora(ctx, backend, build_base(ctx, backend, ex), load_adapter=load_adapter, **lora_overrides)


def local_piece(full: torch.Tensor, shard: Shard, groups) -> torch.Tensor:
    """This rank's piece of `full` over the example's TP group."""
    return piece(full, shard, groups.tp_rank, groups.tp_size)


def load_adapter_weights(built: Built, backend, A=None, B=None) -> None:
    """Write the full A and B (default: the example's) into the backend's adapter: whole through
    load_full_adapter_weights for a backend with "full_adapter" (its layout is then [LORA-FWD-2]'s
    business alone), else this rank's SPEC shards into adapter_weights, in place."""
    A, B = built.A if A is None else A, built.B if B is None else B
    A_param, B_param = backend.adapter_weights(built.wrapped)
    if backend.supports("full_adapter"):
        backend.load_full_adapter_weights(built.wrapped, A.to(A_param.dtype), B.to(B_param.dtype))
        return
    for label, param, full in (("A", A_param, A), ("B", B_param, B)):
        local = local_piece(full, example_shard(label, built.ex), built.groups)
        if tuple(param.shape) != tuple(local.shape):
            raise AssertionError(
                f"adapter {label} on this rank has shape {tuple(param.shape)}; SPEC [LORA-FWD-2] gives "
                f"{tuple(local.shape)} for a {built.ex['kind']} base (full {tuple(full.shape)}, tp={built.ex['tp']})")
        with torch.no_grad():
            param.copy_(local.to(param.dtype))


def adapter_tensors(backend, built: Built, grad: bool = False) -> list[tuple[torch.Tensor | None, Shard]]:
    """[(A, its shard), (B, its shard)]: the adapter's weights (grad=True: their gradients) and the
    piece of the full tensor each is: the full tensors (WHOLE) from a backend with "full_adapter",
    else this rank's parameters as SPEC shards ([LORA-FWD-2])."""
    if backend.supports("full_adapter"):
        return [(t, WHOLE) for t in backend.full_adapter_weights(built.wrapped, grad=grad)]
    params = backend.adapter_weights(built.wrapped)
    return [(p.grad if grad else p, example_shard(label, built.ex)) for label, p in zip("AB", params)]


def expected(built: Built, X: torch.Tensor, G: torch.Tensor, lora: bool = True) -> dict:
    """Full float64 forward and gradients for input X (s, b, in) and upstream gradient G (s, b, out)."""
    W, A, B, s = built.W, built.A, built.B, built.scale
    Y = X @ W.T
    if built.bias is not None and not built.ex["skip_bias_add"]:
        Y = Y + built.bias
    H = X @ A.T                                                   # (s, b, d)
    if lora:
        Y = Y + s * H @ B.T
    Xf, Gf, Hf = X.reshape(-1, X.shape[-1]), G.reshape(-1, G.shape[-1]), H.reshape(-1, H.shape[-1])
    dX = G @ W + (s * (G @ B) @ A if lora else 0)
    dB = s * Gf.T @ Hf                                            # (out, d)
    dA = s * (Gf @ B).T @ Xf                                      # (d, in)
    return {"Y": Y, "dX": dX, "dA": dA, "dB": dB}


def term_sizes(built: Built, X: torch.Tensor, G: torch.Tensor, lora: bool = True) -> dict:
    """The largest entry of each of `expected`'s results computed on absolute values: the size of the
    terms every result sums (Context.assert_close's `terms`)."""
    absolute = replace(built, W=built.W.abs(), A=built.A.abs(), B=built.B.abs(),
                       bias=None if built.bias is None else built.bias.abs())
    return {key: value.abs().max().item() for key, value in expected(absolute, X.abs(), G.abs(), lora).items()}


def run(ctx, built: Built, X: torch.Tensor, G: torch.Tensor):
    """Forward this rank's input piece, backward this rank's loss; returns (y_local, bias, x_local)."""
    ex = built.ex
    x = local_piece(X, example_shard("input", ex), built.groups).to(built.dtype).clone().requires_grad_(True)
    result = built.wrapped(x)
    y, returned_bias = (result if isinstance(result, tuple) else (result, None))
    g = local_piece(G, example_shard("output", ex), built.groups)
    if isinstance(y, torch.Tensor) and y.shape == g.shape:
        (y.float() * g.float()).sum().backward()
    return y, returned_bias, x


# -- the base layer alone, and LoRA added to it (for the parallel, init, dtype and merge properties) --

def build_base(ctx, backend, ex: dict) -> Built:
    """The base layer of `ex` alone, without LoRA, with the same full W and bias as `build`.

    `wrapped` is the bare layer (also `container.layer()`); A and B are zeros of the adapter's full
    shapes, so that `run(ctx, base, X, G)` and `expected(base, X, G, lora=False)` apply as they are.
    """
    dtype = DTYPES[ex["dtype"]]
    groups = backend.init_parallel(ex["tp"]) if ex["kind"] != "linear" else NO_TP  # nn.Linear: no layout
    seed = ex["seed"]
    W = _rounded(ctx.randn((ex["out"], ex["in"]), seed, scale=ex["in"] ** -0.5), dtype)
    bias = _rounded(ctx.randn((ex["out"],), seed + 1), dtype) if ex["bias"] else None
    name = NAMES[ex["kind"]]
    spec = LinearSpec(kind=ex["kind"], in_features=ex["in"], out_features=ex["out"], weight=W.to(dtype),
                      bias=None if bias is None else bias.to(dtype), sequence_parallel=ex["sp"],
                      skip_bias_add=ex["skip_bias_add"], gather_output=ex["gather_output"],
                      input_is_parallel=ex["input_is_parallel"], stride=ex["stride"], dtype=dtype,
                      groups=groups, name=name)
    layer = backend.make_linear(spec)
    container = Container(name, layer)
    A = torch.zeros(ex["dim"], ex["in"], dtype=torch.float64, device=ctx.device)
    B = torch.zeros(ex["out"], ex["dim"], dtype=torch.float64, device=ctx.device)
    return Built(ex, groups, container, layer, W, bias, A, B, dtype)


def add_lora(ctx, backend, base: Built, load_adapter: bool = True, torch_seed: int | None = None,
             **lora_overrides) -> Built:
    """LoRA on a `build_base` layer, as `build` does (same full A and B, loaded when load_adapter).

    torch_seed: `torch.manual_seed(torch_seed)` on every rank right before `apply_lora`, so that
    the adapter's own initialization is reproducible (SPEC [LORA-INIT-2]).
    """
    ex, name = base.ex, NAMES[base.ex["kind"]]
    config = backend.validate_config(layer_lora(ex, name, **lora_overrides))
    if torch_seed is not None:
        torch.manual_seed(torch_seed)
    container = returned_model(base.container, backend.apply_lora(base.container, config, training=True))
    if not isinstance(container, Container):
        raise AssertionError(f"apply_lora returned a {type(container).__name__} for the suite's Container; return "
                             f"the model it was given (adapted in place) or a copy of it (conformance/backend.py)")
    wrapped = container.layer()
    A = _rounded(ctx.randn((ex["dim"], ex["in"]), ex["seed"] + 2, scale=ex["in"] ** -0.5), base.dtype)
    B = _rounded(ctx.randn((ex["out"], ex["dim"]), ex["seed"] + 3, scale=ex["dim"] ** -0.5), base.dtype)
    built = Built(ex, base.groups, container, wrapped, base.W, base.bias, A, B, base.dtype)
    if load_adapter:
        load_adapter_weights(built, backend)
    return built


def as_plain_linear(ex: dict) -> dict:
    """The same sizes on a plain nn.Linear base (for backends without tensor parallelism)."""
    return dict(ex, kind="linear", tp=1, sp=False, a2a=False, gather_output=False, input_is_parallel=True,
                stride=1, skip_bias_add=False)


def fit_to_backend(ctx, ex: dict, backend) -> dict:
    """The example moved onto bases the backend has, for properties whose point is not the base kind:
    column/row bases become plain nn.Linear for a backend without "tp", and the reverse. What changed
    is recorded (ctx.ran), so that a failure reports the example that ran."""
    fitted = ex
    if ex["kind"] != "linear" and not backend.supports("tp") and backend.supports("linear"):
        fitted = as_plain_linear(ex)
    elif ex["kind"] == "linear" and not backend.supports("linear"):
        fitted = dict(ex, kind="column")                     # a TP-1 column base with the same sizes
    else:
        if ex["tp"] > 1 and not backend.supports("tp"):
            fitted = dict(fitted, tp=1, sp=False, a2a=False)
        if fitted["sp"] and not backend.supports("sp"):
            fitted = dict(fitted, sp=False, a2a=False)
        if fitted["a2a"] and not backend.supports("a2a"):
            fitted = dict(fitted, a2a=False)
        if fitted.get("skip_bias_add") and not backend.supports("skip_bias_add"):
            fitted = dict(fitted, skip_bias_add=False)
    ctx.ran(**{key: value for key, value in fitted.items() if ex.get(key) != value})
    return fitted


def fit_layout(ctx, backend, ex: dict) -> tuple[int, bool]:
    """(tp, sp) of a model example moved onto what the backend supports; recorded (ctx.ran)."""
    tp = ex["tp"] if backend.supports("tp") else 1
    sp = ex["sp"] and tp > 1 and backend.supports("sp")
    ctx.ran(**{key: value for key, value in (("tp", tp), ("sp", sp)) if ex.get(key) != value})
    return tp, sp


def plain_example(**values) -> dict:
    """A layer example without the layout options (no SP, a2a, gather, stride or skip_bias_add),
    float32: the given values on top (for properties that pick their own sizes)."""
    ex = {"sp": False, "a2a": False, "gather_output": False, "input_is_parallel": True, "stride": 1,
          "skip_bias_add": False, "b": 1, "alpha": 1, "dtype": "float32"}
    ex.update(values)
    return ex
