"""Tests for input_pipeline.augment: ops, policies, mixing and the pipeline contract."""

import itertools

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import input_pipeline as ip
from input_pipeline import augment

# Ops whose magnitude-0 argument is the identity by definition (RandAugment
# convention): zero angle / shear / shift / cutout side, threshold 256, 8 bits,
# enhancement factor 1. AutoContrast, Equalize and Invert take no magnitude.
IDENTITY_AT_ZERO = sorted(set(augment.OPS) - {'AutoContrast', 'Equalize', 'Invert'})


def _image(channels, seed=0, size=(20, 24)):
    rng = np.random.default_rng(seed)
    # A bright square on a textured background, so every op has something to change.
    image = rng.integers(0, 120, (*size, channels), dtype=np.uint8)
    image[5:14, 6:15] = rng.integers(150, 256, (9, 9, channels), dtype=np.uint8)
    return tf.constant(image)


def _seed(a, b=0):
    return tf.constant([a, b], tf.int64)


@pytest.mark.parametrize('channels', [1, 3])
@pytest.mark.parametrize('name', sorted(augment.OPS))
def test_every_op_keeps_shape_dtype_and_range(name, channels):
    image = _image(channels)
    for level in (0.0, 5.0, 10.0, 30.0):
        for sign in (1.0, -1.0):
            arg = augment.op_argument(name, level, sign)
            out = augment.OPS[name](tf.cast(image, tf.float32), arg, _seed(1)).numpy()
            assert out.shape == image.shape and out.dtype == np.float32
            assert out.min() >= 0.0 and out.max() <= 255.0, (name, level, sign)
    # Through RandAugment (uint8 in, uint8 out) with only this op.
    out = augment.randaugment(image, _seed(2), num_layers=2, magnitude=9.0, ops=name)
    assert out.dtype == tf.uint8 and out.shape == image.shape


@pytest.mark.parametrize('channels', [1, 3])
def test_magnitude_zero_is_identity(channels):
    image = _image(channels)
    for name in IDENTITY_AT_ZERO:
        for sign in (1.0, -1.0):
            arg = augment.op_argument(name, 0.0, sign)
            out = augment.OPS[name](tf.cast(image, tf.float32), arg, _seed(3))
            np.testing.assert_array_equal(out.numpy(), image.numpy(), err_msg=name)
    ops = ','.join(IDENTITY_AT_ZERO)
    out = augment.randaugment(image, _seed(4), num_layers=3, magnitude=0.0, ops=ops)
    np.testing.assert_array_equal(out.numpy(), image.numpy())


def test_ops_do_what_they_say():
    image = tf.cast(_image(1), tf.float32)
    # Translate by 0.25 of the width = 6 whole pixels, zero fill.
    shifted = augment.translate_x(image, tf.constant(0.25), None).numpy()
    np.testing.assert_array_equal(shifted[:, 6:], image.numpy()[:, :-6])
    assert not shifted[:, :6].any()
    # A 180 degree rotation about the centre is a double flip.
    rotated = augment.rotate(image, tf.constant(180.0), None).numpy()
    np.testing.assert_allclose(rotated, image.numpy()[::-1, ::-1], atol=1e-3)
    np.testing.assert_array_equal(augment.invert(image, 0.0, None), 255.0 - image)
    assert set(np.unique(augment.posterize(image, tf.constant(2.0), None))) <= {0, 64, 128, 192}
    hole = augment.cutout(image, tf.constant(0.25), _seed(5)).numpy()
    assert 0 < (hole != image.numpy()).sum() <= 25  # At most a 5x5 square.


def test_randaugment_and_autoaugment_are_deterministic():
    image = _image(3)
    for fn in (
        lambda s: augment.randaugment(image, s, num_layers=2, magnitude=9.0, magnitude_std=0.5),
        lambda s: augment.autoaugment(image, s),
    ):
        outs = [fn(_seed(7, k)).numpy() for k in range(6)]
        np.testing.assert_array_equal(outs[0], fn(_seed(7, 0)).numpy())
        assert sum(not np.array_equal(outs[0], o) for o in outs[1:]) >= 4


