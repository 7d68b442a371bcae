"""Tests for input_pipeline: builders, determinism, coverage, preprocessing, errors."""

import hashlib
import itertools

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import input_pipeline as ip

EXPECTED = {
    'mnist5k': {
        'shape': (28, 28, 1),
        'train': [400] * 10,
        'test': [100] * 10,
    },
    'digits': {
        'shape': (8, 8, 1),
        'train': [138, 142, 137, 143, 141, 142, 141, 139, 134, 140],
        'test': [40] * 10,
    },
}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp('tfds'))


def _config(data_dir, **overrides):
    config = ip.default_data_config()
    config.data_dir = data_dir
    config.preprocess = 'small'
    config.train_augment = 'random_crop'
    config.crop_padding = 2
    config.flip = False
    config.num_parallel_calls = 2
    for k, v in overrides.items():
        setattr(config, k, v)
    return config


def _hashes(images) -> list[str]:
    return [hashlib.sha1(np.ascontiguousarray(x).tobytes()).hexdigest() for x in images]


def _take(iterator, n):
    return list(itertools.islice(iterator, n))


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def _split_arrays(name, split, data_dir):
    builder = tfds.builder(name, data_dir=data_dir)
    return tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))


@pytest.mark.parametrize('name', ['mnist5k', 'digits'])
def test_builder_splits(name, data_dir):
    info = ip.get_dataset_info(name, data_dir=data_dir)
    expected = EXPECTED[name]
    assert info.num_classes == 10
    assert info.image_shape == expected['shape']
    assert info.split_sizes == {s: sum(expected[s]) for s in ('train', 'test')}
    hashes = {}
    for split in ('train', 'test'):
        data = _split_arrays(name, split, data_dir)
        assert data['image'].dtype == np.uint8
        assert data['image'].shape == (sum(expected[split]), *expected['shape'])
        assert data['image'].max() == 255
        assert np.bincount(data['label'], minlength=10).tolist() == expected[split]
        hashes[split] = set(_hashes(data['image']))
        assert len(hashes[split]) == len(data['image'])  # No duplicate images.
    assert not hashes['train'] & hashes['test']


def _mnist_kwargs(**overrides):
    kwargs = dict(
        dataset='mnist5k',
        split='train',
        global_batch_size=16,
        seed=3,
        image_size=32,
        channels=1,
        mean=0.1307,
        std=0.3081,
    )
    kwargs.update(overrides)
    return kwargs


def test_resume_and_process_slices_are_bitwise_equal(data_dir):
    config = _config(data_dir, flip=True)
    reference = _take(ip.create_train_iterator(config, start_step=0, **_mnist_kwargs()), 6)
    resumed = _take(ip.create_train_iterator(config, start_step=4, **_mnist_kwargs()), 2)
    _assert_batches_equal(reference[4:], resumed)

    slices = [
        _take(
            ip.create_train_iterator(
                config, start_step=2, process_index=p, process_count=2, **_mnist_kwargs()
            ),
            3,
        )
        for p in range(2)
    ]
    for step, (a, b) in enumerate(zip(*slices, strict=True), start=2):
        assert a['image'].shape == (8, 32, 32, 1)
        joined = {k: np.concatenate([a[k], b[k]]) for k in a}
        _assert_batches_equal([reference[step]], [joined])

    other_seed = _take(ip.create_train_iterator(config, start_step=0, **_mnist_kwargs(seed=4)), 1)
    assert not np.array_equal(other_seed[0]['image'], reference[0]['image'])
    batch = reference[0]
    assert batch['image'].dtype == np.float32 and batch['label'].dtype == np.int32


def test_streaming_path_resumes_on_real_files(data_dir):
    config = _config(data_dir, in_memory=False, shuffle_buffer=64)
    kwargs = _mnist_kwargs(split='test')
    reference = _take(ip.create_train_iterator(config, start_step=0, **kwargs), 4)
    resumed = _take(ip.create_train_iterator(config, start_step=3, **kwargs), 1)
    _assert_batches_equal(reference[3:], resumed)
    assert reference[0]['image'].shape == (16, 32, 32, 1)
    start_pass, n = ip.create_eval_iterator(
        config,
        dataset='mnist5k',
        split='test',
        global_batch_size=300,
        image_size=28,
        channels=1,
        mean=0.0,
        std=1.0,
    )
    batches = list(start_pass())
    assert n == 1000 and len(batches) == 4
    images = np.concatenate([b['image'] for b in batches])
    mask = np.concatenate([b['mask'] for b in batches])
    expected = _split_arrays('mnist5k', 'test', data_dir)['image']
    assert sorted(_hashes(_raw_uint8(images[mask == 1]))) == sorted(_hashes(expected))


