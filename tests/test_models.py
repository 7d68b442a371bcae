"""Tests of models/: parameter counts, forward/backward, layers, registry, conversion.

Kept to tiny inputs and few compilations (shapes via ``jax.eval_shape``) so the file runs
in well under a minute on 2 CPU cores.
"""

from __future__ import annotations

import functools
import logging

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from modeltest import abstract_variables, compile_fast, normal, num_params, run_fast, train_step  # noqa: E402

import models
from models import layers

# torchvision parameter counts at 1000 classes (torchvision.models docs / sum of numel()).
TORCHVISION_PARAMS = {
    'resnet18': 11_689_512,
    'resnet34': 21_797_672,
    'resnet50': 25_557_032,
    'resnet101': 44_549_160,
    'resnet152': 60_192_808,
}
LENET5_PARAMS = 156 + 12 + 1_516 + 32 + 48_120 + 10_164 + 850  # = 60,850, models/lenet.py


# Compilation dominates these tests (XLA:CPU takes ~30 s to optimise ResNet-18's ``init``
# RNG code on a busy 2-core machine). Each compiled function runs once or twice, so trade
# run time for compile time.


def _random_variables(model, shape, seed=0):
    """Concrete variables with the model's structure, without compiling ``init``."""
    abstract = abstract_variables(model, shape)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), abstract)


@pytest.fixture(scope='module')
def tiny():
    """resnet_tiny, its initialised variables, a batch and a jitted eval forward."""
    model = models.create_model('resnet_tiny')
    x = normal((2, 32, 32, 3))
    variables = _init('resnet_tiny', (2, 32, 32, 3))
    forward = compile_fast(functools.partial(model.apply, train=False), variables, x)
    return model, variables, x, forward


# --------------------------------------------------------------------------- param counts


@pytest.mark.parametrize('name', sorted(TORCHVISION_PARAMS))
def test_resnet_param_count_matches_torchvision(name):
    variables = abstract_variables(models.create_model(name), (1, 64, 64, 3))
    assert num_params(variables['params']) == TORCHVISION_PARAMS[name]


def test_lenet5_param_count():
    variables = abstract_variables(models.create_model('lenet5'), (1, 32, 32, 1))
    assert num_params(variables) == LENET5_PARAMS == 60_850
    params = variables['params']
    # Table I: 60 C3 kernels of 5x5.
    c3 = params['c3']
    assert sum(c3[f'map{j}']['kernel'].shape[2] for j in range(16)) == 60
    assert num_params(c3) == 1_516


def test_lenet5_c3_follows_table_i():
    from models.lenet import C3_TABLE, PartialConv

    c3 = PartialConv(C3_TABLE, 5)
    x = normal((1, 14, 14, 6))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(
        lambda s: rng.standard_normal(s.shape).astype(s.dtype),
        jax.eval_shape(c3.init, jax.random.key(0), x),
    )
    forward = compile_fast(c3.apply, variables, x)
    base = forward(variables, x)
    assert base.shape == (1, 10, 10, 16)
    for s2_map in range(6):
        changed = np.abs(forward(variables, x.at[..., s2_map].add(1.0)) - base).max(axis=(0, 1, 2))
        feeds = np.array([s2_map in inputs for inputs in C3_TABLE])
        assert feeds.sum() == 10  # every S2 map feeds 10 of the 16 C3 maps (Table I rows)
        np.testing.assert_array_equal(changed > 0, feeds)


def test_batch_stats_only_with_batch_norm():
    bn = abstract_variables(models.create_model('resnet18'), (1, 32, 32, 3))
    gn = abstract_variables(
        models.create_model('resnet18', norm='group', weight_std=True), (1, 32, 32, 3)
    )
    assert set(bn) == {'params', 'batch_stats'}
    assert set(gn) == {'params'}
    # Same parameter count: GN scale/bias replace BN scale/bias one for one.
    assert num_params(gn['params']) == TORCHVISION_PARAMS['resnet18']
    assert set(abstract_variables(models.create_model('lenet5'), (1, 32, 32, 1))) == {'params'}
    lenet_bn = abstract_variables(models.create_model('lenet5', norm='batch'), (1, 32, 32, 1))
    assert set(lenet_bn['batch_stats']) == {'n1', 'n3', 'n5'}


# ----------------------------------------------------------------- forward and backward


_INIT_CACHE: dict = {}


