"""Tests of models/efficientnet.py and configs/effnet_b*.py.

The block-string decoding and scaling rules, the SE width and drop-path rules, logits
parity with timm for both padding conventions, timm's state-dict names, and one training
step of the B0 ImageNet recipe under mock data. Counts (equal to timm 1.0.29's), shapes,
twins and train steps of every model: tests/test_models_registry.py.
"""

from __future__ import annotations

import functools
import importlib
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

# Imported before TensorFlow (which trainers/ and input_pipeline/ load): with TensorFlow
# already loaded, importing timm crashes the interpreter in this environment.
torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')

import tensorflow_datasets as tfds  # noqa: E402
from parity import assert_logits_match  # noqa: E402

import models  # noqa: E402
from models import efficientnet, layers  # noqa: E402
from trainers import supervised  # noqa: E402

# Blocks per stage in timm's models (len of each ``blocks[i]``).
TIMM_DEPTHS = {
    'b0': (1, 2, 2, 3, 3, 4, 1),
    'b1': (2, 3, 3, 4, 4, 5, 2),
    'b3': (2, 3, 3, 5, 5, 6, 2),
    'b7': (4, 7, 7, 10, 10, 13, 4),
    'l2': (6, 11, 11, 16, 16, 22, 6),
}


def _abstract_variables(model, size=32):
    return jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
    )


# ------------------------------------------------------------------- architecture data


def test_registered_names():
    expected = {f'{p}efficientnet_b{i}' for p in ('', 'tf_') for i in range(8)}
    assert set(models.list_models('*efficientnet_*')) == expected | {'tf_efficientnet_l2'}
    assert models.create_model('efficientnet_b3').padding == 'symmetric'
    assert models.create_model('tf_efficientnet_b3').padding == 'tf_same'
    cfg = models.get_model_cfg('tf_efficientnet_b7')
    assert cfg.input_size == (600, 600, 3) and cfg.interpolation == 'bicubic'
    assert round(cfg.crop_pct, 3) == 0.949  # timm's tf_efficientnet_b7 cfg
    assert models.get_model_cfg('efficientnet_b0').top1 == 77.1
    assert models.get_model_cfg('tf_efficientnet_l2').top1 == 88.4


def test_decode_block_and_scaling_rules():
    assert efficientnet.decode_block('ir_r2_k3_s2_e6_c24_se0.25') == efficientnet.BlockArgs(
        block='ir', repeats=2, kernel=3, stride=2, expand=6.0, out_channels=24, se_ratio=0.25
    )
    ds = efficientnet.decode_block('ds_r1_k3_s1_e1_c16_se0.25')
    assert ds.block == 'ds' and ds.expand == 1.0
    for bad in ('er_r1_k3_s1_c16', 'ir_r1_k3_s1_c16_noskip', 'ir_k3_s1_c16'):
        with pytest.raises(ValueError):
            efficientnet.decode_block(bad)
    # TF round_filters: nearest multiple of 8, never more than 10% below.
    assert layers.make_divisible(32 * 1.1) == 32
    assert layers.make_divisible(32 * 1.2) == 40
    assert layers.make_divisible(1280 * 4.3) == 5504
    assert layers.make_divisible(16 * 1.0) == 16
    for variant, depths in TIMM_DEPTHS.items():
        sc = efficientnet.VARIANTS[variant]
        model = efficientnet.EfficientNet(width_mult=sc.width, depth_mult=sc.depth)
        assert tuple(r for _, r, _ in model.stage_args()) == depths


def test_squeeze_excite_width_follows_the_block_input():
    bn = _abstract_variables(models.create_model('efficientnet_b0'))
    # SE bottleneck: 1/4 of the block's *input* channels (Tan & Le 2019), not of the
    # expanded width: blocks_1_0 takes 16 channels, expands to 96, squeezes to 4.
    se = bn['params']['blocks_1_0']['se']
    assert se['fc1']['kernel'].shape == (1, 1, 96, 4)
    assert bn['params']['blocks_0_0']['se']['fc1']['kernel'].shape == (1, 1, 32, 8)


