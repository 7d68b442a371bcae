"""Weight conversion between reference (PyTorch-style) state dicts and our variables.

The mechanism here is family-agnostic. Each family registers a *name map*: a table of
:class:`NameRule` s that pair a module prefix in the reference naming (``layer{s}.{b}.conv{i}``)
with a module path in ours (``layer{s}_{b}/conv{i}``) and a *kind* (``'conv'``, ``'norm'``,
...). The kind says how the leaves under that module are named and transformed
(``weight`` -> ``kernel`` with OIHW -> HWIO, ``running_mean`` -> ``batch_stats/mean``, ...).
Placeholders like ``{s}`` match decimal integers and are copied across. Because the rules
are templates they work in both directions, giving :func:`export_state_dict` for free.

State dicts are plain ``Mapping[str, numpy.ndarray]`` so weights load from safetensors or
npz without torch.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from flaxnets_errors import UserError
from models import registry

Transform = Callable[[np.ndarray], np.ndarray] | None


class ConversionError(UserError, ValueError):
    """A state dict does not match a model; the message lists every mismatch by name.

    Attributes:
        missing: our variable paths (with the reference name, where known) not provided.
        unexpected: reference names that map to nothing in the model.
        mismatched: ``(name, got_shape, expected_shape)`` for shape mismatches.
    """

    def __init__(self, message: str, missing=(), unexpected=(), mismatched=()):
        super().__init__(message)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)


@dataclasses.dataclass(frozen=True)
class LeafSpec:
    """How one reference leaf (e.g. ``weight``) maps under a module kind.

    Attributes:
        collection: ``'params'`` or ``'batch_stats'``.
        name: our leaf name.
        to_ours: array transform reference -> ours (None: identity).
        to_ref: the inverse transform.
    """

    collection: str
    name: str
    to_ours: Transform = None
    to_ref: Transform = None


def _oihw_to_hwio(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (2, 3, 1, 0))


def _hwio_to_oihw(w: np.ndarray) -> np.ndarray:
    return np.transpose(w, (3, 2, 0, 1))


def _transpose(w: np.ndarray) -> np.ndarray:
    return np.transpose(w)


# Keyed by kind, then by reference leaf name.
LEAF_KINDS: dict[str, dict[str, LeafSpec]] = {
    'conv': {
        'weight': LeafSpec('params', 'kernel', _oihw_to_hwio, _hwio_to_oihw),
        'bias': LeafSpec('params', 'bias'),
    },
    'linear': {
        'weight': LeafSpec('params', 'kernel', _transpose, _transpose),
        'bias': LeafSpec('params', 'bias'),
    },
    'norm': {
        'weight': LeafSpec('params', 'scale'),
        'bias': LeafSpec('params', 'bias'),
        'running_mean': LeafSpec('batch_stats', 'mean'),
        'running_var': LeafSpec('batch_stats', 'var'),
    },
}

# Bookkeeping buffers with no counterpart in our variables.
IGNORED_LEAVES = frozenset({'num_batches_tracked'})


@dataclasses.dataclass(frozen=True)
class NameRule:
    """One row of a family's name map.

    Attributes:
        ref: module prefix in the reference naming, with ``{placeholders}`` for indices.
        ours: module path in our variables (``/``-separated), same placeholders.
        kind: key of :data:`LEAF_KINDS`.
    """

    ref: str
    ours: str
    kind: str

    def __post_init__(self):
        if self.kind not in LEAF_KINDS:
            raise ValueError(f'unknown kind {self.kind!r}; known: {sorted(LEAF_KINDS)}')
        if set(_placeholders(self.ref)) != set(_placeholders(self.ours)):
            raise ValueError(f'placeholders differ between {self.ref!r} and {self.ours!r}')


def flat(kind: str, *refs: str) -> tuple[NameRule, ...]:
    """Rows of modules whose path in ours is the reference name with ``.`` -> ``_``
    (``stem.conv`` <-> ``stem_conv``, ``fc`` <-> ``fc``)."""
    return tuple(NameRule(ref, ref.replace('.', '_'), kind) for ref in refs)


def within(ref_prefix: str, ours_prefix: str, kind: str, *refs: str) -> tuple[NameRule, ...]:
    """Rows of modules inside a block: ``{ref_prefix}.{ref}`` <-> ``{ours_prefix}/{ref}``
    with ``.`` -> ``_`` in ``ref`` (``layer{s}.{b}`` + ``downsample.0`` <->
    ``layer{s}_{b}/downsample_0``)."""
    return tuple(NameRule(f'{ref_prefix}.{ref}', f'{ours_prefix}/{ref.replace(".", "_")}', kind) for ref in refs)


def _placeholders(template: str) -> list[str]:
    return re.findall(r'\{(\w+)\}', template)


@functools.cache
def _template_regex(template: str) -> re.Pattern[str]:
    parts = re.split(r'\{(\w+)\}', template)
    # re.split with one group alternates literal, placeholder, literal, ...
    pattern = ''.join(re.escape(p) if i % 2 == 0 else f'(?P<{p}>\\d+)' for i, p in enumerate(parts))
    return re.compile(pattern)


_NAME_MAPS: dict[str, tuple[NameRule, ...]] = {}


def register_leaf_kind(kind: str, leaves: Mapping[str, LeafSpec]) -> None:
    """Adds a module kind (for layers other than conv / linear / norm)."""
    if kind in LEAF_KINDS:
        raise ValueError(f'leaf kind {kind!r} already registered')
    LEAF_KINDS[kind] = dict(leaves)


def register_name_map(key: str, rules: Sequence[NameRule]) -> None:
    """Registers a name map under a family (the ``family`` a model is registered with) or
    under one registered model's name, which then takes precedence over its family's map
    (VGG: torchvision numbers each variant's layers differently)."""
    if key in _NAME_MAPS:
        raise ValueError(f'name map {key!r} already registered')
    _NAME_MAPS[key] = tuple(rules)


def _rules_for(model_name: str) -> tuple[NameRule, ...]:
    name = registry.resolve_model_name(model_name)
    family = registry.get_model_family(name)
    for key in (name, family):
        if key in _NAME_MAPS:
            return _NAME_MAPS[key]
    raise NotImplementedError(
        f'no state-dict name map for model {model_name!r} or its family {family!r}; '
        f'name maps: {sorted(_NAME_MAPS)}'
    )


def _ref_to_ours(rules: Sequence[NameRule], ref_key: str) -> tuple[tuple[str, ...], LeafSpec] | None:
    prefix, _, leaf = ref_key.rpartition('.')
    for rule in rules:
        m = _template_regex(rule.ref).fullmatch(prefix)
        spec = LEAF_KINDS[rule.kind].get(leaf)
        if m and spec:
            path = rule.ours.format(**m.groupdict()).split('/')
            return (spec.collection, *path, spec.name), spec
    return None


def _ours_to_ref(rules: Sequence[NameRule], key: tuple[str, ...]) -> tuple[str, LeafSpec] | None:
    collection, *path, leaf = key
    module = '/'.join(path)
    for rule in rules:
        m = _template_regex(rule.ours).fullmatch(module)
        if not m:
            continue
        for ref_leaf, spec in LEAF_KINDS[rule.kind].items():
            if (spec.collection, spec.name) == (collection, leaf):
                return f'{rule.ref.format(**m.groupdict())}.{ref_leaf}', spec
    return None


def _fmt(key: tuple[str, ...]) -> str:
    return '/'.join(key)


def _expected_shapes(model, model_name: str) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    h, w, c = registry.get_model_cfg(model_name).input_size
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, h, w, c), jnp.float32), train=False)
    )
    return traverse_util.flatten_dict(shapes)