def test_augmentation_depends_on_step_not_on_example(data_dir):
    # With augmentation on, the same example at two stream positions is cropped
    # differently (the seed includes the position), yet deterministically.
    config = _config(data_dir, crop_padding=4)
    kwargs = _mnist_kwargs(dataset='digits', split='test', global_batch_size=400, image_size=8)
    epoch0, epoch1 = _take(ip.create_train_iterator(config, start_step=0, **kwargs), 2)
    assert sorted(epoch0['label']) == sorted(epoch1['label'])
    assert not np.array_equal(np.sort(epoch0['image'], 0), np.sort(epoch1['image'], 0))


def _raw_uint8(batch, mean=0.0, std=1.0):
    return np.round((batch * std + mean) * 255.0).astype(np.uint8)


def test_one_epoch_covers_every_example_once(data_dir):
    config = _config(data_dir, train_augment='none')
    kwargs = _mnist_kwargs(
        dataset='digits', split='test', global_batch_size=64, image_size=8, mean=0.0, std=1.0
    )
    batches = _take(ip.create_train_iterator(config, start_step=0, **kwargs), 7)
    seen = np.concatenate([b['image'] for b in batches])[:400]  # 400 = one epoch.
    expected = _split_arrays('digits', 'test', data_dir)['image']
    assert sorted(_hashes(_raw_uint8(seen))) == sorted(_hashes(expected))


