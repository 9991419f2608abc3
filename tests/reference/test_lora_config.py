"""LoRA configuration, matching, injection and their errors (SPEC sections 2, 3, 8 and 10).

Matching is checked in this process at world 1 (a 12-layer TinyGPT, so that layers 1, 10 and 11
exist); injection at TP = 1, 2 and 4 and the errors at TP = 2 and 4 run on gloo ranks.
"""

import dataclasses
import re
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

import reference
import reference.parallel as P
from reference import ColumnParallelLinear, LoRA, LoRALinear, RowParallelLinear, TinyGPT, TinyGPTConfig
from reference.lora import LoRAConfig, pattern_matches

# Megatron-Bridge 0.6.2's LoRA defaults, written out once in the suite (not taken from the reference).
from conformance.configs import SPEC_DEFAULTS as MEGATRON_BRIDGE_DEFAULTS

from ..distributed import BACKEND, run_distributed
from ..helpers import all_reduce_sum, device

NUM_LAYERS = 12
LINEARS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")


def layer_linears(i, kinds=LINEARS):
    return {f"decoder.layers.{i}.{k}" for k in kinds}


def all_layers(kinds=LINEARS, layers=range(NUM_LAYERS)):
    return set().union(*(layer_linears(i, kinds) for i in layers))


EVERY_LINEAR = all_layers() | {"output_layer"}


class Plain(nn.Module):
    """A custom model of plain nn.Linear layers (and things that are not linear)."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.ModuleDict({"proj": nn.Linear(8, 8)})
        self.blocks = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.norm(self.blocks(self.encoder["proj"](x))))


PLAIN_LINEARS = {"encoder.proj", "blocks.0", "blocks.2", "head"}


def wrapped(model):
    """Full names of the LoRALinear modules in `model`."""
    return {name for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_recording(lora, model, **kwargs):
    """Apply `lora`; return the messages of the UserWarnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lora(model, **kwargs)
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def assert_warned_exactly(messages, patterns, unmatched):
    """One warning naming every unmatched pattern and no matched one, or none when all matched."""
    if not unmatched:
        assert messages == [], messages
        return
    assert len(messages) == 1, messages
    for pattern in patterns:
        listed = repr(pattern) in messages[0]
        assert listed == (pattern in unmatched), (pattern, messages[0])


@pytest.fixture(scope="module")
def world1():
    """A world of one in this process (gloo, or NCCL on one GPU under TP_LORA_TEST_BACKEND=nccl)."""
    reference.init_distributed(backend=BACKEND)
    state = P.initialize_model_parallel(tensor_model_parallel_size=1)
    yield state
    P.destroy_model_parallel()


def tiny12():
    return TinyGPT(TinyGPTConfig(num_layers=NUM_LAYERS), seed=0)


# ---- [LORA-CFG-*] ---------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [LoRA, LoRAConfig], ids=["LoRA", "LoRAConfig"])
def test_defaults_are_megatron_bridges(cls):
    """[LORA-CFG-1] every field and its default equals Megatron-Bridge's; default lists are not shared."""
    assert {f.name for f in dataclasses.fields(cls)} == set(MEGATRON_BRIDGE_DEFAULTS)
    config = cls()
    for name, expected in MEGATRON_BRIDGE_DEFAULTS.items():
        actual = getattr(config, name)
        assert actual == expected and type(actual) is type(expected), (name, actual, expected)
    # A fresh list per instance: editing one config's patterns leaves the next one's defaults alone.
    config.target_modules.append("output_layer")
    config.exclude_modules.append("x")
    again = cls()
    assert again.target_modules == MEGATRON_BRIDGE_DEFAULTS["target_modules"] and again.exclude_modules == []


INIT_ALLOWED = ("xavier", "kaiming", "normal", "zero")
EITHER = (ValueError, TypeError)

