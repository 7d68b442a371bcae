"""Where examples come from: tfds builders and image folders.

This module answers three questions for the iterators in `pipeline.py`: is the
dataset there (and if not, what exactly should the user do), how big is it, and
how to get at its examples, either as a random-access `ArraySource` (whole split
in host memory, or a list of files) or as a streaming tfds `tf.data.Dataset`.
"""

import dataclasses
import difflib
import math
import os
import threading

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from flaxnets_errors import ConfigError, UserError
from input_pipeline import builders

FOLDER_PREFIX = 'folder:'
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp')
# Splits whose decoded size is below this are held in host memory by 'auto'.
IN_MEMORY_LIMIT_BYTES = 4 * 2**30

# `tfds.testing.mock_data` replaces `DatasetBuilder.as_dataset`; comparing with
# the original tells us that reads are faked, so "is it prepared?" does not apply
# and nothing may be cached across the mock boundary. The class __dict__ entry is
# compared because attribute access goes through tfds' logging descriptor, which
# returns a new object every time.
_ORIGINAL_AS_DATASET = vars(tfds.core.DatasetBuilder)['as_dataset']


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a trainer needs to know about a dataset before building a model.

    Attributes:
        name: the dataset string as given (`'mnist5k'`, `'folder:/data/pets'`).
        num_classes: number of labels.
        split_sizes: examples per split; empty if unknown (under tfds mock data).
        image_shape: (height, width, channels) of the stored images; None for a
            dimension that varies between images (ImageNet, image folders).
        class_names: the name of every label, in label order: the tfds metadata's
            `ClassLabel` names (WordNet ids for ImageNet, '0'..'9' for the digit sets)
            or the class folder names; None when unknown.
    """

    name: str
    num_classes: int
    split_sizes: dict[str, int]
    image_shape: tuple[int, int, int]
    class_names: tuple[str, ...] | None = None


class DatasetNotAvailableError(UserError, RuntimeError):
    """The dataset is not on disk (and downloading was not allowed) or unknown."""


@dataclasses.dataclass(frozen=True)
class ArraySource:
    """A split whose examples can be fetched by index.

    Attributes:
        kind: 'array' (`data` is uint8 (N, H, W, C)), 'encoded' (`data` holds
            the encoded image bytes, object array (N,)) or 'files' (`data` holds
            image file paths, str array (N,)).
        data: see `kind`.
        labels: int32 (N,).
    """

    kind: str
    data: np.ndarray
    labels: np.ndarray
    extras: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, indices, extras: dict[str, np.ndarray] | None = None) -> 'ArraySource':
        """The examples at `indices` (repeats allowed), in that order.

        Args:
            indices: int array into this source.
            extras: per-example arrays for the *selected* examples (e.g. pseudo-label
                'targets', (len(indices), K)); they travel with their examples through
                the pipeline into the batches. Existing extras are selected too.
        """
        indices = np.asarray(indices, dtype=np.int64)
        merged = {k: v[indices] for k, v in self.extras.items()}
        for k, v in (extras or {}).items():
            if len(v) != len(indices):
                raise ValueError(f'extras[{k!r}] has {len(v)} rows for {len(indices)} indices.')
            merged[k] = np.asarray(v)
        return ArraySource(self.kind, self.data[indices], self.labels[indices], merged)


def per_class_indices(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first `per_class` examples of every class, in the split's order.

    The split's order is fixed (tfds files read unshuffled), so this is a fixed labeled
    subset: the same for every seed, process count and trainer.
    """
    labels = np.asarray(labels)
    out = []
    for c in np.unique(labels):
        idx = np.nonzero(labels == c)[0]
        if len(idx) < per_class:
            raise ConfigError(f'Class {c} has only {len(idx)} examples; asked for {per_class} per class.')
        out.append(idx[:per_class])
    return np.sort(np.concatenate(out))


def tfds_is_mocked() -> bool:
    """True inside `tfds.testing.mock_data`."""
    return vars(tfds.core.DatasetBuilder)['as_dataset'] is not _ORIGINAL_AS_DATASET


def is_folder(dataset: str) -> bool:
    return dataset.startswith(FOLDER_PREFIX)


# ----------------------------------------------------------------------------
# tfds datasets.


def _base_name(dataset: str) -> str:
    # 'imagenet2012_subset/10pct:5.0.0' -> 'imagenet2012_subset'
    return dataset.split(':')[0].split('/')[0]


def _unknown_dataset_error(dataset: str) -> DatasetNotAvailableError:
    names = sorted(set(tfds.list_builders(with_community_datasets=False)))
    close = difflib.get_close_matches(_base_name(dataset), names, n=5, cutoff=0.6)
    hint = f' Did you mean: {", ".join(close)}?' if close else ''
    return DatasetNotAvailableError(
        f'Unknown dataset {dataset!r}: no tfds builder of that name.{hint} '
        f'For your own images use "{FOLDER_PREFIX}/path/to/root" with '
        'root/<split>/<class_name>/*.jpg|png.'
    )