def test_presets_and_config_validation():
    ops, maxima = augment.resolve_ops('imagenet')
    assert len(ops) == 14 and maxima == {}
    digits, maxima = augment.resolve_ops('digits')
    assert not {'Invert', 'Equalize', 'Solarize', 'Posterize', 'Color'} & set(digits)
    assert maxima['Rotate'] < 30.0
    assert augment.resolve_ops('Rotate, Cutout')[0] == ('Rotate', 'Cutout')
    with pytest.raises(ValueError, match='Flip'):
        augment.resolve_ops('Rotate,Flip')
    config = ip.default_data_config()
    assert augment.example_augmenter(config) is None
    assert augment.batch_mixer(config, 10) is None
    config.randaugment_layers = 2
    config.autoaugment = 'imagenet'
    with pytest.raises(ValueError, match='not both'):
        augment.example_augmenter(config)


def test_autoaugment_imagenet_policy_table():
    policy = augment.AUTOAUGMENT_POLICIES['imagenet']
    assert len(policy) == 25
    for sub_policy in policy:
        assert len(sub_policy) == 2
        for name, prob, magnitude in sub_policy:
            assert name in augment.OPS
            assert 0.0 <= prob <= 1.0 and 0 <= magnitude <= 9
    assert policy[0] == (('Posterize', 0.4, 8), ('Rotate', 0.6, 9))


def _mix(seed, **kwargs):
    images = tf.zeros([2, 8, 10, 1])
    partners = tf.ones([2, 8, 10, 1])
    kwargs = {'num_classes': 5, 'mixup_alpha': 0.0, 'cutmix_alpha': 0.0, **kwargs}
    mixed, targets = augment.mix_batch(
        images, tf.constant([1, 2]), partners, tf.constant([3, 2]), seed, **kwargs
    )
    return mixed.numpy(), targets.numpy()


