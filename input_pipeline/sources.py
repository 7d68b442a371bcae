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


def _merge_extras(extras, indices, new_extras) -> dict[str, np.ndarray]:
    merged = {k: v[indices] for k, v in extras.items()}
    for k, v in (new_extras or {}).items():
        if len(v) != len(indices):
            raise ValueError(f'extras[{k!r}] has {len(v)} rows for {len(indices)} indices.')
        merged[k] = np.asarray(v)
    return merged


@dataclasses.dataclass(frozen=True)
class ArraySource:
    """A split whose examples can be fetched by index.

    Attributes:
        kind: 'array' (`data` is uint8 (N, H, W, C)), 'encoded' (`data` holds
            the encoded image bytes, object array (N,)) or 'files' (`data` holds
            image file paths, str array (N,)).
        data: see `kind`.
        labels: int32 (N,).
        extras: per-example arrays that travel into the batches (e.g. 'targets').
        ids: each example's index in the split it was loaded from (kept by
            `select`, so a log line can name the example); None means 0..N-1.
    """

    kind: str
    data: np.ndarray
    labels: np.ndarray
    extras: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    ids: np.ndarray | None = None

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
        ids = indices if self.ids is None else self.ids[indices]
        return ArraySource(
            self.kind,
            self.data[indices],
            self.labels[indices],
            _merge_extras(self.extras, indices, extras),
            ids,
        )

    def fetch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """{'x', 'label', **extras} of the examples at `indices`."""
        return {
            'x': self.data[indices],
            'label': self.labels[indices],
            **{k: v[indices] for k, v in self.extras.items()},
        }

    def describe(self, i: int) -> str:
        """Names example `i` for a log line: its file, or its index in the split."""
        if self.kind == 'files':
            return str(self.data[i])
        return f'example {int(i if self.ids is None else self.ids[i])}'

    def encoded(self, i: int) -> bytes | None:
        """The encoded bytes of example `i` (None for decoded arrays).

        Raises:
            OSError: the file cannot be read.
        """
        if self.kind == 'files':
            with open(self.data[i], 'rb') as f:
                return f.read()
        if self.kind == 'encoded':
            return bytes(self.data[i])
        return None


class RecordSource:
    """A tfds split stored as ArrayRecord, read by index (`tfds` random-access source).

    Records are fetched as serialized `tf.train.Example`s (fast: no per-record
    Python deserialisation) and parsed inside the tf.data map, in parallel, by
    `parse`. Label lookups read the records, so `labels` (needed only for
    per-class subsets) reads the whole split once and keeps it.
    """

    kind = 'records'

    def __init__(self, builder, split: str, *, reader=None, indices=None, extras=None):
        self._builder = builder
        self._split = split
        if reader is None:
            if not has_array_record(builder):
                raise ValueError(f'{builder.name} has no ArrayRecord files.')
            reader = builder.as_data_source(
                split=split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES
            )
        self._reader = reader
        self._indices = None if indices is None else np.asarray(indices, np.int64)
        self.extras: dict[str, np.ndarray] = dict(extras or {})
        self._labels: np.ndarray | None = None
        self._features = builder.info.features

    def __len__(self) -> int:
        return len(self._reader) if self._indices is None else len(self._indices)

    def _ids(self, indices) -> np.ndarray:
        indices = np.asarray(indices, np.int64)
        return indices if self._indices is None else self._indices[indices]

    def fetch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        records = self._reader.__getitems__(self._ids(indices).tolist())
        return {
            'x': np.array(records, dtype=object),
            # Replaced by the record's own label in `parse`.
            'label': np.zeros(len(records), np.int32),
            **{k: v[indices] for k, v in self.extras.items()},
        }

    def parse(self, element: dict) -> dict:
        """Graph function: element with a serialized example -> its image bytes and label."""
        example = self._features.deserialize_example(
            element['x'], decoders={'image': tfds.decode.SkipDecoding()}
        )
        return {**element, 'x': example['image'], 'label': tf.cast(example['label'], tf.int32)}

    def _parse_all(self, records) -> tuple[np.ndarray, np.ndarray]:
        ds = tf.data.Dataset.from_tensor_slices(np.array(records, dtype=object))
        ds = ds.map(lambda r: self.parse({'x': r}), num_parallel_calls=tf.data.AUTOTUNE)
        out = next(iter(ds.batch(len(records)).as_numpy_iterator()))
        return out['x'], out['label']

    @property
    def labels(self) -> np.ndarray:
        if self._labels is None:
            n, chunk, labels = len(self), 8192, []
            for lo in range(0, n, chunk):
                ids = self._ids(np.arange(lo, min(n, lo + chunk)))
                labels.append(self._parse_all(self._reader.__getitems__(ids.tolist()))[1])
            self._labels = np.concatenate(labels).astype(np.int32) if labels else np.zeros(0, np.int32)
        return self._labels

    def select(self, indices, extras: dict[str, np.ndarray] | None = None) -> 'RecordSource':
        """As `ArraySource.select`."""
        indices = np.asarray(indices, dtype=np.int64)
        return RecordSource(
            self._builder,
            self._split,
            reader=self._reader,
            indices=self._ids(indices),
            extras=_merge_extras(self.extras, indices, extras),
        )

    def describe(self, i: int) -> str:
        return f'example {int(self._ids([i])[0])}'

    def encoded(self, i: int) -> bytes:
        return bytes(self._parse_all(self._reader.__getitems__(self._ids([i]).tolist()))[0][0])


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


