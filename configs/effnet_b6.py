"""EfficientNet-B6 on ImageNet-1k: the B0 recipe (configs/effnet_b0.py) at B6's scale.

Command:
    python train.py --config configs/effnet_b6.py --workdir DIR \
        [--config.data.data_dir=/path/to/tensorflow_datasets]

Changes from B0, and only these (Tan & Le 2019, Sec. 5.2 and the reference's scaling
table): the model (``efficientnet_b6``), the resolution (528 px), dropout 0.5 before the
classifier, and the evaluation crop: resize to 528 + 32, centre-crop 528 (crop_pct =
528/560; timm's ``tf_efficientnet_b6`` cfg has 0.942). Optimizer, schedule,
regularisation, batch and epochs are B0's. AutoAugment is on, as in B0.

Expected result: 84.0% top-1 on the ImageNet validation set (Tan & Le 2019, Table 2, with
AutoAugment), read from the EMA weights (`results.json` key 'ema').
Time: not measured in this project (no accelerator in CI); like B0, 109,200 steps of
4,096 images, each costing more than B0's by the FLOPs ratio of Table 2
(`python tools/model_table.py efficientnet_b6` prints our MACs).
"""

import ml_collections

from configs import effnet_b0

RESOLUTION = 528


def get_config() -> ml_collections.ConfigDict:
    config = effnet_b0.get_config()
    config.model = 'efficientnet_b6'
    config.image_size = RESOLUTION
    config.model_kwargs.drop_rate = 0.5
    config.data.crop_pct = RESOLUTION / (RESOLUTION + 32)
    return config
