"""The `config.data` section of a run config and its defaults."""

import ml_collections


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
        train_augment: 'inception_crop' (random-resized crop with
            `inception_scale` / `inception_ratio`), 'random_crop' (pad by
            `crop_padding`, crop back to the source size, then the eval resize) or
            'none' (the eval transform).
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
            (datasets too large for memory).
        in_memory: 'auto' (hold the decoded split in host memory when it is
            under about 4 GB), True or False (stream from the tfds files).
            Image folders ignore it: they are always read by index from their
            files (the OS page cache keeps small ones in memory), so they follow
            the in-memory ordering rules.
        prefetch: host batches prepared ahead of the trainer.
        num_parallel_calls: threads for decoding and augmentation; -1 lets
            tf.data tune it.
    """
    config = ml_collections.ConfigDict()
    config.data_dir = ml_collections.FieldReference(None, field_type=str)
    config.download = False
    config.preprocess = 'imagenet'
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
    return config
