"""BiT transfer, offline: the mnist5k-pretrained small ResNet-v2 fine-tuned on `digits`.

Config argument `<norm>,<shots>`: norm `gn` (GroupNorm + WS, BiT) or `bn` (the
BatchNorm twin), shots 1, 5 or 10 labelled examples per class, or `full` (all 1,397).

Commands (one arm each; `tools/bit_demo.py all` runs every arm for seeds 0, 1, 2 and
prints the README table):
    python train.py --config configs/bit/mnist5k_upstream.py:gn --workdir /tmp/flaxnets/bit_up_gn
    python train.py --config configs/bit/digits_transfer.py:gn,10 --workdir /tmp/flaxnets/bit_gn_10 \\
        --config.init_from=/tmp/flaxnets/bit_up_gn
    python train.py --config configs/bit/digits_transfer.py:gn,10 --workdir /tmp/flaxnets/bit_scratch_10
    python train.py --config configs/bit/mnist5k_upstream.py:bn --workdir /tmp/flaxnets/bit_up_bn
    python train.py --config configs/bit/digits_transfer.py:bn,10 --workdir /tmp/flaxnets/bit_bn_10 \\
        --config.init_from=/tmp/flaxnets/bit_up_bn

Recipe: `configs/bit_finetune.py` (BiT-HyperRule, Kolesnikov et al. 2020, Sec. 3.3): SGD
with momentum 0.9, LR 0.003 at batch 512 scaled linearly to the batch used, no weight
decay, the classifier re-initialised to zeros (`reinit_head='always'`: BiT always trains
a new head, even though digits and mnist5k share their ten classes); schedule from
`trainers/hyperrule.bit_hyperrule` for the run's example count (every regime here has
fewer than 20k: 500 steps, warmup 100, LR / 10 at steps 200, 300, 400; no mixup).
Departures, for a 2-core CPU: batch 64 instead of 512 (LR 0.000375 by the linear
rule; BiT's released code, google-research/big_transfer `bit_common.py`, keeps batch 512
and LR 0.003 and accumulates gradients over `--batch_split` parts instead), and
resolution. The HyperRule sends images under 96 x 96 to 160 px with random
128 px crops; here the 8 x 8 digits are resized to MNIST's 20 x 20 digit box and
zero-padded to the 32 x 32 input the network was pre-trained on, with random 2-pixel
translations as the crop (as `configs/finetune/digits.py` does), so `hyperrule` is ''
and the rule's schedule is written into the config. The from-scratch arm is the same
config without `init_from` (same schedule and LR, not tuned for scratch training).

Labelled subsets are the first N examples of each class of the `train` split (fixed,
the same for every seed); evaluation on the 400 `test` digits. Expected results
(held-out top-1, seeds 0/1/2, mean +- std; the full tables are in the README section
"BiT: upstream pre-training and transfer on digits"): GN+WS pre-trained 78.3 +- 3.0 % at
1 per class, 88.3 +- 1.9 % at 10, 90.9 +- 1.3 % on all 1,397; from scratch 40.3 / 57.9 /
62.0 %; BN twin pre-trained 83.2 / 86.7 / 89.9 %. With `--config.lr_base_batch_size=0`
(LR 0.003 at batch 64, as BiT's released code uses 0.003 at its batch of 512): GN+WS
pre-trained 80.3 / 94.2 / 97.8 %, from scratch 54.0 / 87.9 / 93.5 %, BN twin
84.8 / 95.3 / 97.7 %. Time: 25-130 s of training per run on a 2-core CPU shared with
other work, plus start-up.
"""

import ml_collections

from configs import bit_finetune, common
from configs.bit import mnist5k_upstream
from trainers import hyperrule

DIGITS_TRAIN = 1397  # the `digits` train split
DIGITS_CLASSES = 10
SHOTS = ('1', '5', '10', 'full')
BATCH = 64


def parse_arg(arg: str) -> tuple[str, str]:
    norm, _, shots = (arg or 'gn,10').partition(',')
    if norm not in mnist5k_upstream.NORMS or shots not in SHOTS:
        raise ValueError(
            f"Config argument must be '<norm>,<shots>' with norm in "
            f'{sorted(mnist5k_upstream.NORMS)} and shots in {SHOTS}; got {arg!r}.'
        )
    return norm, shots


def get_config(arg: str = 'gn,10') -> ml_collections.ConfigDict:
    norm, shots = parse_arg(arg)
    config = bit_finetune.get_config()  # BiT-HyperRule optimizer, LR and zero-initialised head
    net = mnist5k_upstream.model_config(norm)
    config.model = net.model
    config.model_kwargs = net.model_kwargs

    config.dataset = 'digits'
    config.labeled_per_class = 0 if shots == 'full' else int(shots)
    examples = DIGITS_TRAIN if shots == 'full' else int(shots) * DIGITS_CLASSES

    config.hyperrule = ''  # applied below, at the pre-training resolution
    rule = hyperrule.bit_hyperrule(examples, (8, 8))
    config.num_train_steps = rule.num_steps
    config.schedule = common.step_schedule(rule.warmup_steps, rule.boundaries)
    config.data.mixup_alpha = rule.mixup_alpha
    # default.py's 'small' preprocessing and 2-pixel translations, from 20 x 20 digits.
    config.image_size = 32
    config.data.source_size = 20
    config.data.interpolation = 'bilinear'
    config.data.flip = False  # digits are not mirror-symmetric

    config.batch_size = BATCH  # learning_rate 0.003 stays quoted at lr_base_batch_size 512
    config.eval_batch_size = 400
    config.finetune.reinit_head = 'always'
    config.update(
        log_every_steps=100, eval_every_steps=rule.num_steps,
        checkpoint_every_steps=rule.num_steps, keep_checkpoints=1,
    )
    return config