def _init(name: str, shape: tuple[int, ...]):
    """Initialised variables of a registered model, compiled once per (name, shape)."""
    if (name, shape) not in _INIT_CACHE:
        model = models.create_model(name)
        x = jnp.zeros(shape)
        _INIT_CACHE[name, shape] = run_fast(lambda x: model.init(jax.random.key(0), x, train=False), x)
    return _INIT_CACHE[name, shape]


# The GN + WS ResNet-18 and the 28 px LeNet reuse the parameters of the default variant
# (same tree: GN scale/bias replace BN scale/bias; LeNet's weights are size-independent)
# to save compilations; their own init structure is checked with eval_shape above.
@pytest.mark.parametrize(
    'name, size, channels, overrides',
    [
        ('resnet_tiny', 32, 3, {}),
        ('resnet18', 32, 3, {}),
        ('resnet18', 32, 3, {'norm': 'group', 'weight_std': True}),
        ('lenet5', 32, 1, {}),
        ('lenet5', 28, 1, {'drop_rate': 0.5}),
    ],
)
def test_forward_backward(name, size, channels, overrides):
    model = models.create_model(name, **overrides)
    variables = _init(name, (2, 32, 32, channels))
    if model.norm != 'batch':
        variables = {'params': variables['params']}
    x = normal((2, size, size, channels))
    loss, logits, updates, grads = train_step(model, variables, x, jnp.array([1, 3]))
    chex.assert_shape(logits, (2, model.num_classes))
    assert logits.dtype == jnp.float32
    chex.assert_tree_all_finite((loss, logits, grads))
    # Every parameter receives gradient signal (a disconnected layer would give zeros).
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    if 'batch_stats' in variables:
        old = jax.tree.leaves(variables['batch_stats'])
        new = jax.tree.leaves(updates['batch_stats'])
        assert len(old) == len(new) > 0
        assert all(not np.allclose(o, n) for o, n in zip(old, new, strict=True))
    else:
        assert updates == {}


def test_bfloat16_compute_keeps_float32_params_and_logits(tiny):
    _, variables, x, _ = tiny
    model = models.create_model('resnet_tiny', dtype=jnp.bfloat16)
    abstract = abstract_variables(model, x.shape)
    assert {p.dtype for p in jax.tree.leaves(abstract)} == {jnp.dtype(jnp.float32)}
    chex.assert_trees_all_equal_shapes_and_dtypes(abstract, variables)
    logits, features = run_fast(functools.partial(model.apply, return_features=True), variables, x)
    assert logits.dtype == jnp.float32
    assert features['stage4'].dtype == jnp.bfloat16
    chex.assert_tree_all_finite(logits)
    lenet = models.create_model('lenet5', dtype=jnp.bfloat16, norm='group')
    lenet_vars = abstract_variables(lenet, (1, 32, 32, 1))
    assert {p.dtype for p in jax.tree.leaves(lenet_vars)} == {jnp.dtype(jnp.float32)}
    assert jax.eval_shape(lenet.apply, lenet_vars, jnp.zeros((1, 32, 32, 1))).dtype == jnp.float32


def test_lenet5_feature_shapes_at_32_and_28():
    model = models.create_model('lenet5')
    for size, s4 in ((32, 5), (28, 4)):
        x = jnp.zeros((2, size, size, 1))
        variables = abstract_variables(model, x.shape)
        logits, feats = jax.eval_shape(
            functools.partial(model.apply, return_features=True), variables, x
        )
        assert logits.shape == (2, 10)
        assert feats['c1'].shape == (2, size - 4, size - 4, 6)
        assert feats['s4'].shape == (2, s4, s4, 16)
        assert feats['c5'].shape == (2, 1, 1, 120)
        assert feats['pre_logits'].shape == (2, 84)


# ------------------------------------------------------------------------------ layers


