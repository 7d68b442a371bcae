"""Tests of models/efficientnet.py and configs/effnet_b*.py.

Parameter counts against timm (jax.eval_shape only), logits parity with timm for both
padding conventions, forward/backward with BatchNorm and GN + weight standardisation, the
feature dict, and one training step of the B0 ImageNet recipe under mock data.
"""

from __future__ import annotations

import functools
import importlib
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

# Imported before TensorFlow (which trainers/ and input_pipeline/ load): with TensorFlow
# already loaded, importing timm crashes the interpreter in this environment.
torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')

import tensorflow_datasets as tfds  # noqa: E402
from modeltest import num_params, train_step  # noqa: E402
from parity import assert_logits_match  # noqa: E402

import models  # noqa: E402
from models import efficientnet  # noqa: E402
from trainers import supervised  # noqa: E402

# sum(p.numel() for p in timm.create_model(name).parameters()) with timm 1.0.29, models
# built under torch.device('meta') (no memory). The tf_ ports of B0..B7 have the same
# counts as the symmetric ones (padding adds no parameters); tracing all 17 models costs
# minutes on a busy 2-core CPU, so one tf_ port is counted here, and the parity tests'
# strict conversions of tf_efficientnet_b0 / b3 pin the others' layouts.
TIMM_PARAMS = {
    'efficientnet_b0': 5_288_548,
    'efficientnet_b1': 7_794_184,
    'efficientnet_b2': 9_109_994,
    'efficientnet_b3': 12_233_232,
    'efficientnet_b4': 19_341_616,
    'efficientnet_b5': 30_389_784,
    'efficientnet_b6': 43_040_704,
    'efficientnet_b7': 66_347_960,
    'tf_efficientnet_l2': 480_309_308,
}
TIMM_PARAMS['tf_efficientnet_b0'] = TIMM_PARAMS['efficientnet_b0']
# Blocks per stage in the same timm models (len of each ``blocks[i]``).
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


def _random_variables(model, size=32):
    """Concrete variables without compiling ``init`` (its RNG code is slow to compile on CPU).

    Parameters ~ N(0, 0.1^2); BatchNorm statistics at their initial mean 0, variance 1.
    """
    rng = np.random.default_rng(0)
    flat = traverse_util.flatten_dict(_abstract_variables(model, size))
    out = {}
    for key, s in flat.items():
        if key[0] == 'batch_stats':
            out[key] = np.full(s.shape, 1.0 if key[-1] == 'var' else 0.0, s.dtype)
        else:
            out[key] = (0.1 * rng.standard_normal(s.shape)).astype(s.dtype)
    return traverse_util.unflatten_dict(out)


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
    assert efficientnet.round_channels(32, 1.1) == 32
    assert efficientnet.round_channels(32, 1.2) == 40
    assert efficientnet.round_channels(1280, 4.3) == 5504
    assert efficientnet.round_channels(16, 1.0) == 16
    for variant, depths in TIMM_DEPTHS.items():
        sc = efficientnet.VARIANTS[variant]
        model = efficientnet.EfficientNet(width_mult=sc.width, depth_mult=sc.depth)
        assert tuple(r for _, r, _ in model.stage_args()) == depths


@pytest.mark.parametrize('name', sorted(TIMM_PARAMS))
def test_param_count_matches_timm(name):
    variables = _abstract_variables(models.create_model(name))
    assert num_params(variables['params']) == TIMM_PARAMS[name]


def test_group_norm_twin_has_same_params_and_no_batch_stats():
    bn = _abstract_variables(models.create_model('efficientnet_b0'))
    gn = _abstract_variables(models.create_model('efficientnet_b0', norm='group', weight_std=True))
    assert set(bn) == {'params', 'batch_stats'} and set(gn) == {'params'}
    chex.assert_trees_all_equal_shapes(bn['params'], gn['params'])
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


# ----------------------------------------------------------------- forward and backward


# A narrow, shallow B0 (one block per stage, 1/4 width) keeps XLA:CPU compile time down;
# the full B0 trains a BatchNorm step in the config test below.
@pytest.mark.parametrize('overrides', [{'norm': 'group', 'weight_std': True}, {}])
def test_forward_backward(overrides):
    model = models.create_model(
        'efficientnet_b0', num_classes=10, width_mult=0.25, depth_mult=0.3, **overrides
    )
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
    variables = _random_variables(model)
    loss, logits, updates, grads = train_step(model, variables, x, jnp.array([1, 3]))
    chex.assert_shape(logits, (2, 10))
    assert logits.dtype == jnp.float32
    chex.assert_tree_all_finite((loss, grads))
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    if model.norm == 'batch':
        old = traverse_util.flatten_dict(variables['batch_stats'])
        new = traverse_util.flatten_dict(updates['batch_stats'])
        assert set(old) == set(new) and old
        # Every running variance moves. Some running means legitimately stay at 0: a 1x1
        # conv right after a norm without activation (bn3 -> next block's conv_pw) keeps the
        # batch mean at exactly 0 when the norm offset is 0, as it is at init.
        assert all(not np.allclose(old[k], new[k]) for k in old if k[-1] == 'var')
    else:
        assert 'batch_stats' not in variables and updates == {}


def test_features_and_headless_shapes():
    model = models.create_model('tf_efficientnet_b0', dtype=jnp.bfloat16)
    x = jnp.zeros((2, 224, 224, 3))
    variables = _abstract_variables(model)
    assert {p.dtype for p in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    logits, feats = jax.eval_shape(
        functools.partial(model.apply, return_features=True), variables, x
    )
    assert logits.shape == (2, 1000) and logits.dtype == jnp.float32
    assert {k: v.shape for k, v in feats.items()} == {
        'stem': (2, 112, 112, 32),
        'stage1': (2, 112, 112, 16),
        'stage2': (2, 56, 56, 24),
        'stage3': (2, 28, 28, 40),
        'stage4': (2, 14, 14, 80),
        'stage5': (2, 14, 14, 112),
        'stage6': (2, 7, 7, 192),
        'stage7': (2, 7, 7, 320),
        'pre_logits': (2, 1280),
    }
    headless = models.create_model('efficientnet_b0', num_classes=0)
    head_vars = _abstract_variables(headless)
    assert 'classifier' not in head_vars['params']
    pooled = jax.eval_shape(functools.partial(headless.apply, train=False), head_vars, x)
    assert pooled.shape == (2, 1280) and pooled.dtype == jnp.float32


# ----------------------------------------------------------------------------- configs


def test_effnet_b0_config_one_step_under_mock_data(tmp_path):
    from configs import effnet_b0

    config = effnet_b0.get_config()
    # The paper's recipe, shrunk only where CI's 2 CPU cores need it.
    config.num_train_steps = 1
    config.batch_size = 2
    config.eval_batch_size = 2
    config.image_size = 64
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
