"""Train and eval iterators with exactly reproducible batches.

Random access (every source but TFRecord-only tfds splits)
    Examples are read by index: from host memory (small tfds splits), from
    image files (`folder:`), or from ArrayRecord files through tfds' random-access
    `data_source` (large tfds splits, e.g. imagenet2012 train). The example order
    is one stream over epochs: epoch e is `np.random.default_rng([seed, e])
    .permutation(N)`. Global batch s is stream positions [s*B, (s+1)*B) and
    process p of P takes rows [p*B/P, (p+1)*B/P). An example's augmentation seed
    is (seed, s*B + row). So batch s is a pure function of (dataset, split, seed,
    s, B): it does not depend on the number of processes, on start_step or on
    what was consumed before; starting at step s costs what starting at step 0
    costs, and a resumed run sees exactly the batches an uninterrupted one would.
    The iterator's position is therefore the step: the trainer's checkpoint
    holds it and `create_train_iterator(start_step=step)` restores it, so no
    separate iterator state is saved.

    Per step, one Python call looks up the batch's indices and fetches its
    encoded images, paths or arrays; decoding and augmentation run in tf.data's
    parallel map (TensorFlow kernels on C++ threads, without the GIL), then
    batching and prefetching. A JPEG's random-resized crop decodes only its
    window (`preprocess.decode_and_crop`).

    Why tf.data and not Grain, which tfds' `data_source` is usually paired
    with: the order above is ours whatever reads the records, and the per-example
    work is TensorFlow ops, which tf.data runs in parallel threads in one process
    while Grain runs per-example Python (threads that share the GIL, or worker
    processes that each need their own TensorFlow). Grain's checkpointable
    iterator state would hold what the step already determines.

Streaming (tfds splits stored only as TFRecord, too large for memory)
    TFRecord files cannot be read by index. Such a split is read as before,
    with a warning naming the one command that converts it (`convert.py`, or
    `tfds build --file_format=array_record`): each process reads its own subset
    of the files (tfds' InputContext), files and a `shuffle_buffer` of encoded
    records are shuffled with tf.data's seeded per-epoch reshuffling (epochs
    stay whole), images are decoded after shuffling, and a run resumed at step s
    skips s * local_batch records (read, not decoded). The order is then a
    function of (seed, step, process_count).

Undecodable images (any source)
    An image that cannot be decoded (empty, truncated, not an image, unreadable)
    never stops the iterator. It is replaced in its batch by a substitute: an
    all-zero image, label 0, zero extras, and `'valid'` 0.0 (1.0 for every
    decoded example); in eval also `'mask'` 0.0. The substitute sits where the
    example would have been, so the batch stays a pure function of (seed, step).
    Each bad example is logged once per process (absl warning) with its file path
    or dataset index and the decoder's reason. `checks.check_dataset` finds bad
    files of a `folder:` split up front. Mechanism: examples carry their stream
    position through the map; `ignore_errors` drops the ones whose decoding
    failed and a scan puts substitutes back at the missing positions.

mixup / CutMix (`config.data.mixup_alpha`, `cutmix_alpha`)
    Row i of global batch s is mixed with row B-1-i, with lam and the CutMix box
    drawn from (seed, s). Process p's partners are the rows of process P-1-p,
    which it preprocesses itself (their augmentation seeds are their stream
    positions), so the mixed batch is still a pure function of (seed, s) and
    slices concatenate to the single-process batch. That costs twice the
    per-example work on processes other than the middle one. The streaming path
    mixes each process's batch with itself reversed. A mixed row is valid only
    when both of its images were decoded.
"""

import itertools
import math
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from flaxnets_errors import ConfigError
from input_pipeline import augment, checks, preprocess, sources

# Marks each example's own decode status in mixed batches (the partner's status is
# folded into 'valid'); the iterator reads it to log bad examples and drops it.
_DECODED = '_decoded'


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


def _element_signature(source, eval_mode: bool) -> dict:
    if source.kind == 'array':
        x = tf.TensorSpec((None, *source.data.shape[1:]), tf.uint8)
    else:
        x = tf.TensorSpec((None,), tf.string)
    signature = {
        'x': x,
        'label': tf.TensorSpec((None,), tf.int32),
        'pos': tf.TensorSpec((None,), tf.int64),
    }
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