def _not_prepared_error(builder: tfds.core.DatasetBuilder) -> DatasetNotAvailableError:
    root = os.fspath(builder.data_dir_root)
    name = builder.name
    lines = [
        f'Dataset {name!r} is not prepared in data_dir {root!r} '
        f'(looked for {builder.data_dir}), and config.data.download is False, '
        'so nothing was downloaded.'
    ]
    instructions = getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None)
    if instructions:
        manual_dir = os.path.join(root, 'downloads', 'manual')
        lines += [
            f'{name} needs a manual download. Put the files in {manual_dir}/ :',
            '  ' + ' '.join(instructions.split()),
            f'then prepare it with:\n  tfds build {name} --data_dir {root}',
        ]
    else:
        lines += [
            f'Prepare it with:\n  tfds build {name} --data_dir {root}',
            'or let the run download it with --config.data.download=True.',
        ]
    return DatasetNotAvailableError('\n'.join(lines))


def get_builder(
    dataset: str, data_dir: str | None, download: bool
) -> tfds.core.DatasetBuilder:
    """Returns a builder whose data is ready to read.

    Args:
        dataset: tfds name, optionally with config and version.
        data_dir: tfds data dir, None for tfds' default.
        download: allow downloading and preparing a missing dataset.

    Raises:
        DatasetNotAvailableError: unknown name, or not prepared and download is
            False. Never downloads in that case.
    """
    if _base_name(dataset) not in tfds.list_builders(with_community_datasets=False):
        raise _unknown_dataset_error(dataset)
    builder = tfds.builder(dataset, data_dir=data_dir)
    if tfds_is_mocked() or builder.is_prepared():
        return builder
    if builder.name in builders.EMBEDDED_DATASETS or download:
        builder.download_and_prepare()
        return builder
    raise _not_prepared_error(builder)


def check_split(builder: tfds.core.DatasetBuilder, split: str) -> None:
    """Raises ConfigError, naming the dataset's splits, for a split tfds cannot read."""
    if tfds_is_mocked():
        return  # mock data reads any split name
    try:
        builder.info.splits[split]
    except (KeyError, ValueError) as e:
        reason = ' '.join(str(e).split())
        names = sorted(builder.info.splits)
        if not all(repr(n) in reason for n in names):
            reason += f' Splits of {builder.name}: {", ".join(names)}.'
        raise ConfigError(
            f'Split {split!r}: {reason} Slices and sums like "train[:90%]" or "train+test" work too.'
        ) from e


def _split_size(builder: tfds.core.DatasetBuilder, split: str) -> int | None:
    try:
        return builder.info.splits[split].num_examples
    except (KeyError, ValueError, TypeError):
        return None  # Unknown split names under mock data.


def tfds_info(dataset: str, builder: tfds.core.DatasetBuilder) -> DatasetInfo:
    features = builder.info.features
    return DatasetInfo(
        name=dataset,
        num_classes=int(features['label'].num_classes),
        split_sizes={k: int(v.num_examples) for k, v in builder.info.splits.items()},
        image_shape=tuple(features['image'].shape),
        class_names=tuple(features['label'].names),
    )


def use_in_memory(setting, builder: tfds.core.DatasetBuilder, split: str) -> bool:
    """Resolves `config.data.in_memory` for one tfds split."""
    if isinstance(setting, bool):
        return setting
    if setting != 'auto':
        raise ConfigError(f"in_memory must be 'auto', True or False, got {setting!r}.")
    shape = builder.info.features['image'].shape
    static = all(d is not None for d in shape)
    n = _split_size(builder, split)
    if n is None:
        # Only mock data has unknown sizes; fixed-shape datasets are the small
        # ones (MNIST, CIFAR), variable-shape ones the large (ImageNet).
        return static
    if static:
        size = n * math.prod(shape)
    else:
        size = builder.info.splits[split].num_bytes  # Encoded bytes: a lower bound.
    return size < IN_MEMORY_LIMIT_BYTES


_CACHE: dict[tuple, ArraySource] = {}
_CACHE_LOCK = threading.Lock()


def deterministic_options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    return options


def _select(example):
    return {'x': example['image'], 'label': tf.cast(example['label'], tf.int32)}


