"""EfficientNet-B7 on ImageNet-1k: the B0 recipe (configs/effnet_b0.py) at B7's scale.

Command:
    python train.py --config configs/effnet_b7.py --workdir DIR \
        [--config.data.data_dir=/path/to/tensorflow_datasets]

Changes from B0, and only these (Tan & Le 2019, Sec. 5.2 and the reference's scaling
table): the model (``efficientnet_b7``), the resolution (600 px), dropout 0.5 before the
classifier, and the evaluation crop: resize to 600 + 32, centre-crop 600 (crop_pct =
600/632; timm's ``tf_efficientnet_b7`` cfg has 0.949). Optimizer, schedule,
regularisation, batch and epochs are B0's. AutoAugment is on, as in B0.

Expected result: 84.3% top-1 on the ImageNet validation set (Tan & Le 2019, Table 2, with
AutoAugment), read from the EMA weights (`results.json` key 'ema').
Time: not measured in this project (no accelerator in CI); like B0, 109,200 steps of
4,096 images, each costing more than B0's by the FLOPs ratio of Table 2
(`python tools/model_table.py efficientnet_b7` prints our MACs).
"""

import ml_collections

from configs import effnet_b0

RESOLUTION = 600


def get_config() -> ml_collections.ConfigDict:
    config = effnet_b0.get_config()
    config.model = 'efficientnet_b7'
    config.image_size = RESOLUTION
    config.model_kwargs.drop_rate = 0.5
    config.data.crop_pct = RESOLUTION / (RESOLUTION + 32)
    return config