class _ProducerErrors:
    """Carries an exception out of a `from_generator` producer.

    The map after the producer ignores errors (a failed decode becomes a
    substitute), which would also swallow an exception of the producer itself
    and end the stream quietly. The producer therefore catches its exception and
    ends; the consuming iterator re-raises it.
    """

    def __init__(self):
        self.error: BaseException | None = None

    def guard(self, generate: Callable[[], Iterator]) -> Callable[[], Iterator]:
        def guarded():
            try:
                yield from generate()
            except Exception as e:  # noqa: BLE001  (re-raised by the consumer)
                self.error = e

        return guarded

    def check(self) -> None:
        if self.error is not None:
            raise self.error


def _fill_gaps(ds: tf.data.Dataset) -> tf.data.Dataset:
    """Puts a substitute (zeros, 'valid' 0) at every stream position `ds` lacks.

    Elements carry 'pos', their position in this process's stream (0, 1, 2, ...);
    the ones whose map failed were dropped by `ignore_errors`.
    """
    spec = ds.element_spec

    def with_substitutes(expected, element):
        pos = element['pos']
        gap = pos - expected
        out = {}
        for key, s in spec.items():
            if key == 'pos':
                out[key] = tf.concat([tf.range(expected, pos), pos[None]], 0)
            else:
                shape = tf.concat([[gap], np.array(s.shape.as_list(), np.int64)], 0)
                out[key] = tf.concat([tf.zeros(shape, s.dtype), element[key][None]], 0)
        return out

    def fill(expected, element):
        # The common case (nothing missing) avoids copying the image into a concat.
        out = tf.cond(
            tf.equal(element['pos'], expected),
            lambda: {k: v[None] for k, v in element.items()},
            lambda: with_substitutes(expected, element),
        )
        return element['pos'] + 1, out

    return ds.scan(tf.constant(0, tf.int64), fill).unbatch()


def _decode_map(
    ds: tf.data.Dataset, fn, data_config, *, source_kind: str, parse=None, padding=None
) -> tf.data.Dataset:
    """Parallel per-example map with substitutes for undecodable examples.

    Args:
        ds: elements with 'x', 'label', 'pos' (and 'seed' or 'mask', extras).
        fn: `preprocess.make_preprocess_fn`'s function.
        source_kind: 'array' examples are decoded already and cannot fail.
        parse: graph fn applied first (ArrayRecord records -> image bytes, label).
        padding: (start, stop): eval padding rows for stream positions [start, stop)
            after the real examples: zeros, 'mask' 0, 'valid' 1.
    """

    def fn_valid(element):
        if parse is not None:
            element = parse(element)
        out = fn(element)
        out['valid'] = tf.constant(1.0)
        return out

    ds = ds.map(fn_valid, num_parallel_calls=_num_parallel_calls(data_config))
    if padding is not None:
        spec = ds.element_spec

        def pad(pos):
            out = {k: tf.zeros(s.shape, s.dtype) for k, s in spec.items()}
            return {**out, 'valid': tf.constant(1.0), 'pos': pos}

        # One extra row past the end makes the gap filler see examples dropped at
        # the very end of the stream; `take` removes it.
        start, stop = padding
        ds = ds.concatenate(tf.data.Dataset.range(start, stop + 1).map(pad))
    if source_kind != 'array':
        ds = _fill_gaps(ds.ignore_errors())
    if padding is not None:
        ds = ds.take(padding[1])
    return ds.map(lambda e: {k: v for k, v in e.items() if k != 'pos'})


def _finish(ds: tf.data.Dataset, data_config) -> tf.data.Dataset:
    ds = ds.prefetch(data_config.prefetch)
    return ds.with_options(sources.deterministic_options())


def _iterate(ds, errors: _ProducerErrors, on_bad: Callable[[int, int], None], *, endless: bool):
    """The numpy batches of `ds`; logs the bad examples they mark, re-raises producer errors.

    Args:
        on_bad: fn(batch number, row) for each row whose own example failed to decode.
        endless: a train stream; its end is an error.
    """
    for k, batch in enumerate(ds.as_numpy_iterator()):
        own = batch.pop(_DECODED, batch['valid'])
        if own.min(initial=1.0) < 1.0:
            for row in np.flatnonzero(own < 1.0):
                on_bad(k, int(row))
        yield batch
    errors.check()
    if endless:
        raise RuntimeError('The training input pipeline ended unexpectedly; see the log above.')


def _explain(source, i: int, what: str, channels: int) -> None:
    """Logs (once) why example `i` of `source` could not be decoded."""
    try:
        contents = source.encoded(i)
        reason = None if contents is None else preprocess.decode_problem(contents, channels)
    except Exception as e:  # noqa: BLE001  (any failure to read is the reason)
        reason = f'cannot be read ({type(e).__name__}: {e})'
    if reason is None:
        reason = ('failed in the pipeline but decodes when retried alone (a failed read, '
                  'or an error in preprocessing)')
    checks.log_bad_example(what, reason)


