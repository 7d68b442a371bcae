"""Fine-tuning: start a run from pretrained weights instead of a random init.

A supervised run becomes a fine-tune when `config.init_from` (or `config.init_from_hub`)
is set. Before the first step, and only when the run's own workdir holds no checkpoint,
the pretrained variables are read, matched against the new model name by name and shape,
reported, and written into the freshly initialised train state (and its EMA copy). From
then on it is ordinary supervised training: sharding, EMA, metrics, checkpoints, and a
preempted fine-tune resumes from its own checkpoint, never from the pretrained source.

Sources (`config.init_from`):
  - a workdir of any flaxnets run, its `checkpoints/` folder or one step folder of it
    (`.../checkpoints/1500`); the newest step unless `config.init_from_step` names one;
    `tools/convert_weights.py` writes reference weights in this form;
  - a weights file in the reference's state-dict naming, converted by the model
    family's name map: `.safetensors`, `.npz` (timm exports; BiT's `BiT-M-R50x1.npz`
    with its TensorFlow names is recognised and renamed), or a PyTorch file (`.pth`,
    `.pt`, `.bin`) read with `torch.load(weights_only=True)`, which never unpickles
    arbitrary objects.
`config.init_from_hub` names a timm model id (e.g. `resnet50.a1_in1k`) whose published
weights timm downloads (needs internet and timm; tests use local files only).

`config.finetune` controls the transfer:
  head_init: 'zeros' (BiT: the re-initialised classifier starts at zero) or 'default'
      (the model's own initialiser).
  reinit_head: 'auto' (re-initialise the classifier when its shape differs from the
      source's, i.e. the class count changed), 'always' or 'never'. The classifier is
      found structurally: the variables whose shapes change with `num_classes`.
  no_load: regexes (re.search on paths such as 'params/layer4_2/conv3/kernel' or
      'batch_stats/bn1/mean'); matching variables keep their fresh init.
  freeze: regexes on the same paths; matching parameters get no gradient and no update
      (no weight decay either); a BatchNorm layer with matching statistics runs in eval
      mode during training too (running statistics, never updated).
  strict: True (default) fails before training on any variable the source lacks, any
      shape mismatch outside the re-initialised head, and any source entry the model
      has no place for; False logs the same report as a warning and keeps the fresh
      init for what did not load.
  use_ema: take a flaxnets checkpoint's EMA weights instead of the raw ones.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import traverse_util
from ml_collections.config_dict import placeholder

import models
from flaxnets_errors import ConfigError, InputNotFoundError, UserError
from models import convert
from trainers.checkpointing import load_checkpoint_meta, load_state_arrays
from trainers.weights import (  # noqa: F401 - re-exported: the tools read weights files through here
    WEIGHT_SUFFIXES,
    WeightsFileError,
    bit_to_timm,
    file_sha256,
    is_bit_npz,
    read_state_dict,
)

Path = tuple[str, ...]
HEAD_INITS = ('zeros', 'default')
REINIT_HEAD = ('auto', 'always', 'never')


class PretrainedMismatchError(UserError, ValueError):
    """The pretrained variables do not fit the model; the message lists every name."""


def default_finetune_config() -> ml_collections.ConfigDict:
    """`config.finetune` with the defaults documented in this module."""
    return ml_collections.ConfigDict(dict(
        head_init='zeros',
        reinit_head='auto',
        no_load=(),
        freeze=(),
        strict=True,
        use_ema=False,
    ))


def add_config_fields(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Adds the fine-tuning keys (all off) to a supervised config, for fine-tune configs.

    `init_from` / `init_from_hub` empty means training from scratch, so one config runs
    both arms of a transfer comparison (`--config.init_from=''`).
    """
    config.init_from = ''
    config.init_from_step = placeholder(int)
    config.init_from_hub = ''
    config.finetune = default_finetune_config()
    config.hyperrule = ''
    return config


@dataclasses.dataclass
class Pretrained:
    """Pretrained variables in our naming, before matching against a model.

    Attributes:
        arrays: flat `('params' | 'batch_stats', ...) -> array`, our layouts.
        names: for reference files, the reference name of each entry (for reports).
        unmatched: reference names the family's name map does not cover.
        description: where the weights came from (for logs and the checkpoint meta).
    """

    arrays: dict[Path, np.ndarray]
    names: dict[Path, str]
    unmatched: list[str]
    description: str