def test_std_conv_standardizes_kernel_per_output_channel():
    raw = normal((3, 3, 8, 4), scale=3.0, shift=1.5)
    w = np.asarray(layers.standardize_kernel(raw, eps=1e-8))
    np.testing.assert_allclose(w.mean(axis=(0, 1, 2)), 0.0, atol=1e-6)
    np.testing.assert_allclose(w.var(axis=(0, 1, 2)), 1.0, rtol=1e-5)

    # The module stores the raw kernel and convolves with the standardised one.
    x = normal((1, 5, 5, 8), seed=1)
    conv = layers.StdConv(4, (3, 3), padding='VALID', use_bias=False)
    assert jax.eval_shape(conv.init, jax.random.key(0), x)['params']['kernel'].shape == raw.shape
    got = conv.apply({'params': {'kernel': raw}}, x)
    expected = nn.Conv(4, (3, 3), padding='VALID', use_bias=False).apply(
        {'params': {'kernel': jnp.asarray(w)}}, x
    )
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    plain = nn.Conv(4, (3, 3), padding='VALID', use_bias=False).apply({'params': {'kernel': raw}}, x)
    assert not np.allclose(got, plain)


def test_group_norm_falls_back_to_a_divisor_for_narrow_layers():
    assert layers._largest_divisor_at_most(64, 32) == 32
    assert layers._largest_divisor_at_most(6, 32) == 6
    assert layers._largest_divisor_at_most(84, 32) == 28
    x = normal((2, 4, 4, 6), scale=5.0, shift=3.0)
    y = layers.GroupNorm().apply({'params': {'scale': jnp.ones(6), 'bias': jnp.zeros(6)}}, x)
    # 6 groups of 1 channel: each (example, channel) is normalised over space.
    np.testing.assert_allclose(y.mean(axis=(1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.var(axis=(1, 2)), 1.0, rtol=1e-3)


def test_symmetric_padding_matches_torch():
    assert layers.get_padding('symmetric', 7, 2) == [(3, 3), (3, 3)]
    assert layers.get_padding('symmetric', 3, 1) == [(1, 1), (1, 1)]
    assert layers.get_padding('symmetric', 1, 2) == [(0, 0), (0, 0)]
    assert layers.get_padding('tf_same', 3, 2) == 'SAME'
    with pytest.raises(ValueError, match='padding mode'):
        layers.get_padding('reflect', 3)


def test_drop_path():
    x = jnp.ones((64, 2, 2, 3))
    dp = layers.DropPath(rate=0.5)
    np.testing.assert_array_equal(dp.apply({}, x, train=False), x)
    y = run_fast(lambda x: dp.apply({}, x, train=True, rngs={'dropout': jax.random.key(0)}), x)
    per_example = np.unique(np.asarray(y).reshape(64, -1), axis=1)
    assert per_example.shape == (64, 1)  # whole example kept or dropped
    assert set(np.unique(per_example)) == {0.0, 2.0}


def test_drop_path_and_dropout_are_identity_at_eval(tiny):
    model, variables, x, forward = tiny
    noisy = model.clone(drop_path_rate=0.5, drop_rate=0.5)
    np.testing.assert_array_equal(
        run_fast(functools.partial(noisy.apply, train=False), variables, x), forward(variables, x)
    )


# ---------------------------------------------------------------------------- features


def test_num_classes_zero_and_return_features_shapes():
    model = models.create_model('resnet50')
    x = jnp.zeros((2, 224, 224, 3))
    variables = abstract_variables(model, (1, 64, 64, 3))
    logits, feats = jax.eval_shape(functools.partial(model.apply, return_features=True), variables, x)
    assert logits.shape == (2, 1000) and logits.dtype == jnp.float32
    assert {k: v.shape for k, v in feats.items()} == {
        'stem': (2, 56, 56, 64),
        'stage1': (2, 56, 56, 256),
        'stage2': (2, 28, 28, 512),
        'stage3': (2, 14, 14, 1024),
        'stage4': (2, 7, 7, 2048),
        'pre_logits': (2, 2048),
    }
    headless = models.create_model('resnet50', num_classes=0)
    head_vars = abstract_variables(headless, (1, 64, 64, 3))
    assert 'fc' not in head_vars['params']
    pooled = jax.eval_shape(functools.partial(headless.apply, train=False), head_vars, x)
    assert pooled.shape == (2, 2048) and pooled.dtype == jnp.float32
    lenet = models.create_model('lenet5', num_classes=0)
    out = jax.eval_shape(lenet.apply, abstract_variables(lenet, (1, 32, 32, 1)), jnp.zeros((3, 32, 32, 1)))
    assert out.shape == (3, 84)


def test_cifar_stem_features(tiny):
    model, variables, x, _ = tiny
    _, feats = jax.eval_shape(functools.partial(model.apply, return_features=True), variables, x)
    assert feats['stem'].shape == (2, 32, 32, 16)
    assert feats['stage4'].shape == (2, 4, 4, 128)


# ----------------------------------------------------------------------------- padding


def _first_model_of_each_family() -> list[str]:
    """One registered name per family (VGG registers one family per variant)."""
    first: dict[str, str] = {}
    for name in models.list_models():
        first.setdefault(models.get_model_family(name), name)
    return sorted(first.values())


@pytest.mark.parametrize('name', _first_model_of_each_family())
def test_padding_switch_reaches_every_family(name):
    shape = (1, *models.get_model_cfg(name).input_size)
    symmetric = models.create_model(name, padding='symmetric')
    tf_same = models.create_model(name, padding='tf_same')
    assert (symmetric.padding, tf_same.padding) == ('symmetric', 'tf_same')
    # Padding adds no parameters: the same tree, so converted weights load in either mode.
    chex.assert_trees_all_equal_shapes_and_dtypes(
        abstract_variables(symmetric, shape), abstract_variables(tf_same, shape)
    )
    with pytest.raises(ValueError, match='symmetric') as info:
        abstract_variables(models.create_model(name, padding='reflect'), shape)
    assert 'tf_same' in str(info.value) and 'reflect' in str(info.value)


def _unit_scale_variables(model, shape, seed=0):
    """Random variables keeping activations O(1): kernels N(0, 1/fan_in), norm scales near 1,
    other vectors N(0, 0.01), BatchNorm statistics mean 0 / var 1 (no ``init`` compile)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        key = path[-1].key
        if key in ('mean', 'var'):
            return np.full(leaf.shape, float(key == 'var'), leaf.dtype)
        if len(leaf.shape) > 1:
            value = rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
        else:
            value = 0.1 * rng.standard_normal(leaf.shape) + (key == 'scale')
        return value.astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract_variables(model, shape))


# Even inputs, where TF SAME pads a strided layer bottom/right only. squeezenet1_1: its
# ceil-mode pools see odd maps (32 -> 15), where SAME pads both sides; legacy_xception at
# 80 px: block3's max-pool sees an even map. LeNet-5 has no padded layers at all.
@pytest.mark.parametrize(
    'name, size, differs',
    [
        ('squeezenet1_1', 32, True),
        ('shufflenet_v2_x0_5', 32, True),
        ('legacy_xception', 80, True),
        ('lenet5', 32, False),
    ],
)
def test_tf_same_padding_changes_outputs(name, size, differs):
    symmetric = models.create_model(name, num_classes=10)
    tf_same = models.create_model(name, num_classes=10, padding='tf_same')
    x = normal((1, size, size, models.get_model_cfg(name).input_size[2]), seed=1)
    variables = _unit_scale_variables(symmetric, x.shape)
    expected = run_fast(functools.partial(symmetric.apply, train=False), variables, x)
    got = run_fast(functools.partial(tf_same.apply, train=False), variables, x)
    chex.assert_tree_all_finite((expected, got))
    if differs:
        assert float(jnp.abs(got - expected).max()) > 1e-3 * float(jnp.abs(expected).max())
    else:
        np.testing.assert_array_equal(got, expected)


# ---------------------------------------------------------------------------- registry


def test_list_models_and_cfg():
    assert models.list_models('resnet[0-9_]*') == [
        'resnet101',
        'resnet152',
        'resnet18',
        'resnet34',
        'resnet50',
        'resnet_tiny',
    ]
    assert 'lenet5' in models.list_models()
    cfg = models.get_model_cfg('resnet50')
    assert cfg.top1 == 76.130 and cfg.input_size == (224, 224, 3) and cfg.crop_pct == 0.875
    assert cfg.mean == (0.485, 0.456, 0.406) and cfg.std == (0.229, 0.224, 0.225)
    lenet = models.get_model_cfg('lenet5')
    assert lenet.input_size == (32, 32, 1) and lenet.num_classes == 10
    assert models.create_model('lenet5').num_classes == 10
    assert models.create_model('resnet18').num_classes == 1000
    assert models.create_model('resnet18', num_classes=5, norm='group').norm == 'group'


def test_unknown_model_suggests_close_names():
    with pytest.raises(models.UnknownModelError, match='resnet50') as info:
        models.create_model('resnt50')
    assert "list_models('pattern*')" in str(info.value)
    assert isinstance(info.value, ValueError)
    with pytest.raises(models.UnknownModelError):
        models.get_model_cfg('nope')


def test_bad_override_names_key_and_accepted_fields():
    with pytest.raises(TypeError, match='drop_path') as info:
        models.create_model('resnet18', drop_path=0.1)
    assert 'drop_path_rate' in str(info.value) and 'weight_std' in str(info.value)


def test_duplicate_registration_raises():
    with pytest.raises(ValueError, match='already registered'):
        models.register_model()(models.resnet.resnet18)


# -------------------------------------------------------------------------- conversion


def test_convert_round_trip_reproduces_variables_and_logits(tiny):
    _, variables, x, forward = tiny
    state_dict = models.export_state_dict('resnet_tiny', variables)
    assert state_dict['conv1.weight'].shape == (16, 3, 3, 3)  # OIHW
    assert state_dict['layer2.0.downsample.0.weight'].shape == (32, 16, 1, 1)
    assert state_dict['fc.weight'].shape == (10, 128)
    assert 'bn1.running_var' in state_dict
    converted = models.convert_state_dict('resnet_tiny', state_dict)
    chex.assert_trees_all_equal(converted, variables)
    np.testing.assert_array_equal(forward(converted, x), forward(variables, x))


def test_resnet50_state_dict_names_match_torchvision():
    model = models.create_model('resnet50')
    variables = _random_variables(model, (1, 64, 64, 3))
    state_dict = models.export_state_dict('resnet50', variables)
    # torchvision's resnet50 state dict has 320 entries, 53 of them num_batches_tracked.
    assert len(state_dict) == 320 - 53
    assert state_dict['conv1.weight'].shape == (64, 3, 7, 7)
    assert state_dict['layer1.0.downsample.0.weight'].shape == (256, 64, 1, 1)
    assert state_dict['layer1.0.downsample.1.running_mean'].shape == (256,)
    assert state_dict['layer4.2.conv3.weight'].shape == (2048, 512, 1, 1)
    assert state_dict['layer3.5.bn2.weight'].shape == (256,)
    assert state_dict['fc.weight'].shape == (1000, 2048)
    state_dict.update({k: np.array(0) for k in ('bn1.num_batches_tracked', 'layer1.0.bn1.num_batches_tracked')})
    chex.assert_trees_all_equal(models.convert_state_dict('resnet50', state_dict), variables)


def test_lenet5_round_trip():
    model = models.create_model('lenet5', norm='batch')
    variables = _random_variables(model, (1, 32, 32, 1))
    state_dict = models.export_state_dict('lenet5', variables)
    assert state_dict['c3.15.weight'].shape == (1, 6, 5, 5)
    assert state_dict['c3.0.weight'].shape == (1, 3, 5, 5)
    assert state_dict['s2.weight'].shape == (6,)
    assert state_dict['n5.running_var'].shape == (120,)
    converted = models.convert_state_dict('lenet5', state_dict, norm='batch')
    chex.assert_trees_all_equal(converted, variables)


def test_strict_conversion_reports_missing_unexpected_and_mismatched(tiny, caplog):
    _, variables, _, _ = tiny
    state_dict = models.export_state_dict('resnet_tiny', variables)
    del state_dict['layer3.0.bn2.running_var']
    state_dict['fc.weight'] = np.zeros((5, 128), np.float32)
    state_dict['layer1.0.conv9.weight'] = np.zeros((1,), np.float32)
    state_dict['layer1.0.bn1.num_batches_tracked'] = np.array(7)
    with pytest.raises(models.ConversionError) as info:
        models.convert_state_dict('resnet_tiny', state_dict)
    message = str(info.value)
    assert 'layer3.0.bn2.running_var -> batch_stats/layer3_0/bn2/var' in message
    assert 'fc.weight: got (5, 128), expected (10, 128)' in message
    assert 'layer1.0.conv9.weight' in message
    assert 'num_batches_tracked' not in message
    assert info.value.unexpected == ['layer1.0.conv9.weight']

    with caplog.at_level(logging.WARNING):
        partial = models.convert_state_dict('resnet_tiny', state_dict, strict=False)
    assert 'layer3.0.bn2.running_var' in caplog.text
    assert 'kernel' not in partial['params']['fc']
    assert 'var' not in partial['batch_stats']['layer3_0']['bn2']
    filled = models.convert_state_dict(
        'resnet_tiny', state_dict, strict=False, init_variables=variables
    )
    chex.assert_trees_all_equal(filled, variables)
