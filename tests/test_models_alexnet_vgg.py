"""AlexNet family (alexnet, alexnet_original, overfeat_*) and VGG: counts, parity, training.

Parity runs converted random-init torchvision weights through both implementations
(tests/parity.py). Everything else uses ``jax.eval_shape`` or batch-2 inputs at the
smallest resolution each architecture allows, so the file stays cheap on CPU.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models import alexnet as alexnet_lib

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')
from modeltest import num_params, train_step  # noqa: E402
from parity import assert_logits_match  # noqa: E402  (needs torch)

# sum(p.numel() for p in torchvision.models.<name>().parameters()), torchvision 0.29.1
# (the same numbers are the `num_params` of torchvision's IMAGENET1K_V1 weight metadata).
TORCHVISION_PARAMS = {
    'alexnet': 61_100_840,
    'vgg11': 132_863_336,
    'vgg11_bn': 132_868_840,
    'vgg13': 133_047_848,
    'vgg13_bn': 133_053_736,
    'vgg16': 138_357_544,
    'vgg16_bn': 138_365_992,
    'vgg19': 143_667_240,
    'vgg19_bn': 143_678_248,
}
# No reference implementation: the layer-table arithmetic of models/alexnet.py's docstring
# (Krizhevsky et al. 2012 Fig. 2; OverFeat Tables 1 and 3) and the papers' own figures.
PAPER_PARAMS = {
    'alexnet_original': (60_965_224, 60e6, 0.02),  # "60 million" (abstract), rounded
    'overfeat_fast': (145_920_872, 145e6, 0.01),  # OverFeat Table 4
    'overfeat_accurate': (144_656_488, 144e6, 0.01),  # OverFeat Table 4
}


def _abstract(model, size, batch=1):
    x = jnp.zeros((batch, size, size, 3))
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))


def _random_variables(model, size, seed=0):
    """He-scaled random variables with the model's structure, without compiling ``init``."""
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = path[-1].key
        if name == 'kernel':
            fan_in = int(np.prod(s.shape[:-1]))
            return rng.standard_normal(s.shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
        if name in ('scale', 'var'):
            return np.ones(s.shape, np.float32)
        return np.zeros(s.shape, np.float32)

    return jax.tree_util.tree_map_with_path(leaf, _abstract(model, size))


# --------------------------------------------------------------------------- param counts


@pytest.mark.parametrize('name', sorted(TORCHVISION_PARAMS))
def test_param_count_matches_torchvision(name):
    assert num_params(_abstract(models.create_model(name), 64)['params']) == TORCHVISION_PARAMS[name]


@pytest.mark.parametrize('name', sorted(PAPER_PARAMS))
def test_param_count_matches_paper(name):
    exact, paper, tolerance = PAPER_PARAMS[name]
    size = models.get_model_cfg(name).input_size[0]
    count = num_params(_abstract(models.create_model(name), size)['params'])
    assert count == exact
    assert abs(count - paper) / paper < tolerance


def test_norm_twins_keep_counts_up_to_norm_params():
    # _bn == plain + BN scale/bias (torchvision keeps the conv biases); GN swaps BN 1:1.
    bn = _abstract(models.create_model('vgg11', norm='batch'), 32)
    gn = _abstract(models.create_model('vgg11', norm='group', weight_std=True), 32)
    assert num_params(bn['params']) == num_params(gn['params']) == TORCHVISION_PARAMS['vgg11_bn']
    assert set(gn) == {'params'} and set(bn) == {'params', 'batch_stats'}
    # AlexNet family: a norm replaces each conv bias with a scale and an offset.
    plain = _abstract(models.create_model('alexnet_original'), 67)
    normed = _abstract(models.create_model('alexnet_original', norm='group'), 67)
    assert num_params(normed['params']) == PAPER_PARAMS['alexnet_original'][0] + 96 + 256 + 384 + 384 + 256
    assert set(plain) == {'params'} and 'norm1' in normed['params']


def test_alexnet_original_groups_and_shapes_follow_fig2():
    model = models.create_model('alexnet_original')
    params = _abstract(model, 227)['params']
    # Kernels of conv2/4/5 see only their own GPU's half of the maps; conv3 sees all 256.
    assert params['conv1']['kernel'].shape == (11, 11, 3, 96)
    assert params['conv2']['kernel'].shape == (5, 5, 48, 256)
    assert params['conv3']['kernel'].shape == (3, 3, 256, 384)
    assert params['conv4']['kernel'].shape == (3, 3, 192, 384)
    assert params['conv5']['kernel'].shape == (3, 3, 192, 256)
    assert params['fc6']['kernel'].shape == (6 * 6 * 256, 4096)
    _, feats = jax.eval_shape(
        functools.partial(model.apply, return_features=True),
        {'params': params},
        jnp.zeros((1, 227, 227, 3)),
    )
    # 227 -> 55 (conv1) -> 27 (pool) -> 13 (pool after conv2) -> 6 (pool after conv5).
    assert {k: v.shape[1:] for k, v in feats.items()} == {
        'stem': (27, 27, 96),
        'stage1': (13, 13, 256),
        'stage2': (13, 13, 384),
        'stage3': (13, 13, 384),
        'stage4': (6, 6, 256),
        'pre_logits': (4096,),
    }


@pytest.mark.parametrize(
    'name, final, fc_in',
    [('overfeat_fast', (6, 6, 1024), 6 * 6 * 1024), ('overfeat_accurate', (5, 5, 1024), 5 * 5 * 1024)],
)
def test_overfeat_tables_reach_the_published_map_sizes(name, final, fc_in):
    model = models.create_model(name)
    size = models.get_model_cfg(name).input_size[0]
    variables = _abstract(model, size)
    _, feats = jax.eval_shape(
        functools.partial(model.apply, return_features=True), variables, jnp.zeros((1, size, size, 3))
    )
    last = sorted(k for k in feats if k.startswith('stage'))[-1]
    assert feats[last].shape[1:] == final  # identity adaptive pool at the default size
    first_fc = 'fc6' if name == 'overfeat_fast' else 'fc7'
    assert variables['params'][first_fc]['kernel'].shape[0] == fc_in


# ------------------------------------------------------------------------------ layers


def test_local_response_norm_matches_paper_formula_and_torch():
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 7)).astype(np.float32) * 20
    got = np.asarray(alexnet_lib.LocalResponseNorm().apply({}, jnp.asarray(x)))
    # Sec. 3.3, literally: sum over channels max(0, i - 2) .. min(N - 1, i + 2).
    want = np.empty_like(x)
    for i in range(7):
        s = (x[..., max(0, i - 2) : min(6, i + 2) + 1] ** 2).sum(-1)
        want[..., i] = x[..., i] / (2.0 + 1e-4 * s) ** 0.75
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # torch divides alpha by n.
    lrn = torch.nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)
    ref = lrn(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(got, ref, rtol=1e-5)


@pytest.mark.parametrize('n, out', [(5, 6), (3, 7), (13, 6), (7, 7), (2, 7)])
def test_adaptive_avg_pool_matches_torch(n, out):
    x = np.random.default_rng(n).standard_normal((1, n, n + 1, 3)).astype(np.float32)
    got = np.asarray(alexnet_lib.adaptive_avg_pool(jnp.asarray(x), out))
    ref = torch.nn.AdaptiveAvgPool2d(out)(torch.from_numpy(x.transpose(0, 3, 1, 2)))
    np.testing.assert_allclose(got, ref.numpy().transpose(0, 2, 3, 1), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------- parity


@pytest.mark.parametrize('resolution', [224, 193])
def test_alexnet_logits_match_torchvision(resolution):
    torch.manual_seed(0)
    assert_logits_match('alexnet', torchvision.models.alexnet(), resolution=resolution)


@pytest.mark.parametrize('name, resolution, batch', [('vgg11_bn', 224, 1), ('vgg11_bn', 97, 2), ('vgg16', 64, 2)])
def test_vgg_logits_match_torchvision(name, resolution, batch):
    torch.manual_seed(0)
    assert_logits_match(name, getattr(torchvision.models, name)(), resolution=resolution, batch=batch)


@pytest.mark.parametrize('name', sorted(n for n in TORCHVISION_PARAMS if n.startswith('vgg')))
def test_vgg_name_maps_cover_torchvision_state_dicts(name):
    """Every variant's generated map: exported names and shapes == torchvision's, both ways."""
    with torch.device('meta'):
        reference = getattr(torchvision.models, name)()
    want = {
        k: tuple(v.shape)
        for k, v in reference.state_dict().items()
        if not k.endswith('num_batches_tracked')
    }
    zeros = jax.tree.map(
        lambda s: np.broadcast_to(np.zeros((), np.float32), s.shape),
        _abstract(models.create_model(name), 32),
    )
    exported = models.export_state_dict(name, zeros)
    assert {k: v.shape for k, v in exported.items()} == want


# ---------------------------------------------------------------- forward and backward


@pytest.mark.parametrize(
    'name, size, overrides',
    [
        ('alexnet_original', 67, {'norm': 'group', 'weight_std': True}),
        ('alexnet', 64, {'norm': 'batch', 'drop_rate': 0.2}),
        ('vgg11', 32, {'norm': 'group', 'weight_std': True}),
        ('vgg11_bn', 32, {}),
    ],
)
def test_forward_backward(name, size, overrides):
    model = models.create_model(name, num_classes=10, **overrides)
    variables = _random_variables(model, size)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, size, size, 3)), jnp.float32)
    loss, logits, updates, grads = train_step(model, variables, x, jnp.array([1, 3]))
    chex.assert_shape(logits, (2, 10))
    assert logits.dtype == jnp.float32
    chex.assert_tree_all_finite((loss, logits, grads))
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    if model.norm == 'batch':
        old = jax.tree.leaves(variables['batch_stats'])
        new = jax.tree.leaves(updates['batch_stats'])
        assert len(old) == len(new) > 0
        assert all(not np.allclose(o, n) for o, n in zip(old, new, strict=True))
    else:
        assert 'batch_stats' not in variables and updates == {}


