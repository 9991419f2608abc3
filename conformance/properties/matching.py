"""SPEC section 3: which modules get an adapter, on TinyGPT's Megatron names at TP 1.

The expected selection is the suite's own (conformance/model_case.py): the candidates are the
linear-like modules of model.named_modules() enumerated before LoRA is applied, and a pattern selects
a module when the module's attribute name equals it or when it matches the whole full name with `*`
standing for any run of characters and every other character literal. The backend's answer is the
set of full names of backend.lora_modules(model).
"""

from __future__ import annotations

from hypothesis import strategies as st

from ..backend import ModelSpec
from ..configs import lora
from ..model_case import (
    DEFAULT_TARGETS,
    apply_quietly,
    expected_selection,
    full_names,
    linear_candidates,
    unmatched_targets,
)
from ..registry import prop, with_explicit

SHORT_NAMES = [*DEFAULT_TARGETS, "output_layer"]
# Wildcard templates ({i}: a layer index). With at most 10 layers every index is one digit, so a
# dot read as "any character" selects the same modules: only wildcard_dots_are_literal tells them apart.
TEMPLATES = [
    "*.layers.{i}.*.linear_qkv", "decoder.layers.*.mlp.linear_fc1", "*linear_fc*", "*.layers.{i}.*",
    "decoder.layers.{i}.self_attention.*", "*_layer", "*proj", "decoder.*", "*.mlp.*", "*.linear_qkv", "*",
]
# Patterns that select nothing unless matching is unanchored or takes non-linear modules; every
# drawn list of wildcards holds one.
PROBES = [
    "linear_*",                         # anchored at the start: no full name starts with "linear_"
    "*.linear_fc",                      # anchored at the end: linear_fc1 / linear_fc2 continue past it
    "decoder.layers.{i}",               # a transformer layer (not a linear), and a prefix of its linears
    "*.layers.{i}.self_attention",      # a prefix of the attention linears' names
]
UNMATCHED = ["linear_kv", "no_such_module", "*.layers.99.*", "decoder.layers.{n}.mlp.linear_fc1", "*.router"]


def _spec(num_layers: int) -> ModelSpec:
    return ModelSpec(kind="gpt", seed=0, num_layers=num_layers, hidden_size=8, ffn_hidden_size=8,
                     num_attention_heads=2, vocab_size=8)


def _model(backend, num_layers):
    backend.init_parallel(1)
    model = backend.make_model(_spec(num_layers))
    return model, linear_candidates(model)


def _lora(targets, excludes=()):
    return lora(target_modules=list(targets), exclude_modules=list(excludes), dim=2, alpha=4)


def _selected(ctx, backend, model, targets, excludes=()):
    model, _ = apply_quietly(backend, model, _lora(targets, excludes))
    return set(backend.lora_modules(model))


def _compare(ctx, got: set, want: set, what: str) -> None:
    missing, extra = sorted(want - got), sorted(got - want)
    ctx.check(not missing and not extra,
              f"{what}: {len(got)} modules adapted, expected {len(want)}; "
              f"missing {missing[:6]}{' ...' if len(missing) > 6 else ''}, "
              f"unexpected {extra[:6]}{' ...' if len(extra) > 6 else ''}")


def _fill(template: str, i: int, n: int) -> str:
    return template.replace("{i}", str(i)).replace("{n}", str(n))


@prop("LORA-MATCH-1", needs={"models"},
      strategy=lambda ctx: with_explicit(st.fixed_dictionaries({"num_layers": st.integers(1, 12)}),
                                         [{"num_layers": 1}, {"num_layers": 12}]))
def full_names_are_dotted_module_paths(ctx, backend, ex):
    """The default targets given by their full names: the adapted modules' full names are exactly
    those dotted paths of named_modules() (bare names are [LORA-MATCH-2]'s)."""
    model, candidates = _model(backend, ex["num_layers"])
    targets = full_names(model, DEFAULT_TARGETS)
    got = _selected(ctx, backend, model, targets)
    want = expected_selection(candidates, targets)
    ctx.check(f"decoder.layers.{ex['num_layers'] - 1}.self_attention.linear_qkv" in want,
              "the model lacks Megatron's names (decoder.layers.N.self_attention.linear_qkv, SPEC [TP-MODEL-1])")
    _compare(ctx, got, want, "the default targets by full name")
    names = {name for name, _ in model.named_modules()}
    ctx.check(got <= names, "lora_modules() names modules that model.named_modules() does not list")


