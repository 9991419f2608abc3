"""Bad inputs against the public API of `reference`: a catalogue, run and classified.

    python tools/bad_inputs.py [--json PATH] [--fail-on-bad] [-k SUBSTRING]
    torchrun --standalone --nproc-per-node 2 tools/bad_inputs.py [--json PATH] [--fail-on-bad]

Each case calls one public function or constructor with one bad value (everything else valid) and
says what it expects: "error" (SPEC [LORA-CFG-2], [TP-ERR-1], [LORA-ERR-1]: a ValueError or TypeError
naming the argument) or "warn" (a UserWarning naming it). Its outcome is one of

    clear   a ValueError or TypeError (or a subclass) whose message contains the case's `names`
    warned  (warn cases) a UserWarning whose message contains `names`
    deep    anything else raised: RuntimeError, ZeroDivisionError, AttributeError, IndexError, ...,
            or a ValueError / TypeError that does not name the argument: a crash deep inside
    silent  nothing raised (and, for a warn case, no matching warning): silent acceptance

`names` is matched case-insensitively, "_" and " " alike ("base_weight" matches "base weight's
shape"); "a|b" accepts either (cases with NaN / inf values also accept a message saying "nan" /
"inf"). A warn case that raises a clear error is `clear` (stricter than asked, and fine). A case
whose valid setup (the model or layer the bad value is given to) fails is `deep`, its message
starting with "setup:". Only values the SPEC does not allow are here: integer-likes that must be
accepted, and parts the SPEC says are skipped, are not bad inputs.

Without torchrun the tool joins a one-process gloo group itself (reference.init_distributed). Under
torchrun every rank runs every case in the same order (some calls are collectives) and rank 0
prints; a case that needs tensor parallelism 2 (`tp=2`) or an expert-parallel world of 2 runs only
when the world allows it and is otherwise skipped, not counted. If the ranks disagree about a case,
the worse outcome is reported and the message says so. No case needs a collective that a rank could
skip: every bad value is the same on every rank.

Output: one line per case (id, outcome, the first line of the message, at most 100 characters),
then the totals. --json PATH writes {"world", "cases": [{"id", "api", "expect", "names", "outcome",
"message"}], "totals"}. The exit code is 0 (this is a measuring tool) unless --fail-on-bad is given,
then 1 if any case is deep or silent.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import reference  # noqa: E402
from reference import (  # noqa: E402
    ColumnParallelLinear,
    LoRA,
    LoRAMerge,
    MoELayer,
    ParallelLinearAdapter,
    RowParallelLinear,
    TinyGPT,
    TinyGPTConfig,
    TinyVLM,
    VLMLoRA,
    apply_lora,
    finalize_lora_grads,
    initialize_model_parallel,
    layout_of,
    merge_lora,
    merge_lora_shard,
    merge_lora_weight,
    set_adapters_enabled,
    unmerge_lora,
)

NAN, INF = float("nan"), float("inf")
FLOAT8 = [torch.float8_e4m3fn] if hasattr(torch, "float8_e4m3fn") else []
OUTCOMES = ("clear", "warned", "deep", "silent")
SEVERITY = {outcome: i for i, outcome in enumerate(OUTCOMES)}   # later is worse
MESSAGE_CHARS = 100


@dataclass(frozen=True)
class Case:
    """One bad input: `call(setup())` (or `call()` without a setup) under a TP layout of size `tp`."""

    id: str
    expect: str                     # "error" or "warn"
    names: str                      # what the message must contain; "a|b": either
    call: Callable
    setup: Callable | None = None   # builds the valid things the bad value is given to
    tp: int = 1                     # the tensor-parallel size the case runs under
    min_world: int = 1              # e.g. 2 for an expert-parallel layout of 2
    api: str = ""                   # filled in from the group

    def runs_at(self, world: int) -> bool:
        return world >= max(self.tp, self.min_world) and world % self.tp == 0


def bad(id: str, names: str, call: Callable, **kw) -> Case:
    """A case that must raise a ValueError / TypeError naming `names`."""
    return Case(id, "error", names, call, **kw)


def warns(id: str, names: str, call: Callable, **kw) -> Case:
    """A case that must warn (UserWarning) naming `names` (a clear error is accepted too)."""
    return Case(id, "warn", names, call, **kw)


def world_size() -> int:
    return dist.get_world_size()


def singleton_group():
    """This rank's one-rank group (the TP group of the tp=1 layout)."""
    return initialize_model_parallel(1).tp_group


# ---- fixtures: small valid things the bad values are given to -----------------------------------

def tokens(b=2, s=8, vocab=64, dtype=torch.long) -> torch.Tensor:
    return (torch.arange(b * s) % vocab).reshape(b, s).to(dtype)


def activations(s=4, b=2, h=8, dtype=torch.float32) -> torch.Tensor:
    return torch.linspace(-1, 1, s * b * h, dtype=dtype).reshape(s, b, h)


def column(**kw) -> ColumnParallelLinear:
    args = dict(input_size=8, output_size=16)
    args.update(kw)
    return ColumnParallelLinear(**args)


def row(**kw) -> RowParallelLinear:
    args = dict(input_size=16, output_size=8)
    args.update(kw)
    return RowParallelLinear(**args)


