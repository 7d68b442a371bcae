"""The `config.data` section of a run config and its defaults."""

import ml_collections

# A few damaged files in a million-image folder are normal; one in a thousand is not.
DEFAULT_MAX_BAD_FRACTION = 0.001


def default_data_config() -> ml_collections.ConfigDict:
    """Returns the data config every experiment config starts from.

    Fields:
        data_dir: tfds data directory; None means tfds' default
            (`$TFDS_DATA_DIR` or `~/tensorflow_datasets`).
        download: if True, datasets missing from `data_dir` are downloaded and
            prepared at start-up. False by default so a run never fetches data
            behind the user's back; a missing dataset then raises
            `DatasetNotAvailableError` with the command that prepares it. The
            embedded datasets (`mnist5k`, `digits`) are always prepared on first
            use since they need no download.
        preprocess: 'imagenet' (eval: resize the shorter side to
            `image_size / crop_pct`, then centre crop) or 'small' (eval: resize
            to `image_size` only if it differs; zero-pad when the target is larger
            by an even number of pixels, e.g. MNIST 28 -> 32 for LeNet-5).
        source_size: when > 0, every decoded image is first resized to
            source_size x source_size (with `interpolation`), before cropping,
            padding or augmentation, in training and eval. Used to bring
            scikit-learn's 8x8 digits to MNIST's 28x28 stroke scale, so that a
            LeNet-5 trained on mnist5k sees them as it saw MNIST (then zero-padded
            to 32). 0 (default) keeps the stored size.
        train_augment: 'inception_crop' (random-resized crop with
            `inception_scale` / `inception_ratio`), 'random_crop' (pad by
            `crop_padding`, crop back to the source size, then the eval resize),
            'crop' (a random `image_size` square of the image, no padding or
            rescaling: BiT's fine-tuning crop, after `source_size`) or 'none' (the
            eval transform).
        crop_padding: pixels of zero padding for 'random_crop' (4 for CIFAR,
            2 for MNIST).
        flip: random horizontal flip in training. Set False for digits, where a
            mirrored 2 or 7 is not a digit.
        crop_pct: fraction of the resized eval image kept by the centre crop
            (timm's `crop_pct`; 0.875 gives 224 from 256).
        inception_scale: (min, max) fraction of the image area of the crop.
        inception_ratio: (min, max) aspect ratio of the crop.
        interpolation: 'bilinear' | 'bicubic' | 'nearest' | 'area' for resizing.
        shuffle_buffer: examples in the shuffle buffer of the streaming path
            (tfds datasets too large for memory and stored only as TFRecord).
        in_memory: 'auto' (hold the decoded split in host memory when it is
            under about 4 GB), True or False (read from the tfds files: by
            index from ArrayRecord files when the dataset has them, else
            streamed from TFRecord; see `pipeline.py`).
            Image folders ignore it: they are always read by index from their
            files (the OS page cache keeps small ones in memory), so they follow
            the in-memory ordering rules.
        prefetch: host batches prepared ahead of the trainer.
        num_parallel_calls: threads for decoding and augmentation; -1 lets
            tf.data tune it.
        max_bad_fraction: the largest fraction of a `folder:` split's image
            files that may be undecodable (empty, truncated, not an image) for
            `input_pipeline.check_dataset` to accept it (default 0.001). Bad
            files are never fatal in the iterators: each is replaced by a
            zero image marked 'valid' 0 (and, in eval, 'mask' 0) and logged
            once; this limit only stops a run on a mostly broken folder.

    Extra training augmentation (all off by default; see `augment.py` for the
    op definitions and the magnitude scale). The per-example policies run after
    the crop / flip on uint8-range pixels, before normalisation; mixing runs on
    the batch, also before normalisation. Eval is never augmented.

        randaugment_layers: RandAugment's N, ops applied per image; 0 = off.
        randaugment_magnitude: RandAugment's M on the EfficientNet / TF scale:
            10 is the maximum of the paper's op ranges (9 is its ImageNet
            ResNet-50 setting), values up to 30 extrapolate; 0 is the identity.
        randaugment_ops: 'imagenet' (the paper's 14 ops), 'digits' (no colour,
            inversion or histogram ops, smaller rotations / shears / shifts,
            plus Cutout) or a comma-separated list such as
            'Rotate,ShearX,Cutout'.
        randaugment_magnitude_std: per-op Gaussian noise on M (timm's mstd);
            inf draws M uniformly from [0, M]; 0 = fixed M.
        autoaugment: '' (off) or 'imagenet' (the 25 sub-policies of Cubuk et
            al. 2019, Table 9). Exclusive with RandAugment.
        mixup_alpha: Beta(alpha, alpha) of mixup (Zhang et al. 2018); 0 = off.
        cutmix_alpha: Beta(alpha, alpha) of CutMix (Yun et al. 2019); 0 = off.
        mix_prob: probability that a batch is mixed when either alpha is > 0.
        mix_switch_prob: probability of CutMix rather than mixup when both
            alphas are > 0.

    With mixing on, train batches carry 'targets' (float32 soft labels,
    (b, num_classes)); 'label' stays each row's own label. Row i of global batch
    s is mixed with row B - 1 - i, so batches do not depend on the process count
    (random-access path; the streaming path, whose order already depends on it,
    mixes within each process's batch). Label smoothing is left to the trainer.
    """
    config = ml_collections.ConfigDict()
    config.data_dir = ml_collections.FieldReference(None, field_type=str)
    config.download = False
    config.preprocess = 'imagenet'
    config.source_size = 0
    config.train_augment = 'inception_crop'
    config.crop_padding = 4
    config.flip = True
    config.crop_pct = 0.875
    config.inception_scale = (0.08, 1.0)
    config.inception_ratio = (3.0 / 4.0, 4.0 / 3.0)
    config.interpolation = 'bilinear'
    config.shuffle_buffer = 16_384
    # object-typed so the field accepts both 'auto' and a bool.
    config.in_memory = ml_collections.FieldReference('auto', field_type=object)
    config.prefetch = 2
    config.num_parallel_calls = -1
    config.max_bad_fraction = DEFAULT_MAX_BAD_FRACTION
    config.randaugment_layers = 0
    config.randaugment_magnitude = 9.0
    config.randaugment_ops = 'imagenet'
    config.randaugment_magnitude_std = 0.0
    config.autoaugment = ''
    config.mixup_alpha = 0.0
    config.cutmix_alpha = 0.0
    config.mix_prob = 1.0
    config.mix_switch_prob = 0.5
    return config