def _describe(source, dataset: str, split: str, i: int) -> str:
    what = source.describe(i)
    return what if source.kind == 'files' else f'{dataset} {split} {what}'


def _random_access_train(
    source,
    data_config,
    fn,
    *,
    dataset,
    split,
    channels,
    seed,
    start_step,
    global_batch,
    index,
    local_batch,
    mix_stage=None,
    partner=None,
):
    order = _EpochOrder(len(source), seed)
    offsets = np.arange(local_batch, dtype=np.int64)
    rows = index * local_batch + offsets
    if mix_stage is not None and partner != index:
        # The partner process's rows follow ours; `mix_stage` pairs them up.
        rows = np.concatenate([rows, partner * local_batch + offsets])
    per_step = np.arange(len(rows), dtype=np.int64)
    errors = _ProducerErrors()

    def generate():
        for k, step in enumerate(itertools.count(start_step)):
            positions = step * global_batch + rows
            idx = order.indices(positions)
            yield {
                **source.fetch(idx),
                'seed': np.stack([np.full_like(positions, seed), positions], axis=1),
                'pos': k * len(rows) + per_step,
            }

    ds = tf.data.Dataset.from_generator(
        errors.guard(generate), output_signature=_element_signature(source, eval_mode=False)
    )
    ds = _decode_map(
        ds.unbatch(), fn, data_config, source_kind=source.kind, parse=getattr(source, 'parse', None)
    )
    ds = ds.batch(len(rows), drop_remainder=True)
    if mix_stage is not None:
        ds = mix_stage(ds)

    def on_bad(k, row):
        i = int(order.indices(np.array([(start_step + k) * global_batch + rows[row]]))[0])
        _explain(source, i, _describe(source, dataset, split, i), channels)

    return _iterate(_finish(ds, data_config), errors, on_bad, endless=True)


def _mix_stage(mixer, *, seed, start_step, local_batch, mean, std, channels, data_config):
    """Returns ds -> ds that mixes each (unnormalised) batch, then normalises it.

    A batch holds this process's `local_batch` rows, optionally followed by
    its partner process's rows; local row j pairs with the last block's row
    local_batch-1-j, which is global row B-1-i for global row i.
    """

    def mix(step, batch):
        images, labels, valid = batch['image'], batch['label'], batch['valid']
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
            'valid': valid[:local_batch] * tf.reverse(valid[-local_batch:], [0]),
            _DECODED: valid[:local_batch],
        }

    def stage(ds):
        ds = ds.enumerate(start=start_step)
        return ds.map(mix, num_parallel_calls=_num_parallel_calls(data_config))

    return stage


def _with_seeds(ds, *, seed, start_step, global_batch, index, local_batch):
    """Attaches each element's stateless seed (seed, global stream position) and 'pos'."""
    ds = ds.enumerate(start=start_step * local_batch)

    def add_seed(i, element):
        step, row = i // local_batch, index * local_batch + i % local_batch
        position = step * global_batch + row
        return {
            **element,
            'seed': tf.stack([tf.constant(seed, tf.int64), position]),
            'pos': i - start_step * local_batch,
        }

    return ds.map(add_seed)


def _resolve(data_config, dataset: str, split: str, source=None):
    """Returns ('random_access', ArraySource | RecordSource) or ('streaming', builder)."""
    if source is not None:
        return 'random_access', source
    if sources.is_folder(dataset):
        return 'random_access', sources.folder_source(dataset, split)
    builder = sources.get_builder(dataset, data_config.data_dir, data_config.download)
    sources.check_split(builder, split)
    if sources.use_in_memory(data_config.in_memory, builder, split):
        return 'random_access', sources.load_in_memory(builder, split)
    if sources.has_array_record(builder):
        return 'random_access', sources.RecordSource(builder, split)
    if not sources.tfds_is_mocked():
        logging.warning(
            '%s %s is stored as TFRecord only, so it is streamed: its training order depends '
            'on the number of processes and resuming re-reads the records before the resume '
            'point. For random access (the same batches on any number of processes, resuming '
            'at no cost) add ArrayRecord files once: %s.',
            dataset, split, sources.conversion_hint(builder),
        )
    return 'streaming', builder


