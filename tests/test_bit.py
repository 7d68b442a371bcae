"""BiT pre-training (issue #17): upstream recipes, GN+WS batch independence, WS numerics.

Tolerances (and why):
- 1 vs 8 devices with GN+WS: rtol 1e-5 on per-step losses, as tests/test_trainer.py; only
  the order of the cross-device gradient sum differs (GroupNorm reduces within each
  example, so no statistic crosses devices).
- WS against BiT's formula: rtol 1e-5 (atol 1e-6 for values near 0): our float32
  arithmetic against the formula evaluated in float64.
- bfloat16 compute: the kernel the convolution sees is the float32 standardised kernel
  rounded once to bfloat16 (bitwise), i.e. within bfloat16's 2^-8 relative precision.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import read_jsonl, run_train
from PIL import Image

import models
from configs.bit import common, digits_transfer, mnist5k_upstream, upstream_i1k, upstream_i21k
from models import layers
from models.resnetv2 import RESNETV2_DEPTHS
from trainers import optim, supervised

UPSTREAM = {'i1k': upstream_i1k, 'i21k': upstream_i21k}


# ------------------------------------------------------------------ the published recipe


@pytest.mark.parametrize('name', sorted(UPSTREAM))
def test_upstream_config_is_the_papers_recipe(name):
    config = UPSTREAM[name].get_config()
    images = UPSTREAM[name].TRAIN_IMAGES
    # Kolesnikov et al. 2020, Sec. 3.3.
    assert config.batch_size == 4096
    assert dict(config.optimizer) == dict(name='sgd', momentum=0.9, nesterov=False, weight_decay=1e-4)
    schedule = optim.create_schedule(config)
    assert float(schedule(5000)) == pytest.approx(0.03 * 4096 / 256)  # 0.48 after warmup
    assert float(schedule(2500)) == pytest.approx(0.24)  # linear warmup over 5000 steps
    per_epoch = images / 4096
    assert config.num_train_steps == int(90 * images) // 4096
    assert config.schedule.boundaries == tuple(int(e * images) // 4096 for e in (30, 60, 80))
    for b, e in zip(config.schedule.boundaries, (30, 60, 80), strict=True):
        assert 0 <= e * per_epoch - b < 1  # within the step where epoch e ends
        assert float(schedule(b + 1)) == pytest.approx(float(schedule(b - 1)) * 0.1)
    assert (config.image_size, config.data.train_augment, config.data.flip) == (224, 'inception_crop', True)
    assert tuple(config.data.inception_scale) == (0.08, 1.0)
    assert (config.grad_clip_norm, config.label_smoothing, config.data.mixup_alpha) == (0.0, 0.0, 0.0)
    model = models.create_model(config.model, **supervised.model_overrides(config))
    assert (model.norm, model.weight_std, model.gn_groups) == ('group', True, 32)
    assert models.get_model_cfg(config.model).mean == (0.5, 0.5, 0.5)  # pixels in [-1, 1]


def test_upstream_step_counts_as_documented():
    i1k, i21k = upstream_i1k.get_config(), upstream_i21k.get_config()
    assert (i1k.num_train_steps, i1k.schedule.boundaries) == (28_150, (9_383, 18_767, 25_022))
    assert (i21k.num_train_steps, i21k.schedule.boundaries) == (311_948, (103_982, 207_965, 277_287))
    other = upstream_i21k.get_config('R50x1,images=13000000')
    assert other.num_train_steps == 90 * 13_000_000 // 4096


@pytest.mark.parametrize('devices, per_device', [(8, 512), (64, 64), (512, 8)])
def test_upstream_batch_arithmetic_on_many_devices(devices, per_device):
    for module in UPSTREAM.values():
        config = module.get_config()
        # 512 devices: 8 images per chip, as BiT's TPUv3-512 (Sec. 3.3).
        assert common.per_device_batch(config, devices) == per_device
        assert config.eval_batch_size % devices == 0
        # Step counts depend on the global batch only, not on the device count.
        sched = common.epoch_schedule(module.TRAIN_IMAGES, per_device * devices)
        assert (sched.num_train_steps, sched.boundaries) == (
            config.num_train_steps, config.schedule.boundaries)
    with pytest.raises(ValueError, match='not divisible by 3 devices'):
        common.per_device_batch(upstream_i1k.get_config(), 3)


@pytest.mark.parametrize('depth', common.DEPTHS)
@pytest.mark.parametrize('width', common.WIDTHS)
def test_every_bit_variant_builds(depth, width):
    config = upstream_i1k.get_config(f'R{depth}x{width}')
    model = models.create_model(config.model, **supervised.model_overrides(config))
    assert model.stage_sizes == RESNETV2_DEPTHS[depth]
    assert model.width_factor == width
    assert (model.norm, model.weight_std, model.stem_type) == ('group', True, 'fixed')
    assert model.std_eps == 1e-8 and model.gn_groups == 32
    if (depth, width) in common.REGISTERED:
        assert config.model == f'resnetv2_{depth}x{width}_bit'
        assert supervised.model_overrides(config) == {}


def test_command_line_switches_the_variant():
    from absl import flags
    from ml_collections import config_flags

    def parse(*args):
        fv, argv = flags.FlagValues(), ['train.py', *args]
        # As train.py defines it; overrides are found in `sys_argv` at definition.
        config_flags.DEFINE_config_file('config', None, flag_values=fv, lock_config=True,
                                        sys_argv=argv)
        fv(argv)
        config = fv.config
        return models.create_model(config.model, **supervised.model_overrides(config))

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'configs/bit/upstream_i1k.py')
    m = parse(f'--config={path}', '--config.model=resnetv2_152x4_bit')
    assert (m.stage_sizes, m.width_factor) == (RESNETV2_DEPTHS[152], 4)
    m = parse(f'--config={path}:R101x2')
    assert (m.stage_sizes, m.width_factor, m.norm, m.weight_std) == (RESNETV2_DEPTHS[101], 2, 'group', True)
    m = parse(f'--config={path}:R101x2', '--config.model_kwargs.width_factor=4')
    assert m.width_factor == 4


def test_unknown_bit_variant_is_refused():
    for bad in ('R34x1', 'R50x5', 'resnet50'):
        with pytest.raises(ValueError, match='R<depth>x<width>'):
            upstream_i1k.get_config(bad)


def _shrink(config, tmp_path):
    # The recipe, shrunk only where CI's 2 CPU cores need it: one block per stage, narrower
    # stages (still multiples of BiT's 32 groups), batch 2 at 32 px.
    config.model_kwargs.stage_sizes = (1, 1, 1, 1)
    config.model_kwargs.widths = (128, 128, 256, 256)
    config.model_kwargs.stem_width = 32
    config.num_train_steps = 1
    config.batch_size = 2
    config.eval_batch_size = 2
    config.image_size = 32
    config.data.data_dir = str(tmp_path / 'tfds')
    return config


def test_upstream_i1k_one_step_under_mock_data(tmp_path):
    config = _shrink(upstream_i1k.get_config(), tmp_path)
    with tfds.testing.mock_data(num_examples=4):
        results = supervised.train_and_evaluate(config, str(tmp_path / 'run'))
    assert results['step'] == 1 and results['num_examples'] == 4
    assert math.isfinite(results['loss']) and results['model'] == 'resnetv2_50x1_bit'


def test_upstream_i21k_one_step_on_an_image_folder(tmp_path):
    # ImageNet-21k is read from root/<split>/<synset>/; three synsets of random JPEGs.
    rng = np.random.default_rng(0)
    root = tmp_path / 'imagenet21k'
    for split, n in (('train', 2), ('validation', 1)):
        for synset in ('n00004475', 'n00005787', 'n00006024'):
            os.makedirs(root / split / synset)
            for i in range(n):
                pixels = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / synset / f'{synset}_{i}.JPEG')
    config = _shrink(upstream_i21k.get_config('R50x2'), tmp_path)
    config.dataset = f'folder:{root}'
    results = supervised.train_and_evaluate(config, str(tmp_path / 'run'))
    assert results['step'] == 1 and results['num_examples'] == 3
    assert math.isfinite(results['loss'])


# ------------------------------------------------------------------ the offline demonstration


def test_demo_configs_pair_up():
    up = {n: mnist5k_upstream.get_config(n) for n in ('gn', 'bn')}
    assert dict(up['gn'].model_kwargs) == {**dict(up['bn'].model_kwargs), 'norm': 'group', 'weight_std': True}
    assert up['bn'].model_kwargs.norm == 'batch' and not up['bn'].model_kwargs.weight_std
    assert up['gn'].num_train_steps == 938 and up['gn'].schedule.boundaries == (313, 625, 834)
    for shots, n in (('1', 1), ('5', 5), ('10', 10), ('full', 0)):
        ft = digits_transfer.get_config(f'gn,{shots}')
        assert ft.labeled_per_class == n
        # BiT-HyperRule for < 20k examples: 500 steps, warmup 100, decays at 200/300/400.
        assert (ft.num_train_steps, ft.schedule.warmup_steps, ft.schedule.boundaries) == (
            500, 100, (200, 300, 400))
        assert (ft.optimizer.weight_decay, ft.learning_rate, ft.lr_base_batch_size) == (0.0, 0.003, 512)
        assert (ft.finetune.reinit_head, ft.finetune.head_init, ft.data.mixup_alpha) == ('always', 'zeros', 0.0)
        # The transferred network is exactly the pre-trained one.
        assert dict(ft.model_kwargs) == dict(up['gn'].model_kwargs) and ft.model == up['gn'].model
    with pytest.raises(ValueError, match='shots'):
        digits_transfer.get_config('gn,3')


def test_demo_upstream_then_transfer_runs(data_dir, tmp_path):
    up = mnist5k_upstream.get_config('gn')
    up.data.data_dir = data_dir
    up.num_train_steps = up.eval_every_steps = up.checkpoint_every_steps = 3
    up.schedule.warmup_steps, up.schedule.boundaries = 1, (2,)
    supervised.train_and_evaluate(up, str(tmp_path / 'up'))
    ft = digits_transfer.get_config('gn,1')
    ft.data.data_dir = data_dir
    ft.num_train_steps = ft.eval_every_steps = ft.checkpoint_every_steps = 2
    ft.schedule.warmup_steps, ft.schedule.boundaries = 1, ()
    ft.init_from = str(tmp_path / 'up')
    results = supervised.train_and_evaluate(ft, str(tmp_path / 'ft'))
    assert results['step'] == 2 and results['num_examples'] == 400


# ------------------------------------------------------------------ batch independence


def test_gn_ws_one_vs_eight_devices_same_losses(data_dir, tmp_path):
    losses = {}
    for devices in (1, 8):
        workdir = str(tmp_path / f'd{devices}')
        run_train(
            ['--config', 'configs/bit/mnist5k_upstream.py:gn', '--workdir', workdir,
             f'--config.data.data_dir={data_dir}', '--config.num_train_steps=10',
             '--config.batch_size=16', '--config.eval_batch_size=200',
             '--config.log_every_steps=1', '--config.eval_every_steps=10',
             '--config.checkpoint_every_steps=10', '--config.schedule.warmup_steps=2',
             '--config.schedule.boundaries=(6,)'],
            devices=devices,
        )
        losses[devices] = np.array([r['loss'] for r in read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
                                    if r['split'] == 'train'])
    assert len(losses[1]) == len(losses[8]) == 10
    np.testing.assert_allclose(losses[1], losses[8], rtol=1e-5)
    print('GN+WS max |loss diff| 1 vs 8 devices:', np.max(np.abs(losses[1] - losses[8])))


# ------------------------------------------------------------------ weight standardisation


def _bit_standardize(w: np.ndarray, eps: float) -> np.ndarray:
    """google-research/big_transfer bit_jax/models.py `standardize` (float64 here):
    centre over (H, W, in), divide by sqrt(mean square + eps); eps inside the root."""
    w = w.astype(np.float64)
    w = w - w.mean(axis=(0, 1, 2), keepdims=True)
    return w / np.sqrt(np.mean(np.square(w), axis=(0, 1, 2), keepdims=True) + eps)


def test_weight_standardization_is_bits_formula():
    rng = np.random.default_rng(0)
    # Trained-scale kernels, plus one output channel whose variance is comparable to eps,
    # where the placement of eps (inside the square root, not added to the std) decides
    # the value: BiT's formula gives that channel a std of sqrt(var / (var + eps)).
    k = rng.normal(0.0, 0.05, size=(3, 3, 16, 8)).astype(np.float32)
    k[..., 0] = rng.normal(0.0, 1e-4, size=(3, 3, 16)).astype(np.float32)
    bit_eps = models.create_model('resnetv2_50x1_bit').std_eps
    assert bit_eps == 1e-8  # timm's BiT StdConv2d (the parity reference); BiT's own code: 1e-10
    for eps in (bit_eps, 1e-10):
        ours = np.asarray(layers.standardize_kernel(jnp.asarray(k), eps))
        np.testing.assert_allclose(ours, _bit_standardize(k, eps), rtol=1e-5, atol=1e-6)
    small = np.asarray(layers.standardize_kernel(jnp.asarray(k), bit_eps))[..., 0]
    var = k[..., 0].astype(np.float64).var()
    assert small.std() == pytest.approx(math.sqrt(var / (var + bit_eps)), rel=1e-4)
    centred = k[..., 0] - k[..., 0].mean()
    eps_on_std = centred / (centred.std() + bit_eps)  # the other placement: std ~1.0
    assert abs(eps_on_std.std() - small.std()) > 0.2
    # 1e-8 vs BiT's 1e-10 moves trained-scale kernels by about eps / (2 var) ~ 2e-6.
    a = np.asarray(layers.standardize_kernel(jnp.asarray(k[..., 1:]), 1e-8))
    b = np.asarray(layers.standardize_kernel(jnp.asarray(k[..., 1:]), 1e-10))
    np.testing.assert_allclose(a, b, rtol=1e-5)


def test_bfloat16_std_conv_standardizes_the_float32_kernel():
    # A kernel whose structure lives below bfloat16's resolution: 1 + N(0, 1e-3) has its
    # noise at 2^-10, under bfloat16's 2^-7 spacing near 1. Standardising a bfloat16
    # copy would see a constant kernel; standardising the float32 parameter sees the noise.
    rng = np.random.default_rng(0)
    kh, kw, cin, cout = 3, 3, 4, 5
    kernel = (1.0 + rng.normal(0.0, 1e-3, size=(kh, kw, cin, cout))).astype(np.float32)
    conv = layers.StdConv(cout, (kh, kw), padding='VALID', use_bias=False, dtype=jnp.bfloat16,
                          param_dtype=jnp.float32, eps=1e-8)
    # One-hot inputs the size of the kernel: output[n] is kernel[h, w, c, :] for the nth
    # (h, w, c), read through the convolution itself (products with 1 and sums of zeros
    # are exact in bfloat16).
    eye = np.eye(kh * kw * cin, dtype=np.float32).reshape(-1, kh, kw, cin)
    variables = {'params': {'kernel': jnp.asarray(kernel)}}
    seen = conv.apply(variables, jnp.asarray(eye)).reshape(kh, kw, cin, cout)
    assert seen.dtype == jnp.bfloat16
    assert jax.eval_shape(conv.init, jax.random.key(0), jnp.asarray(eye))['params']['kernel'].dtype == jnp.float32

    f32 = layers.standardize_kernel(jnp.asarray(kernel), 1e-8)
    assert f32.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(seen), np.asarray(f32.astype(jnp.bfloat16)))
    np.testing.assert_allclose(np.asarray(seen, np.float32), np.asarray(f32), rtol=2**-8, atol=0)
    var = kernel.astype(np.float64).var(axis=(0, 1, 2))  # ~1e-6: eps = 1e-8 is 1 % of it
    np.testing.assert_allclose(np.asarray(f32).std(axis=(0, 1, 2)), np.sqrt(var / (var + 1e-8)), rtol=1e-3)
    # What the float32 statistics avoid: statistics of the bfloat16 copy lose the kernel.
    from_bf16 = layers.standardize_kernel(jnp.asarray(kernel).astype(jnp.bfloat16), 1e-8)
    assert np.abs(np.asarray(from_bf16, np.float32) - np.asarray(f32)).max() > 0.5

    # The same holds inside a bfloat16 BiT network: parameters float32, activations bfloat16.
    model = models.create_model('resnetv2_50x1_bit', num_classes=10, dtype=jnp.bfloat16,
                                stage_sizes=(1, 1, 1, 1), widths=(32, 64, 128, 256),
                                stem_width=16, gn_groups=4)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    assert {p.dtype for p in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