def _checkpoint_location(path: str, step: int | None) -> tuple[str, int | None]:
    """(checkpoint manager directory, step) for a workdir, checkpoints/ or step folder."""
    if os.path.isdir(os.path.join(path, 'checkpoints')):
        return os.path.join(path, 'checkpoints'), step
    base = os.path.basename(os.path.normpath(path))
    if base.isdigit() and os.path.isdir(os.path.join(path, 'state')):
        if step is not None and step != int(base):
            raise ConfigError(
                f'init_from {path!r} is step {base} but config.init_from_step={step}; '
                f'give one of the two.'
            )
        return os.path.dirname(os.path.normpath(path)), int(base)
    return path, step


def state_dict_to_pretrained(model_name: str, state: Mapping[str, np.ndarray], description: str) -> Pretrained:
    """Renames a reference state dict with the family's name map (no shape checks)."""
    arrays, names, unmatched = convert.rename_state_dict(model_name, state)
    return Pretrained(arrays, names, unmatched, description)


def load_pretrained(
    source: str, model_name: str, *, step: int | None = None, use_ema: bool = False
) -> Pretrained:
    """Reads `source` (a weights file or a flaxnets checkpoint) into our naming."""
    if source.lower().endswith(WEIGHT_SUFFIXES) or os.path.isfile(source):
        state = read_state_dict(source)
        return state_dict_to_pretrained(
            model_name, state, f'{os.path.abspath(source)} (sha256 {file_sha256(source)[:16]})'
        )
    if not os.path.isdir(source):
        raise InputNotFoundError(
            f'config.init_from={source!r} is neither a weights file '
            f'({", ".join(WEIGHT_SUFFIXES)}) nor a directory. Give a flaxnets workdir, its '
            f'checkpoints/ folder or a step folder, or a reference weights file.'
        )
    directory, step = _checkpoint_location(source, step)
    try:
        step, state = load_state_arrays(directory, step)
    except FileNotFoundError as e:
        raise InputNotFoundError(
            f'config.init_from={source!r}: no orbax checkpoint found there ({e}). Point it '
            f'at a workdir that has finished at least one checkpoint, or convert reference '
            f'weights with tools/convert_weights.py.'
        ) from e
    meta = load_checkpoint_meta(directory, step)
    params, stats = state['params'], state.get('batch_stats', {})
    if use_ema:
        if not state.get('ema_params'):
            raise ConfigError(
                f'config.finetune.use_ema is True but the checkpoint {directory} step {step} '
                f'has no EMA weights (it was trained with ema_decay=0).'
            )
        params, stats = state['ema_params'], state.get('ema_batch_stats', {})
    arrays = {
        **{('params', *k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()},
        **{('batch_stats', *k): np.asarray(v) for k, v in traverse_util.flatten_dict(stats or {}).items()},
    }
    who = f' of model {meta["model"]!r}' if meta.get('model') else ''
    return Pretrained(arrays, {}, [], f'{os.path.abspath(directory)} step {step}{who}')


def load_from_hub(model_id: str, model_name: str) -> Pretrained:
    """Downloads published weights through timm (`timm.create_model(id, pretrained=True)`)."""
    try:
        import timm
    except ImportError as e:
        raise ImportError(
            f'config.init_from_hub={model_id!r} needs timm (pip install timm torch); or '
            f'download the weights file yourself and set config.init_from to it.'
        ) from e
    reference = timm.create_model(model_id, pretrained=True)
    state = {k: v.detach().cpu().numpy() for k, v in reference.state_dict().items()}
    return state_dict_to_pretrained(model_name, state, f'timm hub {model_id}')


# ----------------------------------------------------------------------------- matching


def _path(key: Path) -> str:
    return '/'.join(key)


def compile_patterns(patterns: Sequence[str], field: str) -> list[re.Pattern[str]]:
    out = []
    for p in patterns or ():
        try:
            out.append(re.compile(p))
        except re.error as e:
            raise ConfigError(f'config.finetune.{field}: bad regex {p!r} ({e}).') from e
    return out


def matches(patterns: Sequence[re.Pattern[str]], key: Path) -> bool:
    path = _path(key)
    return any(p.search(path) for p in patterns)


def head_keys(model_name: str, num_classes: int, **overrides) -> set[Path]:
    """The classifier's variables: those under the model's declared classifier
    (`models.classifier_paths`, its ModelCfg; the registry's tests hold each declaration
    to exactly the variables whose shapes change with `num_classes`)."""
    h, w, c = models.get_model_cfg(model_name).input_size
    model = models.create_model(model_name, num_classes=num_classes, **overrides)
    tree = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, h, w, c)), train=False))
    return {k for k in traverse_util.flatten_dict(tree) if models.in_classifier(model_name, k[1:])}