def load_in_memory(builder: tfds.core.DatasetBuilder, split: str) -> ArraySource:
    """Reads a whole tfds split into host memory, once per process.

    Fixed-shape images are decoded into one uint8 array; variable-shape images
    are kept encoded (decoded per use) since they cannot be stacked.
    """
    key = (builder.info.full_name, os.fspath(builder.data_dir), split)
    mocked = tfds_is_mocked()
    with _CACHE_LOCK:
        if not mocked and key in _CACHE:
            return _CACHE[key]
        static = all(d is not None for d in builder.info.features['image'].shape)
        decoders = None if static else {'image': tfds.decode.SkipDecoding()}
        ds = builder.as_dataset(
            split=split,
            shuffle_files=False,  # The file order is the split's canonical order.
            decoders=decoders,
            read_config=tfds.ReadConfig(options=deterministic_options()),
        )
        ds = ds.map(_select, num_parallel_calls=tf.data.AUTOTUNE)
        xs, labels = [], []
        for batch in ds.batch(1024).as_numpy_iterator():
            xs.append(batch['x'])
            labels.append(batch['label'])
        if not labels:
            raise ConfigError(f'Split {split!r} of {builder.name} is empty.')
        source = ArraySource(
            kind='array' if static else 'encoded',
            data=np.concatenate(xs),
            labels=np.concatenate(labels).astype(np.int32),
        )
        if not mocked:
            _CACHE[key] = source
        return source


def streaming_dataset(
    builder: tfds.core.DatasetBuilder,
    split: str,
    *,
    shuffle_files: bool,
    seed: int | None,
    input_context: tf.distribute.InputContext | None,
) -> tf.data.Dataset:
    """Undecoded examples {'x': encoded bytes, 'label'} read from the tfds files."""
    # Decoding happens after shuffling (and after skipping on resume), so the
    # shuffle buffer holds small encoded images and skipped records are never
    # decoded.
    decoders = {'image': tfds.decode.SkipDecoding()}
    read_config = tfds.ReadConfig(
        shuffle_seed=seed,
        shuffle_reshuffle_each_iteration=True,
        input_context=input_context,
        options=deterministic_options(),
    )
    ds = builder.as_dataset(
        split=split, shuffle_files=shuffle_files, decoders=decoders, read_config=read_config
    )
    return ds.map(_select, num_parallel_calls=tf.data.AUTOTUNE)


def count_examples(ds: tf.data.Dataset) -> int:
    """Counts by reading; only for splits of unknown size (mock data)."""
    return int(ds.reduce(np.int64(0), lambda n, _: n + 1))


def split_size(builder: tfds.core.DatasetBuilder, split: str) -> int | None:
    return _split_size(builder, split)


# ----------------------------------------------------------------------------
# Image folders: root/<split>/<class_name>/<image file>.


def _folder_root(dataset: str) -> str:
    root = os.path.expanduser(dataset[len(FOLDER_PREFIX) :])
    if not os.path.isdir(root):
        raise DatasetNotAvailableError(
            f'Image folder {root!r} (from dataset {dataset!r}) does not exist. Expected '
            'root/<split>/<class_name>/*.jpg|png, e.g. root/train/cat/001.jpg.'
        )
    return root


def _subdirs(path: str) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith('.'))


def _folder_index(dataset: str) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """Returns (sorted class names, {split: [(path, label), ...]})."""
    root = _folder_root(dataset)
    splits = _subdirs(root)
    # Labels must mean the same in every split, so classes are the sorted union.
    class_names = sorted({c for s in splits for c in _subdirs(os.path.join(root, s))})
    index = {c: i for i, c in enumerate(class_names)}
    files = {}
    for s in splits:
        items = []
        for c in _subdirs(os.path.join(root, s)):
            class_dir = os.path.join(root, s, c)
            for name in sorted(os.listdir(class_dir)):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    items.append((os.path.join(class_dir, name), index[c]))
        if items:
            files[s] = items
    if not files:
        raise DatasetNotAvailableError(
            f'No images found under {root!r}: expected root/<split>/<class_name>/'
            f'<image> with extensions {", ".join(IMAGE_EXTENSIONS)}.'
        )
    return class_names, files


def folder_info(dataset: str) -> DatasetInfo:
    class_names, files = _folder_index(dataset)
    return DatasetInfo(
        name=dataset,
        num_classes=len(class_names),
        split_sizes={s: len(v) for s, v in files.items()},
        # Folders may mix sizes; images are decoded to RGB.
        image_shape=(None, None, 3),
        class_names=tuple(class_names),
    )


def folder_source(dataset: str, split: str) -> ArraySource:
    """The files of one split; decoded on use (the OS page cache keeps them)."""
    _, files = _folder_index(dataset)
    if split not in files:
        raise DatasetNotAvailableError(
            f'Split {split!r} not found in {dataset!r}; available: {sorted(files)}.'
        )
    paths, labels = zip(*files[split], strict=True)
    return ArraySource(
        kind='files', data=np.array(paths), labels=np.array(labels, dtype=np.int32)
    )


def dataset_info(dataset: str, data_dir: str | None = None, download: bool = False) -> DatasetInfo:
    if is_folder(dataset):
        return folder_info(dataset)
    builder = get_builder(dataset, data_dir, download)
    return tfds_info(dataset, builder)