def rename_state_dict(
    model_name: str, state_dict: Mapping[str, np.ndarray]
) -> tuple[dict[tuple[str, ...], np.ndarray], dict[tuple[str, ...], str], list[str]]:
    """Renames and re-lays-out a reference state dict into our naming, checking no shapes.

    The building block of :func:`convert_state_dict` and of fine-tuning, which compares
    the result against a model whose head (or resolution-dependent layers) may differ.

    Returns:
        ``(arrays, sources, unmatched)``: arrays keyed by our flat variable path
        (``('params', 'layer1_0', 'conv1', 'kernel')``) in our layout, the reference name
        each came from, and the reference names no rule of the family's map covers.

    Raises:
        ConversionError: if two reference names map to the same variable.
    """
    rules = _rules_for(model_name)
    arrays: dict[tuple[str, ...], np.ndarray] = {}
    sources: dict[tuple[str, ...], str] = {}
    unmatched: list[str] = []
    for ref_key, value in state_dict.items():
        if ref_key.rpartition('.')[2] in IGNORED_LEAVES:
            continue
        found = _ref_to_ours(rules, ref_key)
        if found is None:
            unmatched.append(ref_key)
            continue
        key, spec = found
        if key in sources:
            raise ConversionError(f'{ref_key} and {sources[key]} both map to {_fmt(key)}')
        array = np.asarray(value)
        if spec.to_ours is not None:
            try:
                array = spec.to_ours(array)
            except ValueError:  # e.g. a 1-D array under a conv name: no such layer here
                unmatched.append(ref_key)
                continue
        arrays[key] = array
        sources[key] = ref_key
    return arrays, sources, unmatched