@prop("LORA-MATCH-2", needs={"models"},
      strategy=lambda ctx: with_explicit(st.fixed_dictionaries({
          "num_layers": st.integers(1, 4),
          "targets": st.lists(st.sampled_from(SHORT_NAMES), min_size=1, max_size=5, unique=True),
          "overlap": st.lists(st.sampled_from(["*", "*.linear_qkv", "*.mlp.*", "decoder.*"]), max_size=2, unique=True),
      }), [{"num_layers": 2, "targets": SHORT_NAMES, "overlap": []},
           {"num_layers": 1, "targets": ["linear_qkv"], "overlap": ["*", "*.linear_qkv"]}]))
def short_names_select_exactly_and_once(ctx, backend, ex):
    """Short names select exactly the modules of that attribute name; a module matched by several
    patterns (the first one wins) is wrapped once."""
    model, candidates = _model(backend, ex["num_layers"])
    targets = ex["targets"] + ex["overlap"]
    got = _selected(ctx, backend, model, targets)
    _compare(ctx, got, expected_selection(candidates, targets), f"target_modules={targets}")
    nested = sorted(n for n in got if any(n.startswith(m + ".") for m in got))
    ctx.check(not nested, f"target_modules={targets}: adapters inside adapted modules: {nested[:4]}")


@prop("LORA-MATCH-3", needs={"models"},
      strategy=lambda ctx: with_explicit(st.integers(2, 10).flatmap(lambda n: st.fixed_dictionaries({
          "num_layers": st.just(n),
          "probe": st.tuples(st.sampled_from(PROBES), st.integers(0, n - 1)),
          "patterns": st.lists(st.tuples(st.sampled_from(TEMPLATES), st.integers(0, n - 1)), min_size=1, max_size=3),
      })), [{"num_layers": 2, "probe": (probe, 1), "patterns": [(TEMPLATES[i % len(TEMPLATES)], 0)]}   # each probe
            for i, probe in enumerate(PROBES)]))
def wildcard_patterns_match_whole_names(ctx, backend, ex):
    """`*` is any run of characters (dots included); the pattern must match the whole full name."""
    model, candidates = _model(backend, ex["num_layers"])
    targets = list(dict.fromkeys(_fill(t, i, ex["num_layers"]) for t, i in [*ex["patterns"], ex["probe"]]))
    got = _selected(ctx, backend, model, targets)
    _compare(ctx, got, expected_selection(candidates, targets), f"target_modules={targets}")


DOT_PATTERNS = ["*.layers.1.*.linear_fc1", "decoder.layers.1.*.linear_qkv", "*.layers.1.*", "decoder.layers.1.*",
                "*.1.*", "*.layers.1.self_attention.*"]


@prop("LORA-MATCH-3", needs={"models"}, weight=0.5,
      strategy=lambda ctx: with_explicit(st.fixed_dictionaries({
          # Patterns that reach only linear modules come first: a failing backend then shrinks to one
          # that shows the dots, not a failure on a non-linear module ([LORA-MATCH-2]'s business).
          "pattern": st.sampled_from(DOT_PATTERNS)}), [{"pattern": p} for p in DOT_PATTERNS]))
def wildcard_dots_are_literal(ctx, backend, ex):
    """Decision: dots are literal, so `*.layers.1.*` selects layer 1 and not layers 10 and 11
    (Megatron-Bridge's unescaped regex lets `.` match any character)."""
    model, candidates = _model(backend, 12)
    got = _selected(ctx, backend, model, [ex["pattern"]])
    wrong = sorted(n for n in got if n.startswith(("decoder.layers.10.", "decoder.layers.11.")))
    ctx.check(not wrong, f"target_modules=[{ex['pattern']!r}] selected layers 10/11 ({wrong[:3]} ...): "
                         f"a dot in a pattern must match only a dot (SPEC Decision [LORA-MATCH-3])")
    _compare(ctx, got, expected_selection(candidates, [ex["pattern"]]), f"target_modules=[{ex['pattern']!r}]")


