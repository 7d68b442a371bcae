"""EfficientNet-B0 on ImageNet-1k: the paper's 350-epoch RMSProp recipe.

Command:
    python train.py --config configs/effnet_b0.py --workdir DIR \
        [--config.data.data_dir=/path/to/tensorflow_datasets]

Recipe (Tan & Le 2019, "EfficientNet", Sec. 5.2, and the released TF code): RMSProp
(TF-style: decay 0.9, momentum 0.9, epsilon 1e-3), learning rate 0.256 per 4,096
images, 5 epochs of linear warmup, then decayed by 0.97 every 2.4 epochs (staircase);
weight decay 1e-5 (not on BatchNorm or biases); label smoothing 0.1; dropout 0.2 before
the classifier and stochastic depth 0.2 (survival probability 0.8); weight EMA 0.9999;
batch 4,096 for 350 epochs; BatchNorm momentum 0.9 / eps 1e-5 of timm's
``efficientnet_b0`` (the model's default, symmetric padding). Here the exponential decay
counts from the end of the warmup; the TF code counts from step 0, so its rate is lower
by a factor of about 0.97^2 throughout.

Data: Inception-style random-resized crop + flip at 224 px; evaluation resizes bicubically
to 256 and centre-crops 224 (the reference's ``crop_padding = 32``, i.e.
crop_pct = 224 / 256).

Augmentation: AutoAugment's ImageNet policy (Cubuk et al. 2019), as in the paper
(Sec. 5.2).

Expected result: 77.1% top-1 on the 50,000 validation images (Tan & Le 2019, Table 2,
with AutoAugment), read from the EMA weights (`results.json` key 'ema'); timm's
``efficientnet_b0.ra_in1k`` (its RandAugment recipe) reaches 77.7.
Time: not measured in this project (no accelerator in CI); 350 epochs are 109,200 steps
of 4,096 images, and `tools/benchmark.py` gives images/s on your hardware. bfloat16
compute (`--config.compute_dtype=bfloat16`) is recommended on GPU/TPU.

ImageNet must be prepared by tfds first (manual download); the run fails at start with
the instructions when it is not.

B1-B7 (`configs/effnet_b1.py` ... `effnet_b7.py`, built by `scaled` below) change only the
model, the resolution, the dropout before the classifier and the evaluation crop (resize
to resolution + 32, centre crop: crop_pct = r / (r + 32)), as Tan & Le 2019, Sec. 5.2 and
the reference's scaling table do; optimizer, schedule, regularisation, batch, epochs and
AutoAugment are B0's:

| config | resolution | dropout | crop_pct | timm's tf_ cfg | top-1 (Table 2) |
|---|---|---|---|---|---|
| B1 | 240 | 0.2 | 240/272 | 0.882 | 79.1 |
| B2 | 260 | 0.3 | 260/292 | 0.89 | 80.1 |
| B3 | 300 | 0.3 | 300/332 | 0.904 | 81.6 |
| B4 | 380 | 0.4 | 380/412 | 0.922 | 82.9 |
| B5 | 456 | 0.4 | 456/488 | 0.934 | 83.6 |
| B6 | 528 | 0.5 | 528/560 | 0.942 | 84.0 |
| B7 | 600 | 0.5 | 600/632 | 0.949 | 84.3 |
"""

import ml_collections

from configs import common

BATCH = 4096
EPOCHS = 350
STEPS_PER_EPOCH = common.imagenet_steps_per_epoch(BATCH)  # 312


def get_config() -> ml_collections.ConfigDict:
    epoch = STEPS_PER_EPOCH
    return common.imagenet_config(
        'efficientnet_b0', batch_size=BATCH, epochs=EPOCHS,
        model_kwargs=common.model_kwargs(drop_rate=0.2, drop_path_rate=0.2),
        # The reference evaluates with crop_padding 32: resize to 224 + 32, crop 224.
        data=dict(crop_pct=224 / 256, interpolation='bicubic', autoaugment='imagenet'),
        optimizer=ml_collections.ConfigDict(dict(
            name='rmsprop_tf', rmsprop_decay=0.9, momentum=0.9, rmsprop_eps=1e-3,
            weight_decay=1e-5,
        )),
        learning_rate=0.256, lr_base_batch_size=4096,
        schedule=ml_collections.ConfigDict(dict(
            name='exponential', warmup_steps=5 * epoch, decay_steps=int(2.4 * epoch),
            decay_factor=0.97, staircase=True,
        )),
        label_smoothing=0.1, ema_decay=0.9999,
    )


def scaled(n: int, resolution: int, drop_rate: float) -> ml_collections.ConfigDict:
    """B0's recipe for EfficientNet-B`n` at `resolution` with dropout `drop_rate`."""
    config = get_config()
    config.model = f'efficientnet_b{n}'
    config.image_size = resolution
    config.model_kwargs.drop_rate = drop_rate
    config.data.crop_pct = resolution / (resolution + 32)
    return config
