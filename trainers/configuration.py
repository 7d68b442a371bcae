"""Run configs: the keys each trainer accepts, their validation, and derived configs.

Every trainer validates its config here before anything is read or written: an unknown
(misspelled) key, a missing section or an impossible value (a batch size of 0, a negative
step count, an unknown optimizer) stops the run in well under a second with one message
naming the field, the value and what is allowed, before the workdir exists.

Derived configs: the Noisy Student teacher and student and the MPL optimizers are
supervised-style configs made from the trainer's own (`derived`).
"""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Callable, Iterable
from typing import Any

import ml_collections

from flaxnets_errors import ConfigError

# Every top-level key a supervised config may hold.
SUPERVISED_KEYS = frozenset({
    'trainer', 'model', 'model_kwargs', 'dataset', 'train_split', 'eval_split', 'data',
    'image_size', 'batch_size', 'eval_batch_size', 'num_train_steps', 'seed',
    'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps', 'keep_checkpoints',
    'optimizer', 'learning_rate', 'lr_base_batch_size', 'schedule', 'label_smoothing',
    'ema_decay', 'grad_clip_norm', 'compute_dtype', 'shard_params', 'prefetch_to_device',
    'labeled_per_class', 'compilation_cache_dir', 'remat',
    # Fine-tuning (trainers/finetune.py) and the BiT-HyperRule (trainers/hyperrule.py).
    'init_from', 'init_from_step', 'init_from_hub', 'finetune', 'hyperrule',
})
FINETUNE_KEYS = frozenset({'init_from', 'init_from_step', 'init_from_hub', 'finetune', 'hyperrule'})
REQUIRED_KEYS = ('model', 'dataset', 'batch_size', 'num_train_steps', 'seed',
                 'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps')

# Fields whose change between a checkpoint and its continuation breaks exact resumption
# (another model, other data, another order or other augmentation); `data` covers the
# augmentation. A resume that changes one is refused unless the user allows it.
REPLAY_FIELDS = ('trainer', 'model', 'model_kwargs', 'dataset', 'train_split', 'labeled_per_class',
                 'batch_size', 'seed', 'data', 'image_size', 'teacher', 'teacher_model',
                 'teacher_model_kwargs', 'unlabeled_dataset', 'unlabeled_split', 'unlabeled_ratio',
                 'noisy_student', 'mpl', 'uda', 'init_from', 'init_from_hub', 'finetune')
# Fields a continuation may change freely (logged): schedules of logging and saving, the
# length of the run, where compilations are cached and remat (the same numbers).
HARMLESS_FIELDS = ('num_train_steps', 'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps',
                   'keep_checkpoints', 'eval_batch_size', 'eval_split', 'compilation_cache_dir',
                   'prefetch_to_device', 'remat')


def _int_at_least(low: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= low,
            f'an integer >= {low}')


def _number_in(low: float, high: float, *, low_open: bool = False, high_open: bool = True):
    def check(v):
        if not isinstance(v, numbers.Real) or isinstance(v, bool) or v != v:
            return False
        return (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    return check, f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


_INF = float('inf')
# (dotted key, (predicate, description of the valid values)); absent keys are skipped.
VALUE_RULES: tuple[tuple[str, tuple[Callable[[Any], bool], str]], ...] = (
    ('batch_size', _int_at_least(1)),
    ('eval_batch_size', _int_at_least(0)),
    ('num_train_steps', _int_at_least(0)),
    ('seed', _int_at_least(0)),
    ('log_every_steps', _int_at_least(1)),
    ('eval_every_steps', _int_at_least(1)),
    ('checkpoint_every_steps', _int_at_least(1)),
    ('keep_checkpoints', _int_at_least(1)),
    ('image_size', _int_at_least(0)),
    ('labeled_per_class', _int_at_least(0)),
    ('lr_base_batch_size', _int_at_least(0)),
    ('prefetch_to_device', _int_at_least(0)),
    ('learning_rate', _number_in(0.0, _INF, low_open=True)),
    ('teacher_learning_rate', _number_in(0.0, _INF, low_open=True)),
    ('label_smoothing', _number_in(0.0, 1.0)),
    ('ema_decay', _number_in(0.0, 1.0)),
    ('grad_clip_norm', _number_in(0.0, _INF)),
    ('unlabeled_ratio', _number_in(0.0, _INF, low_open=True)),
    ('schedule.warmup_steps', _int_at_least(0)),
    ('optimizer.weight_decay', _number_in(0.0, _INF)),
    ('data.max_bad_fraction', _number_in(0.0, 1.0, high_open=False)),
    ('noisy_student.num_iterations', _int_at_least(1)),
    ('noisy_student.unlabeled_ratio', _number_in(0.0, _INF, low_open=True)),
    ('mpl.finetune_steps', _int_at_least(0)),
)


def _get(config: ml_collections.ConfigDict, dotted: str) -> tuple[bool, Any]:
    node: Any = config
    for part in dotted.split('.'):
        if not hasattr(node, 'keys') or part not in node:
            return False, None
        node = node[part]
    return True, node


def _enum_rules() -> tuple[tuple[str, tuple[str, ...]], ...]:
    from trainers import core, optim  # noqa: PLC0415 - keeps this module import-light

    return (
        ('compute_dtype', tuple(core.DTYPES)),
        ('remat', ('none', 'block')),
        ('optimizer.name', tuple(optim.OPTIMIZERS)),
        ('schedule.name', tuple(optim.SCHEDULES)),
        ('teacher_optimizer.name', tuple(optim.OPTIMIZERS)),
        ('teacher_schedule.name', tuple(optim.SCHEDULES)),
        ('mpl.finetune_schedule.name', tuple(optim.SCHEDULES)),
    )


def check_values(config: ml_collections.ConfigDict) -> None:
    """Refuses impossible values, every one found at once, each with its valid range."""
    problems = []
    for key, (ok, valid) in VALUE_RULES:
        present, value = _get(config, key)
        if present and value is not None and not ok(value):
            problems.append(f'config.{key}={value!r} (must be {valid})')
    for key, choices in _enum_rules():
        present, value = _get(config, key)
        if present and value is not None and value not in choices:
            close = difflib.get_close_matches(str(value), choices, n=1)
            hint = f', did you mean {close[0]!r}?' if close else ''
            problems.append(f'config.{key}={value!r} (must be one of {", ".join(choices)}{hint})')
    if problems:
        raise ConfigError('Invalid config value(s): ' + '; '.join(problems) + '. Nothing was written.')


def validate_config(config: ml_collections.ConfigDict, known: frozenset = SUPERVISED_KEYS) -> None:
    """Fails on a missing required key, an unknown (misspelled) one or an impossible
    value, naming each."""
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise ConfigError(f'The config lacks required key(s) {missing}; add them to the config file.')
    unknown = sorted(set(config.keys()) - known)
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, sorted(known), n=1)
            hints.append(f'{k!r}' + (f' (did you mean {close[0]!r}?)' if close else ''))
        raise ConfigError(
            f"Unknown config key(s) {', '.join(hints)} for trainer "
            f"{config.get('trainer', 'supervised')!r}. Known keys: {', '.join(sorted(known))}."
        )
    check_values(config)


