"""BiT-HyperRule: fine-tuning settings chosen from the size of the target dataset.

Kolesnikov et al. 2020 ("Big Transfer (BiT): General Visual Representation Learning",
Sec. 3.3) transfer with one heuristic instead of a per-task search: SGD with momentum
0.9, LR 0.003 at batch 512, a zero-initialised head, no weight decay, and

  - resolution: images smaller than 96x96 pixels are resized to 160x160 and randomly
    cropped to 128x128; larger ones to 512x512 with 480x480 crops (eval: resize to the
    crop size);
  - schedule: fewer than 20k training examples: 500 steps; fewer than 500k: 10k steps;
    otherwise 20k steps; linear warmup, then the LR divided by 10 at 30%, 60% and 90%
    of training (the released code: warmup 100 / decays at 200, 300, 400 for the
    shortest schedule, warmup 500 for the others);
  - mixup with alpha 0.1 for datasets of at least 20k examples, none below.

Here the example count comes from the dataset's split metadata (tfds split info, or the
labeled subset when `config.labeled_per_class` is set) and the image size from its
feature shape, never from a table of dataset names. Datasets whose images vary in size
(ImageNet, folders) count as large images.

`config.hyperrule = 'bit'` applies it when the run starts (after command-line overrides,
so `--config.dataset=...` is honoured); the resolved values are logged and written to
the workdir's `config.json`. The rule overwrites `num_train_steps`, `schedule`,
`image_size`, `data.source_size`, `data.preprocess`, `data.train_augment` and
`data.mixup_alpha`; set `config.hyperrule = ''` to choose them yourself.
"""

from __future__ import annotations

import dataclasses

import ml_collections
from absl import logging

import input_pipeline
from flaxnets_errors import ConfigError

RULES = ('bit',)
SMALL_IMAGE_AREA = 96 * 96


@dataclasses.dataclass(frozen=True)
class BitSettings:
    """What the HyperRule decides for one dataset."""

    resize: int
    crop: int
    num_steps: int
    warmup_steps: int
    boundaries: tuple[int, ...]
    mixup_alpha: float


def bit_hyperrule(num_examples: int, image_hw: tuple[int | None, int | None]) -> BitSettings:
    """The BiT-HyperRule for a dataset of `num_examples` images of size `image_hw`.

    Args:
        num_examples: training examples.
        image_hw: stored (height, width); None entries mean the size varies (large).
    """
    if num_examples <= 0:
        raise ValueError(f'The HyperRule needs a positive example count, got {num_examples}.')
    h, w = image_hw
    small = h is not None and w is not None and h * w < SMALL_IMAGE_AREA
    resize, crop = (160, 128) if small else (512, 480)
    if num_examples < 20_000:
        steps, warmup = 500, 100
    elif num_examples < 500_000:
        steps, warmup = 10_000, 500
    else:
        steps, warmup = 20_000, 500
    boundaries = tuple(int(steps * f) for f in (0.3, 0.6, 0.9))
    if steps == 500:
        boundaries = (200, 300, 400)  # the released code's shortest schedule
    mixup = 0.0 if num_examples < 20_000 else 0.1
    return BitSettings(resize, crop, steps, warmup, boundaries, mixup)


def training_examples(config: ml_collections.ConfigDict, info) -> int:
    """Examples the run trains on: the split's size, or the labeled subset's."""
    size = info.split_sizes.get(config.train_split)
    if not size:
        raise ConfigError(
            f'The HyperRule needs the size of {config.dataset!r} split {config.train_split!r}, '
            f'which the dataset metadata does not give (known: {info.split_sizes}). Set '
            f"config.hyperrule='' and choose num_train_steps, schedule and image_size yourself."
        )
    per_class = config.get('labeled_per_class', 0)
    if per_class:
        size = min(size, per_class * info.num_classes)
    return size


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` with the fields of `config.hyperrule` filled in."""
    if config.hyperrule not in RULES:
        raise ConfigError(f'config.hyperrule must be one of {RULES} or empty, got {config.hyperrule!r}.')
    info = input_pipeline.get_dataset_info(config.dataset, config.data.data_dir, config.data.download)
    n = training_examples(config, info)
    rule = bit_hyperrule(n, info.image_shape[:2])
    out = ml_collections.ConfigDict(config.to_dict())
    out.num_train_steps = rule.num_steps
    out.schedule = ml_collections.ConfigDict(dict(
        name='step', warmup_steps=rule.warmup_steps, boundaries=rule.boundaries, decay_factor=0.1,
    ))
    out.image_size = rule.crop
    out.data.source_size = rule.resize
    out.data.preprocess = 'small'
    out.data.train_augment = 'crop'
    out.data.mixup_alpha = rule.mixup_alpha
    logging.info(
        'BiT-HyperRule for %s (%d training examples, images %s): resize %d, crop %d, %d steps, '
        'warmup %d, LR / 10 at %s, mixup alpha %.1f.',
        config.dataset, n, info.image_shape, rule.resize, rule.crop, rule.num_steps,
        rule.warmup_steps, list(rule.boundaries), rule.mixup_alpha,
    )
    return out
