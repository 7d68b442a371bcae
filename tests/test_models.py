"""Tests of models/: LeNet-5's structure, layers, the padding switch, the registry and
weight conversion (every registered model against the shared contract is
tests/test_models_registry.py).

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
from modeltest import (
    abstract_variables,
    compile_fast,
    normal,
    num_params,
    random_variables,
    run_fast,
)

import models
from models import layers

LENET5_PARAMS = 156 + 12 + 1_516 + 32 + 48_120 + 10_164 + 850  # = 60,850, models/lenet.py


@pytest.fixture(scope='module')
def tiny():
    """resnet_tiny, random variables, a batch and a jitted eval forward."""
    model = models.create_model('resnet_tiny')
    x = normal((2, 32, 32, 3))
    variables = random_variables(model, x.shape)
    forward = compile_fast(functools.partial(model.apply, train=False), variables, x)
    return model, variables, x, forward


# --------------------------------------------------------------------------- param counts


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


def test_lenet5_feature_shapes_at_32_and_28():
    model = models.create_model('lenet5', norm='batch')
    assert set(abstract_variables(model, (1, 32, 32, 1))['batch_stats']) == {'n1', 'n3', 'n5'}
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


# ----------------------------------------------------------------------------- padding


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
    variables = random_variables(symmetric, x.shape)
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


def test_registration_needs_a_new_name_a_family_and_the_declared_paths():
    register = functools.partial(models.register_model, family='resnet', classifier='fc', first_conv='conv1')
    with pytest.raises(ValueError, match='already registered'):
        register(name='resnet18')(models.resnet.ResNet)
    with pytest.raises(ValueError, match='already an alias'):
        register(name='xception')(models.xception.Xception)
    with pytest.raises(ValueError, match='classifier and first_conv'):
        models.register_model(family='resnet', name='resnet18_new', classifier='fc')(models.resnet.ResNet)
    assert 'resnet18_new' not in models.list_models()


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
    variables = random_variables(model, (1, 64, 64, 3))
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
    variables = random_variables(model, (1, 32, 32, 1))
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