# (id, kwargs, exception, field named in the message, words of the allowed values in the message)
BAD_CONFIGS = [
    ("dim=0", dict(dim=0), EITHER, "dim", ["positive integer"]),
    ("dim=-1", dict(dim=-1), EITHER, "dim", ["positive integer"]),
    ("dim=1.5", dict(dim=1.5), EITHER, "dim", ["positive integer"]),
    ("dim=True", dict(dim=True), EITHER, "dim", ["positive integer"]),
    ("alpha=0", dict(alpha=0), EITHER, "alpha", ["positive number"]),
    ("alpha=-2", dict(alpha=-2), EITHER, "alpha", ["positive number"]),
    ("alpha='32'", dict(alpha="32"), EITHER, "alpha", ["positive number"]),
    ("alpha=True", dict(alpha=True), EITHER, "alpha", ["positive number"]),
    ("alpha=inf", dict(alpha=float("inf")), EITHER, "alpha", ["positive number", "finite"]),
    ("alpha=nan", dict(alpha=float("nan")), EITHER, "alpha", ["positive number", "finite"]),
    ("lora_dtype=float8", dict(lora_dtype=torch.float8_e4m3fn), ValueError, "lora_dtype", ["floating", "bfloat16"]),
    ("dropout=-0.1", dict(dropout=-0.1), EITHER, "dropout", ["[0, 1)"]),
    ("dropout=1.0", dict(dropout=1.0), EITHER, "dropout", ["[0, 1)"]),
    ("dropout=1.5", dict(dropout=1.5), EITHER, "dropout", ["[0, 1)"]),
    ("dropout_position=middle", dict(dropout_position="middle"), EITHER, "dropout_position", ["pre", "post"]),
    ("lora_A_init_method=he", dict(lora_A_init_method="he"), EITHER, "lora_A_init_method", INIT_ALLOWED),
    ("lora_B_init_method=he", dict(lora_B_init_method="he"), EITHER, "lora_B_init_method", INIT_ALLOWED),
    ("lora_dtype=int32", dict(lora_dtype=torch.int32), ValueError, "lora_dtype", ["floating"]),
    ("lora_dtype='bf16'", dict(lora_dtype="bf16"), TypeError, "lora_dtype", ["None", "torch.dtype"]),
    ("target_modules=str", dict(target_modules="linear_qkv"), TypeError, "target_modules", ["list", "str"]),
    ("target_modules=[1]", dict(target_modules=[1]), TypeError, "target_modules", ["str"]),
    ("target_modules=['']", dict(target_modules=[""]), ValueError, "target_modules", ["empty"]),
    ("exclude_modules=[None]", dict(target_modules=[], exclude_modules=[None]), TypeError, "exclude_modules",
     ["str"]),
    ("a2a_experimental=1", dict(a2a_experimental=1), TypeError, "a2a_experimental", ["True", "False"]),
    ("normalize_moe_lora=1", dict(normalize_moe_lora=1), TypeError, "normalize_moe_lora", ["True", "False"]),
    ("share_expert_adapters=1", dict(share_expert_adapters=1), TypeError, "share_expert_adapters",
     ["True", "False"]),
    ("sequence_parallel_input_regather=1", dict(sequence_parallel_input_regather=1), TypeError,
     "sequence_parallel_input_regather", ["True", "False"]),
    ("experts_shared_outer_loras='yes'", dict(experts_shared_outer_loras="yes"), TypeError,
     "experts_shared_outer_loras", ["True", "False"]),
]


@pytest.mark.parametrize("kwargs, exc, field, allowed", [c[1:] for c in BAD_CONFIGS],
                         ids=[c[0] for c in BAD_CONFIGS])
def test_bad_values_raise_at_construction(kwargs, exc, field, allowed):
    """[LORA-CFG-2] a bad value raises when the config is built, naming the field and what is allowed."""
    with pytest.raises(exc) as info:
        LoRA(**kwargs)
    message = str(info.value)
    assert re.search(rf"(?<![\w.]){re.escape(field)}(?!\w)", message), message
    for word in allowed:
        assert word in message, (word, message)


