"""Noisy Student on mnist5k: 25 labeled digits per class, the rest as unlabeled data.

Command:
    python train.py --config configs/noisy_student/mnist5k.py --workdir /tmp/flaxnets/ns_mnist5k

Data: the labeled set is the first 25 examples of each digit in mnist5k's `train` split
(250 images); the other 3,750 train images are the unlabeled pool (their labels are never
read); the 1,000 held-out `test` digits measure teacher and student. The same split is
used by configs/mpl/mnist5k.py and configs/mpl/mnist5k_baseline.py, so the three methods
compare on equal terms.

Round 0's teacher is LeNet-5 trained on the 250 labels with the default augmentation
(2-pixel random translations). Each student is LeNet-5 trained from scratch with noise:
RandAugment (the digit-safe op set, N=2, M=9) on every image and dropout 0.3 before the
output layer, on 32 labeled + 128 pseudo-labeled images per step (unlabeled_ratio 4),
soft pseudo-labels, confident (p >= 0.5) images balanced to 350 per class. Two rounds.

Expected result (seeds 0-2, held-out top-1): round-0 teacher 92.0 +- 0.95 %, round-0
student 96.6 +- 0.2 %, round-1 student 97.2 +- 0.4 % (the README's table). Time: about
8 minutes on a 2-core CPU.
"""

import ml_collections

from configs import common, default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.trainer = 'noisy_student'
    config.labeled_per_class = 25
    config.unlabeled_dataset = 'mnist5k'
    config.unlabeled_split = 'train'  # minus the labeled examples

    # Round 0's teacher: plain supervised training on the labels.
    config.teacher = common.noisy_student_teacher(
        'lenet5', dict(config.model_kwargs), default.get_config().data, num_train_steps=400
    )

    # The student (config.model, model_kwargs, data, num_train_steps describe it).
    config.model_kwargs.drop_rate = 0.3
    common.randaugment(config.data, layers=2, magnitude=9.0, ops='digits')
    config.update(batch_size=32, num_train_steps=1200)
    config.update(log_every_steps=100, eval_every_steps=600, checkpoint_every_steps=600)
    config.schedule.warmup_steps = 50

    config.noisy_student = common.noisy_student(
        num_iterations=2, min_confidence=0.5, images_per_class=350, unlabeled_ratio=4.0,
        inference_shard_size=1000,
    )
    return config
