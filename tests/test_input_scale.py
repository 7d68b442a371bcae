"""ImageNet-scale input: random access over ArrayRecord, windowed JPEG decoding, the benchmark."""

import argparse
import hashlib
import io
import itertools
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

import input_pipeline as ip
from input_pipeline import convert, preprocess, sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KW = dict(dataset='digits', global_batch_size=16, seed=7, image_size=8, channels=1, mean=0.5,
          std=0.25)


def _config(data_dir, **overrides):
    config = ip.default_data_config()
    config.data_dir = data_dir
    config.preprocess = 'small'
    config.train_augment = 'random_crop'
    config.crop_padding = 2
    config.num_parallel_calls = 2
    for k, v in overrides.items():
        setattr(config, k, v)
    return config


def _take(iterator, n):
    return list(itertools.islice(iterator, n))


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_tfrecord_streams_with_a_hint_then_converted_reads_by_index(tmp_path, caplog):
    data_dir = str(tmp_path)
    ip.get_dataset_info('digits', data_dir=data_dir)  # Prepared as TFRecord, tfds' default.
    streamed = _config(data_dir, in_memory=False)
    caplog.set_level(logging.WARNING)
    _take(ip.create_train_iterator(streamed, split='train', start_step=0, **KW), 1)
    hint = [r.getMessage() for r in caplog.records if 'TFRecord' in r.getMessage()]
    assert hint and 'python -m input_pipeline.convert digits' in hint[0]
    assert '--file_format=array_record' in hint[0]

    written = convert.convert_to_array_record('digits', data_dir)
    assert len(written) == 2 and all(os.path.exists(p) for p in written)
    assert convert.convert_to_array_record('digits', data_dir) == []  # Idempotent.
    builder = tfds.builder('digits', data_dir=data_dir)
    assert sources.has_array_record(builder)
    source = ip.load_source(streamed, 'digits', 'train')
    assert isinstance(source, ip.RecordSource) and len(source) == 1397
    in_memory = ip.load_source(_config(data_dir), 'digits', 'train')
    np.testing.assert_array_equal(source.labels, in_memory.labels)
    # A selection (labeled subset, pseudo-labelled pool) reads the selected records.
    targets = np.eye(10, dtype=np.float32)[[3, 1, 4]]
    subset = source.select([5, 1, 5], extras={'targets': targets}).select([2, 0])
    np.testing.assert_array_equal(subset.labels, in_memory.labels[[5, 5]])
    np.testing.assert_array_equal(subset.fetch(np.array([1]))['targets'], targets[[0]])
    assert subset.describe(1) == 'example 5'


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
    """`digits` prepared as TFRecord, then given ArrayRecord files by `convert`."""
    data_dir = str(tmp_path_factory.mktemp('tfds_ar'))
    ip.get_dataset_info('digits', data_dir=data_dir)
    convert.convert_to_array_record('digits', data_dir)
    return data_dir


def test_array_record_order_is_the_in_memory_order_on_any_process_count(converted):
    records = _config(converted, in_memory=False, flip=True)
    reference = _take(ip.create_train_iterator(records, split='train', start_step=0, **KW), 5)
    # The same batches as the in-memory path: one order for every source.
    in_memory = _take(ip.create_train_iterator(
        _config(converted, in_memory=True, flip=True), split='train', start_step=0, **KW), 5)
    _assert_batches_equal(reference, in_memory)
    # A fresh iterator at step s gives step s of an uninterrupted one.
    _assert_batches_equal(reference[3:], _take(
        ip.create_train_iterator(records, split='train', start_step=3, **KW), 2))
    # Two processes' local batches concatenate to the one-process global batch.
    halves = [_take(ip.create_train_iterator(
        records, split='train', start_step=2, process_index=p, process_count=2, **KW), 2)
        for p in range(2)]
    joined = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*halves, strict=True)]
    _assert_batches_equal(reference[2:4], joined)
    assert reference[0]['valid'].tolist() == [1.0] * 16


def test_resuming_far_ahead_reads_only_the_batches_it_yields(converted):
    config = _config(converted, in_memory=False, prefetch=1)
    source = ip.load_source(config, 'digits', 'train')
    fetched = []
    original = source.fetch

    def counting_fetch(indices):
        fetched.append(len(indices))
        return original(indices)

    source.fetch = counting_fetch
    kwargs = {**KW, 'global_batch_size': 32}
    batch = _take(ip.create_train_iterator(
        config, split='train', start_step=100_000, source=source, **kwargs), 1)[0]
    assert batch['image'].shape == (32, 8, 8, 1)
    assert sum(fetched) <= 8 * 32  # The batch and a few prefetched ones, not 100,000 steps.
    fresh = _take(ip.create_train_iterator(
        _config(converted, in_memory=True), split='train', start_step=100_000, **kwargs), 1)
    _assert_batches_equal([batch], fresh)


def test_array_record_eval_covers_every_example_once(converted):
    config = _config(converted, in_memory=False)
    kwargs = {k: v for k, v in KW.items() if k != 'seed'}
    kwargs['global_batch_size'] = 96
    images = []
    for p in range(2):
        start_pass, n = ip.create_eval_iterator(
            config, split='test', process_index=p, process_count=2, **kwargs)
        for b in start_pass():
            assert b['valid'].min() == 1.0
            images.append(b['image'][b['mask'] == 1])
    assert n == 400
    seen = np.concatenate(images)
    start_pass, _ = ip.create_eval_iterator(_config(converted), split='test', **kwargs)
    expected = np.concatenate([b['image'][b['mask'] == 1] for b in start_pass()])
    digest = lambda xs: sorted(hashlib.sha1(x.tobytes()).hexdigest() for x in xs)  # noqa: E731
    assert len(seen) == 400 and digest(seen) == digest(expected)