def check_sections(config: ml_collections.ConfigDict, sections: dict[str, Iterable[str]],
                   trainer: str) -> None:
    """Each named sub-config must exist and hold exactly the given keys."""
    for name, known in sections.items():
        known = frozenset(known)
        if name not in config:
            raise ConfigError(f'The {trainer} config needs a `config.{name}` section.')
        unknown = sorted(set(config[name].keys()) - known)
        missing = sorted(known - set(config[name].keys()))
        if unknown or missing:
            raise ConfigError(
                f'config.{name}: unknown keys {unknown}, missing keys {missing}; '
                f'expected exactly {sorted(known)}.'
            )


def derived(config: ml_collections.ConfigDict, drop: Iterable[str] = (), **changes) -> ml_collections.ConfigDict:
    """A supervised config made from another trainer's: the `drop` keys removed,
    `trainer='supervised'`, then `changes` set."""
    out = ml_collections.ConfigDict(config.to_dict())
    for key in drop:
        if key in out:
            del out[key]
    out.trainer = 'supervised'
    for key, value in changes.items():
        out[key] = value
    return out


def model_overrides(config: ml_collections.ConfigDict, key: str = 'model_kwargs') -> dict[str, Any]:
    """`config.<key>` (the model's overrides) without its unset (None) fields."""
    return {k: v for k, v in dict(config.get(key) or {}).items() if v is not None}


def labeled_source(config: ml_collections.ConfigDict):
    """The training examples: None for the whole `train_split`, or its first
    `labeled_per_class` examples of every class (in the split's fixed order) for
    low-label experiments."""
    import input_pipeline  # noqa: PLC0415 - TensorFlow loads only when data is read

    per_class = config.get('labeled_per_class', 0)
    if not per_class:
        return None
    source = input_pipeline.load_source(config.data, config.dataset, config.train_split)
    return source.select(input_pipeline.per_class_indices(source.labels, per_class))


def check_data(config: ml_collections.ConfigDict, splits: Iterable[tuple[str, str]]) -> None:
    """Checks the image files of every `folder:` (dataset, split) once, before training:
    each bad file is logged, and a split past `config.data.max_bad_fraction` stops the
    run (input_pipeline.BadDataError). tfds datasets are checked as they are read."""
    import input_pipeline  # noqa: PLC0415

    for dataset, split in dict.fromkeys(splits):
        report = input_pipeline.check_dataset(config.data, dataset, split)
        if report.checked and report.bad:
            from absl import logging  # noqa: PLC0415

            logging.warning('%s', report.summary())


def changed_fields(old: dict, new: dict, fields: Iterable[str]) -> list[str]:
    """The `fields` whose values differ between two `config.to_dict()`s (dotted paths
    into nested sections, so the message names `data.randaugment_layers`, not `data`)."""
    out = []
    for key in fields:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(f'{key}.{k}' for k in changed_fields(a, b, sorted(set(a) | set(b))))
        elif a != b and not (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple))
                             and list(a) == list(b)):
            out.append(key)
    return out
