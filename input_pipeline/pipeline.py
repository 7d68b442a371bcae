"""Train and eval iterators with exactly reproducible batches.

Random-access path (splits held in memory, small image folders)
    The example order is one stream over epochs: epoch e is
    `np.random.default_rng([seed, e]).permutation(N)`. Global batch s is stream
    positions [s*B, (s+1)*B) and process p of P takes rows [p*B/P, (p+1)*B/P).
    An example's augmentation seed is (seed, s*B + row). So batch s is a pure
    function of (dataset, split, seed, s, B): it does not depend on the number of
    processes, on start_step or on what was consumed before, and a resumed run
    sees exactly the batches an uninterrupted one would.

Streaming path (splits too large for memory, e.g. imagenet2012 train)
    Each process reads its own subset of the tfds files (tfds' InputContext),
    files and a `shuffle_buffer` of encoded records are shuffled with tf.data's
    seeded, per-epoch reshuffling (epochs stay whole), images are decoded after shuffling and a run
    resumed at step s skips s * local_batch records (read but not decoded). The
    order is then a function of (seed, step, process_count): resuming with the
    same number of processes reproduces the batches, changing it does not.
    Augmentation seeds are derived as above.

mixup / CutMix (`config.data.mixup_alpha`, `cutmix_alpha`)
    Row i of global batch s is mixed with row B-1-i, with lam and the CutMix box
    drawn from (seed, s). Process p's partners are the rows of process P-1-p,
    which it preprocesses itself (their augmentation seeds are their stream
    positions), so the mixed batch is still a pure function of (seed, s) and
    slices concatenate to the single-process batch. That costs twice the
    per-example work on processes other than the middle one. The streaming path
    mixes each process's batch with itself reversed.
"""

import itertools
import math
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from flaxnets_errors import ConfigError
from input_pipeline import augment, preprocess, sources


def _process_layout(global_batch_size, process_index, process_count) -> tuple[int, int, int]:
    if process_index is None or process_count is None:
        import jax  # Deferred: only multi-host callers rely on the default.

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
        raise ConfigError(
            f'global_batch_size {global_batch_size} is not divisible by the '
            f'{process_count} processes.'
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f'process_index {process_index} not in [0, {process_count}).')
    return process_index, process_count, global_batch_size // process_count


def _num_parallel_calls(data_config) -> int:
    n = data_config.num_parallel_calls
    return tf.data.AUTOTUNE if n is None or n < 0 else n


def _finish(
    ds: tf.data.Dataset, data_config, fn, local_batch: int, batch_stage=None
) -> tf.data.Dataset:
    ds = ds.map(fn, num_parallel_calls=_num_parallel_calls(data_config))
    ds = ds.batch(local_batch, drop_remainder=True)
    if batch_stage is not None:
        ds = batch_stage(ds)
    ds = ds.prefetch(data_config.prefetch)
    return ds.with_options(sources.deterministic_options())


def _element_signature(source: sources.ArraySource, eval_mode: bool) -> dict:
    if source.kind == 'array':
        x = tf.TensorSpec((None, *source.data.shape[1:]), tf.uint8)
    else:
        x = tf.TensorSpec((None,), tf.string)
    signature = {'x': x, 'label': tf.TensorSpec((None,), tf.int32)}
    for key, value in source.extras.items():
        signature[key] = tf.TensorSpec((None, *value.shape[1:]), tf.as_dtype(value.dtype))
    if eval_mode:
        signature['mask'] = tf.TensorSpec((None,), tf.float32)
    else:
        signature['seed'] = tf.TensorSpec((None, 2), tf.int64)
    return signature