def test_drop_path_rate_grows_linearly_per_block():
    model = models.create_model('efficientnet_b0', drop_path_rate=0.2)
    x = jnp.zeros((1, 32, 32, 3))
    variables = _abstract_variables(model)
    rates = {}

    def record(next_fun, args, kwargs, context):
        if context.method_name == '__call__' and (context.module.name or '').startswith('blocks_'):
            rates[context.module.name] = context.module.drop_path_rate
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(functools.partial(model.apply, train=False), variables, x)
    ordered = [rates[f'blocks_{s}_{b}'] for s, r in enumerate(TIMM_DEPTHS['b0']) for b in range(r)]
    np.testing.assert_allclose(ordered, 0.2 * np.arange(16) / 16)


# ------------------------------------------------------------------------------ parity


@pytest.mark.parametrize(
    'name, resolution',
    [
        ('efficientnet_b0', 224),
        ('efficientnet_b0', 193),
        # TF SAME pads strided convs asymmetrically; at odd sizes differently from even ones.
        ('tf_efficientnet_b0', 224),
        ('tf_efficientnet_b0', 193),
        ('tf_efficientnet_b3', 64),
    ],
)
def test_logits_match_timm(name, resolution):
    err = assert_logits_match(name, timm.create_model(name), resolution=resolution)
    assert err <= 1e-4


def test_state_dict_names_match_timm():
    with torch.device('meta'):
        reference = timm.create_model('tf_efficientnet_b3')
    ref = {k: tuple(v.shape) for k, v in reference.state_dict().items() if 'num_batches' not in k}
    model = models.create_model('tf_efficientnet_b3')
    variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), _abstract_variables(model))
    ours = models.export_state_dict('tf_efficientnet_b3', variables)
    assert {k: v.shape for k, v in ours.items()} == ref


# ----------------------------------------------------------------------------- configs


def test_effnet_b0_config_one_step_under_mock_data(tmp_path):
    from configs import effnet_b0

    config = effnet_b0.get_config()
    # The paper's recipe, shrunk only where CI's 2 CPU cores need it.
    config.num_train_steps = 1
    config.batch_size = 2
    config.eval_batch_size = 2
    config.image_size = 64
    # The same blocks, fewer and narrower: full-depth B0 compiles for a minute here.
    config.model_kwargs.depth_mult, config.model_kwargs.width_mult = 0.3, 0.25
    config.data.data_dir = str(tmp_path / 'tfds')
    with tfds.testing.mock_data(num_examples=4):
        results = supervised.train_and_evaluate(config, str(tmp_path / 'run'))
    assert results['step'] == 1
    assert results['num_examples'] == 4
    assert math.isfinite(results['loss']) and 0.0 <= results['top1'] <= 1.0
    assert results['model'] == 'efficientnet_b0'


# (resolution, dropout) per Tan & Le 2019 / the reference's scaling table.
_CONFIG_CHANGES = {
    1: (240, 0.2),
    2: (260, 0.3),
    3: (300, 0.3),
    4: (380, 0.4),
    5: (456, 0.4),
    6: (528, 0.5),
    7: (600, 0.5),
}


def _flat(config) -> dict:
    out = {}
    for key, value in config.items():
        if hasattr(value, 'items'):
            out.update({f'{key}.{k}': v for k, v in _flat(value).items()})
        else:
            out[key] = value
    return out


def test_effnet_b1_to_b7_configs_change_only_model_resolution_dropout_crop():
    from configs import effnet_b0

    base = _flat(effnet_b0.get_config())
    supervised.validate_config(effnet_b0.get_config())
    assert base['model'] == 'efficientnet_b0' and base['optimizer.name'] == 'rmsprop_tf'
    assert base['data.crop_pct'] == 224 / 256 and base['data.autoaugment'] == 'imagenet'
    for n, (res, dropout) in _CONFIG_CHANGES.items():
        config = importlib.import_module(f'configs.effnet_b{n}').get_config()
        supervised.validate_config(config)
        flat = _flat(config)
        changed = {k: v for k, v in flat.items() if base.get(k) != v}
        assert set(flat) == set(base)
        expected = {
            'model': f'efficientnet_b{n}',
            'image_size': res,
            'model_kwargs.drop_rate': dropout,
            'data.crop_pct': res / (res + 32),
        }
        assert changed == {k: v for k, v in expected.items() if base[k] != v}  # B1 keeps 0.2
        assert flat['model_kwargs.drop_rate'] == dropout
        assert abs(res / (res + 32) - models.get_model_cfg(f'tf_efficientnet_b{n}').crop_pct) < 1e-9
        assert efficientnet.VARIANTS[f'b{n}'].resolution == res
        assert efficientnet.VARIANTS[f'b{n}'].dropout == dropout
