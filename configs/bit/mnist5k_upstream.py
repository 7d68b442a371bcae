"""BiT-style upstream pre-training, offline: a small ResNet-v2 on mnist5k at 32 px.

Commands (the config argument is the norm switch: `gn` = GroupNorm + weight
standardisation as in BiT, `bn` = its BatchNorm twin with plain convs):
    python train.py --config configs/bit/mnist5k_upstream.py:gn --workdir /tmp/flaxnets/bit_up_gn
    python train.py --config configs/bit/mnist5k_upstream.py:bn --workdir /tmp/flaxnets/bit_up_bn
    # every arm of the README's transfer table, 3 seeds, then the table:
    python tools/bit_demo.py all --root /tmp/flaxnets/bit_demo

Model: `resnetv2_50x1_bit` (BiT's ResNet-v2: pre-activation bottlenecks, 'fixed' stem,
GN + StdConv) shrunk through `model_kwargs` only (nothing new is registered): one
bottleneck per stage, stage widths 32/64/128/256 (bottlenecks 8/16/32/64), a 16-channel
stem and 4 GroupNorm groups (BiT's 32 need at least 32 channels); 131,514 parameters with
the 10-class head. The grey digits are fed as 3 equal channels, scaled to [-1, 1].

Recipe: BiT's upstream recipe (Kolesnikov et al. 2020, Sec. 3.3; `configs/bit/common.py`)
scaled to 4,000 images: SGD with momentum 0.9, LR 0.03 x batch/256 (0.015 at batch 128),
weight decay 1e-4, linear warmup over the same fraction of training as BiT's 5,000 of
28,150 steps (17.8 %: 167 steps), and BiT's 90-epoch step schedule compressed to 30 epochs
with the decays at the same fractions (1/3, 2/3, 8/9 of training: epochs 10, 20, 26.7;
938 steps of 128 images). Augmentation: random 2-pixel translations instead of the
Inception crop and flip, which do not preserve digits. Both arms use exactly these
settings; only `norm` / `weight_std` differ.

Expected result (held-out top-1 on the 1,000 mnist5k test digits, seeds 0/1/2): GN+WS
97.37 +- 0.35 % (97.0, 97.4, 97.7), BN twin 97.10 +- 0.36 % (96.7, 97.2, 97.4). Time:
80-290 s of training per run on a 2-core CPU shared with other work (938 steps at
3-12 steps/s), plus ~30 s start-up.
"""

import ml_collections

from configs import common, default
from configs.bit import common as bit
from trainers import finetune

# The small ResNet-v2 every arm of the demonstration uses (model_kwargs overrides).
TINY = dict(stage_sizes=(1, 1, 1, 1), widths=(32, 64, 128, 256), stem_width=16, gn_groups=4)
NORMS = {'gn': dict(norm='group', weight_std=True), 'bn': dict(norm='batch', weight_std=False)}

TRAIN_IMAGES = 4000
BATCH = 128
EPOCHS = 30
# BiT: 5,000 warmup steps of 28,150; decays after 30, 60, 80 of 90 epochs.
WARMUP_FRACTION = 5000 / 28150
DECAY_FRACTIONS = (30 / 90, 60 / 90, 80 / 90)
STEPS = -(-EPOCHS * TRAIN_IMAGES // BATCH)  # 938: every image seen 30 times


def model_config(norm: str) -> ml_collections.ConfigDict:
    """`config.model` and `config.model_kwargs` of the demonstration's network."""
    if norm not in NORMS:
        raise ValueError(f'norm switch must be one of {sorted(NORMS)}, got {norm!r}.')
    config = default.get_config()
    config.model = 'resnetv2_50x1_bit'
    for key, value in {**TINY, **NORMS[norm]}.items():
        config.model_kwargs[key] = value
    return config


def get_config(arg: str = 'gn') -> ml_collections.ConfigDict:
    # default.py's data (2-pixel translations, no flip) and evaluation batch of 500.
    config = finetune.add_config_fields(model_config(arg))
    config.image_size = 32  # mnist 28 x 28 zero-padded to 32, as for LeNet-5
    config.batch_size = BATCH
    config.num_train_steps = STEPS
    config.optimizer = common.sgd(bit.WEIGHT_DECAY, momentum=bit.MOMENTUM)
    config.learning_rate = bit.BASE_LR
    config.lr_base_batch_size = bit.LR_BASE_BATCH
    config.schedule = common.step_schedule(
        round(WARMUP_FRACTION * STEPS), tuple(round(f * STEPS) for f in DECAY_FRACTIONS)
    )
    config.update(log_every_steps=100, eval_every_steps=STEPS, checkpoint_every_steps=STEPS)
    config.keep_checkpoints = 1
    return config
