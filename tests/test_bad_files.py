"""Undecodable images are never fatal: substituted, marked, logged once, checked up front."""

import io
import itertools
import logging

import numpy as np
import pytest
from PIL import Image

import input_pipeline as ip
from flaxnets_errors import UserError
from input_pipeline import checks

BAD_NAMES = ('truncated.jpg', 'empty.jpg', 'text.jpg')
SIZE = 16
KW = dict(image_size=SIZE, channels=3, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def _jpeg(rng, h, w) -> bytes:
    # Smooth content, so the JPEG is a plausible photo rather than noise.
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (h + w)], -1)
    pixels = np.clip(base + rng.integers(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, 'JPEG', quality=90)
    return buf.getvalue()


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    """root/{train,val}/{ant,bee}/: good JPEGs plus a truncated, an empty and a text '.jpg'."""
    root = tmp_path_factory.mktemp('bad_folder')
    rng = np.random.default_rng(0)
    bad = {}
    for split, per_class in (('train', 7), ('val', 4)):
        for c in ('ant', 'bee'):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                (d / f'{i:02d}.jpg').write_bytes(_jpeg(rng, 40 + 3 * i, 56 - 2 * i))
        whole = _jpeg(rng, 64, 64)
        (root / split / 'ant' / BAD_NAMES[0]).write_bytes(whole[: len(whole) // 2])
        (root / split / 'bee' / BAD_NAMES[1]).write_bytes(b'')
        (root / split / 'bee' / BAD_NAMES[2]).write_text('these are not the pixels you seek\n')
        bad[split] = {str(root / split / c / n) for c, n in
                      (('ant', BAD_NAMES[0]), ('bee', BAD_NAMES[1]), ('bee', BAD_NAMES[2]))}
    return f'folder:{root}', bad


def _config(**overrides):
    config = ip.default_data_config()
    config.num_parallel_calls = 2
    for k, v in overrides.items():
        setattr(config, k, v)
    return config


def _bad_warnings(caplog, path):
    return [r for r in caplog.records if r.levelno == logging.WARNING and path in r.getMessage()]


def test_check_lists_every_bad_file_and_refuses_a_mostly_broken_folder(folder, caplog):
    dataset, bad = folder
    caplog.set_level(logging.WARNING)
    report = ip.check_dataset(_config(max_bad_fraction=0.2), dataset, 'train')
    assert report.checked and report.num_files == 17
    assert {p for p, _ in report.bad} == bad['train']
    reasons = dict(report.bad)
    assert 'empty' in reasons[next(p for p in bad['train'] if p.endswith('empty.jpg'))]
    assert 'not a JPEG' in reasons[next(p for p in bad['train'] if p.endswith('text.jpg'))]
    assert 'truncated' in reasons[next(p for p in bad['train'] if p.endswith('truncated.jpg'))]
    assert len(report.lines()) == 3 and all(': ' in line for line in report.lines())
    for path in bad['train']:
        assert len(_bad_warnings(caplog, path)) == 1  # One line per file.

    with pytest.raises(UserError) as e:
        ip.check_dataset(_config(max_bad_fraction=0.01), dataset, 'val')
    message = str(e.value)
    assert isinstance(e.value, ip.BadDataError)
    assert '3 of 11' in message and 'max_bad_fraction' in message and 'Remove' in message
    assert all(p in message for p in bad['val'])

    tfds_report = ip.check_dataset(_config(), 'mnist5k', 'train')
    assert not tfds_report.checked and tfds_report.bad == ()


def _train(dataset, config, start_step, n, **kw):
    it = ip.create_train_iterator(
        config, dataset=dataset, split='train', global_batch_size=17, seed=5,
        start_step=start_step, **KW, **kw)
    return list(itertools.islice(it, n))


def test_train_batches_mark_bad_files_and_stay_pure_functions_of_the_step(
    folder, caplog, monkeypatch
):
    dataset, bad = folder
    caplog.set_level(logging.WARNING)
    monkeypatch.setattr(checks, '_logged', set())  # Forget what the check test logged.
    config = _config(preprocess='imagenet', train_augment='inception_crop', flip=True)
    first = _train(dataset, config, 0, 2)
    again = _train(dataset, config, 0, 2)
    resumed = _train(dataset, config, 1, 1)
    for x, y in zip(first + first[1:], again + resumed, strict=True):
        assert x.keys() == y.keys() == {'image', 'label', 'valid'}
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    # One epoch per step: step s holds permutation [5, s] of the files.
    paths = ip.load_source(config, dataset, 'train').data
    for step, batch in enumerate(first):
        order = np.random.default_rng([5, step]).permutation(len(paths))
        expected = np.array([paths[i] not in bad['train'] for i in order], np.float32)
        assert batch['valid'].dtype == np.float32
        np.testing.assert_array_equal(batch['valid'], expected)
        assert not batch['image'][expected == 0].any() and not batch['label'][expected == 0].any()
        assert np.abs(batch['image'][expected == 1]).reshape(14, -1).max(1).min() > 0
    for path in bad['train']:
        # Logged once, with the decoder's reason, however often it is met.
        (record,) = _bad_warnings(caplog, path)
        assert 'Invalid JPEG data' in record.getMessage() or 'empty' in record.getMessage() or (
            'Unknown image file format' in record.getMessage())

    # Mixing: a row is valid only when its partner (row B-1-i) was decoded too.
    mixed = _train(dataset, _config(preprocess='imagenet', mixup_alpha=0.2), 0, 1)[0]
    decoded = first[0]['valid']
    np.testing.assert_array_equal(mixed['valid'], decoded * decoded[::-1])
    assert '_decoded' not in mixed


def test_eval_masks_bad_files_and_counts_them(folder):
    dataset, bad = folder
    config = _config(preprocess='imagenet')
    start_pass, n = ip.create_eval_iterator(
        config, dataset=dataset, split='val', global_batch_size=4, **KW)
    batches = list(start_pass())
    assert n == 11 and len(batches) == 3
    mask = np.concatenate([b['mask'] for b in batches])
    valid = np.concatenate([b['valid'] for b in batches])
    paths = ip.load_source(config, dataset, 'val').data
    is_bad = np.array([p in bad['val'] for p in paths] + [False], np.float32)  # + 1 padding row
    np.testing.assert_array_equal(valid, 1 - is_bad)
    np.testing.assert_array_equal(mask, np.r_[1 - is_bad[:11], 0])
    assert mask.sum() + (1 - valid).sum() == n
    images = np.concatenate([b['image'] for b in batches])
    assert not images[mask == 0].any()
    # Two processes: the same rows, split between them.
    halves = [list(ip.create_eval_iterator(
        config, dataset=dataset, split='val', global_batch_size=4, process_index=p,
        process_count=2, **KW)[0]()) for p in range(2)]
    joined = np.concatenate([np.concatenate([a['valid'], b['valid']]) for a, b in zip(*halves, strict=True)])
    np.testing.assert_array_equal(joined, valid)


def test_encoded_and_pseudo_labelled_sources_substitute_bad_examples(folder):
    # tfds images held in memory (kind 'encoded') and a pseudo-labelled pool with
    # 'targets': a bad record is substituted with zero targets, and the rest is unchanged.
    rng = np.random.default_rng(1)
    good = [_jpeg(rng, 30, 30) for _ in range(5)]
    data = np.array(good[:2] + [b'\x00' * 20] + good[2:], dtype=object)
    source = ip.ArraySource('encoded', data, np.arange(6, dtype=np.int32) % 3)
    targets = np.eye(3, dtype=np.float32)[[2, 1, 0, 2, 1, 0]]
    pool = source.select(np.arange(6), extras={'targets': targets})
    config = _config(preprocess='imagenet', train_augment='none')
    batch = next(
        ip.create_train_iterator(config, dataset='pool', split='train', global_batch_size=6,
                                 seed=0, start_step=0, source=pool, **KW))
    order = np.random.default_rng([0, 0]).permutation(6)
    np.testing.assert_array_equal(batch['valid'], (order != 2).astype(np.float32))
    np.testing.assert_array_equal(batch['targets'][order != 2], targets[order[order != 2]])
    assert not batch['targets'][order == 2].any()
    start_pass, n = ip.create_eval_iterator(
        config, dataset='pool', split='train', global_batch_size=4, source=pool, **KW)
    evals = list(start_pass())
    assert np.concatenate([b['valid'] for b in evals]).tolist() == [1, 1, 0, 1, 1, 1, 1, 1]
    assert np.concatenate([b['mask'] for b in evals]).tolist() == [1, 1, 0, 1, 1, 1, 0, 0]
