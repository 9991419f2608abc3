"""Deliberately broken LoRA backends: each one bug on top of the reference backend.

tests/test_conformance.py runs the real conformance entry point against each of them and checks that
the suite catches the bug: the SPEC clause named by `expected_clause` must come out "failed" when the
properties selected by `select` (a `-k` expression) run. The bugs are injected without touching
reference/: by overriding a backend method, or by patching methods on the adapters the reference
creates (types.MethodType), or by patching a reference function only for the duration of one
backend call (`_patched`).

Classes without `expected_clause` (HangingCollectiveBackend, DyingRankBackend) are robustness probes
with their own tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import time
import types

import torch
import torch.distributed as dist
import torch.nn.functional as F

import reference
from reference.init import init_full_weight
from reference.lora import matching as _matching
from reference.lora.adapter import LoRAWeight, ParallelLinearAdapter
from reference.lora.experts import ExpertAdapter
from reference.lora.transform import model_chunks
from reference.lora import build_adapter, is_lora_wrapper
from reference.lora.wrapper import LoRALinear
from reference.parallel import (
    all_to_all_hidden_to_sequence_parallel_region,
    copy_to_tensor_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_parallel_region,
    reduce_from_tensor_parallel_region,
    scatter_to_tensor_parallel_region,
    shard,
)

from conformance.backends.reference import ReferenceBackend


# ---- helpers ------------------------------------------------------------------------------------

def _wrappers(model):
    """Every LoRALinear-like wrapper in the model (or its chunks)."""
    for chunk in model_chunks(model):
        for module in chunk.modules():
            if is_lora_wrapper(module) and isinstance(module, LoRALinear):
                yield module


def _adapters(model, kinds=("column", "row", "none"), include_experts=True):
    for chunk in model_chunks(model):
        for module in chunk.modules():
            if isinstance(module, ParallelLinearAdapter) and module.base_kind in kinds:
                if include_experts or not isinstance(module, ExpertAdapter):
                    yield module


@contextlib.contextmanager
def _patched(owner, name, value):
    """Replace owner.name by value for the duration of the block (one backend call)."""
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


def _own_communication(model, kinds):
    """Let the adapters of these base kinds do their own collectives (share_communication=False, the
    Megatron-Bridge way), so that a bug in the adapter's own communication is on the path taken."""
    for wrapper in _wrappers(model):
        if getattr(wrapper.adapter, "base_kind", None) in kinds and hasattr(wrapper, "share_communication"):
            wrapper.share_communication = False


def _break_adapter_forward(model, kind, broken_forward, own_communication=False):
    """Give every dense adapter over a `kind` ("column" or "row") base `broken_forward` as its
    `_{kind}_forward`; with own_communication the adapters also do their own collectives, so that
    the broken communication is on the path taken."""
    if own_communication:
        _own_communication(model, (kind,))
    for adapter in _adapters(model, kinds=(kind,), include_experts=False):
        setattr(adapter, f"_{kind}_forward", types.MethodType(broken_forward, adapter))
    return model


class _Mutant(ReferenceBackend):
    expected_clause: str | None = None
    # Other clauses of the property that catches it (a property that checks several clauses fails
    # them all): the per-mutant test asserts the failed set is exactly these and expected_clause.
    also_failing: tuple[str, ...] = ()
    whole_suite = True                  # False: a mutant breaking everything (tests/suite/test_mutant_clauses.py)
    select: str | None = None
    diagnosis: str | None = None        # a word the failure message must contain (robustness mutants)

    @property
    def name(self):   # noqa: D401 - shown in the report header
        return f"mutant:{type(self).__name__}"

    def describe(self) -> str:
        doc = (type(self).__doc__ or "").strip().splitlines()[0]
        return f"mutant {type(self).__name__} ({doc})"


# ---- forward ----------------------------------------------------------------------------------------

