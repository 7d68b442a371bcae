"""ResNet-50 (v1.5) on ImageNet-1k: the standard 90-epoch recipe.

Command:
    python train.py --config configs/resnet50_imagenet.py --workdir DIR \
        [--config.data.data_dir=/path/to/tensorflow_datasets]

Recipe (Goyal et al. 2017, "Accurate, Large Minibatch SGD", Sec. 5): SGD, momentum 0.9,
learning rate 0.1 per 256 images scaled linearly to the batch (0.4 at 1,024), 5 epochs
of linear warmup, divided by 10 after epochs 30, 60 and 80; weight decay 1e-4 on
weights (not on BatchNorm or biases); batch 1,024; Inception crop + flip at 224 px,
resize 256 + center crop 224 for evaluation. BatchNorm statistics are synchronised
over all devices (the step runs under jit on the global batch).

Expected result: about 76.3% top-1 on the 50,000 validation images (Goyal et al. 2017,
Table 2: 76.26 +- 0.09 at batch 1k-8k; torchvision's recipe: 76.13). Time: not measured
in this project (no accelerator in CI); `tools/benchmark.py` gives images/s on your
hardware, and 90 epochs are 112,590 steps of 1,024 images. bfloat16 compute
(`--config.compute_dtype=bfloat16`) is recommended on GPU/TPU.

ImageNet must be prepared by tfds first (manual download); the run fails at start with
the instructions when it is not.
"""

import ml_collections
from ml_collections.config_dict import placeholder

import input_pipeline

TRAIN_IMAGES = 1_281_167
EPOCHS = 90


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.trainer = 'supervised'
    config.model = 'resnet50'
    # Overrides passed to models.create_model; unset (None) fields keep the model's default.
    config.model_kwargs = ml_collections.ConfigDict(
        dict(
            norm=placeholder(str),  # 'batch' | 'group' | 'none'
            weight_std=placeholder(bool),
            drop_rate=placeholder(float),
            drop_path_rate=placeholder(float),
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
    config.data.crop_pct = 0.875

    config.seed = 0
    config.batch_size = 1024
    config.eval_batch_size = 1000
    steps_per_epoch = TRAIN_IMAGES // config.batch_size
    config.num_train_steps = EPOCHS * steps_per_epoch
    config.log_every_steps = 100
    config.eval_every_steps = 10 * steps_per_epoch
    config.checkpoint_every_steps = 2000
    config.keep_checkpoints = 3

    config.optimizer = ml_collections.ConfigDict(
        dict(name='sgd', momentum=0.9, nesterov=False, weight_decay=1e-4)
    )
    config.learning_rate = 0.1
    config.lr_base_batch_size = 256
    config.schedule = ml_collections.ConfigDict(
        dict(
            name='step',
            warmup_steps=5 * steps_per_epoch,
            boundaries=(30 * steps_per_epoch, 60 * steps_per_epoch, 80 * steps_per_epoch),
            decay_factor=0.1,
        )
    )
    config.label_smoothing = 0.0
    config.ema_decay = 0.0
    config.grad_clip_norm = 0.0
    config.compute_dtype = 'float32'
    config.shard_params = False
    # JAX's persistent compilation cache: a second run of the same program skips XLA
    # compilation. None: the per-user default (~/.cache/flaxnets/jax); '' turns it off.
    config.compilation_cache_dir = None
    config.prefetch_to_device = 2
    return config
