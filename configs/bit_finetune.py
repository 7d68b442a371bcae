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

from configs import default
from trainers import finetune


def get_config() -> ml_collections.ConfigDict:
    config = finetune.add_config_fields(default.get_config())
    config.model = 'resnetv2_50x1_bit'
    config.dataset = 'cifar10'
    config.eval_split = 'test'
    config.data.flip = True  # natural images; BiT flips
    # image_size, num_train_steps, schedule, data.source_size / train_augment / mixup_alpha:
    # set by the HyperRule when the run starts.
    config.hyperrule = 'bit'

    config.batch_size = 512
    config.eval_batch_size = 512
    config.log_every_steps = 50
    config.eval_every_steps = 500
    config.checkpoint_every_steps = 500
    config.optimizer = ml_collections.ConfigDict(dict(name='sgd', momentum=0.9, weight_decay=0.0))
    config.learning_rate = 0.003
    config.lr_base_batch_size = 512
    config.finetune.head_init = 'zeros'
    return config