@pytest.mark.parametrize("kwargs", [
    dict(alpha=16.0), dict(alpha=1), dict(dropout=0.0), dict(dropout=0.5), dict(lora_dtype=torch.bfloat16),
    dict(lora_dtype=torch.float64), dict(dim=1), dict(dropout_position="post"),
    dict(lora_A_init_method="kaiming", lora_B_init_method="normal"),
    dict(a2a_experimental=True, normalize_moe_lora=True, share_expert_adapters=False),
    dict(sequence_parallel_input_regather=True, experts_shared_outer_loras=True),
    dict(target_modules=["*.layers.1.*", "output_layer"]), dict(target_modules=[], exclude_modules=["head"]),
], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_good_values_are_accepted(kwargs):
    """[LORA-CFG-2] good values are accepted and kept as given."""
    config = LoRA(**kwargs)
    for name, value in kwargs.items():
        assert getattr(config, name) == value


@pytest.mark.parametrize("kwargs, exc, field, allowed", [c[1:] for c in BAD_CONFIGS if len(c[1]) == 1],
                         ids=[c[0] for c in BAD_CONFIGS if len(c[1]) == 1])
def test_bad_values_raise_when_assigned_after_construction(kwargs, exc, field, allowed):
    """[LORA-CFG-2] recipes change a built config (cfg.dim = 0, cfg.target_modules = "linear_qkv"): the
    assignment is checked like the constructor's argument, and a refused value leaves the field as it was."""
    config = LoRA()
    (name, value), = kwargs.items()
    before = getattr(config, name)
    with pytest.raises(exc) as info:
        setattr(config, name, value)
    assert field in str(info.value) and all(word in str(info.value) for word in allowed), str(info.value)
    assert getattr(config, name) == before
    config.dim = 16                                             # a good value is kept
    assert config.dim == 16
    with pytest.raises(ValueError, match="target_modules=\\[\\]"):
        config.exclude_modules = ["linear_fc2"]                 # exclusive with the non-empty targets


def test_numpy_integers_are_integers():
    """[LORA-CFG-2] dim given as a numpy integer (numbers.Integral) is accepted, stored as an int."""
    numpy = pytest.importorskip("numpy")
    config = LoRA(dim=numpy.int64(8))
    assert config.dim == 8 and type(config.dim) is int


@pytest.mark.parametrize("kwargs", [
    dict(target_modules=["linear_qkv"], exclude_modules=["linear_fc2"]),
    dict(exclude_modules=["linear_fc2"]),            # the default target_modules is non-empty
], ids=["both-given", "default-targets"])
def test_target_and_exclude_are_exclusive(kwargs):
    """[LORA-CFG-3] target_modules and exclude_modules both non-empty is a ValueError at construction."""
    with pytest.raises(ValueError) as info:
        LoRA(**kwargs)
    message = str(info.value)
    assert "target_modules=[]" in message and "exclude_modules" in message, message
    config = LoRA(target_modules=[], exclude_modules=["linear_fc2"])    # exclude mode is fine
    assert config.target_modules == [] and config.exclude_modules == ["linear_fc2"]


# ---- [LORA-MATCH-*] -------------------------------------------------------------------------------

def test_full_names(world1):
    """[LORA-MATCH-1] wrapped modules carry their full names: parent's name, '.', attribute name,
    ModuleList/Sequential children '0', '1', ...; the adapter knows its base's full name."""
    model = tiny12()
    originals = {name: m for name, m in model.named_modules()}
    messages = apply_recording(LoRA(), model)
    assert messages == []
    assert wrapped(model) == all_layers()
    for name in wrapped(model):
        wrapper = model.get_submodule(name)
        assert wrapper.to_wrap is originals[name]
        assert wrapper.adapter.base_name == name
    params = dict(model.named_parameters())
    assert "decoder.layers.1.self_attention.linear_qkv.adapter.linear_in.weight" in params
    assert "decoder.layers.11.mlp.linear_fc2.adapter.linear_out.weight" in params

    plain = Plain()
    LoRA(target_modules=["*"])(plain)
    assert wrapped(plain) == PLAIN_LINEARS
    assert {plain.get_submodule(n).adapter.base_name for n in PLAIN_LINEARS} == PLAIN_LINEARS


@pytest.mark.parametrize("patterns, expected", [
    (["linear_proj"], all_layers(["self_attention.linear_proj"])),
    (["output_layer"], {"output_layer"}),
    (["linear_qkv", "linear_fc2"], all_layers(["self_attention.linear_qkv", "mlp.linear_fc2"])),
    (["linear"], set()),                                  # exact attribute name, not a substring
    (["linear_qkv", "linear_qk"], all_layers(["self_attention.linear_qkv"])),
    (["decoder.layers.1.mlp.linear_fc1"], {"decoder.layers.1.mlp.linear_fc1"}),   # a full name
    (["layers.1.mlp.linear_fc1"], set()),                 # anchored: a tail of the full name is not enough
], ids=["proj", "output_layer", "qkv+fc2", "substring", "one-unmatched", "full-name", "anchored"])
def test_exact_short_names(world1, patterns, expected):
    """[LORA-MATCH-2] [LORA-MATCH-5] a pattern selects a module whose attribute name equals it (or
    whose whole full name it matches); the unmatched patterns are warned about."""
    model = tiny12()
    messages = apply_recording(LoRA(target_modules=patterns), model)
    assert wrapped(model) == expected
    unmatched = [p for p in patterns if not any(pattern_matches(p, n.rsplit(".", 1)[-1], n) for n in expected)]
    assert_warned_exactly(messages, patterns, unmatched)


WILDCARD_CASES = [
    ("*.layers.1.*", layer_linears(1)),                                 # not layers.10 / layers.11
    ("*.layers.1*", layer_linears(1) | layer_linears(10) | layer_linears(11)),
    ("*.linear_qkv", all_layers(["self_attention.linear_qkv"])),
    ("decoder.layers.*.mlp.linear_fc1", all_layers(["mlp.linear_fc1"])),
    ("*linear_fc*", all_layers(["mlp.linear_fc1", "mlp.linear_fc2"])),
    ("*", EVERY_LINEAR),
    ("*.layers.1?.*", set()),                                           # '?' is literal
    ("decoder.layers.[12].*", set()),                                   # brackets are literal
    ("decoder.layers.1.mlp.linear_fc.", set()),                         # '.' does not match '1'
    ("decoder.layers.1.mlp.linear_fc\\d", set()),                       # no regex escapes
    ("layers.1.*", set()),                                              # anchored at the start
    ("*.mlp", set()),                                                   # MLP is not linear-like
]


@pytest.mark.parametrize("pattern, expected", WILDCARD_CASES, ids=[c[0] for c in WILDCARD_CASES])
def test_wildcards(world1, pattern, expected):
    """[LORA-MATCH-3] [LORA-MATCH-5] '*' is any run (dots included), every other character literal,
    anchored at both ends: *.layers.1.* selects layers.1's four linears and not layers.10/11; a pattern
    with regex meta characters matches nothing and is warned about."""
    model = tiny12()
    messages = apply_recording(LoRA(target_modules=[pattern]), model)
    assert wrapped(model) == expected
    assert_warned_exactly(messages, [pattern], [] if expected else [pattern])


def test_first_pattern_wins(world1):
    """[LORA-MATCH-2] LoRA.match returns the first pattern that selects the module."""
    model = tiny12()
    fc1_0, fc1_1 = model.decoder.layers[0].mlp.linear_fc1, model.decoder.layers[1].mlp.linear_fc1
    lora = LoRA(target_modules=["*.layers.1.*", "linear_fc1"])
    assert lora.match(fc1_1, "linear_fc1", "decoder.layers.1.mlp") == "*.layers.1.*"
    assert lora.match(fc1_0, "linear_fc1", "decoder.layers.0.mlp") == "linear_fc1"
    assert lora.match(model.output_layer, "output_layer", "") is None
    reverse = LoRA(target_modules=["linear_fc1", "*.layers.1.*"])
    assert reverse.match(fc1_1, "linear_fc1", "decoder.layers.1.mlp") == "linear_fc1"
    qkv_1 = model.decoder.layers[1].self_attention.linear_qkv
    assert reverse.match(qkv_1, "linear_qkv", "decoder.layers.1.self_attention") == "*.layers.1.*"
    # The prefix matters: the same module under another prefix is not selected.
    assert reverse.match(qkv_1, "linear_qkv", "decoder.layers.2.self_attention") is None
    messages = apply_recording(lora, model)
    assert wrapped(model) == layer_linears(1) | all_layers(["mlp.linear_fc1"])
    assert messages == []


def test_only_linear_like_modules(world1):
    """[LORA-MATCH-2] LayerNorm, Embedding, attention and MLP modules are never wrapped, even when a
    pattern covers them; nn.Linear in a custom module is."""
    model = tiny12()
    layer1 = model.decoder.layers[1]
    lora = LoRA(target_modules=["*.layers.1.*", "*"])
    for module, name, prefix in [(layer1.input_layernorm, "input_layernorm", "decoder.layers.1"),
                                 (layer1.self_attention, "self_attention", "decoder.layers.1"),
                                 (layer1.mlp, "mlp", "decoder.layers.1"),
                                 (model.embedding.word_embeddings, "word_embeddings", "embedding"),
                                 (model.decoder.final_layernorm, "final_layernorm", "decoder")]:
        assert lora.match(module, name, prefix) is None, name
    assert lora.match(nn.Linear(2, 2), "anything", "x.y") == "*"
    assert lora.match(nn.Conv1d(2, 2, 1), "anything", "x.y") is None

    messages = apply_recording(LoRA(target_modules=["*.layers.1.*"]), model)
    assert wrapped(model) == layer_linears(1) and messages == []
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            assert isinstance(m.to_wrap, (ColumnParallelLinear, RowParallelLinear)), name
    assert isinstance(layer1.input_layernorm, nn.LayerNorm) and isinstance(layer1.pre_mlp_layernorm, nn.LayerNorm)

    model = tiny12()
    names = ["input_layernorm", "self_attention", "word_embeddings", "mlp", "decoder.final_layernorm"]
    messages = apply_recording(LoRA(target_modules=names), model)
    assert wrapped(model) == set()
    assert_warned_exactly(messages, names, names)


def test_exclude_mode(world1):
    """[LORA-MATCH-4] target_modules=[]: every linear-like module except the excluded ones, including
    output_layer and nn.Linear modules of a custom module; no unmatched warning."""
    model = tiny12()
    lora = LoRA(target_modules=[], exclude_modules=["linear_fc2", "*.layers.0.*"])
    messages = apply_recording(lora, model)
    expected = (EVERY_LINEAR - all_layers(["mlp.linear_fc2"])) - layer_linears(0)
    assert wrapped(model) == expected and messages == []
    assert "decoder.layers.10.self_attention.linear_qkv" in expected       # layers.0 is not layers.10
    output = model.output_layer.adapter
    assert output.base_kind == "column" and output.gather_output
    assert lora.match(model.decoder.layers[3].mlp.linear_fc2, "linear_fc2", "decoder.layers.3.mlp") is None
    assert lora.match(model.decoder.layers[1].mlp, "mlp", "decoder.layers.1") is None

    model = tiny12()
    LoRA(target_modules=[], exclude_modules=[])(model)                       # nothing excluded
    assert wrapped(model) == EVERY_LINEAR

    plain = Plain()
    messages = apply_recording(LoRA(target_modules=[], exclude_modules=["head"]), plain)
    assert wrapped(plain) == PLAIN_LINEARS - {"head"} and messages == []
    plain = Plain()
    LoRA(target_modules=[], exclude_modules=["blocks.*"])(plain)
    assert wrapped(plain) == {"encoder.proj", "head"}


def test_unmatched_target_warning(world1):
    """[LORA-MATCH-5] one UserWarning lists exactly the target patterns that selected nothing; none
    when every pattern selected something."""
    patterns = ["linear_qkv", "linear_nope", "*.layers.99.*", "*.layers.11.*"]
    model = tiny12()
    with pytest.warns(UserWarning, match=r"linear_nope") as record:
        LoRA(target_modules=patterns)(model)
    lora_warnings = [str(w.message) for w in record if issubclass(w.category, UserWarning)]
    assert_warned_exactly(lora_warnings, patterns, ["linear_nope", "*.layers.99.*"])
    # The warning comes after the transform: the matched patterns were applied.
    assert wrapped(model) == all_layers(["self_attention.linear_qkv"]) | layer_linears(11)

    model = tiny12()
    assert apply_recording(LoRA(target_modules=["linear_qkv", "*.layers.11.*", "output_layer"]), model) == []
    assert apply_recording(LoRA(), tiny12()) == []

    plain = Plain()                                   # Megatron names in a model without them
    messages = apply_recording(LoRA(), plain)
    assert wrapped(plain) == set()
    assert_warned_exactly(messages, MEGATRON_BRIDGE_DEFAULTS["target_modules"],
                          MEGATRON_BRIDGE_DEFAULTS["target_modules"])


PATTERN_CASES = [
    ("linear_qkv", "linear_qkv", "decoder.layers.0.self_attention.linear_qkv", True),
    ("linear_qkv", "linear_qkv", "linear_qkv", True),
    ("linear", "linear_qkv", "decoder.layers.0.self_attention.linear_qkv", False),
    ("linear_qkv", "linear_qkv_extra", "a.linear_qkv_extra", False),
    ("*.layers.1.*", "linear_fc1", "decoder.layers.1.mlp.linear_fc1", True),
    ("*.layers.1.*", "linear_fc1", "decoder.layers.10.mlp.linear_fc1", False),
    ("*.layers.1.*", "linear_fc1", "decoder.layersX1Xmlp.linear_fc1", False),
    ("*.layers.1*", "linear_fc1", "decoder.layers.10.mlp.linear_fc1", True),
    ("*.linear_qkv", "linear_qkv", "decoder.layers.7.self_attention.linear_qkv", True),
    ("*.linear_qkv", "linear_qkv_x", "decoder.layers.7.self_attention.linear_qkv_x", False),
    ("decoder.*.linear_fc2", "linear_fc2", "decoder.layers.3.mlp.linear_fc2", True),
    ("decoder.layers.[12].*", "linear_fc1", "decoder.layers.1.mlp.linear_fc1", False),
    ("decoder.layers.[12].*", "linear_fc1", "decoder.layers.[12].mlp.linear_fc1", True),
    ("a+b", "ab", "ab", False),
    ("a+b", "x", "a+b", True),
    ("a.b", "b", "aXb", False),
    ("(a|b)", "a", "a", False),
    ("*", "anything", "any.full.name", True),
    ("*fc*", "linear_fc1", "decoder.layers.0.mlp.linear_fc1", True),
    ("layers.0.*", "linear_fc1", "decoder.layers.0.mlp.linear_fc1", False),
    ("*.mlp", "linear_fc1", "decoder.layers.0.mlp.linear_fc1", False),
]


@pytest.mark.parametrize("pattern, name, full_name, expected", PATTERN_CASES,
                         ids=[f"{c[0]}~{c[2]}" for c in PATTERN_CASES])
def test_pattern_matches(pattern, name, full_name, expected):
    """[LORA-MATCH-2] [LORA-MATCH-3] attribute name equal to the pattern, or the wildcard pattern
    (only '*' special, anchored) matching the whole full name."""
    assert pattern_matches(pattern, name, full_name) is expected


def test_match_units():
    """[LORA-MATCH-2] [LORA-MATCH-4] LoRA.match on plain modules, without a model: the first matching
    pattern, None for non-linears, and exclude mode."""
    linear, norm = nn.Linear(2, 2), nn.LayerNorm(2)
    lora = LoRA(target_modules=["head", "*.head", "blocks.*"])
    assert lora.match(linear, "head", "model") == "head"
    assert lora.match(linear, "head", None) == "head"
    assert lora.match(linear, "0", "blocks") == "blocks.*"
    assert lora.match(linear, "0", "other") is None
    assert lora.match(norm, "head", "model") is None
    exclude = LoRA(target_modules=[], exclude_modules=["head", "blocks.1"])
    assert exclude.match(linear, "head", "model") is None
    assert exclude.match(linear, "1", "blocks") is None
    assert exclude.match(linear, "0", "blocks") is not None
    assert exclude.match(linear, "1", "blocks.inner") is not None       # anchored: blocks.inner.1
    assert exclude.match(norm, "0", "blocks") is None


# ---- [LORA-INJ-*] ---------------------------------------------------------------------------------

def _kinds():
    return {"self_attention.linear_qkv": "column", "self_attention.linear_proj": "row",
            "mlp.linear_fc1": "column", "mlp.linear_fc2": "row"}


def _snapshot(model):
    modules = {name: id(m) for name, m in model.named_modules()}
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    params = {name: id(p) for name, p in model.named_parameters()}
    return modules, trainable, params


def check_apply(tp):
    P.initialize_model_parallel(tensor_model_parallel_size=tp)
    config = TinyGPTConfig(num_layers=2)
    ids = torch.randint(0, config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(3)).to(device())

    # [LORA-INJ-1] apply: base frozen, adapters trainable, train mode, the base modules kept.
    model = TinyGPT(config, seed=0).eval()
    bases = {name: m for name, m in model.named_modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))}
    assert LoRA(dim=8)(model) is model
    assert model.training and all(m.training for m in model.modules())
    names = wrapped(model)
    assert names == {f"decoder.layers.{i}.{k}" for i in range(2) for k in LINEARS}
    for name in names:
        wrapper = model.get_submodule(name)
        assert wrapper.to_wrap is bases[name]
        assert wrapper.adapter.base_kind == _kinds()[name.split(".", 3)[3]]
        assert wrapper.adapter.tp_size == tp
    for name, p in model.named_parameters():
        assert p.requires_grad == (".adapter." in name), name
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    assert len(trainable) == 2 * len(names)
    logits = model(ids)
    assert logits.shape == (2, 8, config.vocab_size)

    # [LORA-INJ-2] training=False: adapters frozen too, eval mode.
    frozen = TinyGPT(config, seed=0)
    LoRA(dim=8)(frozen, training=False)
    assert wrapped(frozen) == names
    assert not frozen.training and not any(m.training for m in frozen.modules())
    assert not any(p.requires_grad for p in frozen.parameters())

    # [LORA-INJ-3] applying the same LoRA twice changes nothing.
    lora = LoRA(dim=8)
    twice = TinyGPT(config, seed=0)
    lora(twice)
    before = _snapshot(twice)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lora(twice)
    assert [str(w.message) for w in caught] == []
    after = _snapshot(twice)
    assert after == before
    assert after[1] == trainable and len(after[1]) == len(trainable)
    for name, m in twice.named_modules():
        if isinstance(m, LoRALinear):
            inner = [n for n, sub in m.named_modules() if sub is not m and isinstance(sub, LoRALinear)]
            assert inner == [], (name, inner)
    # A second LoRA that selects everything adapts output_layer but nothing inside a wrapper.
    LoRA(dim=8, target_modules=["*"])(twice)
    assert wrapped(twice) == names | {"output_layer"}
    for name in names:
        assert id(twice.get_submodule(name)) == before[0][name]
        assert not isinstance(twice.get_submodule(name).to_wrap, LoRALinear)
    # Applying again for inference freezes the same adapters without wrapping anything again.
    lora(twice, training=False)
    assert wrapped(twice) == names | {"output_layer"} and not twice.training
    assert not any(p.requires_grad for p in twice.parameters())

    # [LORA-INJ-4] plain nn.Linear children get non-parallel adapters, and return a tensor.
    torch.manual_seed(0)
    plain = Plain().to(device())
    LoRA(dim=4, target_modules=["proj", "blocks.*", "head"])(plain)
    assert wrapped(plain) == PLAIN_LINEARS
    for name in PLAIN_LINEARS:
        adapter = plain.get_submodule(name).adapter
        assert adapter.base_kind == "none" and adapter.tp_size == 1
        assert tuple(adapter.linear_in.weight.shape) == (4, plain.get_submodule(name).to_wrap.in_features)
    for name, p in plain.named_parameters():
        assert p.requires_grad == (".adapter." in name), name
    y = plain.head(torch.ones(3, 2, 8, device=device()))
    assert isinstance(y, torch.Tensor) and y.shape == (3, 2, 4)
    out = plain(torch.ones(3, 2, 8, device=device()))
    assert isinstance(out, torch.Tensor) and out.shape == (3, 2, 4)
    return trainable


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_apply_freeze_and_idempotence(world_size):
    """[LORA-INJ-1] [LORA-INJ-2] [LORA-INJ-3] [LORA-INJ-4] apply on TinyGPT at TP = world: base frozen,
    adapters trainable, train mode; training=False freezes all and sets eval; applying twice changes
    nothing; plain nn.Linear modules get non-parallel adapters returning a tensor."""
    per_rank = run_distributed(check_apply, world_size, world_size)
    expected = sorted(f"decoder.layers.{i}.{k}.adapter.{w}.weight"
                      for i in range(2) for k in LINEARS for w in ("linear_in", "linear_out"))
    assert all(names == expected for names in per_rank)