def _source_kind(mode: str, data) -> str:
    """The kind `preprocess` sees: records are parsed to encoded bytes first."""
    if mode == 'streaming' or data.kind == 'records':
        return 'encoded'
    return data.kind


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
    source: sources.ArraySource | sources.RecordSource | None = None,
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
        channels), 'label': int32 (b,), 'valid': float32 (b,)} with
        b = global_batch_size // process_count, plus 'targets' (float32
        (b, num_classes) soft labels) when mixup or CutMix is on. 'valid' is 1.0
        for a decoded example and 0.0 for the substitute of an undecodable one
        (zero image, label 0; see the module docstring).

    Raises:
        DatasetNotAvailableError: the dataset is missing (see `get_dataset_info`).
    """
    index, count, local_batch = _process_layout(global_batch_size, process_index, process_count)
    mode, data = _resolve(data_config, dataset, split, source)
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
        kind=_source_kind(mode, data),
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
        return _random_access_train(
            data,
            data_config,
            fn,
            dataset=dataset,
            split=split,
            channels=channels,
            mix_stage=mix_stage,
            partner=count - 1 - index,
            **layout,
        )
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
    ds = _decode_map(_with_seeds(ds, **layout), fn, data_config, source_kind='encoded')
    ds = ds.batch(local_batch, drop_remainder=True)
    if mix_stage is not None:
        ds = mix_stage(ds)

    def on_bad(k, row):
        checks.log_bad_example(
            f'{dataset} {split} record at row {row} of step {start_step + k} on process {index} '
            '(streamed from TFRecord, so its index is unknown)',
            'could not be decoded',
        )

    return _iterate(_finish(ds, data_config), _ProducerErrors(), on_bad, endless=True)


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
    source: sources.ArraySource | sources.RecordSource | None = None,
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
        {'image', 'label', 'mask', 'valid'}: 'mask' is float32 1 for an example to
        score, 0 for padding and for an undecodable example; 'valid' is float32 0
        exactly for an undecodable example (its substitute: zero image, label 0)
        and 1 otherwise, padding included, so the skipped examples of a pass are
        sum(1 - valid). num_examples is the split's size (sum over all processes
        of mask + (1 - valid)).
    """
    index, count, local_batch = _process_layout(global_batch_size, process_index, process_count)
    mode, data = _resolve(data_config, dataset, split, source)
    fn = preprocess.make_preprocess_fn(
        data_config,
        train=False,
        kind=_source_kind(mode, data),
        image_size=image_size,
        channels=channels,
        mean=mean,
        std=std,
    )
    errors = _ProducerErrors()
    if mode == 'random_access':
        num_examples = len(data)
        num_batches = math.ceil(num_examples / global_batch_size)
        rows = index * local_batch + np.arange(local_batch, dtype=np.int64)
        # This process's real examples, in the order its rows take them.
        positions = (np.arange(num_batches, dtype=np.int64)[:, None] * global_batch_size + rows)
        positions = positions[positions < num_examples]

        def generate():
            for lo in range(0, len(positions), local_batch):
                idx = positions[lo : lo + local_batch]
                yield {
                    **data.fetch(idx),
                    'mask': np.ones(len(idx), np.float32),
                    'pos': np.arange(lo, lo + len(idx), dtype=np.int64),
                }

        ds = tf.data.Dataset.from_generator(
            errors.guard(generate), output_signature=_element_signature(data, eval_mode=True)
        ).unbatch()
        num_real, parse = len(positions), getattr(data, 'parse', None)

        def on_bad(k, row):
            i = int(positions[k * local_batch + row])
            _explain(data, i, _describe(data, dataset, split, i), channels)

    else:
        num_examples = sources.split_size(data, split)
        subsplit = split if count == 1 else tfds.even_splits(split, n=count)[index]
        ds = sources.streaming_dataset(
            data, subsplit, shuffle_files=False, seed=None, input_context=None
        )
        num_real = sources.split_size(data, subsplit)
        if num_real is None:  # Mock data: sizes are not recorded anywhere.
            num_real = sources.count_examples(ds)
        if num_examples is None:
            num_examples = num_real * count
        # even_splits sizes differ by at most one, so ceil(N / P) bounds them all.
        num_batches = math.ceil(math.ceil(num_examples / count) / local_batch)
        ds = ds.enumerate().map(lambda i, e: {**e, 'mask': tf.constant(1.0), 'pos': i})
        parse = None

        def on_bad(k, row):
            checks.log_bad_example(
                f'{dataset} {subsplit} example {k * local_batch + row}', 'could not be decoded'
            )

    kind = data.kind if mode == 'random_access' else 'encoded'
    ds = _decode_map(
        ds, fn, data_config, source_kind=kind, parse=parse,
        padding=(num_real, num_batches * local_batch),
    )
    out = _finish(ds.batch(local_batch), data_config)

    def start_pass():
        errors.error = None
        return _iterate(out, errors, on_bad, endless=False)

    return start_pass, num_examples