class WrongScaleBackend(_Mutant):
    """The update is scaled by alpha instead of alpha / dim."""

    expected_clause = "LORA-FWD-5"
    select = "LORA-FWD-5"

    def apply_lora(self, model, config, training=True):
        model = super().apply_lora(model, config, training)
        for adapter in _adapters(model):
            adapter.scale = adapter.alpha          # BUG: should be alpha / dim
        return model


def _column_forward_with_broken_gather(gather_h):
    """A column adapter forward whose all-gather of A's output h (s, b, r/t) is `gather_h(h, group)`."""

    def forward(self, x, A, B, caller_communicates=False, regather=None):
        group = self.tp_group
        if regather is not None:           # sequence_parallel_input_regather: not this mutant's path
            return type(self)._column_forward(self, x, A, B, caller_communicates, regather)
        if not (caller_communicates or self.explicit_expert_comm):
            x = (gather_from_sequence_parallel_region(x, group) if self.sequence_parallel
                 else copy_to_tensor_parallel_region(x, group))
        h = gather_h(self._down(x, A), group)                                  # the broken step
        h = copy_to_tensor_parallel_region(h, group)
        y = F.linear(h, B)
        if self.gather_output and not caller_communicates:
            y = gather_from_tensor_parallel_region(y, group)
        return y

    return forward


# BUG: (s, b, r/t) is never all-gathered to (s, b, r).
_column_forward_without_gather = _column_forward_with_broken_gather(lambda h, group: h)


class ColumnMissingGatherBackend(_Mutant):
    """The column adapter does not all-gather A's output (s, b, r/t) before B."""

    expected_clause = "LORA-FWD-1"
    select = "forward.parallel_forward_matches_full_math"

    def apply_lora(self, model, config, training=True):
        return _break_adapter_forward(super().apply_lora(model, config, training), "column",
                                      _column_forward_without_gather)


# BUG: gathered along the sequence (dim 0) instead of the hidden dim, then viewed as (s, b, r).
_column_forward_gather_wrong_axis = _column_forward_with_broken_gather(
    lambda h, group: gather_from_sequence_parallel_region(h, group).reshape(*h.shape[:-1], -1))


class GatherWrongAxisBackend(_Mutant):
    """The column adapter all-gathers A's output along the sequence axis (then reshapes) instead of the last axis."""

    expected_clause = "LORA-FWD-1"
    select = "forward.parallel_forward_matches_full_math"

    def apply_lora(self, model, config, training=True):
        return _break_adapter_forward(super().apply_lora(model, config, training), "column",
                                      _column_forward_gather_wrong_axis)


def _row_forward_without_sp_scatter(self, x, A, B, caller_communicates=False):
    group = self.tp_group
    if not self.input_is_parallel and not caller_communicates:
        x = scatter_to_tensor_parallel_region(x, group)
    h = reduce_from_tensor_parallel_region(self._down(x, A), group)
    h = copy_to_tensor_parallel_region(h, group)
    y = F.linear(h, B)
    if caller_communicates:
        return y
    if self.a2a_experimental:
        return all_to_all_hidden_to_sequence_parallel_region(y, group)
    return gather_from_tensor_parallel_region(y, group)   # BUG: no scatter to (s/t, b, out) under SP


class RowNoSequenceScatterBackend(_Mutant):
    """Under sequence parallelism the row adapter returns the full (s, b, out) instead of its sequence shard.

    (The adapters do their own collectives, share_communication=False, as in Megatron-Bridge.)
    """

    expected_clause = "LORA-FWD-3"
    select = "forward.sequence_parallel_forward_matches_full_math"

    def apply_lora(self, model, config, training=True):
        return _break_adapter_forward(super().apply_lora(model, config, training), "row",
                                      _row_forward_without_sp_scatter, own_communication=True)