def adapter(**kw) -> ParallelLinearAdapter:
    args = dict(in_features=8, out_features=16, dim=4)
    args.update(kw)
    return ParallelLinearAdapter(**args)


def merge_tensors(out=16, inn=8, r=4):
    """(W, B, A) full and local at TP 1: W (out, in), B (out, r), A (r, in)."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(out, inn, generator=g), torch.randn(out, r, generator=g), torch.randn(r, inn, generator=g)


def with_nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = NAN
    return t


def adapted(dim=8, **kw) -> TinyGPT:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LoRA(dim=dim, **kw)(TinyGPT())


def adapted_with_nan_B() -> TinyGPT:
    model = adapted()
    with torch.no_grad():
        model.decoder.layers[0].self_attention.linear_qkv.adapter.linear_out.weight[0, 0] = NAN
    return model


def tiny_gpt(**config) -> TinyGPT:
    return TinyGPT(TinyGPTConfig(**config))


def patches(b=2, n=5, patch_dim=12) -> torch.Tensor:
    return torch.linspace(-1, 1, b * n * patch_dim).reshape(b, n, patch_dim)


# ---- 1. LoRA(...) construction -------------------------------------------------------------------

LORA_BAD_VALUES = {
    "dim": [0, -1, 2.5, "8", True, None, NAN],
    "alpha": [NAN, INF, -INF, 0, -1.0, "x", None],
    "dropout": [-0.1, 1.0, 1.5, NAN, "0.1", None],
    "dropout_position": ["mid", "", None, 1, "PRE"],
    "lora_A_init_method": ["uniform", "xavier_uniform", "", None, 3],
    "lora_B_init_method": ["uniform", "gaussian", None, 3],
    "lora_dtype": [torch.int8, *FLOAT8, torch.int64, torch.bool, torch.complex64, "float16", 16],
    "target_modules": ["linear_qkv", [1], [""], [None], None, {"linear_qkv"}],
    "a2a_experimental": ["yes", 1, None],
    "normalize_moe_lora": [1, "true"],
    "share_expert_adapters": ["false", 0],
    "experts_shared_outer_loras": ["yes"],
    "sequence_parallel_input_regather": ["yes", 1],
}
EXCLUDE_BAD_VALUES = ["linear_qkv", [1], [""], [None], None]     # with target_modules=[] (exclude mode)
VLM_FLAGS = ("freeze_vision_model", "freeze_vision_projection", "freeze_language_model")


def config_cases() -> list[Case]:
    cases = [bad(f"LoRA.{field}={value!r}", field, partial(LoRA, **{field: value}))
             for field, values in LORA_BAD_VALUES.items() for value in values]
    cases += [bad(f"LoRA.exclude_modules={value!r}", "exclude_modules",
                  partial(LoRA, target_modules=[], exclude_modules=value)) for value in EXCLUDE_BAD_VALUES]
    cases += [
        bad("LoRA.targets+excludes both non-empty", "exclude_modules",
            partial(LoRA, exclude_modules=["linear_fc2"])),
        bad("LoRA.rank=8 (no such field)", "rank", partial(LoRA, rank=8)),
        bad("VLMLoRA.freeze_vision_model='yes'", "freeze_vision_model", partial(VLMLoRA, freeze_vision_model="yes")),
        bad("VLMLoRA.freeze_vision_projection=None", "freeze_vision_projection",
            partial(VLMLoRA, freeze_vision_projection=None)),
        bad("VLMLoRA.freeze_language_model=1", "freeze_language_model", partial(VLMLoRA, freeze_language_model=1)),
    ]
    return cases


# ---- 2. fields set after construction ------------------------------------------------------------

def assign(field: str, value, config=LoRA) -> Callable:
    def call():
        setattr(config(), field, value)
    return call


def append_then_apply(pattern) -> Callable:
    def call():
        config = LoRA()
        config.target_modules.append(pattern)      # in place: no __setattr__
        config(TinyGPT())
    return call


ASSIGNED_BAD_VALUES = [
    ("dim", 0), ("dim", "8"), ("alpha", -1), ("alpha", NAN), ("dropout", 1.0), ("dropout_position", "mid"),
    ("lora_A_init_method", "uniform"), ("lora_B_init_method", None), ("lora_dtype", torch.int8),
    ("lora_dtype", "float16"), ("target_modules", "linear_qkv"), ("target_modules", [""]),
    ("a2a_experimental", "yes"), ("normalize_moe_lora", 1), ("share_expert_adapters", "no"),
]


def assigned_cases() -> list[Case]:
    cases = [bad(f"LoRA().{field}={value!r}", field, assign(field, value)) for field, value in ASSIGNED_BAD_VALUES]
    cases += [
        bad("LoRA().exclude_modules=['linear_fc2'] (targets set)", "exclude_modules",
            assign("exclude_modules", ["linear_fc2"])),
        bad("VLMLoRA().freeze_vision_model='yes'", "freeze_vision_model",
            assign("freeze_vision_model", "yes", VLMLoRA)),
        bad("VLMLoRA().freeze_language_model=None", "freeze_language_model",
            assign("freeze_language_model", None, VLMLoRA)),
        bad("LoRA().target_modules.append(1); apply", "target_modules", append_then_apply(1)),
        bad("LoRA().target_modules.append(''); apply", "target_modules", append_then_apply("")),
    ]
    return cases


# ---- 4. ColumnParallelLinear / RowParallelLinear -------------------------------------------------

def layer_construction_cases() -> list[Case]:
    cases = []
    for layer_name, build in (("Column", column), ("Row", row)):
        for field in ("input_size", "output_size"):
            for value in (0, -1, 2.5):
                cases.append(bad(f"{layer_name}.{field}={value!r}", field, partial(build, **{field: value})))
        cases += [
            bad(f"{layer_name}.params_dtype=torch.int8", "params_dtype", partial(build, params_dtype=torch.int8)),
            bad(f"{layer_name}.sequence_parallel='false'", "sequence_parallel",
                partial(build, sequence_parallel="false")),
            bad(f"{layer_name}.tp_group=5", "tp_group", partial(build, tp_group=5)),
        ]
    cases += [
        bad("Column.stride=0", "stride", partial(column, stride=0)),
        bad("Column.stride=-1", "stride", partial(column, stride=-1)),
        bad("Column.stride=3 (16 % 3)", "stride", partial(column, stride=3)),
        bad("Column.params_dtype='float32'", "params_dtype", partial(column, params_dtype="float32")),
        bad("Column.init_method='uniform'", "init_method", partial(column, init_method="uniform")),
        bad("Column.bias='yes'", "bias", partial(column, bias="yes")),
        bad("Column.gather_output='no'", "gather_output", partial(column, gather_output="no")),
        bad("Column.tp_group='tp'", "tp_group", partial(column, tp_group="tp")),
        bad("Column.gather_output+stride=2", "gather_output", partial(column, gather_output=True, stride=2)),
        bad("Column.explicit_expert_comm+sequence_parallel", "explicit_expert_comm",
            partial(column, explicit_expert_comm=True, sequence_parallel=True)),
        bad("Row.input_is_parallel='no'", "input_is_parallel", partial(row, input_is_parallel="no")),
        bad("Row.skip_bias_add='no'", "skip_bias_add", partial(row, skip_bias_add="no")),
        bad("Row.sequence_parallel without input_is_parallel", "input_is_parallel",
            partial(row, sequence_parallel=True, input_is_parallel=False)),
        # tp=2: sizes that do not divide
        bad("Column.output_size=3 @tp2", "output_size", partial(column, output_size=3), tp=2),
        bad("Column.output_size=6,stride=2 @tp2", "output_size|stride", partial(column, output_size=6, stride=2),
            tp=2),
        bad("Row.input_size=3 @tp2", "input_size", partial(row, input_size=3), tp=2),
    ]
    return cases


def forward(layer_builder, x_builder) -> dict:
    """bad()'s setup= and call= for a forward of `x_builder()` through `layer_builder()`."""
    return dict(setup=layer_builder, call=lambda layer: layer(x_builder()))


