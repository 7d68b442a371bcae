"""BiT-S upstream: a BiT ResNet-v2 (GroupNorm + weight standardisation) on ILSVRC-2012.

Command (R50x1 by default; any of R{50,101,152}x{1,2,3,4} through the config argument):
    python train.py --config configs/bit/upstream_i1k.py --workdir DIR \\
        [--config.data.data_dir=/path/to/tensorflow_datasets] [--config.compute_dtype=bfloat16]
    python train.py --config configs/bit/upstream_i1k.py:R152x4 --workdir DIR ...
    # R50x1, R50x3, R101x1, R101x3, R152x2, R152x4 are registered names (the released
    # BiT models; also --config.model=resnetv2_101x3_bit); the other six are the plain
    # resnetv2_{50,101,152} with BiT's overrides (GN, WS, 'fixed' stem) and
    # model_kwargs.width_factor, which the config argument fills in

Recipe: Kolesnikov et al., "Big Transfer (BiT): General Visual Representation Learning",
ECCV 2020 (arXiv:1912.11370v3), Sec. 3.3 "Hyperparameter Details", Upstream Pre-Training,
field by field (`configs/bit/common.py` holds the shared values):

| field | value | source |
|---|---|---|
| model | ResNet-v2, GN (32 groups) + WS in every conv | Sec. 3.3 (and Sec. 4.3, Tab. 4) |
| optimizer | SGD, momentum 0.9 (not Nesterov) | Sec. 3.3; Sec. 4.2: "without any modifications" |
| learning rate | 0.03 x batch / 256 = 0.48 at 4096 | Sec. 3.3 ("multiply the learning rate by batch_size/256 following [11]") |
| warmup | linear, 5,000 steps | Sec. 3.3 |
| schedule | 90 epochs, LR / 10 after epochs 30, 60, 80 | Sec. 3.3 ("both BiT-S and BiT-M") |
| weight decay | 1e-4 (L2 on conv and dense kernels) | Sec. 3.3, Sec. 4.2 ("throughout we use 1e-4") |
| batch | 4,096 global (8 per chip on TPUv3-512) | Sec. 3.3 |
| train preprocessing | Inception crop (8-100 % area) + horizontal flip, 224 x 224 | Sec. 3.3 (crop of [53], Szegedy et al. 2015) |
| eval preprocessing | resize shorter side 256, centre crop 224 | big_vision `configs/bit_i1k.py` (`resize_small(256)|central_crop(224)`) |
| pixel range | [-1, 1] (mean = std = 0.5, the BiT models' cfg) | big_vision `value_range(-1, 1)`; the released BiT weights |

With 1,281,167 training images: 312.8 steps per epoch, 28,150 steps in all, decays at
steps 9,383 / 18,767 / 25,022. On 8 / 64 / 512 devices the per-device batch is 512 / 64 / 8
(tests/test_bit.py checks this arithmetic).

Taken from google-research/big_vision `big_vision/configs/bit_i1k.py`: the global batch
(4096), the evaluation transform, the [-1, 1] pixel range, logging every 50 steps and a
checkpoint every 1000. Not taken, because the paper says otherwise: its LR 0.1 x batch/256,
cosine decay, 1000 warmup steps, gradient clipping at norm 1.0, a 1 % minival split held out
of train, and decoupled weight decay 1e-4/256 x batch (on kernels, scaled by the schedule);
big_vision's inception crop also starts at 5 % of the area (`area_min=5`) where the paper
cites Szegedy et al.'s 8 %.

Expected result: BiT-S R50x1 76.0 % top-1 on the ILSVRC-2012 validation set when trained
from scratch at batch 4096 (Table 4, GN + WS); not measured here (no accelerator).
bfloat16 compute (`--config.compute_dtype=bfloat16`; parameters and the weight
standardisation stay float32) is recommended on GPU/TPU, and `--config.shard_params=True`
for R152x4 (936 M parameters).

ImageNet must be prepared by tfds first (manual download: ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar in <data_dir>/downloads/manual/, then
`tfds build imagenet2012 --data_dir <data_dir>`); the run fails at start with these
instructions when it is not.
"""

import ml_collections

from configs.bit import common

TRAIN_IMAGES = 1_281_167  # ILSVRC-2012 train split (tfds imagenet2012 'train')


def get_config(arg: str = 'R50x1') -> ml_collections.ConfigDict:
    return common.upstream_config(
        arg, dataset='imagenet2012', eval_split='validation', num_images=TRAIN_IMAGES
    )