@prop("LORA-MATCH-4", needs={"models"},
      strategy=lambda ctx: with_explicit(st.integers(1, 4).flatmap(lambda n: st.fixed_dictionaries({
          "num_layers": st.just(n),
          "excludes": st.lists(st.one_of(st.tuples(st.sampled_from(SHORT_NAMES), st.just(0)),
                                         st.tuples(st.sampled_from(TEMPLATES[:-1] + PROBES), st.integers(0, n - 1))),
                               max_size=3),
      })), [{"num_layers": 2, "excludes": []},
            {"num_layers": 2, "excludes": [("linear_qkv", 0), ("*.layers.{i}.*", 1), ("*.linear_fc", 0)]}]))
def exclude_mode_adapts_every_other_linear(ctx, backend, ex):
    """target_modules=[]: every linear-like module except those an exclude pattern matches."""
    model, candidates = _model(backend, ex["num_layers"])
    excludes = list(dict.fromkeys(_fill(t, i, ex["num_layers"]) for t, i in ex["excludes"]))
    got = _selected(ctx, backend, model, [], excludes)
    _compare(ctx, got, expected_selection(candidates, (), excludes), f"target_modules=[], exclude_modules={excludes}")


@prop("LORA-MATCH-5", needs={"models"},
      strategy=lambda ctx: with_explicit(st.fixed_dictionaries({
          "num_layers": st.integers(1, 3),
          "matched": st.lists(st.sampled_from(SHORT_NAMES + ["*.linear_qkv"]), max_size=2, unique=True),
          "unmatched": st.lists(st.sampled_from(UNMATCHED), max_size=3, unique=True),
      }).filter(lambda ex: ex["matched"] or ex["unmatched"]),
          [{"num_layers": 1, "matched": ["linear_qkv", "*.linear_qkv"], "unmatched": []},
           {"num_layers": 2, "matched": [], "unmatched": UNMATCHED[:3]},
           {"num_layers": 1, "matched": ["linear_fc1"], "unmatched": UNMATCHED[3:]}]))
def unmatched_targets_warn(ctx, backend, ex):
    """Target patterns that select nothing are listed in exactly one UserWarning (none when all match)."""
    backend.init_parallel(1)
    model = backend.make_model(_spec(ex["num_layers"]))
    candidates = linear_candidates(model)
    targets = ex["matched"] + [_fill(p, 0, ex["num_layers"]) for p in ex["unmatched"]]
    unmatched = unmatched_targets(candidates, targets)
    model, records = apply_quietly(backend, model, _lora(targets))
    mentions = [str(r.message) for r in records if issubclass(r.category, UserWarning)
                and any(p in str(r.message) for p in targets)]
    if not unmatched:
        ctx.check(not mentions, f"target_modules={targets} all match, yet a UserWarning names them: {mentions[:2]}")
        return
    ctx.check(len(mentions) == 1, f"target_modules={targets}: {len(mentions)} UserWarnings about the unmatched "
                                  f"patterns {unmatched}, expected exactly one listing them all: {mentions[:3]}")
    missing = [p for p in unmatched if p not in mentions[0]]
    ctx.check(not missing, f"the unmatched-pattern warning does not list {missing}: {mentions[0]!r}")


# ---- patterns from a grammar over the model's real names ([LORA-MATCH-2], [LORA-MATCH-3]) ----------------
# Each transform turns a real full name into a pattern. Under SPEC, most select nothing or exactly
# what SPEC says, where a plausible other semantics (suffix as PEFT, substring, regex with `.` as any
# character, fnmatch / glob with `?` and `[]`, unanchored ends) selects something else.
# tests/suite/test_matching_grammar.py checks that the always-run examples tell SPEC apart from each.

MODULES = ["self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2"]
GRAMMAR_LAYERS = 12          # layers 1, 10 and 11: digit runs

