"""EfficientNet-B3 on ImageNet-1k: the B0 recipe (configs/effnet_b0.py) at B3's scale.

Command:
    python train.py --config configs/effnet_b3.py --workdir DIR \
        [--config.data.data_dir=/path/to/tensorflow_datasets]

Changes from B0, and only these (Tan & Le 2019, Sec. 5.2 and the reference's scaling
table): the model (``efficientnet_b3``), the resolution (300 px), dropout 0.3 before the
classifier, and the evaluation crop: resize to 300 + 32, centre-crop 300 (crop_pct =
300/332; timm's ``tf_efficientnet_b3`` cfg has 0.904). Optimizer, schedule,
regularisation, batch and epochs are B0's. AutoAugment is on, as in B0.

Expected result: 81.6% top-1 on the ImageNet validation set (Tan & Le 2019, Table 2, with
AutoAugment), read from the EMA weights (`results.json` key 'ema').
Time: not measured in this project (no accelerator in CI); like B0, 109,200 steps of
4,096 images, each costing more than B0's by the FLOPs ratio of Table 2
(`python tools/model_table.py efficientnet_b3` prints our MACs).
"""

import ml_collections

from configs import effnet_b0

RESOLUTION = 300


def get_config() -> ml_collections.ConfigDict:
    config = effnet_b0.get_config()
    config.model = 'efficientnet_b3'
    config.image_size = RESOLUTION
    config.model_kwargs.drop_rate = 0.3
    config.data.crop_pct = RESOLUTION / (RESOLUTION + 32)
    return config
