"""BiT transfer: fine-tune a BiT ResNet-v2 on any dataset with the BiT-HyperRule.

Commands:
    # BiT-M-R50x1.npz from https://storage.googleapis.com/bit_models/BiT-M-R50x1.npz
    # (the BiT repository's released weights; TensorFlow names, read as they are)
    python train.py --config configs/bit_finetune.py --workdir /tmp/flaxnets/bit_pets \\
        --config.init_from=/path/to/BiT-M-R50x1.npz --config.dataset=oxford_iiit_pet \\
        --config.eval_split=test --config.data.download=True
    # or convert once and check the logits against timm first:
    python tools/convert_weights.py --model resnetv2_50x1_bit \\
        --weights BiT-M-R50x1.npz --out /tmp/flaxnets/bit_m_r50x1

Recipe (Kolesnikov et al. 2020, Sec. 3.3, "BiT-HyperRule"): SGD with momentum 0.9, LR
0.003 at batch 512 (scaled linearly to `batch_size`), no weight decay, the classifier
re-initialised to zeros, and the schedule, resolution and mixup chosen from the target
dataset at start-up (`config.hyperrule = 'bit'`, see trainers/hyperrule.py): the number
of training examples from the tfds split metadata (or `labeled_per_class` x classes for
few-shot runs) and the image size from the dataset's features. Training uses the whole
`train_split`; pick `eval_split` to suit the dataset (tfds names differ).

The model is any ResNet-v2 (`--config.model=resnetv2_101x3_bit`, ...); the GroupNorm +
weight-standardised BiT models are the ones the released weights fit.

Expected result: BiT-M-R50x1 reaches 91-94% top-1 on Oxford-IIIT Pets in the paper
(Table 1 reports BiT-M R152x4 at 94.5%); not measured in this project (no internet or
accelerator here).
"""

import ml_collections
from ml_collections.config_dict import placeholder

import input_pipeline
from trainers import finetune


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.trainer = 'supervised'
    config.model = 'resnetv2_50x1_bit'
    config.model_kwargs = ml_collections.ConfigDict(dict(
        norm=placeholder(str), weight_std=placeholder(bool), drop_rate=placeholder(float),
        drop_path_rate=placeholder(float),
    ))
    config.dataset = 'cifar10'
    config.train_split = 'train'
    config.eval_split = 'test'
    config.image_size = 0  # set by the HyperRule
    config.data = input_pipeline.default_data_config()
    config.data.preprocess = 'small'  # the HyperRule resizes; no ImageNet centre crop

    config.seed = 0
    config.batch_size = 512
    config.eval_batch_size = 512
    config.num_train_steps = 0  # set by the HyperRule
    config.log_every_steps = 50
    config.eval_every_steps = 500
    config.checkpoint_every_steps = 500
    config.keep_checkpoints = 2

    config.optimizer = ml_collections.ConfigDict(dict(name='sgd', momentum=0.9, weight_decay=0.0))
    config.learning_rate = 0.003
    config.lr_base_batch_size = 512
    config.schedule = ml_collections.ConfigDict(dict(name='step'))  # set by the HyperRule
    config.label_smoothing = 0.0
    config.ema_decay = 0.0
    config.grad_clip_norm = 0.0
    config.compute_dtype = 'float32'
    config.shard_params = False
    config.prefetch_to_device = 2

    finetune.add_config_fields(config)
    config.hyperrule = 'bit'
    config.finetune.head_init = 'zeros'
    config.finetune.reinit_head = 'auto'
    return config