PLAIN = {   # no `*`: an attribute name, or a whole full name, or nothing ([LORA-MATCH-2])
    "attribute": lambda n: n.rsplit(".", 1)[1],
    "full_name": lambda n: n,
    "two_segment_tail": lambda n: ".".join(n.split(".")[-2:]),          # suffix semantics select it
    "three_segment_tail": lambda n: ".".join(n.split(".")[-3:]),
    "layer_prefix": lambda n: ".".join(n.split(".")[:3]),               # a transformer layer, not a linear
    "interior_piece": lambda n: n.split(".")[3],                        # "mlp" / "self_attention"
    "attribute_prefix": lambda n: n.rsplit(".", 1)[1][:-1],             # "linear_fc", "linear_qk"
    "question_mark": lambda n: n.rsplit(".", 1)[1][:-1] + "?",          # fnmatch: any one character
    "bracket_class": lambda n: n.rsplit(".", 1)[1][:-1] + "[12vj]",     # fnmatch: a character class
    "regex_dot": lambda n: n.rsplit(".", 1)[1].replace("_", "."),        # regex: `.` is any character
    "upper_case": lambda n: n.rsplit(".", 1)[1].capitalize(),
}
WILDCARD = {  # with `*` ([LORA-MATCH-3]): the whole full name, `*` any run of characters, dots included
    "star_dot_attribute": lambda n: "*." + n.rsplit(".", 1)[1],
    "star_attribute_prefix": lambda n: "*" + n.rsplit(".", 1)[1][:-1],          # anchored at the end: nothing
    "attribute_prefix_star": lambda n: n.rsplit(".", 1)[1][:-1] + "*",          # anchored at the start: nothing
    "layer_star": lambda n: ".".join(n.split(".")[:3]) + ".*",                  # layer i only (dots literal)
    "layer_digits_star": lambda n: ".".join(n.split(".")[:3]) + "*",            # layer 1 also 10, 11
    "star_in_the_middle": lambda n: "decoder.layers.*." + ".".join(n.split(".")[3:]),
    "module_star": lambda n: ".".join(n.split(".")[:4]) + ".*",
    "star_everywhere": lambda n: "*" + "*".join(n.split(".")[2:4]) + "*",       # "*1*mlp*"
    "star_question_mark": lambda n: "*." + n.rsplit(".", 1)[1][:-1] + "?",      # fnmatch selects, SPEC not
    "star_bracket_class": lambda n: "*." + n.rsplit(".", 1)[1][:-1] + "[12vj]",
    "lone_star": lambda n: "*",
}


def grammar_pattern(ex: dict) -> str:
    name = f"decoder.layers.{ex['layer']}.{ex['module']}"
    return {**PLAIN, **WILDCARD}[ex["transform"]](name)


def _grammar_examples(transforms):
    explicit = [{"transform": t, "layer": 1, "module": "mlp.linear_fc1"} for t in transforms]   # layer 1: 10, 11 too
    return with_explicit(st.fixed_dictionaries({"transform": st.sampled_from(list(transforms)),
                                                 "layer": st.integers(0, GRAMMAR_LAYERS - 1),
                                                 "module": st.sampled_from(MODULES)}), explicit)


def _check_grammar(ctx, backend, ex):
    model, candidates = _model(backend, GRAMMAR_LAYERS)
    pattern = grammar_pattern(ex)
    got = _selected(ctx, backend, model, [pattern])
    _compare(ctx, got, expected_selection(candidates, [pattern]), f"target_modules=[{pattern!r}] ({ex['transform']})")


@prop("LORA-MATCH-2", needs={"models"}, weight=0.25, strategy=lambda ctx: _grammar_examples(PLAIN))
def plain_patterns_are_attribute_names_or_whole_names(ctx, backend, ex):
    """A pattern without `*` drawn from a real name (its attribute, the whole name, a dotted tail, a
    prefix, an interior piece, near misses with `?`, `[]`, `.`): it selects the modules whose attribute
    name equals it or whose whole full name it is, and nothing else (not a suffix, substring, regex or glob)."""
    _check_grammar(ctx, backend, ex)


@prop("LORA-MATCH-3", needs={"models"}, weight=0.25, strategy=lambda ctx: _grammar_examples(WILDCARD))
def wildcards_from_real_names_match_whole_names(ctx, backend, ex):
    """`*` in every position of a real name (start, end, middle, several, alone), with digit runs
    (layer 1 vs 10, 11) and `?` / `[]` / `.` near misses: the pattern matches the whole full name,
    `*` is any run of characters and every other character is literal."""
    _check_grammar(ctx, backend, ex)
