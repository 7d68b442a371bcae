"""AlexNet family (alexnet, alexnet_original, overfeat_*) and VGG: papers, parity, names.

Parity runs converted random-init torchvision weights through both implementations
(tests/parity.py). Everything else uses ``jax.eval_shape``, so the file stays cheap on
CPU. Counts (equal to torchvision 0.29.1's), shapes, twins and train steps of every
model: tests/test_models_registry.py.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models import alexnet as alexnet_lib

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')
from modeltest import num_params  # noqa: E402
from parity import assert_logits_match  # noqa: E402  (needs torch)

VGG_NAMES = tuple(f'vgg{d}{bn}' for d in (11, 13, 16, 19) for bn in ('', '_bn'))
VGG11_BN_PARAMS = 132_868_840  # torchvision 0.29.1, sum(p.numel())
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


# --------------------------------------------------------------------------- param counts


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
    assert num_params(bn['params']) == num_params(gn['params']) == VGG11_BN_PARAMS
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


@pytest.mark.parametrize('name', VGG_NAMES)
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


def test_registry_cfgs():
    assert models.list_models('vgg*') == sorted(VGG_NAMES)
    assert models.get_model_cfg('alexnet').top1 == 56.522
    assert models.get_model_cfg('vgg16_bn').top1 == 73.360
    assert models.get_model_cfg('alexnet_original').input_size == (227, 227, 3)
    assert models.get_model_cfg('overfeat_fast').input_size == (231, 231, 3)
    assert models.get_model_cfg('overfeat_accurate').input_size == (221, 221, 3)
    assert models.create_model('vgg16_bn').norm == 'batch'
    assert models.create_model('vgg16').norm == 'none'
    assert models.create_model('alexnet').drop_rate == 0.5
    assert models.create_model('vgg13_bn', norm='group', weight_std=True).norm == 'group'
