"""The BiT upstream recipe shared by `upstream_i1k.py` and `upstream_i21k.py`.

Kolesnikov et al., "Big Transfer (BiT): General Visual Representation Learning", ECCV 2020
(arXiv:1912.11370v3), Sec. 3.3 "Hyperparameter Details", Upstream Pre-Training: ResNet-v2
with GroupNorm and Weight Standardisation; SGD with momentum 0.9, initial LR 0.03 multiplied
by batch_size / 256 (Goyal et al. 2017); linear warmup for 5000 steps; weight decay 1e-4;
global batch 4096 (8 images per chip on a TPUv3-512); Inception crop [Szegedy et al. 2015]
and random horizontal flip at 224 x 224; BiT-S (ILSVRC-2012) and BiT-M (ImageNet-21k)
trained for 90 epochs with the LR divided by 10 after 30, 60 and 80 epochs.

This module turns that prose into config fields and step counts; each config file names
its dataset and documents its command.
"""

from __future__ import annotations

import dataclasses
import re

import ml_collections

from configs import common as configs_common

# Sec. 3.3.
GLOBAL_BATCH = 4096
BASE_LR = 0.03  # per 256 images
LR_BASE_BATCH = 256
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4
WARMUP_STEPS = 5000
EPOCHS = 90
DECAY_EPOCHS = (30, 60, 80)
RESOLUTION = 224

DEPTHS = (50, 101, 152)
WIDTHS = (1, 2, 3, 4)
# The BiT variants timm (and this registry) name: the six the BiT authors released.
REGISTERED = {(50, 1), (50, 3), (101, 1), (101, 3), (152, 2), (152, 4)}
# The other depth x width pairs are the plain ResNet-v2 of that depth with BiT's settings
# (those of models/resnetv2._bit: GN(32) + StdConv, 'fixed' stem) and the width factor
# as overrides. (The registered BiT names cannot take a width_factor override: their
# factory passes it positionally.)
BIT_OVERRIDES = dict(norm='group', weight_std=True, stem_type='fixed')
# The create_model overrides the upstream configs offer (unset unless the variant sets them).
MODEL_KWARGS = ('norm', 'weight_std', 'width_factor', 'stem_type', 'drop_rate', 'drop_path_rate')


def parse_variant(variant: str) -> tuple[str, dict]:
    """'R101x3' -> ('resnetv2_101x3_bit', {}); 'R50x2' -> ('resnetv2_50', {BiT settings,
    width_factor=2}): the registered model name and its `model_kwargs` overrides."""
    m = re.fullmatch(r'[Rr](\d+)x(\d+)', variant.strip())
    if not m or int(m[1]) not in DEPTHS or int(m[2]) not in WIDTHS:
        raise ValueError(
            f'BiT variant must be R<depth>x<width> with depth in {DEPTHS} and width in '
            f'{WIDTHS} (e.g. R50x1, R152x4); got {variant!r}.'
        )
    depth, width = int(m[1]), int(m[2])
    if (depth, width) in REGISTERED:
        return f'resnetv2_{depth}x{width}_bit', {}
    return f'resnetv2_{depth}', {**BIT_OVERRIDES, 'width_factor': width}


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Step counts of an epoch-defined schedule at one global batch size."""

    steps_per_epoch: float
    num_train_steps: int
    warmup_steps: int
    boundaries: tuple[int, ...]


def epoch_schedule(
    num_images: int,
    batch_size: int,
    epochs: float = EPOCHS,
    decay_epochs: tuple[float, ...] = DECAY_EPOCHS,
    warmup_steps: int = WARMUP_STEPS,
) -> Schedule:
    """Converts epochs to optimizer steps (floor of images seen / batch)."""

    def steps(e: float) -> int:
        return int(e * num_images) // batch_size

    return Schedule(
        steps_per_epoch=num_images / batch_size,
        num_train_steps=steps(epochs),
        warmup_steps=warmup_steps,
        boundaries=tuple(steps(e) for e in decay_epochs),
    )


def per_device_batch(config: ml_collections.ConfigDict, num_devices: int) -> int:
    """Images per device of a run on `num_devices`; raises as the trainer would."""
    for key in ('batch_size', 'eval_batch_size'):
        if config[key] % num_devices:
            raise ValueError(
                f'config.{key}={config[key]} is not divisible by {num_devices} devices.'
            )
    return config.batch_size // num_devices


def parse_arg(arg: str) -> dict[str, str]:
    """'R50x1' or 'R152x4,images=13000000' -> {'variant': ..., 'images': ...}."""
    parts = [p.strip() for p in (arg or '').split(',') if p.strip()]
    out = {'variant': 'R50x1'}
    for p in parts:
        if '=' in p:
            key, value = p.split('=', 1)
            if key not in ('images',):
                raise ValueError(f"Unknown config argument {key!r}; known: 'images'.")
            out[key] = value
        else:
            out['variant'] = p
    return out


def upstream_config(
    arg: str, *, dataset: str, eval_split: str, num_images: int
) -> ml_collections.ConfigDict:
    """The paper's upstream recipe for the config argument `arg` (`parse_arg`: the variant,
    optionally `images=N`) on the 'train' split of `dataset`, of `num_images` images
    unless `arg` says otherwise."""
    args = parse_arg(arg)
    model, overrides = parse_variant(args['variant'])
    sched = epoch_schedule(int(args.get('images', num_images)), GLOBAL_BATCH)
    # Inception crop (8-100% of the area, aspect 3/4-4/3: Szegedy et al. 2015, the paper's
    # [53]) resized to 224, random horizontal flip; pixels to [-1, 1] through the BiT
    # models' mean = std = 0.5 (big_vision: value_range(-1, 1)). Evaluation: resize the
    # shorter side to 256, centre crop 224 (big_vision: resize_small(256)|central_crop(224)).
    data = configs_common.data_config(
        **configs_common.IMAGENET_DATA, inception_scale=(0.08, 1.0),
        inception_ratio=(3.0 / 4.0, 4.0 / 3.0), interpolation='bilinear',
    )
    config = configs_common.supervised_config(
        model=model, model_kwargs=configs_common.model_kwargs(MODEL_KWARGS),
        dataset=dataset, train_split='train', eval_split=eval_split,
        image_size=RESOLUTION, data=data,
        batch_size=GLOBAL_BATCH, eval_batch_size=GLOBAL_BATCH,
        num_train_steps=sched.num_train_steps,
        log_every_steps=50, eval_every_steps=int(10 * sched.steps_per_epoch),
        checkpoint_every_steps=1000, keep_checkpoints=3,
        optimizer=configs_common.sgd(WEIGHT_DECAY, momentum=MOMENTUM),
        learning_rate=BASE_LR, lr_base_batch_size=LR_BASE_BATCH,
        schedule=configs_common.step_schedule(sched.warmup_steps, sched.boundaries),
    )
    for key, value in overrides.items():
        config.model_kwargs[key] = value
    # The upstream configs have no compilation_cache_dir field: train.py then uses the
    # per-user cache (as for None), and the command line cannot set it.
    del config['compilation_cache_dir']
    return config
