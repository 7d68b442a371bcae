"""EfficientNet-B1 on ImageNet-1k: the B0 recipe (configs/effnet_b0.py) at B1's scale.

Command:
    python train.py --config configs/effnet_b1.py --workdir DIR \
        [--config.data.data_dir=/path/to/tensorflow_datasets]

Changes from B0, and only these (Tan & Le 2019, Sec. 5.2 and the reference's scaling
table): the model (``efficientnet_b1``), the resolution (240 px), dropout 0.2 before the
classifier, and the evaluation crop: resize to 240 + 32, centre-crop 240 (crop_pct =
240/272; timm's ``tf_efficientnet_b1`` cfg has 0.882). Optimizer, schedule,
regularisation, batch and epochs are B0's. AutoAugment is on, as in B0.

Expected result: 79.1% top-1 on the ImageNet validation set (Tan & Le 2019, Table 2, with
AutoAugment), read from the EMA weights (`results.json` key 'ema').
Time: not measured in this project (no accelerator in CI); like B0, 109,200 steps of
4,096 images, each costing more than B0's by the FLOPs ratio of Table 2
(`python tools/model_table.py efficientnet_b1` prints our MACs).
"""

import ml_collections

from configs import effnet_b0

RESOLUTION = 240


def get_config() -> ml_collections.ConfigDict:
    config = effnet_b0.get_config()
    config.model = 'efficientnet_b1'
    config.image_size = RESOLUTION
    config.model_kwargs.drop_rate = 0.2
    config.data.crop_pct = RESOLUTION / (RESOLUTION + 32)
    return config