def has_array_record(builder: tfds.core.DatasetBuilder) -> bool:
    """True when the prepared split files include ArrayRecord ones (random access).

    Also makes them usable: tfds 4.9 restores a prepared dataset's alternative file
    formats (`convert.py` registers ArrayRecord as one) into the info proto only, not
    into the list `as_data_source` consults, so they are registered here.
    """
    if tfds_is_mocked():
        return False
    info = builder.info
    fmt = tfds.core.FileFormat.ARRAY_RECORD
    if fmt in info.available_file_formats():
        return True
    if fmt.value in info.as_proto.alternative_file_formats:
        info.alternative_file_formats.append(fmt)
        return True
    return False


def conversion_hint(builder: tfds.core.DatasetBuilder) -> str:
    """The commands that add ArrayRecord files to a prepared TFRecord dataset."""
    root = os.fspath(builder.data_dir_root)
    return (
        f'python -m input_pipeline.convert {builder.name} --data_dir {root} '
        f'(writes ArrayRecord copies next to the TFRecord files), or prepare it anew with '
        f'tfds build {builder.name} --data_dir {root} --file_format=array_record'
    )


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


_FOLDER_CACHE: dict[str, tuple[tuple, tuple]] = {}


def _folder_signature(root: str) -> tuple:
    """Modification times of root, its split folders and their class folders.

    Adding or removing a file changes its folder's mtime, so an unchanged signature
    means an unchanged listing (a stat per folder instead of a listing of every file).
    """
    stamps = [os.stat(root).st_mtime_ns]
    for split in _subdirs(root):
        split_dir = os.path.join(root, split)
        stamps.append((split, os.stat(split_dir).st_mtime_ns))
        for c in _subdirs(split_dir):
            stamps.append((split, c, os.stat(os.path.join(split_dir, c)).st_mtime_ns))
    return tuple(stamps)


def _folder_index(dataset: str) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """Returns (sorted class names, {split: [(path, label), ...]}), cached per process."""
    root = _folder_root(dataset)
    signature = _folder_signature(root)
    with _CACHE_LOCK:
        cached = _FOLDER_CACHE.get(root)
    if cached is not None and cached[0] == signature:
        return cached[1]
    splits = _subdirs(root)
    # Labels must mean the same in every split, so classes are the sorted union.
    class_names = sorted({c for s in splits for c in _subdirs(os.path.join(root, s))})
    index = {c: i for i, c in enumerate(class_names)}
    files = {}
    for s in splits:
        items = []
        for c in _subdirs(os.path.join(root, s)):
            class_dir = os.path.join(root, s, c)
            names = sorted(
                e.name
                for e in os.scandir(class_dir)
                if e.name.lower().endswith(IMAGE_EXTENSIONS) and not e.is_dir()
            )
            items.extend((os.path.join(class_dir, name), index[c]) for name in names)
        if items:
            files[s] = items
    if not files:
        raise DatasetNotAvailableError(
            f'No images found under {root!r}: expected root/<split>/<class_name>/'
            f'<image> with extensions {", ".join(IMAGE_EXTENSIONS)}.'
        )
    with _CACHE_LOCK:
        _FOLDER_CACHE[root] = (signature, (class_names, files))
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

