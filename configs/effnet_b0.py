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
"""

import ml_collections
from ml_collections.config_dict import placeholder

import input_pipeline

TRAIN_IMAGES = 1_281_167
EPOCHS = 350


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.trainer = 'supervised'
    config.model = 'efficientnet_b0'
    # Overrides passed to models.create_model; unset (None) fields keep the model's default.
    config.model_kwargs = ml_collections.ConfigDict(
        dict(
            norm=placeholder(str),  # 'batch' | 'group'
            weight_std=placeholder(bool),
            drop_rate=0.2,
            drop_path_rate=0.2,
        )
    )
    config.dataset = 'imagenet2012'
    config.train_split = 'train'
    config.eval_split = 'validation'
    config.image_size = 224

    config.data = input_pipeline.default_data_config()
    config.data.preprocess = 'imagenet'
    config.data.train_augment = 'inception_crop'
    config.data.flip = True
    # The reference evaluates with crop_padding 32: resize to 224 + 32, crop 224.
    config.data.crop_pct = 224 / 256
    config.data.interpolation = 'bicubic'
    config.data.autoaugment = 'imagenet'

    config.seed = 0
    config.batch_size = 4096
    config.eval_batch_size = 1000
    steps_per_epoch = TRAIN_IMAGES // config.batch_size
    config.num_train_steps = EPOCHS * steps_per_epoch
    config.log_every_steps = 100
    config.eval_every_steps = 10 * steps_per_epoch
    config.checkpoint_every_steps = 2000
    config.keep_checkpoints = 3

    config.optimizer = ml_collections.ConfigDict(
        dict(
            name='rmsprop_tf', rmsprop_decay=0.9, momentum=0.9, rmsprop_eps=1e-3, weight_decay=1e-5
        )
    )
    config.learning_rate = 0.256
    config.lr_base_batch_size = 4096
    config.schedule = ml_collections.ConfigDict(
        dict(
            name='exponential',
            warmup_steps=5 * steps_per_epoch,
            decay_steps=int(2.4 * steps_per_epoch),
            decay_factor=0.97,
            staircase=True,
        )
    )
    config.label_smoothing = 0.1
    config.ema_decay = 0.9999
    config.grad_clip_norm = 0.0
    config.compute_dtype = 'float32'
    config.shard_params = False
    # JAX's persistent compilation cache: a second run of the same program skips XLA
    # compilation. None: the per-user default (~/.cache/flaxnets/jax); '' turns it off.
    config.compilation_cache_dir = None
    config.prefetch_to_device = 2
    return config