@dataclasses.dataclass
class TransferPlan:
    """What happens to every variable of the model, decided before training starts."""

    loaded: list[Path]
    head: list[Path]
    skipped: list[Path]
    missing: list[Path]
    mismatched: list[tuple[Path, tuple[int, ...], tuple[int, ...]]]
    unexpected: list[str]

    @property
    def problems(self) -> bool:
        return bool(self.missing or self.mismatched or self.unexpected)

    def report(self, source: Pretrained, model_name: str, names: Mapping[Path, str]) -> str:
        def ref(key: Path) -> str:
            name = names.get(key)
            return f'{_path(key)} (reference {name})' if name else _path(key)

        lines = [f'Fine-tuning {model_name} from {source.description}:']
        n = sum(int(np.prod(source.arrays[k].shape)) for k in self.loaded)
        lines.append(f'  loaded: {len(self.loaded)} arrays ({n:,} values)')
        if self.head:
            lines.append(f'  classifier re-initialised ({len(self.head)}): '
                         + ', '.join(_path(k) for k in self.head))
        if self.skipped:
            lines.append(f'  kept at init by finetune.no_load ({len(self.skipped)}): '
                         + ', '.join(_path(k) for k in self.skipped))
        if self.missing:
            lines.append(f'  MISSING from the source ({len(self.missing)}):')
            lines += [f'    {ref(k)}' for k in self.missing]
        if self.mismatched:
            lines.append(f'  SHAPE MISMATCH ({len(self.mismatched)}), source vs model:')
            lines += [f'    {ref(k)}: {a} vs {b}' for k, a, b in self.mismatched]
        if self.unexpected:
            lines.append(f'  UNEXPECTED in the source, no place in the model ({len(self.unexpected)}):')
            lines += [f'    {u}' for u in self.unexpected]
        return '\n'.join(lines)


def plan_transfer(
    target: Mapping[Path, tuple[int, ...]],
    source: Pretrained,
    head: set[Path],
    *,
    reinit_head: str = 'auto',
    no_load: Sequence[re.Pattern[str]] = (),
) -> TransferPlan:
    """Sorts every model variable into loaded / re-initialised head / skipped / problems."""
    if reinit_head not in REINIT_HEAD:
        raise ConfigError(f'config.finetune.reinit_head must be one of {REINIT_HEAD}, got {reinit_head!r}.')
    plan = TransferPlan([], [], [], [], [], [])
    for key, shape in target.items():
        have = source.arrays.get(key)
        if matches(no_load, key):
            plan.skipped.append(key)
        elif key in head and (
            reinit_head == 'always'
            or (reinit_head == 'auto' and (have is None or tuple(have.shape) != tuple(shape)))
        ):
            plan.head.append(key)
        elif have is None:
            plan.missing.append(key)
        elif tuple(have.shape) != tuple(shape):
            plan.mismatched.append((key, tuple(have.shape), tuple(shape)))
        else:
            plan.loaded.append(key)
    plan.unexpected = [
        source.names.get(k, _path(k)) for k in source.arrays if k not in target
    ] + list(source.unmatched)
    return plan


def _put(value: np.ndarray, like: jax.Array) -> jax.Array:
    """`value` as a global array with `like`'s dtype and sharding (multi-host safe)."""
    value = np.asarray(value, dtype=like.dtype)
    return jax.make_array_from_callback(value.shape, like.sharding, lambda idx: value[idx])


