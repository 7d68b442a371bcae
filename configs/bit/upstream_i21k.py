"""BiT-M upstream: a BiT ResNet-v2 (GroupNorm + weight standardisation) on ImageNet-21k.

Command (R50x1 by default; any of R{50,101,152}x{1,2,3,4} through the config argument,
BiT-M's flagship is R152x4):
    python train.py --config configs/bit/upstream_i21k.py --workdir DIR \\
        --config.dataset=folder:/data/imagenet21k [--config.compute_dtype=bfloat16]
    python train.py --config configs/bit/upstream_i21k.py:R152x4 --workdir DIR ...
    # a copy with another number of training images (steps follow from it):
    python train.py --config configs/bit/upstream_i21k.py:R50x1,images=13153500 ...

Recipe: identical to BiT-S (`configs/bit/upstream_i1k.py`, whose docstring has the
field-by-field table): Kolesnikov et al. 2020, Sec. 3.3 gives BiT-M the same 90 epochs with
the LR divided by 10 after epochs 30, 60 and 80 ("We train both BiT-S and BiT-M for 90
epochs"), SGD momentum 0.9, LR 0.03 x batch/256 (0.48 at 4096), 5,000 warmup steps,
weight decay 1e-4, Inception crop + flip at 224. Sec. 4.2 explains why the long schedule and
the weight decay matter more here than on ILSVRC-2012 (Fig. 7).

Data. ImageNet-21k as BiT used it is the fall 2011 release (Sec. 4.2: 14.2 M images; the
released BiT-M heads have 21,843 outputs); the step counts below assume TRAIN_IMAGES =
14,197,122 training images at batch 4096: 3,466.1 steps per epoch, 311,948 steps in all,
decays at steps 103,982 / 207,965 / 277,287. tfds has no public builder for it, so the
config reads an image-folder tree `root/<split>/<synset>/<image>` (`folder:` datasets,
class ids = sorted union of synset folder names):

    # the image-net.org download (fall11_whole.tar: one tar per synset)
    mkdir -p /data/imagenet21k/train && cd /data/imagenet21k/train
    tar -xf /path/to/fall11_whole.tar
    for t in n*.tar; do d=${t%.tar}; mkdir -p "$d" && tar -xf "$t" -C "$d" && rm "$t"; done
    # hold out a validation split: the first 2 images (sorted) of each synset with >= 10
    cd /data/imagenet21k && for d in train/n*; do s=${d#train/}
      [ "$(ls "$d" | wc -l)" -ge 10 ] && mkdir -p "validation/$s" &&
      ls "$d" | sort | head -2 | xargs -I{} mv "$d/{}" "validation/$s/"; done

Pass the number of images left in train/ as `images=N` when it differs from
TRAIN_IMAGES by more than you care about (`find train -type f | wc -l`). ImageNet-21k
has no official validation split; BiT's own held-out images are not published.

Taken from google-research/big_vision `big_vision/configs/bit_i21k.py`: batch 4096, the
5,000 warmup steps, LR 0.03 x batch/256 (both agree with the paper), the [-1, 1] pixel
range and the resize 256 / centre crop 224 evaluation. Not taken: its cosine decay
(the paper: steps at 30/60/80 epochs), sigmoid cross-entropy with head bias -10 (the
trainer uses softmax cross-entropy; the paper does not name the loss), gradient clipping at
norm 1.0 and decoupled weight decay 3e-5/256 x batch (the paper: 1e-4), and its
`full[51200:]` split of the unpublished tfds `imagenet21k`.

Expected result: BiT-M R152x4 transfers to 85.39 % on ILSVRC-2012 (Table 2, after
fine-tuning with the BiT-HyperRule); the upstream accuracy itself is not reported and
nothing was measured here (no accelerator, no ImageNet-21k).
"""

import ml_collections

from configs.bit import common

TRAIN_IMAGES = 14_197_122  # ImageNet-21k fall 2011 release, all images


def get_config(arg: str = 'R50x1') -> ml_collections.ConfigDict:
    return common.upstream_config(
        arg, dataset='folder:/data/imagenet21k', eval_split='validation', num_images=TRAIN_IMAGES
    )