@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_covers_every_example_once(data_dir, process_count):
    config = _config(data_dir)
    kwargs = _mnist_kwargs(
        dataset='digits', split='test', global_batch_size=96, image_size=8, mean=0.0, std=1.0
    )
    del kwargs['seed']
    per_process = []
    for p in range(process_count):
        start_pass, num_examples = ip.create_eval_iterator(
            config, process_index=p, process_count=process_count, **kwargs
        )
        assert num_examples == 400
        first, second = list(start_pass()), list(start_pass())
        _assert_batches_equal(first, second)  # Each call is a fresh, identical pass.
        assert len(first) == 5  # ceil(400 / 96)
        for b in first:
            assert b['image'].shape == (96 // process_count, 8, 8, 1)
            assert b['mask'].dtype == np.float32
        per_process.append(first)
    images = np.concatenate([b['image'] for bs in zip(*per_process, strict=True) for b in bs])
    mask = np.concatenate([b['mask'] for bs in zip(*per_process, strict=True) for b in bs])
    assert mask.sum() == 400 and mask.size == 480
    assert not images[mask == 0].any()
    expected = _split_arrays('digits', 'test', data_dir)['image']
    assert sorted(_hashes(_raw_uint8(images[mask == 1]))) == sorted(_hashes(expected))


@pytest.mark.parametrize('channels', [1, 3])
def test_small_preprocess_zero_pads_mnist_to_32(data_dir, channels):
    config = _config(data_dir)
    kwargs = _mnist_kwargs(split='test', global_batch_size=50, channels=channels, mean=0.0, std=1.0)
    del kwargs['seed']
    start_pass, _ = ip.create_eval_iterator(config, **kwargs)
    batch = next(start_pass())
    assert batch['image'].shape == (50, 32, 32, channels)
    raw = _raw_uint8(batch['image'])
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert not raw[:, border].any()
    expected = _split_arrays('mnist5k', 'test', data_dir)['image'][:50]
    for c in range(channels):
        np.testing.assert_array_equal(raw[:, 2:30, 2:30, c : c + 1], expected)


def _make_folder(root):
    rng = np.random.default_rng(0)
    for split, per_class in (('train', 4), ('val', 2)):
        for c, name in enumerate(['zebra', 'ant', 'cat']):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(per_class):
                h, w = 20 + 7 * i, 30 - 3 * c
                array = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(array).save(d / f'{i}.png')
    return f'folder:{root}'


def test_folder_imagenet_preprocess(tmp_path):
    dataset = _make_folder(tmp_path)
    info = ip.get_dataset_info(dataset)
    assert info.num_classes == 3
    assert info.split_sizes == {'train': 12, 'val': 6}
    config = _config(None, preprocess='imagenet', train_augment='inception_crop', flip=True)
    kwargs = dict(image_size=16, channels=3, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    train = ip.create_train_iterator(
        config, dataset=dataset, split='train', global_batch_size=6, seed=0, start_step=0, **kwargs
    )
    batches = _take(train, 2)
    assert batches[0]['image'].shape == (6, 16, 16, 3)
    labels = np.concatenate([b['label'] for b in batches])
    assert sorted(labels.tolist()) == [0] * 4 + [1] * 4 + [2] * 4  # One epoch.
    start_pass, n = ip.create_eval_iterator(
        config, dataset=dataset, split='val', global_batch_size=4, **kwargs
    )
    evals = list(start_pass())
    assert n == 6 and len(evals) == 2 and evals[-1]['mask'].tolist() == [1, 1, 0, 0]
    # Classes are sorted by name (ant=0, cat=1, zebra=2); eval keeps file order.
    assert np.concatenate([b['label'] for b in evals])[:6].tolist() == [0, 0, 1, 1, 2, 2]


def test_imagenet_under_mock_data():
    config = ip.default_data_config()
    kwargs = dict(image_size=24, channels=3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    with tfds.testing.mock_data(num_examples=8):
        train = ip.create_train_iterator(
            config,
            dataset='imagenet2012',
            split='train',
            global_batch_size=4,
            seed=0,
            start_step=0,
            **kwargs,
        )
        batches = _take(train, 3)
        resumed = ip.create_train_iterator(
            config,
            dataset='imagenet2012',
            split='train',
            global_batch_size=4,
            seed=0,
            start_step=2,
            **kwargs,
        )
        # Streaming resume skips records: same batches for the same process count.
        _assert_batches_equal(batches[2:], _take(resumed, 1))
        batch = batches[0]
        assert batch['image'].shape == (4, 24, 24, 3)
        assert batch['label'].shape == (4,)
        assert np.isfinite(batch['image']).all()
        start_pass, n = ip.create_eval_iterator(
            config, dataset='imagenet2012', split='validation', global_batch_size=3, **kwargs
        )
        evals = list(start_pass())
        assert n == 8 and sum(b['mask'].sum() for b in evals) == 8 and len(evals) == 3


def test_mnist5k_in_memory_under_mock_data():
    config = _config(None)
    with tfds.testing.mock_data(num_examples=5):
        batch = next(ip.create_train_iterator(config, start_step=0, **_mnist_kwargs()))
    assert batch['image'].shape == (16, 32, 32, 1)


def test_missing_imagenet_raises_with_instructions(tmp_path):
    config = ip.default_data_config()
    config.data_dir = str(tmp_path)
    with pytest.raises(ip.DatasetNotAvailableError) as e:
        ip.get_dataset_info('imagenet2012', data_dir=str(tmp_path))
    message = str(e.value)
    assert 'downloads/manual' in message and 'tfds build imagenet2012' in message
    assert str(tmp_path) in message and 'ILSVRC2012_img_train.tar' in message
    with pytest.raises(ip.DatasetNotAvailableError):
        ip.create_train_iterator(
            config,
            dataset='imagenet2012',
            split='train',
            global_batch_size=2,
            seed=0,
            start_step=0,
            image_size=8,
            channels=3,
            mean=0.5,
            std=0.5,
        )
    assert not (tmp_path / 'imagenet2012').exists()  # Nothing was downloaded.


def test_missing_cifar_and_unknown_names(tmp_path):
    with pytest.raises(ip.DatasetNotAvailableError, match='tfds build cifar10'):
        ip.get_dataset_info('cifar10', data_dir=str(tmp_path))
    with pytest.raises(ip.DatasetNotAvailableError, match='cifar10'):
        ip.get_dataset_info('cifar01', data_dir=str(tmp_path))
    missing = tmp_path / 'no_such_folder'
    with pytest.raises(ip.DatasetNotAvailableError, match='no_such_folder'):
        ip.get_dataset_info(f'folder:{missing}')