def reference_name(model_name: str, key: tuple[str, ...]) -> str | None:
    """The reference (state-dict) name of our variable ``key``, if the family maps it."""
    found = _ours_to_ref(_rules_for(model_name), key)
    return found[0] if found else None


def convert_state_dict(
    model_name: str,
    state_dict: Mapping[str, np.ndarray],
    strict: bool = True,
    *,
    num_classes: int | None = None,
    init_variables: Mapping[str, Any] | None = None,
    **overrides,
) -> dict[str, Any]:
    """Converts a reference state dict (torchvision naming for ResNets) to our variables.

    Args:
        model_name: registered model name; selects the family's name map.
        state_dict: flat mapping of reference names to arrays (torch tensors should be
            converted with ``.numpy()`` first). ``num_batches_tracked`` entries are ignored.
        strict: raise :class:`ConversionError` on any missing, unexpected or mis-shaped
            entry. When False, the report is logged and the matched entries are returned.
        num_classes: head size of the model the weights are for (default: the cfg's).
        init_variables: when not strict, variables to take missing or mis-shaped entries
            from (e.g. a fresh init, to fine-tune with a new head). Without them the result
            holds only the matched entries.
        **overrides: model overrides (e.g. ``norm='group'``) needed to match the weights.

    Returns:
        ``{'params': ..., 'batch_stats': ...}`` as nested dicts of float32 arrays.
    """
    rules = _rules_for(model_name)
    model = registry.create_model(model_name, num_classes=num_classes, **overrides)
    expected = _expected_shapes(model, model_name)

    arrays, sources, unexpected = rename_state_dict(model_name, state_dict)
    converted: dict[tuple[str, ...], np.ndarray] = {}
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    for key, array in arrays.items():
        ref_key = sources[key]
        if key not in expected:
            unexpected.append(ref_key)
            continue
        want = expected[key]
        if array.shape != tuple(want.shape):
            spec = _ref_to_ours(rules, ref_key)[1]
            mismatched.append((ref_key, tuple(np.shape(state_dict[ref_key])), _ref_shape(spec, want.shape)))
            continue
        converted[key] = array.astype(want.dtype)

    # Mis-shaped entries are reported once, as mismatches, not again as missing.
    mismatched_keys = {_ref_to_ours(rules, name)[0] for name, _, _ in mismatched}
    missing = []
    for key, want in expected.items():
        if key not in converted and key not in mismatched_keys:
            ref = _ours_to_ref(rules, key)
            missing.append(f'{ref[0] if ref else "?"} -> {_fmt(key)} {tuple(want.shape)}')

    if missing or unexpected or mismatched:
        report = _report(model_name, missing, unexpected, mismatched)
        if strict:
            raise ConversionError(report, missing, unexpected, mismatched)
        logging.warning('%s', report)
        if init_variables is not None:
            for key, value in traverse_util.flatten_dict(init_variables).items():
                converted.setdefault(key, np.asarray(value))

    return traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in converted.items()})


def _ref_shape(spec: LeafSpec, shape: Sequence[int]) -> tuple[int, ...]:
    if spec.to_ref is None:
        return tuple(shape)
    return tuple(spec.to_ref(np.empty(shape, np.uint8)).shape)


def _report(model_name, missing, unexpected, mismatched) -> str:
    lines = [f'state dict does not match {model_name}:']
    if missing:
        lines.append(f'  missing ({len(missing)}):')
        lines += [f'    {m}' for m in missing]
    if unexpected:
        lines.append(f'  unexpected ({len(unexpected)}):')
        lines += [f'    {u}' for u in unexpected]
    if mismatched:
        lines.append(f'  shape mismatch ({len(mismatched)}), reference layout:')
        lines += [f'    {n}: got {g}, expected {e}' for n, g, e in mismatched]
    return '\n'.join(lines)


def export_state_dict(model_name: str, variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Inverse of :func:`convert_state_dict`: our variables -> reference naming and layout.

    Raises:
        ConversionError: if some variable has no reference name under the family's map.
    """
    rules = _rules_for(model_name)
    out: dict[str, np.ndarray] = {}
    unmapped = []
    for key, value in traverse_util.flatten_dict(variables).items():
        found = _ours_to_ref(rules, key)
        if found is None:
            unmapped.append(_fmt(key))
            continue
        ref_key, spec = found
        array = np.asarray(value)
        out[ref_key] = spec.to_ref(array) if spec.to_ref is not None else array
    if unmapped:
        raise ConversionError(
            f'{model_name}: no reference name for {", ".join(unmapped)}', unexpected=unmapped
        )
    return out
