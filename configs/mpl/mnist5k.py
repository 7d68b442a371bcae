"""Meta Pseudo Labels on mnist5k: 25 labeled digits per class, the rest as unlabeled data.

Command:
    python train.py --config configs/mpl/mnist5k.py --workdir /tmp/flaxnets/mpl_mnist5k

Data: exactly the split of configs/noisy_student/mnist5k.py: the first 25 examples of each
digit in mnist5k's `train` split are labeled (250 images), the other 3,750 train images
are the unlabeled pool (their labels are never read), and the 1,000 held-out `test`
digits measure teacher and student. configs/mpl/mnist5k_baseline.py trains the same
student on the 250 labels alone, so supervised / Noisy Student / MPL compare on equal
terms.

Teacher and student are both LeNet-5 (dropout 0.2 before the output layer). Each step
takes 32 labeled + 128 unlabeled digits (unlabeled_ratio 4); the unlabeled digits come
in a weak view (2-pixel translations) for the teacher's UDA targets and a strong view
(plus RandAugment, the digit-safe op set, N=2, M=9) for the pseudo-labels, the
student's update and the teacher's UDA prediction. Hard pseudo-labels sampled from the
teacher, loss-difference reward, UDA weight 8 / threshold 0.6 / temperature 0.7 ramped
up over 300 steps, the student's LR held at 0 for its first 100 steps; 1,500 MPL steps,
then 300 steps of fine-tuning the student on the labels.

Teacher LR 0.01 (cosine, 100 warmup steps): at the student's 0.05, with the UDA weight
at 8, the teacher collapsed to a single class within ~300 steps.

Expected result (held-out top-1 of the fine-tuned student, seeds 0/1/2): 97.27 +- 0.31 %
(97.2, 97.0, 97.6), against 95.03 +- 0.83 % for configs/mpl/mnist5k_baseline.py (+2.2
points) and 96.63 % for the Noisy Student round-0 student on the same split (README).
Before the fine-tuning phase the student scores 97.50 +- 0.26 %. Time: about 11 minutes
on a 2-core CPU (an MPL step costs ~3.5 supervised steps on the same 160 images).
"""

import ml_collections

from configs import common, default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()  # LeNet-5 and its SGD; 100/500/500-step cadence
    config.trainer = 'mpl'
    config.labeled_per_class = 25

    # The student: config.model / model_kwargs / optimizer / learning_rate / schedule.
    config.model_kwargs.drop_rate = 0.2
    config.learning_rate = 0.05
    config.schedule = common.cosine(warmup_steps=100)
    # The teacher.
    common.mpl_teacher(config, learning_rate=0.01, schedule=common.cosine(warmup_steps=100))

    # config.data is the strong view; the weak view drops RandAugment.
    common.randaugment(config.data, layers=2, magnitude=9.0, ops='digits')
    config.update(batch_size=32, unlabeled_ratio=4.0, num_train_steps=1500)

    config.mpl = common.mpl(
        student_wait_steps=100, finetune_steps=300, finetune_learning_rate=0.01,
        finetune_schedule=common.cosine(warmup_steps=0),
    )
    config.uda = common.uda(warmup_steps=300)
    return config