def test_transform_one_module(world1):
    """[LORA-INJ-4] transform(module, name, prefix): a LoRALinear for a selected module, the module
    itself otherwise, and an existing LoRALinear unchanged."""
    model = TinyGPT(TinyGPTConfig(num_layers=2), seed=0)
    qkv0 = model.decoder.layers[0].self_attention.linear_qkv
    lora = LoRA()
    out = lora.transform(qkv0, "linear_qkv", "decoder.layers.0.self_attention")
    assert isinstance(out, LoRALinear) and out.to_wrap is qkv0
    assert out.adapter.base_name == "decoder.layers.0.self_attention.linear_qkv"
    assert out.adapter.base_kind == "column" and out.adapter.dim == 32
    assert lora.transform(out, "linear_qkv", "decoder.layers.0.self_attention") is out
    assert lora.transform(model.output_layer, "output_layer", "") is model.output_layer
    norm = model.decoder.layers[0].input_layernorm
    assert lora.transform(norm, "input_layernorm", "decoder.layers.0") is norm
    # The prefix takes part in the match.
    by_layer = LoRA(target_modules=["*.layers.1.*"])
    assert by_layer.transform(qkv0, "linear_qkv", "decoder.layers.0.self_attention") is qkv0
    assert isinstance(by_layer.transform(qkv0, "linear_qkv", "decoder.layers.1.self_attention"), LoRALinear)
    # transform touches only the module it is given: the model is unchanged.
    assert model.decoder.layers[0].self_attention.linear_qkv is qkv0 and wrapped(model) == set()
    plain_linear = nn.Linear(4, 6)
    wrapped_linear = LoRA(target_modules=["head"]).transform(plain_linear, "head", "model")
    assert isinstance(wrapped_linear, LoRALinear) and wrapped_linear.adapter.base_kind == "none"