def _encoded(pixels, fmt, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize('fmt', ['JPEG', 'PNG', 'GIF', 'BMP', 'WEBP'])
@pytest.mark.parametrize('channels', [1, 3])
def test_decode_and_crop_matches_decoding_whole_and_slicing(fmt, channels):
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:45, 0:61]
    pixels = np.stack([x * 4, y * 5, (x + y) * 2], -1).astype(np.uint8)
    pixels = np.clip(pixels + rng.integers(0, 20, pixels.shape), 0, 255).astype(np.uint8)
    contents = tf.constant(_encoded(pixels, fmt))
    whole = preprocess.decode_image(contents, channels)
    assert whole.shape == (45, 61, channels) and whole.dtype == tf.uint8
    for begin, size in (([0, 0, 0], [45, 61, -1]), ([7, 13, 0], [20, 31, -1])):
        window = preprocess.decode_and_crop(
            contents, channels, lambda shape, b=begin, s=size: (tf.constant(b), tf.constant(s)))
        expected = tf.slice(whole, begin, size).numpy().astype(int)
        if fmt == 'JPEG':
            # libjpeg upsamples chroma at the window's border from fewer neighbours.
            diff = np.abs(window.numpy().astype(int) - expected)
            assert diff.max() <= 2 and (diff == 0).mean() > 0.9
        else:
            np.testing.assert_array_equal(window, expected)


def test_truncated_jpeg_fails_whatever_its_window():
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    whole = _encoded(pixels, 'JPEG', quality=90)
    truncated = tf.constant(whole[: len(whole) // 2])
    for begin in ([0, 0, 0], [40, 0, 0]):  # Above and below the cut.
        with pytest.raises(tf.errors.InvalidArgumentError):
            preprocess.decode_and_crop(
                truncated, 3, lambda shape, b=begin: (tf.constant(b), tf.constant([8, 8, -1])))
    assert preprocess.decode_problem(whole[: len(whole) // 2]) is not None
    assert preprocess.decode_problem(whole) is None


def test_benchmark_tool_on_a_small_jpeg_tree(tmp_path):
    sys.path.insert(0, ROOT)
    from tools import benchmark_input

    counts = benchmark_input.make_jpeg_tree(str(tmp_path), 24, num_classes=3, max_side=160)
    assert counts['train'] + counts['val'] == 24 and counts['val'] >= 4
    sizes = [Image.open(os.path.join(d, f)).size for d, _, fs in os.walk(tmp_path) for f in fs]
    assert max(max(s) for s in sizes) <= 160 and min(max(s) for s in sizes) >= 100
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'tools', 'benchmark_input.py'),
         '--dataset', f'folder:{tmp_path}', '--workers', '1', '--batch-size', '4',
         '--image-size', '32', '--batches', '1', '--warmup', '1', '--repeats', '1', '--grain', '--json'],
        capture_output=True, text=True, timeout=300, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    rows = {(r['pipeline'], r['stage']): r for r in report['results']}
    assert set(rows) == {(p, s) for p in ('flaxnets', 'torchvision', 'grain') for s in ('train', 'eval')}
    assert all(r['images_per_s'] > 0 and r['images_per_cpu_s'] > 0 for r in rows.values())
    assert {(r['versus'], r['stage'], r['workers']) for r in report['ratios']} == {
        (other, stage, 1) for other in ('torchvision', 'grain') for stage in ('train', 'eval')}
    # Grain's batches hold what ours do: normalised 32 px RGB images and their labels.
    args = argparse.Namespace(dataset=f'folder:{tmp_path}', data_dir=None, image_size=32, crop_pct=0.875,
                              batch_size=4)
    for train in (True, False):
        iterator = benchmark_input._grain_iterator(args, 'train', train, 1, 0)
        images, labels = next(iterator)
        iterator.close()
        assert images.shape == (4, 32, 32, 3) and images.dtype == np.float32
        assert abs(float(images.mean())) < 3 and set(labels.tolist()) <= {0, 1, 2}


def test_two_processes_resume_a_one_process_run_on_array_record(tmp_path):
    """End to end on the ArrayRecord path: a run stopped at step 6 on one process resumes
    on two (jax.distributed on 127.0.0.1) and logs the losses of the uninterrupted run."""
    from conftest import read_jsonl, run_train, run_train_multiprocess

    data_dir = str(tmp_path / 'tfds')
    ip.get_dataset_info('mnist5k', data_dir)
    assert convert.convert_to_array_record('mnist5k', data_dir)

    def args(workdir, steps):
        return ['--config=configs/default.py', f'--workdir={workdir}', f'--config.data.data_dir={data_dir}',
                '--config.data.in_memory=False', '--config.batch_size=16', '--config.eval_batch_size=500',
                f'--config.num_train_steps={steps}', '--config.log_every_steps=2',
                '--config.eval_every_steps=1000', '--config.checkpoint_every_steps=6',
                '--config.schedule.name=constant']

    ref, cut = str(tmp_path / 'ref'), str(tmp_path / 'cut')
    run_train(args(ref, 12))
    run_train(args(cut, 6))
    run_train_multiprocess(args(cut, 12), num_processes=2, devices=1)

    def losses(workdir):
        return {r['step']: r['loss'] for r in read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
                if r['split'] == 'train'}

    a, b = losses(ref), losses(cut)
    assert sorted(a) == sorted(b) == [2, 4, 6, 8, 10, 12]
    np.testing.assert_allclose([b[s] for s in (8, 10, 12)], [a[s] for s in (8, 10, 12)], rtol=1e-5)