class _EpochOrder:
    """Maps stream positions to example indices; epoch e is permuted by [seed, e]."""

    def __init__(self, n: int, seed: int):
        self._n = n
        self._seed = seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            # Earlier epochs are never needed again by a forward-moving stream.
            self._perms = {e: p for e, p in self._perms.items() if e > epoch - 2}
            rng = np.random.default_rng([self._seed, epoch])
            self._perms[epoch] = rng.permutation(self._n)
        return self._perms[epoch]

    def indices(self, positions: np.ndarray) -> np.ndarray:
        epochs, offsets = np.divmod(positions, self._n)
        out = np.empty(positions.shape, np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._perm(int(e))[offsets[sel]]
        return out


def _random_access_train(
    source,
    data_config,
    fn,
    *,
    seed,
    start_step,
    global_batch,
    index,
    local_batch,
    mix_stage=None,
    partner=None,
) -> tf.data.Dataset:
    order = _EpochOrder(len(source), seed)
    offsets = np.arange(local_batch, dtype=np.int64)
    rows = index * local_batch + offsets
    if mix_stage is not None and partner != index:
        # The partner process's rows follow ours; `mix_stage` pairs them up.
        rows = np.concatenate([rows, partner * local_batch + offsets])

    def generate():
        for step in itertools.count(start_step):
            positions = step * global_batch + rows
            idx = order.indices(positions)
            yield {
                'x': source.data[idx],
                'label': source.labels[idx],
                'seed': np.stack([np.full_like(positions, seed), positions], axis=1),
                **{k: v[idx] for k, v in source.extras.items()},
            }

    ds = tf.data.Dataset.from_generator(
        generate, output_signature=_element_signature(source, eval_mode=False)
    )
    return _finish(ds.unbatch(), data_config, fn, len(rows), mix_stage)


def _mix_stage(mixer, *, seed, start_step, local_batch, mean, std, channels, data_config):
    """Returns ds -> ds that mixes each (unnormalised) batch, then normalises it.

    A batch holds this process's `local_batch` rows, optionally followed by
    its partner process's rows; local row j pairs with the last block's row
    local_batch-1-j, which is global row B-1-i for global row i.
    """

    def mix(step, batch):
        images, labels = batch['image'], batch['label']
        own_images, own_labels = images[:local_batch], labels[:local_batch]
        images, targets = mixer(
            own_images,
            own_labels,
            tf.reverse(images[-local_batch:], [0]),
            tf.reverse(labels[-local_batch:], [0]),
            augment.batch_seed(seed, step),
        )
        return {
            'image': preprocess.normalize(images, mean, std, channels),
            'label': own_labels,
            'targets': targets,
        }

    def stage(ds):
        ds = ds.enumerate(start=start_step)
        return ds.map(mix, num_parallel_calls=_num_parallel_calls(data_config))

    return stage


def _with_seeds(ds, *, seed, start_step, global_batch, index, local_batch):
    """Attaches each element's stateless seed (seed, global stream position)."""
    ds = ds.enumerate(start=start_step * local_batch)

    def add_seed(i, element):
        step, row = i // local_batch, index * local_batch + i % local_batch
        position = step * global_batch + row
        return {**element, 'seed': tf.stack([tf.constant(seed, tf.int64), position])}

    return ds.map(add_seed)


def _resolve(data_config, dataset: str, split: str, source=None):
    """Returns ('random_access', ArraySource) or ('streaming', builder)."""
    if source is not None:
        return 'random_access', source
    if sources.is_folder(dataset):
        return 'random_access', sources.folder_source(dataset, split)
    builder = sources.get_builder(dataset, data_config.data_dir, data_config.download)
    sources.check_split(builder, split)
    if sources.use_in_memory(data_config.in_memory, builder, split):
        return 'random_access', sources.load_in_memory(builder, split)
    return 'streaming', builder


def create_train_iterator(
    data_config,
    *,
    dataset: str,
    split: str,
    global_batch_size: int,
    seed: int,
    start_step: int,
    image_size: int,
    channels: int,
    mean,
    std,
    process_index: int | None = None,
    process_count: int | None = None,
    num_classes: int | None = None,
    source: sources.ArraySource | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Yields this process's part of global batches start_step, start_step + 1, ...

    Args:
        data_config: `config.data` (see `default_data_config`).
        dataset: tfds name (`'mnist5k'`, `'cifar10'`, `'imagenet2012'`) or
            `'folder:/root'` for root/<split>/<class>/<image>.
        split: split name, tfds slicing allowed (`'train[:90%]'`).
        global_batch_size: examples per step over all processes.
        seed: data seed (order and augmentation).
        start_step: first step to produce (resume point).
        image_size: output height and width.
        channels: output channels, 1 or 3 (converted as needed).
        mean: per-channel (or scalar) mean in [0, 1] pixel units.
        std: per-channel (or scalar) std in [0, 1] pixel units.
        process_index: this process; default `jax.process_index()`.
        process_count: number of processes; default `jax.process_count()`.
        num_classes: width of the mixup / CutMix targets; default the
            dataset's number of classes. Unused without mixing.
        source: examples to draw from instead of `dataset`/`split` (a subset
            or a pseudo-labeled selection, see `load_source` and
            `ArraySource.select`); `dataset`/`split` then only name it. Its
            `extras` (e.g. 'targets') appear in the batches.

    Returns:
        An endless iterator of {'image': float32 (b, image_size, image_size,
        channels), 'label': int32 (b,)} with b = global_batch_size // process_count,
        plus 'targets' (float32 (b, num_classes) soft labels) when mixup or
        CutMix is on.

    Raises:
        DatasetNotAvailableError: the dataset is missing (see `get_dataset_info`).
    """
    index, count, local_batch = _process_layout(global_batch_size, process_index, process_count)
    mode, data = _resolve(data_config, dataset, split, source)
    kind = data.kind if mode == 'random_access' else 'encoded'
    if mode == 'random_access' and data.extras and augment.mixing_enabled(data_config):
        raise ConfigError(
            'mixup/CutMix on a source with its own soft targets (pseudo-labels) is not '
            'supported; set config.data.mixup_alpha and cutmix_alpha to 0 for it.'
        )
    mix_stage = None
    if augment.mixing_enabled(data_config):
        if num_classes is None:
            num_classes = sources.dataset_info(
                dataset, data_config.data_dir, data_config.download
            ).num_classes
        mix_stage = _mix_stage(
            augment.batch_mixer(data_config, num_classes),
            seed=seed,
            start_step=start_step,
            local_batch=local_batch,
            mean=mean,
            std=std,
            channels=channels,
            data_config=data_config,
        )
    fn = preprocess.make_preprocess_fn(
        data_config,
        train=True,
        kind=kind,
        image_size=image_size,
        channels=channels,
        mean=mean,
        std=std,
        normalize_images=mix_stage is None,
    )
    layout = dict(
        seed=seed,
        start_step=start_step,
        global_batch=global_batch_size,
        index=index,
        local_batch=local_batch,
    )
    if mode == 'random_access':
        partner = count - 1 - index
        ds = _random_access_train(
            data, data_config, fn, mix_stage=mix_stage, partner=partner, **layout
        )
    else:
        ds = sources.streaming_dataset(
            data,
            split,
            shuffle_files=True,
            seed=seed,
            input_context=tf.distribute.InputContext(count, index, local_batch),
        )
        # Shuffling before repeating keeps epochs whole (every record once per
        # epoch; tf.data reshuffles each epoch from the seed) and never buffers
        # more records than the split has, which matters for tiny mock splits.
        ds = ds.shuffle(data_config.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
        ds = ds.repeat()
        ds = ds.skip(start_step * local_batch)
        ds = _finish(_with_seeds(ds, **layout), data_config, fn, local_batch, mix_stage)
    return ds.as_numpy_iterator()


def create_eval_iterator(
    data_config,
    *,
    dataset: str,
    split: str,
    global_batch_size: int,
    image_size: int,
    channels: int,
    mean,
    std,
    process_index: int | None = None,
    process_count: int | None = None,
    source: sources.ArraySource | None = None,
) -> tuple[Callable[[], Iterator[dict[str, np.ndarray]]], int]:
    """One pass over a split, every example exactly once, padded to full batches.

    Random-access path: global batch j holds examples [j*B, (j+1)*B) in the
    split's order, process p its rows [p*B/P, (p+1)*B/P). Streaming path: process
    p reads `tfds.even_splits(split, P)[p]`. Either way every process yields the
    same number of batches; rows beyond the data have mask 0 and zero image and
    label.

    Args: as `create_train_iterator`, without seed and start_step.

    Returns:
        (start_pass, num_examples): `start_pass()` returns a fresh iterator of
        {'image', 'label', 'mask' (float32 1 real / 0 padding)}; num_examples is
        the split's size (sum of all masks over all processes).
    """
    index, count, local_batch = _process_layout(global_batch_size, process_index, process_count)
    mode, data = _resolve(data_config, dataset, split, source)
    kind = data.kind if mode == 'random_access' else 'encoded'
    fn = preprocess.make_preprocess_fn(
        data_config,
        train=False,
        kind=kind,
        image_size=image_size,
        channels=channels,
        mean=mean,
        std=std,
    )
    if mode == 'random_access':
        num_examples = len(data)
        num_batches = math.ceil(num_examples / global_batch_size)
        rows = index * local_batch + np.arange(local_batch, dtype=np.int64)

        def generate():
            for j in range(num_batches):
                positions = j * global_batch_size + rows
                real = positions < num_examples
                idx = np.where(real, positions, 0)
                yield {
                    'x': data.data[idx],
                    'label': data.labels[idx],
                    'mask': real.astype(np.float32),
                    **{k: v[idx] for k, v in data.extras.items()},
                }

        ds = tf.data.Dataset.from_generator(
            generate, output_signature=_element_signature(data, eval_mode=True)
        )
        ds = _finish(ds.unbatch(), data_config, fn, local_batch)
    else:
        num_examples = sources.split_size(data, split)
        subsplit = split if count == 1 else tfds.even_splits(split, n=count)[index]
        ds = sources.streaming_dataset(
            data, subsplit, shuffle_files=False, seed=None, input_context=None
        )
        if num_examples is None:  # Mock data: sizes are not recorded anywhere.
            num_examples = sources.count_examples(ds) * count
        ds = ds.map(lambda e: {**e, 'mask': tf.constant(1.0)})
        ds = ds.map(fn, num_parallel_calls=_num_parallel_calls(data_config))
        padding = {
            'image': tf.zeros([image_size, image_size, channels], tf.float32),
            'label': tf.constant(0, tf.int32),
            'mask': tf.constant(0.0),
        }
        # even_splits sizes differ by at most one, so ceil(N / P) bounds them all.
        num_batches = math.ceil(math.ceil(num_examples / count) / local_batch)
        ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat())
        ds = ds.take(num_batches * local_batch).batch(local_batch)
        ds = ds.prefetch(data_config.prefetch).with_options(sources.deterministic_options())

    return ds.as_numpy_iterator, num_examples