def initialize_from_pretrained(state: Any, config: ml_collections.ConfigDict, num_classes: int) -> tuple[Any, dict]:
    """Writes the pretrained variables named by the config into a fresh train state.

    Returns the new state and a summary for the checkpoint meta / logs.

    Raises:
        PretrainedMismatchError: strict mode and the source does not fit the model.
    """
    ft = config.get('finetune') or default_finetune_config()
    if config.get('init_from') and config.get('init_from_hub'):
        raise ConfigError('Set config.init_from or config.init_from_hub, not both.')
    overrides = {k: v for k, v in dict(config.get('model_kwargs', {})).items() if v is not None}
    if config.get('init_from_hub'):
        source = load_from_hub(config.init_from_hub, config.model)
    else:
        source = load_pretrained(
            config.init_from, config.model,
            step=config.get('init_from_step'), use_ema=ft.get('use_ema', False),
        )
    if ft.get('head_init', 'zeros') not in HEAD_INITS:
        raise ConfigError(f'config.finetune.head_init must be one of {HEAD_INITS}, got {ft.head_init!r}.')
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    flat = traverse_util.flatten_dict(variables)
    plan = plan_transfer(
        {k: v.shape for k, v in flat.items()},
        source,
        head_keys(config.model, num_classes, **overrides),
        reinit_head=ft.get('reinit_head', 'auto'),
        no_load=compile_patterns(ft.get('no_load', ()), 'no_load'),
    )
    names = dict(source.names)
    for k in flat:
        names.setdefault(k, convert.reference_name(config.model, k) if source.names else None)
    report = plan.report(source, config.model, names)
    if plan.problems:
        if ft.get('strict', True):
            raise PretrainedMismatchError(
                report + '\nNothing was trained or written. If these differences are intended, '
                'list the variables in config.finetune.no_load (regexes), or set '
                'config.finetune.strict=False to keep their fresh init with a warning; '
                'otherwise check config.model / config.model_kwargs against the source.'
            )
        logging.warning('%s', report)
    else:
        logging.info('%s', report)

    new = dict(flat)
    for key in plan.loaded:
        new[key] = _put(source.arrays[key], flat[key])
    if ft.get('head_init', 'zeros') == 'zeros':
        for key in plan.head:
            new[key] = jnp.zeros_like(flat[key])
    tree = traverse_util.unflatten_dict(new)
    params, stats = tree['params'], tree.get('batch_stats', {})
    state = state.replace(params=params, batch_stats=stats)
    if state.ema_params:
        state = state.replace(
            ema_params=jax.tree.map(jnp.copy, params), ema_batch_stats=jax.tree.map(jnp.copy, stats)
        )
    summary = {
        'source': source.description,
        'loaded': len(plan.loaded),
        'head_reinitialised': [_path(k) for k in plan.head],
        'not_loaded': [_path(k) for k in plan.skipped + plan.missing] + [_path(k) for k, _, _ in plan.mismatched],
    }
    return state, summary


# ----------------------------------------------------------------------------- freezing


def frozen_mask(tree: Any, patterns: Sequence[re.Pattern[str]], collection: str) -> Any:
    """True for every leaf of `tree` (the 'params' or 'batch_stats' collection) whose
    '<collection>/<path>' matches one of the freeze regexes."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: matches(patterns, (collection, *(p.key for p in path))), tree
    )


def frozen_step_kwargs(state: Any, patterns: Sequence[re.Pattern[str]]) -> dict[str, Any]:
    """`core.make_train_step` arguments for the freeze regexes: `frozen_params` and
    `frozen_stats` masks of `state`, or nothing when no pattern is given."""
    if not patterns:
        return {}
    return {
        'frozen_params': frozen_mask(state.params, patterns, 'params'),
        'frozen_stats': frozen_mask(state.batch_stats, patterns, 'batch_stats'),
    }


def freeze_optimizer(
    tx: optax.GradientTransformation, patterns: Sequence[re.Pattern[str]]
) -> optax.GradientTransformation:
    """`tx` for the trainable parameters; zero updates (no decay, no state) for the rest."""
    if not patterns:
        return tx
    return optax.multi_transform(
        {'train': tx, 'frozen': optax.set_to_zero()},
        lambda params: jax.tree.map(
            lambda frozen: 'frozen' if frozen else 'train', frozen_mask(params, patterns, 'params')
        ),
    )