def test_bfloat16_compute_keeps_float32_params_and_logits():
    for name in ('alexnet_original', 'vgg11'):
        model = models.create_model(name, dtype=jnp.bfloat16, norm='group')
        variables = _abstract(model, 67)
        assert {p.dtype for p in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
        logits, feats = jax.eval_shape(
            functools.partial(model.apply, return_features=True), variables, jnp.zeros((1, 67, 67, 3))
        )
        assert logits.dtype == jnp.float32 and feats['stem'].dtype == jnp.bfloat16


# ---------------------------------------------------------------------------- features


@pytest.mark.parametrize(
    'name, shapes',
    [
        (
            'alexnet',
            {
                'stem': (27, 27, 64),
                'stage1': (13, 13, 192),
                'stage2': (13, 13, 384),
                'stage3': (13, 13, 256),
                'stage4': (6, 6, 256),
            },
        ),
        (
            'vgg16',
            {
                'stem': (112, 112, 64),
                'stage1': (56, 56, 128),
                'stage2': (28, 28, 256),
                'stage3': (14, 14, 512),
                'stage4': (7, 7, 512),
            },
        ),
    ],
)
def test_num_classes_zero_and_return_features_shapes(name, shapes):
    x = jnp.zeros((2, 224, 224, 3))
    model = models.create_model(name)
    variables = _abstract(model, 64)
    logits, feats = jax.eval_shape(functools.partial(model.apply, return_features=True), variables, x)
    assert logits.shape == (2, 1000) and logits.dtype == jnp.float32
    assert {k: v.shape for k, v in feats.items()} == {
        **{k: (2, *v) for k, v in shapes.items()},
        'pre_logits': (2, 4096),
    }
    headless = models.create_model(name, num_classes=0)
    head_vars = _abstract(headless, 64)
    assert 'fc8' not in head_vars['params'] and 'fc7' in head_vars['params']
    pooled = jax.eval_shape(functools.partial(headless.apply, train=False), head_vars, x)
    assert pooled.shape == (2, 4096) and pooled.dtype == jnp.float32


def test_registry_cfgs():
    assert models.list_models('vgg*') == sorted(n for n in TORCHVISION_PARAMS if n.startswith('vgg'))
    assert models.get_model_cfg('alexnet').top1 == 56.522
    assert models.get_model_cfg('vgg16_bn').top1 == 73.360
    assert models.get_model_cfg('alexnet_original').input_size == (227, 227, 3)
    assert models.get_model_cfg('overfeat_fast').input_size == (231, 231, 3)
    assert models.get_model_cfg('overfeat_accurate').input_size == (221, 221, 3)
    assert models.create_model('vgg16_bn').norm == 'batch'
    assert models.create_model('vgg16').norm == 'none'
    assert models.create_model('alexnet').drop_rate == 0.5
    assert models.create_model('vgg13_bn', norm='group', weight_std=True).norm == 'group'