def _row_forward_first_slice_of_full_input(self, x, A, B, caller_communicates=False):
    group = self.tp_group
    if not self.input_is_parallel and not caller_communicates:
        x = x[..., : x.shape[-1] // self.tp_size]        # BUG: rank 0's slice on every rank, not this rank's
    h = reduce_from_tensor_parallel_region(self._down(x, A), group)
    h = copy_to_tensor_parallel_region(h, group)
    y = F.linear(h, B)
    if caller_communicates:
        return y
    return gather_from_tensor_parallel_region(y, group)   # (SP needs input_is_parallel: never here)


class RowFullInputWrongSliceBackend(_Mutant):
    """A row base given the full input (input_is_parallel=False): the adapter reads the first in/t
    features on every rank instead of this rank's slice (the adapters do their own collectives)."""

    expected_clause = "LORA-FWD-8"
    select = "LORA-FWD-8"

    def apply_lora(self, model, config, training=True):
        return _break_adapter_forward(super().apply_lora(model, config, training), "row",
                                      _row_forward_first_slice_of_full_input, own_communication=True)


class OwnActivationCollectivesBackend(_Mutant):
    """LoRA wrappers do not share the base's collectives: the adapter adds its own activation-sized ones."""

    expected_clause = "LORA-FWD-7"
    select = "LORA-FWD-7"

    def apply_lora(self, model, config, training=True):
        model = super().apply_lora(model, config, training)
        _own_communication(model, ("column", "row"))           # BUG: share_communication=False
        return model


class DropoutPostBeforeBBackend(_Mutant):
    """dropout_position='post' drops the adapter's input (like 'pre') instead of its output."""

    expected_clause = "LORA-FWD-6"
    select = "LORA-FWD-6"

    def apply_lora(self, model, config, training=True):
        model = super().apply_lora(model, config, training)
        for adapter in _adapters(model):
            if adapter.dropout_position == "post":
                adapter.dropout_position = "pre"        # BUG: the mask lands before A and B
        return model


class RegatherIgnoredBackend(_Mutant):
    """sequence_parallel_input_regather is ignored: A keeps the gathered input (s, b, in) for backward."""

    expected_clause = "LORA-FWD-10"
    select = "LORA-FWD-10"

    def apply_lora(self, model, config, training=True):
        if config.sequence_parallel_input_regather:
            config = dataclasses.replace(config, sequence_parallel_input_regather=False)   # BUG
        return super().apply_lora(model, config, training)


# ---- backward -------------------------------------------------------------------------------------

def _column_forward_without_copy_to(self, x, A, B, caller_communicates=False, regather=None):
    group = self.tp_group
    if regather is not None:               # sequence_parallel_input_regather: not this mutant's path
        return type(self)._column_forward(self, x, A, B, caller_communicates, regather)
    if caller_communicates or self.explicit_expert_comm:
        pass
    elif self.sequence_parallel:
        x = gather_from_sequence_parallel_region(x, group)
    # BUG: no copy_to_tensor_parallel_region(x): the input gradient is never all-reduced over TP
    h = gather_from_tensor_parallel_region(self._down(x, A), group)
    h = copy_to_tensor_parallel_region(h, group)
    y = F.linear(h, B)
    if self.gather_output and not caller_communicates:
        y = gather_from_tensor_parallel_region(y, group)
    return y


class ColumnMissingInputGradReduceBackend(_Mutant):
    """The column adapter skips copy_to (identity forward, all-reduce backward) on its input.

    (The adapters do their own collectives, share_communication=False, as in Megatron-Bridge.)
    """

    expected_clause = "LORA-BWD-2"
    also_failing = ("LORA-BWD-1", "TP-COLL-1", "LORA-FWD-8", "LORA-FWD-7")   # own communication: FWD-7
    select = "backward.parallel_gradients_match_full_math"

    def apply_lora(self, model, config, training=True):
        return _break_adapter_forward(super().apply_lora(model, config, training), "column",
                                      _column_forward_without_copy_to, own_communication=True)


class BaseNotFrozenBackend(_Mutant):
    """Base weights and biases stay trainable after LoRA is applied."""

    expected_clause = "LORA-BWD-3"
    also_failing = ("LORA-FWD-10",)   # a base weight that trains keeps its input
    select = "LORA-BWD-3"

    def apply_lora(self, model, config, training=True):
        model = super().apply_lora(model, config, training)
        if training:
            for wrapper in _wrappers(model):
                wrapper.to_wrap.requires_grad_(True)   # BUG
        return model


# ---- initialization -------------------------------------------------------------------------------

class NonZeroBInitBackend(_Mutant):
    """lora_B_init_method='zero' is ignored: B is drawn from N(0, 0.2^2)."""

    expected_clause = "LORA-INIT-3"
    also_failing = ("LORA-INIT-1",)   # the default B is not the 'zero' method
    select = "LORA-INIT-3"

    def apply_lora(self, model, config, training=True):
        if config.lora_B_init_method == "zero":
            config = dataclasses.replace(config, lora_B_init_method="normal")   # BUG
        return super().apply_lora(model, config, training)


def _init_weights_per_shard(self, device, dtype):
    """Each rank draws only its own shard, with the shard's fans (Megatron-Bridge's behaviour)."""
    A_shape = tuple(self._shard_A(torch.empty(self.dim, self.in_features)).shape)
    B_shape = tuple(self._shard_B(torch.empty(self.out_features, self.dim)).shape)
    A = init_full_weight(A_shape, self.init_methods[0], field="lora_A_init_method")
    B = init_full_weight(B_shape, self.init_methods[1], field="lora_B_init_method")
    return LoRAWeight(A.to(device=device, dtype=dtype)), LoRAWeight(B.to(device=device, dtype=dtype))


class PerShardInitBackend(_Mutant):
    """Adapter weights are initialized per shard (fans of the shard, each rank its own draw), not on the full matrix."""

    expected_clause = "LORA-INIT-2"
    also_failing = ("LORA-INIT-1",)   # shard fans change the distribution
    select = "LORA-INIT-2"

    def apply_lora(self, model, config, training=True):
        with _patched(ParallelLinearAdapter, "_init_weights", _init_weights_per_shard):
            return super().apply_lora(model, config, training)


def _shard_B_ignoring_stride(self, full_B):
    if self.base_kind == "none":
        return full_B
    return shard(full_B, 0, self.tp_rank, self.tp_size)   # BUG: no stride (contiguous rows)


class InitBShardIgnoresStrideBackend(_Mutant):
    """A column adapter's freshly drawn full B is sharded in contiguous rows, not by the base's stride."""

    # Only TP > 1, stride 2 and a non-zero B init show it (the gathered B's [gate; up] halves are
    # interleaved): the always-run column + TP 2 + stride 2 example of LORA-INIT-2 catches it at any
    # seed; the suite writes adapter weights itself elsewhere, so nothing else sees it.
    expected_clause = "LORA-INIT-2"
    select = "LORA-INIT-2"

    def apply_lora(self, model, config, training=True):
        with _patched(ParallelLinearAdapter, "_shard_B", _shard_B_ignoring_stride):
            return super().apply_lora(model, config, training)


class UniformXavierOnLinearBackend(_Mutant):
    """On plain nn.Linear bases "xavier" draws A uniformly (xavier_uniform_: the right std, the wrong
    distribution), as Megatron-Bridge's nn.Linear adapter does."""

    expected_clause = "LORA-INIT-1"
    select = "init_methods_on_plain_linear_bases"

    def apply_lora(self, model, config, training=True):
        model = super().apply_lora(model, config, training)
        for adapter in _adapters(model, kinds=("none",)):
            if adapter.init_methods[0] == "xavier":
                with torch.no_grad():
                    torch.nn.init.xavier_uniform_(adapter.linear_in.weight)   # BUG: xavier is normal
        return model


# ---- dtype ------------------------------------------------------------------------------------------

class LoraDtypeIgnoredOnParallelBackend(_Mutant):
    """lora_dtype is ignored for tensor-parallel (column/row) adapters: they keep the base weight's dtype."""

    expected_clause = "LORA-DTYPE-1"
    select = "LORA-DTYPE-1"

    def apply_lora(self, model, config, training=True):
        model = super().apply_lora(model, config, training)
        for wrapper in _wrappers(model):
            adapter = wrapper.adapter
            if isinstance(adapter, ParallelLinearAdapter) and adapter.base_kind in ("column", "row"):
                adapter.to(dtype=wrapper.to_wrap.weight.dtype)        # BUG
        return model


# ---- matching and injection ----------------------------------------------------------------------

def _megatron_wildcard_regex(pattern: str) -> re.Pattern:
    return re.compile(pattern.replace("*", ".*"))      # BUG: '.' is not escaped: any character


class WildcardDotIsRegexBackend(_Mutant):
    """In wildcard patterns '.' is a regex any-character instead of a literal dot."""

    expected_clause = "LORA-MATCH-3"
    select = "LORA-MATCH-3"

    def apply_lora(self, model, config, training=True):
        with _patched(_matching, "_wildcard_regex", _megatron_wildcard_regex):
            return super().apply_lora(model, config, training)

    def lora_modules(self, model):
        with _patched(_matching, "_wildcard_regex", _megatron_wildcard_regex):
            return super().lora_modules(model)


_spec_pattern_matches = _matching.pattern_matches


def _suffix_pattern_matches(pattern: str, name: str, full_name: str) -> bool:
    if "*" not in pattern and full_name.endswith("." + pattern):
        return True                                    # BUG: a plain dotted pattern matches as a suffix
    return _spec_pattern_matches(pattern, name, full_name)


class PlainPatternIsSuffixBackend(_Mutant):
    """A pattern without `*` also selects every module whose full name ends with "." + pattern
    (PEFT's suffix rule): `mlp.linear_fc1` selects every layer's fc1. Only plain dotted tails show it."""

    expected_clause = "LORA-MATCH-2"
    select = "LORA-MATCH-2"

    def apply_lora(self, model, config, training=True):
        with _patched(_matching, "pattern_matches", _suffix_pattern_matches):
            return super().apply_lora(model, config, training)


class NotIdempotentBackend(_Mutant):
    """Applying LoRA a second time wraps the existing LoRA wrappers again."""

    expected_clause = "LORA-INJ-3"
    select = "LORA-INJ-3"

    def apply_lora(self, model, config, training=True):
        existing = {id(w) for w in _wrappers(model)}
        model = super().apply_lora(model, config, training)
        for chunk in model_chunks(model):
            for parent_name, parent in list(chunk.named_modules()):
                for name, child in list(parent.named_children()):
                    if id(child) in existing and isinstance(child, LoRALinear) and type(child) is LoRALinear:
                        full_name = f"{parent_name}.{name}" if parent_name else name
                        adapter = build_adapter(config, child.to_wrap, full_name)
                        adapter.requires_grad_(training)
                        setattr(parent, name, LoRALinear(child, adapter))    # BUG: a wrapper of a wrapper
        return model


class ReapplyWithWildcardsResetsAdaptersBackend(_Mutant):
    """A second apply with wildcard or exclude patterns re-initializes the existing adapters (B = 0);
    bare names are handled right (only the wildcard and exclude-mode probes of [LORA-INJ-3] see it)."""

    expected_clause = "LORA-INJ-3"
    select = "LORA-INJ-3"

    def apply_lora(self, model, config, training=True):
        already = bool(_wrappers(model))
        model = super().apply_lora(model, config, training)
        patterns = [*config.target_modules, *config.exclude_modules]
        if already and (not config.target_modules or any("*" in p for p in patterns)):
            with torch.no_grad():
                for wrapper in _wrappers(model):
                    wrapper.adapter.linear_out.weight.zero_()      # BUG: the trained adapter is reset
        return model


class InferenceAdaptersTrainableBackend(_Mutant):
    """training=False leaves the adapters trainable (and the model in train mode)."""

    expected_clause = "LORA-INJ-2"
    select = "LORA-INJ-2"

    def apply_lora(self, model, config, training=True):
        model = super().apply_lora(model, config, True)     # BUG: training flag dropped
        return model


class DisableOnlyFreezesBackend(_Mutant):
    """Turning the adapters off only freezes them: they still add their update to the output."""

    expected_clause = "LORA-INJ-6"
    select = "LORA-INJ-6"

    def set_adapters_enabled(self, model, enabled):
        for wrapper in _wrappers(model):
            wrapper.adapter.requires_grad_(enabled)          # BUG: frozen, but still called


class BaseKeysRenamedBackend(_Mutant):
    """The wrapper's state dict has the default `to_wrap.` keys: a base checkpoint no longer loads."""

    expected_clause = "LORA-INJ-7"
    select = "LORA-INJ-7"

    def apply_lora(self, model, config, training=True):
        model = super().apply_lora(model, config, training)
        for wrapper in _wrappers(model):                     # BUG: no key mapping (nn.Module's default)
            for hooks in (wrapper._state_dict_hooks, wrapper._load_state_dict_pre_hooks,
                          wrapper._load_state_dict_post_hooks):
                hooks.clear()
        return model


class VLMFreezeAfterAdaptersBackend(_Mutant):
    """VLMLoRA freezes its parts after the adapters are created, so adapters in frozen parts are frozen too."""

    expected_clause = "VLM-FREEZE-2"
    also_failing = ("LORA-INJ-2",)
    select = "VLM-FREEZE-2"

    def apply_lora(self, model, config, training=True):
        model = super().apply_lora(model, config, training)
        freeze = getattr(config, "freeze_model", None)
        if isinstance(config, reference.VLMLoRA) and freeze is not None:
            freeze(model, training)                           # BUG: freezing runs after the adapters exist
        return model


# ---- merge ----------------------------------------------------------------------------------------

class MergeWithoutGatherBackend(_Mutant):
    """merge_weight uses only the local shards (tiled to the full size) instead of all-gathering A or B."""

    expected_clause = "LORA-MERGE-1"
    select = "LORA-MERGE-1"

    def merge_weight(self, base_weight, linear_out, linear_in, alpha, dim, *, tp_size, tp_group):
        A, B = linear_in, linear_out
        if tp_size > 1 and A.shape[0] * tp_size == dim:
            A = A.repeat(tp_size, 1)                          # BUG: should be gathered from every rank
        elif tp_size > 1 and B.shape[0] * tp_size == base_weight.shape[0]:
            B = B.repeat(tp_size, 1)                          # BUG
        return reference.LoRAMerge().merge(base_weight, B, A, alpha, dim, tp_size=1, tp_group=None)


class UnmergeKeepsTheUpdateBackend(_Mutant):
    """unmerge_model marks the wrappers unmerged (the adapters run again) without subtracting the
    update from the base weights: the update is then counted twice."""

    expected_clause = "LORA-MERGE-3"
    select = "LORA-MERGE-3"

    def unmerge_model(self, model):
        for wrapper in _wrappers(model):
            wrapper.merged = False                          # BUG: the base weight keeps the update
        return model


class MergeModelDropsAdaptersBackend(_Mutant):
    """merge_model replaces each wrapper by its base layer without folding the adapter into the weight."""

    expected_clause = "LORA-MERGE-3"
    select = "LORA-MERGE-3"

    def merge_model(self, model):
        def strip(module):
            for name, child in list(module.named_children()):
                if isinstance(child, LoRALinear) and type(child) is LoRALinear:
                    setattr(module, name, child.to_wrap)        # BUG: the update is dropped, not merged
                else:
                    strip(child)

        if isinstance(model, LoRALinear):
            return model.to_wrap
        for chunk in model_chunks(model):
            strip(chunk)
        return model


# ---- mixture of experts ----------------------------------------------------------------------------

class NoMoERankNormalizationBackend(_Mutant):
    """normalize_moe_lora is ignored: expert adapters keep the full rank dim."""

    expected_clause = "MOE-RANK-1"
    also_failing = ("LORA-FWD-2", "MOE-SHARE-2")
    select = "MOE-RANK-1"

    def apply_lora(self, model, config, training=True):
        if config.normalize_moe_lora:
            config = dataclasses.replace(config, normalize_moe_lora=False)     # BUG
        return super().apply_lora(model, config, training)


class ExpertScaleIgnoresNormalizationBackend(_Mutant):
    """normalize_moe_lora gives expert adapters rank dim // k, right, but scales them by alpha / dim
    instead of alpha / (dim // k): shapes are right and the error is the same at every layout, so only
    a comparison with dense float64 math sees it."""

    expected_clause = "MOE-RANK-1"
    select = "MOE-RANK-1"

    def apply_lora(self, model, config, training=True):
        model = super().apply_lora(model, config, training)
        if config.normalize_moe_lora:
            for adapter in _adapters(model):
                if isinstance(adapter, ExpertAdapter):
                    adapter.scale = config.alpha / config.dim      # BUG: alpha / (dim // k)
        return model


class SharedExpertGradsNotSyncedBackend(_Mutant):
    """finalize_grads does nothing: shared expert adapters drift apart across the EP group."""

    expected_clause = "MOE-SHARE-1"
    select = "MOE-SHARE-1"

    def finalize_grads(self, model):
        pass                                                  # BUG: no sum over the EP group


class SharedOuterFirstExpertOnlyBackend(_Mutant):
    """experts_shared_outer_loras: every local expert reads the first local expert's per-expert factor."""

    expected_clause = "MOE-SHARE-3"
    also_failing = ("MOE-FWD-1",)
    select = "MOE-SHARE-3"

    def apply_lora(self, model, config, training=True):
        model = super().apply_lora(model, config, training)
        for adapter in _adapters(model):
            if isinstance(adapter, ExpertAdapter) and config.experts_shared_outer_loras:
                weights_for = adapter.weights_for
                adapter.weights_for = lambda expert, _weights_for=weights_for: _weights_for(0)   # BUG
        return model


# ---- errors -----------------------------------------------------------------------------------------

class ErrorOnlyOnRankZeroBackend(_Mutant):
    """A size error in apply_lora is raised on rank 0 only; the other ranks carry on without the adapter."""

    expected_clause = "LORA-ERR-1"
    also_failing = ("MOE-RANK-2",)   # its property checks LORA-ERR-1 too
    select = "errors.lora_errors_are_raised_on_every_rank_before_any_collective"

    def apply_lora(self, model, config, training=True):
        try:
            return super().apply_lora(model, config, training)
        except ValueError:
            if dist.get_rank() == 0:
                raise
            return model                                      # BUG: the error is swallowed on this rank


# ---- robustness ------------------------------------------------------------------------------------

def _nan_output(module, original):
    def forward(self, x, *args, **kwargs):
        result = original(x, *args, **kwargs)
        if isinstance(result, tuple):
            return (result[0] * float("nan"),) + tuple(result[1:])
        return result * float("nan")
    module.forward = types.MethodType(forward, module)


class NaNForwardBackend(_Mutant):
    """The LoRA-wrapped layer's forward returns NaN."""

    expected_clause = "LORA-FWD-1"
    select = "forward.parallel_forward_matches_full_math or forward.linear_forward_matches_full_math"
    diagnosis = "non-finite"

    def apply_lora(self, model, config, training=True):
        model = super().apply_lora(model, config, training)
        for wrapper in _wrappers(model):
            _nan_output(wrapper, wrapper.forward)
        return model


class WrongShapeBackend(_Mutant):
    """The LoRA-wrapped layer's forward returns its output with an extra leading dimension."""

    expected_clause = "LORA-FWD-1"
    select = "forward.parallel_forward_matches_full_math or forward.linear_forward_matches_full_math"
    diagnosis = "shape"

    def apply_lora(self, model, config, training=True):
        model = super().apply_lora(model, config, training)
        for wrapper in _wrappers(model):
            original = wrapper.forward

            def forward(self, x, *args, _original=original, **kwargs):
                result = _original(x, *args, **kwargs)
                if isinstance(result, tuple):
                    return (result[0].unsqueeze(0),) + tuple(result[1:])
                return result.unsqueeze(0)

            wrapper.forward = types.MethodType(forward, wrapper)
        return model


class RaisesInApplyBackend(_Mutant):
    """apply_lora raises RuntimeError (a robustness mutant: every property that applies LoRA fails, so
    it is left out of the whole-suite meta-test; its -k selection checks the diagnosis)."""

    whole_suite = False

    expected_clause = "LORA-FWD-1"
    also_failing = ("LORA-FWD-2",)
    select = "forward.parallel_forward_matches_full_math or forward.linear_forward_matches_full_math"
    diagnosis = "RuntimeError: mutant: apply_lora is broken"

    def apply_lora(self, model, config, training=True):
        raise RuntimeError("mutant: apply_lora is broken")


def _before_tp_adapter_forward(model, hook):
    """Call hook(adapter, x) before the forward of every adapter of a TP-parallel base (tp > 1)."""
    for adapter in _adapters(model, kinds=("column", "row"), include_experts=False):
        if adapter.tp_size > 1:
            original = adapter.forward

            def forward(self, x, *args, _original=original, **kwargs):
                hook(self, x)
                return _original(x, *args, **kwargs)

            adapter.forward = types.MethodType(forward, adapter)
    return model


class HangingCollectiveBackend(_Mutant):
    """In the adapter forward of a TP-parallel layer (tp > 1), rank 0 alone all-reduces on the TP group.

    The other ranks never join that collective, so rank 0 blocks until the group's timeout. The
    suite must turn that into a failed property ("HANG: ...") and go on with the next property.
    Non-parallel adapters (nn.Linear bases) are unaffected, so later properties on them pass.
    """

    def apply_lora(self, model, config, training=True):
        def rank_0_alone(adapter, x):
            if dist.get_rank(adapter.tp_group) == 0:
                dist.all_reduce(torch.zeros(1, device=x.device), group=adapter.tp_group)   # BUG: rank 0 only

        return _before_tp_adapter_forward(super().apply_lora(model, config, training), rank_0_alone)


class OneRankRaisesBackend(_Mutant):
    """In the adapter forward of a TP-parallel layer (tp > 1), rank 1 raises before the adapter's
    collectives while rank 0 goes into them: rank 0 would wait there until the collective timeout
    unless rank 1 releases it."""

    def apply_lora(self, model, config, training=True):
        def rank_1_raises(adapter, x):
            if dist.get_rank(adapter.tp_group) == 1:
                raise RuntimeError("mutant: rank 1 of the TP group fails")      # BUG: one rank only

        return _before_tp_adapter_forward(super().apply_lora(model, config, training), rank_1_raises)


class DyingRankBackend(_Mutant):
    """Rank 1 exits (os._exit(5)) the first time apply_lora is called."""

    def apply_lora(self, model, config, training=True):
        if dist.is_initialized() and dist.get_rank() == 1:
            os._exit(5)
        return super().apply_lora(model, config, training)


class StuckBackend(_Mutant):
    """apply_lora never returns (it sleeps, in no collective): only the watchdog can stop the rank."""

    def apply_lora(self, model, config, training=True):
        time.sleep(3600)
        return super().apply_lora(model, config, training)


MUTANTS = [cls for cls in list(globals().values())
           if isinstance(cls, type) and issubclass(cls, _Mutant) and cls.expected_clause]