def test_mixup_targets():
    mixed, targets = _mix(_seed(11), mixup_alpha=1.0)
    lam = 1.0 - mixed[0, 0, 0, 0]  # Own image 0, partner 1: a pixel is 1 - lam.
    assert 0.0 < lam < 1.0
    np.testing.assert_allclose(mixed, 1.0 - lam, atol=1e-6)  # Same lam everywhere.
    np.testing.assert_allclose(targets.sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose(targets[0], [0, lam, 0, 1 - lam, 0], atol=1e-6)
    np.testing.assert_allclose(targets[1], [0, 0, 1, 0, 0], atol=1e-6)  # Same label.
    # mix_prob 0: untouched images, one-hot targets.
    mixed, targets = _mix(_seed(11), mixup_alpha=1.0, prob=0.0)
    assert not mixed.any()
    np.testing.assert_array_equal(targets[0], [0, 1, 0, 0, 0])


def test_cutmix_box_area_matches_lam():
    lams = []
    for k in range(8):
        mixed, targets = _mix(_seed(12, k), cutmix_alpha=1.0)
        lam = targets[0, 1]
        lams.append(lam)
        np.testing.assert_allclose(targets[0, 3], 1.0 - lam, atol=1e-6)
        pasted = mixed[0, ..., 0]
        np.testing.assert_allclose(pasted.mean(), 1.0 - lam, atol=1e-6)
        np.testing.assert_array_equal(mixed[0], mixed[1])  # One box per batch.
        if pasted.any():  # The pasted region is one axis-aligned box.
            rows, cols = np.nonzero(pasted)
            box = pasted[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
            assert box.all()
    assert len({round(float(v), 4) for v in lams}) > 1
    # With both on, the switch picks each method some of the time.
    kinds = set()
    for k in range(12):
        mixed, _ = _mix(_seed(13, k), mixup_alpha=1.0, cutmix_alpha=1.0)
        kinds.add('cutmix' if set(np.unique(mixed)) <= {0.0, 1.0} else 'mixup')
    assert kinds == {'cutmix', 'mixup'}


def _mnist_config(data_dir, **overrides):
    config = ip.default_data_config()
    config.data_dir = data_dir
    config.preprocess = 'small'
    config.train_augment = 'random_crop'
    config.crop_padding = 2
    config.flip = False
    config.num_parallel_calls = 2
    config.randaugment_layers = 2
    config.randaugment_magnitude = 9.0
    config.randaugment_ops = 'digits'
    config.mixup_alpha = 0.2
    config.cutmix_alpha = 1.0
    for k, v in overrides.items():
        setattr(config, k, v)
    return config


def _train(config, start_step, n, **overrides):
    kwargs = dict(
        dataset='mnist5k',
        split='train',
        global_batch_size=8,
        seed=3,
        start_step=start_step,
        image_size=32,
        channels=1,
        mean=0.5,
        std=0.5,
    )
    kwargs.update(overrides)
    return list(itertools.islice(ip.create_train_iterator(config, **kwargs), n))


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_mnist5k_augmented_batches_are_pure_functions_of_seed_and_step(data_dir):
    config = _mnist_config(data_dir)
    reference = _train(config, 0, 3)
    # A fresh iterator started at step 2 (a resumed run) gives the same batch.
    _assert_batches_equal(reference[2:], _train(config, 2, 1))
    for step in range(1, 3):
        assert not np.array_equal(reference[0]['image'], reference[step]['image'])
    batch = reference[0]
    assert batch['image'].shape == (8, 32, 32, 1) and batch['image'].dtype == np.float32
    assert batch['label'].dtype == np.int32
    assert batch['targets'].shape == (8, 10) and batch['targets'].dtype == np.float32
    for b in reference:
        np.testing.assert_allclose(b['targets'].sum(1), 1.0, atol=1e-6)
        # Row i's own label keeps weight lam, its partner B-1-i the rest.
        lam = b['targets'][np.arange(8), b['label']]
        partner = b['targets'][np.arange(8), b['label'][::-1]]
        same = b['label'] == b['label'][::-1]
        np.testing.assert_allclose(np.where(same, 1.0, lam + partner), 1.0, atol=1e-6)

    # Process slices, concatenated, are the single-process batches.
    a, b = (_train(config, 1, 1, process_index=p, process_count=2)[0] for p in range(2))
    assert a['image'].shape == (4, 32, 32, 1)
    _assert_batches_equal([reference[1]], [{k: np.concatenate([a[k], b[k]]) for k in a}])

    # Augmentation is on: the same examples without it differ.
    off = dict(randaugment_layers=0, mixup_alpha=0.0, cutmix_alpha=0.0)
    plain = _train(_mnist_config(data_dir, **off), 0, 1)[0]
    assert 'targets' not in plain
    np.testing.assert_array_equal(plain['label'], batch['label'])
    assert not np.array_equal(plain['image'], batch['image'])


def test_streaming_path_with_augmentation_resumes(data_dir):
    config = _mnist_config(
        data_dir, in_memory=False, shuffle_buffer=64, randaugment_ops='imagenet'
    )
    reference = _train(config, 0, 2, split='test')
    _assert_batches_equal(reference[1:], _train(config, 1, 1, split='test'))
    assert reference[0]['targets'].shape == (8, 10)


def test_autoaugment_rgb_under_mock_data():
    config = ip.default_data_config()
    config.autoaugment = 'imagenet'
    config.mixup_alpha = 0.8
    kwargs = dict(
        dataset='imagenet2012',
        split='train',
        global_batch_size=4,
        seed=0,
        image_size=24,
        channels=3,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
    )
    with tfds.testing.mock_data(num_examples=8):
        batches = list(itertools.islice(ip.create_train_iterator(config, start_step=0, **kwargs), 2))
    batch = batches[0]
    assert batch['image'].shape == (4, 24, 24, 3) and np.isfinite(batch['image']).all()
    assert batch['targets'].shape == (4, 1000)
    np.testing.assert_allclose(batch['targets'].sum(1), 1.0, atol=1e-6)
