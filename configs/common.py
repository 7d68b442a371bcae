"""What the experiment configs share: the supervised base config and small factories.

Every experiment file builds its `get_config()` from these (or from another experiment's
config) and states only what makes its experiment different, as big_vision and the Flax
examples do. This module is no experiment: it has no `get_config()`.
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections
from ml_collections.config_dict import placeholder

import input_pipeline

IMAGENET_TRAIN_IMAGES = 1_281_167  # tfds imagenet2012 'train'

# The fields of a supervised run, in the order a config lists them (README: "Fields every
# config has"); trainers add their own sections to this base.
FIELDS = (
    'trainer', 'model', 'model_kwargs', 'dataset', 'train_split', 'eval_split', 'image_size',
    'data', 'seed', 'batch_size', 'eval_batch_size', 'num_train_steps', 'log_every_steps',
    'eval_every_steps', 'checkpoint_every_steps', 'keep_checkpoints', 'optimizer',
    'learning_rate', 'lr_base_batch_size', 'schedule', 'label_smoothing', 'ema_decay',
    'grad_clip_norm', 'compute_dtype', 'remat', 'shard_params', 'compilation_cache_dir',
    'prefetch_to_device',
)
# The fields an experiment may leave out of `supervised_config`, at these values.
DEFAULTS = dict(
    trainer='supervised', train_split='train', seed=0,
    label_smoothing=0.0, ema_decay=0.0, grad_clip_norm=0.0,
    compute_dtype='float32', shard_params=False, prefetch_to_device=2,
    # 'block': recompute each block's activations in the backward pass (less memory, one
    # more forward pass; the same numbers). See models.layers.ImageClassifier.remat.
    remat='none',
    # JAX's persistent compilation cache: a second run of the same program skips XLA
    # compilation. None: the per-user default (~/.cache/flaxnets/jax); '' turns it off.
    compilation_cache_dir=None,
)

# Overrides passed to models.create_model, with their types; an unset (None) field keeps
# the model's default. norm: 'batch' | 'group' | 'none'.
OVERRIDE_TYPES = dict(
    norm=str, weight_std=bool, width_factor=int, stem_type=str, drop_rate=float,
    drop_path_rate=float,
)
OVERRIDES = ('norm', 'weight_std', 'drop_rate', 'drop_path_rate')  # every family takes these

# ImageNet preprocessing: Inception crop (8-100 % of the area) + flip for training; resize
# the shorter side to 256 and centre-crop 224 (crop_pct 0.875) for evaluation.
IMAGENET_DATA = dict(
    preprocess='imagenet', train_augment='inception_crop', flip=True, crop_pct=0.875
)


def model_kwargs(keys: Sequence[str] = OVERRIDES, **values) -> ml_collections.ConfigDict:
    """`config.model_kwargs`: the override fields `keys`, unset (typed placeholders)
    except those given in `values`."""
    unknown = sorted(set(values) - set(keys))
    if unknown:
        raise ValueError(f'model_kwargs: {unknown} not among the fields {list(keys)}.')
    return ml_collections.ConfigDict(
        {k: values[k] if k in values else placeholder(OVERRIDE_TYPES[k]) for k in keys}
    )


def data_config(**changes) -> ml_collections.ConfigDict:
    """`input_pipeline.default_data_config()` with `changes` (existing fields only)."""
    config = input_pipeline.default_data_config()
    unknown = sorted(set(changes) - set(config.keys()))
    if unknown:
        raise ValueError(f'data_config: unknown fields {unknown}; known: {sorted(config.keys())}.')
    for key, value in changes.items():
        config[key] = value
    return config


def sgd(weight_decay: float, *, nesterov: bool = False, momentum: float = 0.9):
    """SGD with (Nesterov) momentum; weight decay on kernels only (trainers/optim.py)."""
    return ml_collections.ConfigDict(
        dict(name='sgd', momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    )


def cosine(warmup_steps: int) -> ml_collections.ConfigDict:
    """Linear warmup, then cosine decay to 0 at the last step."""
    return ml_collections.ConfigDict(dict(name='cosine', warmup_steps=warmup_steps))


def step_schedule(warmup_steps: int, boundaries: Sequence[int], decay_factor: float = 0.1):
    """Linear warmup, then the LR multiplied by `decay_factor` at each of `boundaries`."""
    return ml_collections.ConfigDict(
        dict(name='step', warmup_steps=warmup_steps, boundaries=boundaries,
             decay_factor=decay_factor)
    )


def supervised_config(**fields) -> ml_collections.ConfigDict:
    """A supervised run: `fields` plus `DEFAULTS` (and `model_kwargs()`) for those not
    given. Every one of `FIELDS` must end up set; any other name is refused."""
    values = {**DEFAULTS, 'model_kwargs': model_kwargs(), **fields}
    missing, unknown = sorted(set(FIELDS) - set(values)), sorted(set(values) - set(FIELDS))
    if missing or unknown:
        raise ValueError(f'supervised_config: missing fields {missing}, unknown {unknown}.')
    config = ml_collections.ConfigDict()
    for key in FIELDS:
        config[key] = values[key]
    return config


def imagenet_steps_per_epoch(batch_size: int) -> int:
    return IMAGENET_TRAIN_IMAGES // batch_size


def imagenet_config(model: str, *, batch_size: int, epochs: int, data=None, **fields):
    """A supervised ImageNet-1k run of `epochs` (whole steps per epoch) at 224 px with
    `IMAGENET_DATA` preprocessing (`data`: changes to it); evaluation every 10 epochs on
    the 50,000 validation images. `fields`: the rest, as for `supervised_config`."""
    steps_per_epoch = imagenet_steps_per_epoch(batch_size)
    return supervised_config(
        model=model, dataset='imagenet2012', eval_split='validation', image_size=224,
        data=data_config(**{**IMAGENET_DATA, **(data or {})}),
        batch_size=batch_size, eval_batch_size=1000, num_train_steps=epochs * steps_per_epoch,
        log_every_steps=100, eval_every_steps=10 * steps_per_epoch,
        checkpoint_every_steps=2000, keep_checkpoints=3,
        **fields,
    )


def randaugment(data: ml_collections.ConfigDict, layers: int, magnitude: float, ops: str):
    """Turns RandAugment (N = `layers`, M = `magnitude`, op set `ops`) on in `data`."""
    data.randaugment_layers = layers
    data.randaugment_magnitude = magnitude
    data.randaugment_ops = ops


# ----------------------------------------------------------------------------- teacher-student


def noisy_student(
    *, num_iterations: int, min_confidence: float, images_per_class: int,
    unlabeled_ratio: float, inference_shard_size: int, soft_labels: bool = True,
) -> ml_collections.ConfigDict:
    """`config.noisy_student` (trainers/noisy_student.py): rounds, the confidence filter and
    class balance, `unlabeled_ratio` x batch_size pseudo-labeled images per step (at weight
    1), soft or hard pseudo-labels (temperature 1)."""
    return ml_collections.ConfigDict(dict(
        num_iterations=num_iterations, min_confidence=min_confidence,
        images_per_class=images_per_class, soft_labels=soft_labels, temperature=1.0,
        unlabeled_ratio=unlabeled_ratio, unlabeled_weight=1.0,
        inference_shard_size=inference_shard_size,
    ))


def noisy_student_teacher(model: str, model_kwargs: dict, data, num_train_steps: int):
    """`config.teacher` of Noisy Student: round 0's teacher, trained on the labels with
    these settings unless `checkpoint` (a workdir or checkpoint dir) names a trained one."""
    return ml_collections.ConfigDict(dict(
        model=model, model_kwargs=ml_collections.ConfigDict(model_kwargs), data=data,
        num_train_steps=num_train_steps, checkpoint='',
    ))


def mpl_teacher(config: ml_collections.ConfigDict, learning_rate: float, schedule) -> None:
    """Adds MPL's teacher to `config`: a copy of the student's model, overrides and
    optimizer as they are now, with its own learning rate and schedule."""
    config.teacher_model = config.model
    config.teacher_model_kwargs = ml_collections.ConfigDict(dict(config.model_kwargs))
    config.teacher_optimizer = ml_collections.ConfigDict(config.optimizer.to_dict())
    config.teacher_learning_rate = learning_rate
    config.teacher_schedule = schedule


def mpl(
    *, student_wait_steps: int, finetune_steps: int, finetune_learning_rate: float,
    finetune_schedule, reward_baseline_decay: float = 0.0,
) -> ml_collections.ConfigDict:
    """`config.mpl` (trainers/meta_pseudo_labels.py): hard pseudo-labels sampled from the
    teacher, the loss-difference reward (`reward_baseline_decay` 0: no moving-average
    baseline), the student's LR held at 0 for `student_wait_steps`, then `finetune_steps`
    of fine-tuning the student on the labels."""
    return ml_collections.ConfigDict(dict(
        pseudo_label='hard_sample',  # 'hard_sample' | 'hard_argmax' | 'soft'
        reward='loss_difference',  # 'loss_difference' | 'dot_product'
        reward_baseline_decay=reward_baseline_decay, reward_sign=1.0,
        student_wait_steps=student_wait_steps, finetune_steps=finetune_steps,
        finetune_learning_rate=finetune_learning_rate, finetune_schedule=finetune_schedule,
    ))


def uda(warmup_steps: int) -> ml_collections.ConfigDict:
    """`config.uda`: the teacher's UDA consistency loss as the official MPL code sets it
    (weight 8, confidence threshold 0.6, temperature 0.7), ramped up over `warmup_steps`."""
    return ml_collections.ConfigDict(dict(
        weight=8.0, threshold=0.6, temperature=0.7, warmup_steps=warmup_steps,
    ))