def test_a_list_of_chunks(world1):
    """[LORA-INJ-4] [LORA-MATCH-5] LoRA accepts a list of model chunks: each is adapted, frozen and put
    in train mode; a pattern matched in any chunk is not warned about."""
    gpt, plain = TinyGPT(TinyGPTConfig(num_layers=1), seed=0), Plain()
    chunks = [gpt, plain]
    lora = LoRA(target_modules=["linear_qkv", "head"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = lora(chunks)
    assert [str(w.message) for w in caught] == []
    assert result is chunks and result[0] is gpt and result[1] is plain
    assert wrapped(gpt) == {"decoder.layers.0.self_attention.linear_qkv"}
    assert wrapped(plain) == {"head"}
    for chunk in chunks:
        assert chunk.training
        for name, p in chunk.named_parameters():
            assert p.requires_grad == (".adapter." in name), name
    messages = apply_recording(LoRA(target_modules=["linear_qkv", "nowhere"]),
                               [TinyGPT(TinyGPTConfig(num_layers=1), seed=0), Plain()])
    assert_warned_exactly(messages, ["linear_qkv", "nowhere"], ["nowhere"])


# ---- [LORA-ERR-1] ---------------------------------------------------------------------------------

def check_errors_on_every_rank():
    t = dist.get_world_size()
    P.initialize_model_parallel(tensor_model_parallel_size=t)
    messages = {}
    for key, kwargs in [("dim", dict(dim=0)), ("dropout", dict(dropout=1.0)), ("flag", dict(a2a_experimental=1)),
                        ("both", dict(exclude_modules=["linear_fc2"])), ("init", dict(lora_B_init_method="he"))]:
        with pytest.raises((ValueError, TypeError)) as info:
            LoRA(**kwargs)
        messages[key] = str(info.value)

    bad_dim = {2: 3, 4: 6}[t]                 # 6 divides by 2 but not by 4
    model = TinyGPT(TinyGPTConfig(num_layers=2), seed=0)
    with pytest.raises(ValueError) as info:
        LoRA(dim=bad_dim)(model)
    messages["tp"] = str(info.value)
    # Nothing was left half-communicated: the group still works, and a good LoRA runs forward.
    assert all_reduce_sum(torch.ones(1, device=device())).item() == t
    good = LoRA(dim=2 * t)(TinyGPT(TinyGPTConfig(num_layers=2), seed=0))
    ids = torch.zeros(1, 4, dtype=torch.long, device=device())
    assert good(ids).shape == (1, 4, 64)
    assert all_reduce_sum(torch.ones(1, device=device())).item() == t
    return messages


@pytest.mark.parametrize("world_size", [2, 4])
def test_errors_are_the_same_on_every_rank(world_size):
    """[LORA-ERR-1] [LORA-CFG-2] [LORA-CFG-3] config errors and a LoRA dim that the TP size does not
    divide raise the same message on every rank, naming the module, before any collective."""
    per_rank = run_distributed(check_errors_on_every_rank, world_size)
    assert all(m == per_rank[0] for m in per_rank)
    tp_message = per_rank[0]["tp"]
    bad_dim = {2: 3, 4: 6}[world_size]
    assert "decoder.layers.0.self_attention.linear_qkv" in tp_message, tp_message
    assert re.search(rf"\bdim\b.*\({bad_dim}\).*\({world_size}\)", tp_message), tp_message
    assert "target_modules=[]" in per_rank[0]["both"]
