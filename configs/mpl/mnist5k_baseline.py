"""Supervised baseline for configs/mpl/mnist5k.py: the MPL student on the 250 labels only.

Command:
    python train.py --config configs/mpl/mnist5k_baseline.py --workdir /tmp/flaxnets/mpl_baseline

The same labeled subset (first 25 digits per class of mnist5k `train`), held-out test set
(1,000 digits), student model (LeNet-5, dropout 0.2), augmentation (2-pixel translations
plus RandAugment digits N=2, M=9), optimizer and batch size (32 labeled images) as the
MPL run, for as many steps as the MPL student takes in total (1,500 MPL + 300
fine-tuning steps). The unlabeled 3,750 digits are not used.

Expected result (held-out top-1, seeds 0/1/2): 95.03 +- 0.83 % (94.1, 95.3, 95.7); MPL on
the same labels reaches 97.27 +- 0.31 %. Time: about 1.5 minutes on a 2-core CPU.
"""

import ml_collections

from configs.mpl import mnist5k


def get_config() -> ml_collections.ConfigDict:
    mpl = mnist5k.get_config()
    config = mpl
    config.trainer = 'supervised'
    config.num_train_steps = mpl.num_train_steps + mpl.mpl.finetune_steps
    for key in ('teacher_model', 'teacher_model_kwargs', 'teacher_optimizer',
                'teacher_learning_rate', 'teacher_schedule', 'unlabeled_ratio', 'mpl', 'uda'):
        del config[key]
    return config
