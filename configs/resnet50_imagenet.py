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

from configs import common

BATCH = 1024
EPOCHS = 90
STEPS_PER_EPOCH = common.imagenet_steps_per_epoch(BATCH)  # 1,251


def get_config() -> ml_collections.ConfigDict:
    epoch = STEPS_PER_EPOCH
    return common.imagenet_config(
        'resnet50', batch_size=BATCH, epochs=EPOCHS,
        optimizer=common.sgd(1e-4), learning_rate=0.1, lr_base_batch_size=256,
        schedule=common.step_schedule(5 * epoch, (30 * epoch, 60 * epoch, 80 * epoch)),
    )