def layer_forward_cases() -> list[Case]:
    col_in, row_in = 8, 16          # the fixtures' input sizes
    cases = []
    for name, build, size in (("Column", column, col_in), ("Row", row, row_in)):
        cases += [
            bad(f"{name}.forward last dim {size - 1}", "input",
                **forward(build, lambda size=size: activations(h=size - 1))),
            # (A 1-D input is not here: without SP it computes what nn.Linear would, which no user rejects.)
            bad(f"{name}.forward 0-D input", "input", **forward(build, lambda: torch.tensor(1.0))),
            bad(f"{name}.forward float64 input", "input",
                **forward(build, lambda size=size: activations(h=size, dtype=torch.float64))),
            bad(f"{name}.forward int64 input", "input",
                **forward(build, lambda size=size: torch.ones(4, 2, size, dtype=torch.long))),
            bad(f"{name}.forward list input", "input",
                **forward(build, lambda size=size: activations(h=size).tolist())),
        ]
    cases += [
        bad("Column.forward SP 2-D input", "input",
            **forward(partial(column, sequence_parallel=True), lambda: torch.ones(4, col_in))),
        bad("Column.load_full_weight wrong shape", "weight",
            setup=column, call=lambda layer: layer.load_full_weight(torch.zeros(16, 9))),
        bad("Row.load_full_weight bias on bias=False", "bias",
            setup=partial(row, bias=False),
            call=lambda layer: layer.load_full_weight(torch.zeros(8, 16), torch.zeros(8))),
        # tp=2
        bad("Row.forward SP seq 3 @tp2", "sequence length",
            **forward(partial(row, sequence_parallel=True), lambda: activations(s=3, h=row_in // 2)), tp=2),
        bad("Row.forward full input (not in/t) @tp2", "input",
            **forward(row, lambda: activations(h=row_in)), tp=2),
        bad("Column.forward SP 2-D input @tp2", "input",
            **forward(partial(column, sequence_parallel=True), lambda: torch.ones(4, col_in)), tp=2),
        bad("Column.forward SP float64 input @tp2", "input",
            **forward(partial(column, sequence_parallel=True), lambda: activations(s=2, h=col_in, dtype=torch.float64)),
            tp=2),
        bad("Row.forward int64 input @tp2", "input",
            **forward(row, lambda: torch.ones(4, 2, row_in // 2, dtype=torch.long)), tp=2),
        bad("Column.load_full_weight wrong shape @tp2", "weight",
            setup=column, call=lambda layer: layer.load_full_weight(torch.zeros(8, 8)), tp=2),
    ]
    return cases


# ---- 5. ParallelLinearAdapter built directly -----------------------------------------------------

ADAPTER_BAD_VALUES = [
    ("dim", 0), ("dim", -1), ("dim", "4"), ("alpha", NAN), ("alpha", 0), ("alpha", "x"), ("dropout", 2.0),
    ("dropout", -0.5), ("dropout", "0.1"), ("dropout_position", "mid"), ("base_kind", "diagonal"),
    ("sequence_parallel", "false"), ("tp_group", 5), ("in_features", 0), ("in_features", -1),
    ("out_features", 0), ("dtype", torch.int8), ("dtype", "float32"), ("lora_A_init_method", "uniform"),
    ("lora_B_init_method", None), ("activation", "softmax"), ("a2a_experimental", "yes"),
]


def adapter_cases() -> list[Case]:
    cases = [bad(f"Adapter.{field}={value!r}", field, partial(adapter, **{field: value}))
             for field, value in ADAPTER_BAD_VALUES]
    cases += [
        bad("Adapter.layout + base_kind keywords", "layout",
            lambda: adapter(layout=layout_of(column()), in_features=8, out_features=16, base_kind="row")),
        bad("Adapter.layout with other in_features", "in_features",
            lambda: adapter(layout=layout_of(column()), in_features=9)),
        bad("Adapter.forward last dim 7", "input", setup=adapter, call=lambda a: a(activations(h=7))),
        bad("Adapter.forward list input", "input", setup=adapter, call=lambda a: a(activations().tolist())),
        bad("Adapter.load_full_weights wrong A shape", "A must|linear_in",
            setup=adapter, call=lambda a: a.load_full_weights(torch.zeros(4, 9), torch.zeros(16, 4))),
        # tp=2: sizes the base's split cannot take
        bad("Adapter.column dim=3 @tp2", "dim", partial(adapter, dim=3), tp=2),
        bad("Adapter.column out_features=3 @tp2", "out_features", partial(adapter, out_features=3), tp=2),
        bad("Adapter.column out_features=6,stride=2 @tp2", "out_features|stride",
            partial(adapter, out_features=6, stride=2), tp=2),
        bad("Adapter.row in_features=3 @tp2", "in_features", partial(adapter, base_kind="row", in_features=3), tp=2),
        bad("Adapter.row out_features=3 @tp2", "out_features", partial(adapter, base_kind="row", out_features=3),
            tp=2),
        bad("Adapter.row forward full input @tp2", "input",
            setup=partial(adapter, base_kind="row"), call=lambda a: a(activations(h=8)), tp=2),
    ]
    return cases


# ---- 6. merge: LoRAMerge, merge_lora_shard, merge_lora_weight, merge_lora ------------------------

def lora_merge(W, B, A, alpha=8.0, dim=4, **kw):
    return LoRAMerge().merge(W, B, A, alpha, dim, **kw)


def column_shards_at(t: int):
    """(W_r, B_r, A_r) shaped as a column base's shards at TP t (out 16, in 8, r 4)."""
    W, B, A = merge_tensors()
    return W[: 16 // t], B[: 16 // t], A[: 4 // t]


def merge_cases() -> list[Case]:
    W, B, A = merge_tensors()
    W2, B2, A2 = column_shards_at(2)
    W4, B4, A4 = column_shards_at(4)
    cases = [
        bad("LoRAMerge.tp_size=0", "tp_size", lambda: lora_merge(W, B, A, tp_size=0)),
        bad("LoRAMerge.tp_size=-1", "tp_size", lambda: lora_merge(W, B, A, tp_size=-1)),
        bad("LoRAMerge.tp_size='2'", "tp_size", lambda: lora_merge(W2, B2, A2, tp_size="2")),
        bad("LoRAMerge.tp_size=2, 1-rank group", "tp_size",
            setup=singleton_group, call=lambda g: lora_merge(W2, B2, A2, tp_size=2, tp_group=g)),
        bad("LoRAMerge.tp_size=2, tp_group=None at tp1", "tp_size", lambda: lora_merge(W2, B2, A2, tp_size=2)),
        bad("LoRAMerge.tp_size=4, 2-rank group @tp2", "tp_size", lambda: lora_merge(W4, B4, A4, tp_size=4), tp=2),
        bad("LoRAMerge.A rows != dim @tp2", "linear_in", lambda: lora_merge(W2, B2, A[:3], tp_size=2), tp=2),
        bad("LoRAMerge.B rank != A rank", "linear_out|linear_in", lambda: lora_merge(W, B[:, :3], A)),
        bad("LoRAMerge.base_weight shape", "base_weight", lambda: lora_merge(W[:, :7], B, A)),
        bad("LoRAMerge.base_weight list", "base_weight", lambda: lora_merge(W.tolist(), B, A)),
        bad("LoRAMerge.linear_in list", "linear_in", lambda: lora_merge(W, B, A.tolist())),
        bad("LoRAMerge.linear_in 1-D", "linear_in", lambda: lora_merge(W, B, A[0])),
        bad("LoRAMerge.alpha=nan", "alpha", lambda: lora_merge(W, B, A, alpha=NAN)),
        bad("LoRAMerge.alpha='x'", "alpha", lambda: lora_merge(W, B, A, alpha="x")),
        bad("LoRAMerge.dim=0", "dim", lambda: lora_merge(W, B, A, dim=0)),
        bad("LoRAMerge.dim=2.5", "dim", lambda: lora_merge(W, B, A, dim=2.5)),
        bad("LoRAMerge.base_weight has nan", "base_weight|nan", lambda: lora_merge(with_nan(W), B, A)),
        bad("LoRAMerge.linear_in has nan", "linear_in|nan", lambda: lora_merge(W, B, with_nan(A))),
        bad("LoRAMerge.linear_out has inf", "linear_out|inf",
            lambda: lora_merge(W, B.index_fill(0, torch.tensor([0]), INF), A)),
        bad("LoRAMerge.base_weight int8", "base_weight", lambda: lora_merge(W.to(torch.int8), B, A)),
        bad("merge_lora_shard.layout=None", "layout", lambda: merge_lora_shard(W, B, A, 8.0, 4, None)),
        bad("merge_lora_shard.layout='column'", "layout", lambda: merge_lora_shard(W, B, A, 8.0, 4, "column")),
        bad("merge_lora_shard.base_weight shape", "base_weight",
            setup=lambda: layout_of(column()), call=lambda layout: merge_lora_shard(W[:, :7], B, A, 8.0, 4, layout)),
        bad("merge_lora_shard.linear_in rows @tp2", "linear_in",
            setup=lambda: layout_of(column()), call=lambda layout: merge_lora_shard(W2, B2, A, 8.0, 4, layout), tp=2),
        bad("merge_lora_weight.adapter=None", "adapter", lambda: merge_lora_weight(W, None)),
        bad("merge_lora_weight.base_weight shape", "base_weight",
            setup=adapter, call=lambda a: merge_lora_weight(torch.zeros(16, 9), a)),
        bad("merge_lora_weight.sign='x'", "sign", setup=adapter, call=lambda a: merge_lora_weight(W, a, sign="x")),
        bad("merge_lora_weight.base_weight shape @tp2", "base_weight",
            setup=adapter, call=lambda a: merge_lora_weight(torch.zeros(16, 8), a), tp=2),
        bad("merge_lora(None)", "model", lambda: merge_lora(None)),
        bad("merge_lora(5)", "model", lambda: merge_lora(5)),
        bad("merge_lora({'a': model})", "model", setup=adapted, call=lambda m: merge_lora({"a": m})),
        bad("merge_lora.keep_wrappers='no'", "keep_wrappers", setup=adapted,
            call=lambda m: merge_lora(m, keep_wrappers="no")),
        bad("merge_lora adapter B has nan", "linear_qkv|nan", setup=adapted_with_nan_B, call=merge_lora),
        bad("unmerge_lora(None)", "model", lambda: unmerge_lora(None)),
        bad("unmerge_lora(5)", "model", lambda: unmerge_lora(5)),
    ]
    return cases


# ---- 7. models: TinyGPTConfig / TinyGPT / TinyVLM ------------------------------------------------

TINY_GPT_BAD_CONFIG = [
    ("params_dtype", torch.int8), ("params_dtype", "float32"), ("num_attention_heads", 5),
    ("vocab_size", 0), ("num_layers", 0), ("num_layers", -1), ("ffn_hidden_size", 0), ("hidden_size", 2.5),
    ("max_sequence_length", 0), ("init_method", "uniform"), ("num_moe_experts", -1),
    ("sequence_parallel", "false"), ("gated_linear_unit", "no"), ("add_bias_linear", "no"),
]


def model_cases() -> list[Case]:
    cases = [bad(f"TinyGPTConfig.{field}={value!r}", field, partial(tiny_gpt, **{field: value}))
             for field, value in TINY_GPT_BAD_CONFIG]

    def gpt_forward(id, names, ids):
        return bad(f"TinyGPT.forward {id}", names, setup=TinyGPT, call=lambda m: m(ids()))

    cases += [
        bad("TinyGPTConfig.moe_router_topk=0", "moe_router_topk|topk",
            partial(tiny_gpt, num_moe_experts=4, moe_router_topk=0)),
        bad("TinyGPTConfig.moe_router_topk=5 > experts", "moe_router_topk|topk",
            partial(tiny_gpt, num_moe_experts=4, moe_router_topk=5)),
        bad("TinyGPT(config=dict)", "config", lambda: TinyGPT({"hidden_size": 32})),
        bad("TinyGPT(seed='x')", "seed", lambda: TinyGPT(seed="x")),
        gpt_forward("float ids", "input_ids", lambda: tokens(dtype=torch.float32)),
        gpt_forward("ids >= vocab_size", "input_ids", lambda: tokens() + 64),
        gpt_forward("negative ids", "input_ids", lambda: -tokens() - 1),
        gpt_forward("int16 ids", "input_ids", lambda: tokens(dtype=torch.int16)),
        gpt_forward("bool ids", "input_ids", lambda: tokens(dtype=torch.bool)),
        gpt_forward("1-D ids", "input_ids", lambda: tokens()[0]),
        gpt_forward("3-D ids", "input_ids", lambda: tokens()[None]),
        gpt_forward("list ids", "input_ids", lambda: tokens().tolist()),
        gpt_forward("seq 65 > max_sequence_length", "max_sequence_length", lambda: tokens(s=65)),
        bad("TinyGPT.forward decoder_input hidden 31", "decoder_input",
            setup=TinyGPT, call=lambda m: m(decoder_input=activations(h=31))),
        bad("TinyGPT.forward input_ids and decoder_input", "decoder_input",
            setup=TinyGPT, call=lambda m: m(tokens(), decoder_input=activations(s=8, h=32))),
        bad("TinyVLM.forward patch_dim 11", "patches",
            setup=TinyVLM, call=lambda m: m(patches(patch_dim=11), tokens())),
        bad("TinyVLM.forward patches batch 3 != ids batch 2", "patches|batch",
            setup=TinyVLM, call=lambda m: m(patches(b=3), tokens())),
        bad("TinyVLM.forward 2-D patches", "patches", setup=TinyVLM, call=lambda m: m(patches()[0], tokens())),
        bad("TinyVLM.vision_hidden_size=0", "vision_hidden_size", lambda: TinyVLM(vision_hidden_size=0)),
        bad("TinyVLM.vision_hidden_size=18 (heads 4)", "vision_hidden_size", lambda: TinyVLM(vision_hidden_size=18)),
        bad("TinyVLM.patch_dim=0", "patch_dim", lambda: TinyVLM(patch_dim=0)),
        bad("TinyVLM.language_config sequence_parallel", "sequence_parallel",
            lambda: TinyVLM(TinyGPTConfig(sequence_parallel=True))),
        # tp=2
        bad("TinyGPTConfig.num_attention_heads=3 @tp2", "num_attention_heads",
            partial(tiny_gpt, hidden_size=36, num_attention_heads=3), tp=2),
        bad("TinyGPTConfig.ffn_hidden_size=33 @tp2", "ffn_hidden_size", partial(tiny_gpt, ffn_hidden_size=33), tp=2),
        bad("TinyGPTConfig.vocab_size=63 @tp2", "vocab_size", partial(tiny_gpt, vocab_size=63), tp=2),
        bad("TinyGPTConfig.moe without sequence_parallel @tp2", "sequence_parallel",
            partial(tiny_gpt, num_moe_experts=4), tp=2),
        bad("TinyGPT.forward SP seq 3 @tp2", "sequence length",
            setup=partial(tiny_gpt, sequence_parallel=True), call=lambda m: m(tokens(s=3)), tp=2),
        bad("TinyGPT.forward ids >= vocab_size @tp2", "input_ids",
            setup=TinyGPT, call=lambda m: m(tokens() + 64), tp=2),
        bad("TinyVLM.num_attention_heads=3 @tp2", "num_attention_heads",
            lambda: TinyVLM(TinyGPTConfig(hidden_size=36, num_attention_heads=3), vision_hidden_size=18), tp=2),
    ]
    return cases


# ---- 8. VLMLoRA -----------------------------------------------------------------------------------

def vlm_cases() -> list[Case]:
    # SPEC [VLM-FREEZE-1] skips one part that is None or absent; a model with none of the parts,
    # its base left trainable by the flags, is the mistake.
    return [
        warns("VLMLoRA() on TinyGPT (no VLM part)", "vision_model|language_model",
              setup=TinyGPT, call=lambda m: VLMLoRA()(m)),
        warns("VLMLoRA(freeze_language_model) on TinyGPT", "language_model",
              setup=TinyGPT, call=lambda m: VLMLoRA(freeze_vision_model=False, freeze_vision_projection=False)(m)),
        bad("VLMLoRA.freeze_vision_model='false' applied", "freeze_vision_model",
            setup=TinyVLM, call=lambda m: VLMLoRA(freeze_vision_model="false")(m)),
    ]


# ---- 9. apply_lora / LoRA(...)(model) --------------------------------------------------------------

def apply_cases() -> list[Case]:
    return [
        bad("LoRA()(None)", "model", lambda: LoRA()(None)),
        bad("LoRA()(5)", "model", lambda: LoRA()(5)),
        bad("LoRA()({'a': model})", "model", setup=TinyGPT, call=lambda m: LoRA()({"a": m})),
        bad("LoRA()([model, 5])", "model", setup=TinyGPT, call=lambda m: LoRA()([m, 5])),
        bad("LoRA().training='no'", "training", setup=TinyGPT, call=lambda m: LoRA()(m, training="no")),
        bad("apply_lora(model, None)", "config", setup=TinyGPT, call=lambda m: apply_lora(m, None)),
        bad("apply_lora(model, dict)", "config", setup=TinyGPT, call=lambda m: apply_lora(m, {"dim": 8})),
        warns("LoRA(dim=4) on a model adapted with dim=8", "dim", setup=adapted, call=lambda m: LoRA(dim=4)(m)),
        warns("LoRA.exclude_modules misspelt ['linear_qvk']", "linear_qvk",
              setup=TinyGPT, call=lambda m: LoRA(target_modules=[], exclude_modules=["linear_qvk"])(m)),
        warns("LoRA.target_modules misspelt ['linear_qvk']", "linear_qvk",
              setup=TinyGPT, call=lambda m: LoRA(target_modules=["linear_qvk"])(m)),
        warns("LoRA.target_modules misspelt ['*.linear_qvk']", "linear_qvk",
              setup=TinyGPT, call=lambda m: LoRA(target_modules=["*.linear_qvk"])(m)),
        bad("LoRA.normalize_moe_lora dim 3 % topk 2", "dim", setup=partial(tiny_gpt, num_moe_experts=4),
            call=lambda m: LoRA(dim=3, normalize_moe_lora=True, target_modules=["linear_fc1"])(m)),
        bad("set_adapters_enabled(model, 'no')", "enabled", setup=adapted,
            call=lambda m: set_adapters_enabled(m, "no")),
        bad("set_adapters_enabled(None, False)", "model", lambda: set_adapters_enabled(None, False)),
        bad("finalize_lora_grads(None)", "model", lambda: finalize_lora_grads(None)),
        bad("LoRA(dim=3) on TinyGPT @tp2", "dim", setup=TinyGPT, call=lambda m: LoRA(dim=3)(m), tp=2),
    ]


# ---- 10. parallel runtime: initialize_model_parallel, init_distributed, MoELayer --------------------

def parallel_cases() -> list[Case]:
    tp, ep, etp = "tensor_model_parallel_size", "expert_model_parallel_size", "expert_tensor_parallel_size"
    cases = [bad(f"initialize_model_parallel.tp={value!r}", tp, partial(initialize_model_parallel, value))
             for value in (0, -1, 3, "2", 2.0, True)]
    cases += [bad(f"initialize_model_parallel.ep={value!r}", ep,
                  partial(initialize_model_parallel, 1, expert_model_parallel_size=value)) for value in (0, -1, 3, "2")]
    cases += [bad(f"initialize_model_parallel.etp={value!r}", etp,
                  partial(initialize_model_parallel, 1, expert_tensor_parallel_size=value)) for value in (0, 3, "2")]
    cases += [
        bad("initialize_model_parallel.tp=2*world", tp, lambda: initialize_model_parallel(2 * world_size())),
        bad("initialize_model_parallel.ep=2*world", ep,
            lambda: initialize_model_parallel(1, expert_model_parallel_size=2 * world_size())),
        bad("initialize_model_parallel.ep=2,etp=2 @world2", "expert", partial(initialize_model_parallel, 1, 2, 2),
            min_world=2),
        bad("init_distributed.backend='mpi'", "backend", lambda: reference.init_distributed(backend="mpi")),
        bad("init_distributed.timeout_s=0", "timeout_s", lambda: reference.init_distributed(timeout_s=0)),
        bad("init_distributed.timeout_s='60'", "timeout_s", lambda: reference.init_distributed(timeout_s="60")),
        bad("init_distributed.timeout_s=nan", "timeout_s", lambda: reference.init_distributed(timeout_s=NAN)),
    ]
    return cases


def moe(**kw) -> MoELayer:
    args = dict(hidden_size=32, ffn_hidden_size=64, num_experts=4, topk=2)
    args.update(kw)
    return MoELayer(**args)


def moe_cases() -> list[Case]:
    return [
        bad("MoELayer.topk=0", "topk", partial(moe, topk=0)),
        bad("MoELayer.topk=5 > num_experts", "topk", partial(moe, topk=5)),
        bad("MoELayer.topk='2'", "topk", partial(moe, topk="2")),
        bad("MoELayer.topk=2.5", "topk", partial(moe, topk=2.5)),
        bad("MoELayer.num_experts=0", "num_experts|num_moe_experts", partial(moe, num_experts=0, topk=1)),
        bad("MoELayer.hidden_size=0", "hidden_size", partial(moe, hidden_size=0)),
        bad("MoELayer.ffn_hidden_size=-1", "ffn_hidden_size", partial(moe, ffn_hidden_size=-1)),
        bad("MoELayer.dtype=torch.int8", "dtype", partial(moe, dtype=torch.int8)),
        bad("MoELayer tp2 without sequence_parallel", "sequence_parallel", moe, tp=2),
        bad("MoELayer.num_experts=3 @ep2", "num_experts|num_moe_experts",
            setup=partial(initialize_model_parallel, 1, 2), call=lambda _: moe(num_experts=3, topk=1), min_world=2),
    ]


GROUPS = [
    ("LoRA(...) construction", config_cases),
    ("LoRA fields assigned after construction", assigned_cases),
    ("ColumnParallelLinear / RowParallelLinear construction", layer_construction_cases),
    ("ColumnParallelLinear / RowParallelLinear forward and loading", layer_forward_cases),
    ("ParallelLinearAdapter", adapter_cases),
    ("merge (LoRAMerge, merge_lora_shard, merge_lora_weight, merge_lora)", merge_cases),
    ("models (TinyGPTConfig, TinyGPT, TinyVLM)", model_cases),
    ("VLMLoRA", vlm_cases),
    ("apply_lora / LoRA(...)(model)", apply_cases),
    ("parallel runtime (initialize_model_parallel, init_distributed)", parallel_cases),
    ("MoELayer", moe_cases),
]


def all_cases() -> list[Case]:
    cases = []
    for api, build in GROUPS:
        cases += [replace(case, api=api) for case in build()]
    ids = [case.id for case in cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise RuntimeError(f"duplicate case ids: {duplicates}")
    return cases


# ---- running and classifying ------------------------------------------------------------------------

def names_in(names: str, message: str) -> bool:
    def norm(text: str) -> str:
        return text.lower().replace("_", " ")
    return any(norm(alternative) in norm(message) for alternative in names.split("|"))


def first_line(text: str) -> str:
    lines = str(text).strip().splitlines()
    line = lines[0] if lines else ""
    return line if len(line) <= MESSAGE_CHARS else line[: MESSAGE_CHARS - 3] + "..."


def describe(exc: BaseException) -> str:
    return first_line(f"{type(exc).__name__}: {exc}")


def run_case(case: Case) -> tuple[str, str]:
    """(outcome, message) of one case; never raises (an Exception is an outcome)."""
    with warnings.catch_warnings(record=True):      # the setup's warnings are not the case's
        warnings.simplefilter("always")
        try:
            initialize_model_parallel(case.tp)
            given = case.setup() if case.setup is not None else None
        except Exception as exc:
            return "deep", first_line(f"setup: {describe(exc)}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            case.call(given) if case.setup is not None else case.call()
        except Exception as exc:
            full = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, (ValueError, TypeError)) and names_in(case.names, full):
                return "clear", describe(exc)
            return "deep", describe(exc)
    user_warnings = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    if case.expect == "warn":
        for text in user_warnings:
            if names_in(case.names, text):
                return "warned", first_line(f"UserWarning: {text}")
    return "silent", first_line(f"(no error) UserWarning: {user_warnings[0]}") if user_warnings else ""


def agree(per_rank: list[tuple[str, str]]) -> tuple[str, str]:
    """One (outcome, message) from every rank's: the worst outcome, noting a disagreement."""
    worst_rank = max(range(len(per_rank)), key=lambda r: SEVERITY[per_rank[r][0]])
    outcome, message = per_rank[worst_rank]
    if len({o for o, _ in per_rank}) > 1:
        seen = ", ".join(f"rank {r}: {o}" for r, (o, _) in enumerate(per_rank))
        message = first_line(f"[ranks differ: {seen}] {message}")
    elif len({m for _, m in per_rank}) > 1:
        message = first_line(f"[messages differ across ranks] {message}")
    return outcome, message


def all_gather_json(obj) -> list:
    """Every rank's `obj` (JSON-able), in rank order, on every rank (all_gather_object needs numpy)."""
    data = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8)
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([data.numel()]))
    longest = max(int(size) for size in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[: data.numel()] = data
    gathered = [torch.empty(longest, dtype=torch.uint8) for _ in sizes]
    dist.all_gather(gathered, padded)
    return [json.loads(bytes(t[: int(size)].tolist()).decode()) for t, size in zip(gathered, sizes)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON (rank 0)")
    parser.add_argument("--fail-on-bad", action="store_true", help="exit 1 if any case is deep or silent")
    parser.add_argument("-k", metavar="SUBSTRING", default="", help="only cases whose id contains it")
    args = parser.parse_args(argv)

    started_here = not dist.is_initialized()
    if started_here:
        reference.init_distributed(backend="gloo", timeout_s=120)
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    cases = [case for case in all_cases() if case.runs_at(world) and args.k in case.id]

    mine = [run_case(case) for case in cases]
    initialize_model_parallel(1)
    everyone = all_gather_json(mine)
    results = [agree([tuple(everyone[r][i]) for r in range(world)]) for i in range(len(cases))]

    totals = {outcome: sum(1 for o, _ in results if o == outcome) for outcome in OUTCOMES}
    if rank == 0:
        width = max((len(case.id) for case in cases), default=10)
        api = None
        for case, (outcome, message) in zip(cases, results):
            if case.api != api:
                api = case.api
                print(f"\n## {api}")
            print(f"{case.id:<{width}}  {outcome:<6}  {message}")
        print(f"\nworld {world}: {len(cases)} cases  " + "  ".join(f"{o} {n}" for o, n in totals.items()))
        if args.json:
            report = {
                "world": world,
                "cases": [dict(id=case.id, api=case.api, expect=case.expect, names=case.names, outcome=outcome,
                               message=message) for case, (outcome, message) in zip(cases, results)],
                "totals": totals,
            }
            Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    bad_count = totals["deep"] + totals["silent"]
    if started_here:
        dist.destroy_process_group()
    return 1 if args.fail_on_bad and bad_count else 0


if __name__ == "__main__":
    sys.exit(main())
