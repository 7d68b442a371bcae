"""Wide ResNet, ResNeXt, SE-ResNet/ResNeXt (models/resnet.py) and legacy SENet-154 (models/senet.py).

Parameter counts against the references, logit parity with converted random-init
torchvision / timm weights, and train-mode forward/backward of the GN + weight-std twins.
Forward/backward runs one block per stage (``stage_sizes=(1, 1, 1, 1)``) of each variant
kind: the block code is what differs between the variants, and full depth would only add
compile time.
"""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')
timm = pytest.importorskip('timm')

from modeltest import abstract_variables, num_params, train_step  # noqa: E402
from parity import assert_logits_match, randomize_norms  # noqa: E402

import models  # noqa: E402
from models import layers  # noqa: E402

# Reference parameter counts at 1000 classes, sum of p.numel() over parameters() of
# torchvision 0.29.1 (equal to its weights' meta['num_params']) or timm 1.0.29
# timm.create_model(name), taken once and hard-coded.
REFERENCE_PARAMS = {
    # torchvision
    'wide_resnet50_2': 68_883_240,
    'wide_resnet101_2': 126_886_696,
    'resnext50_32x4d': 25_028_904,
    'resnext101_32x8d': 88_791_336,
    'resnext101_64x4d': 83_455_272,
    # timm (resnet.py)
    'seresnet50': 28_088_024,
    'seresnet101': 49_326_872,
    'seresnet152': 66_821_848,
    'seresnext50_32x4d': 27_559_896,
    # timm (senet.py)
    'legacy_senet154': 115_088_984,
}

SHALLOW = {'stage_sizes': (1, 1, 1, 1)}


def _scaled_variables(model, shape, seed=0):
    """Variables with ``model``'s structure without compiling ``init``.

    Kernels are N(0, 1/fan_in) so activations stay O(1); norm scales 1, biases and
    running means 0, running variances 1.
    """
    rng = np.random.default_rng(seed)

    def make(path, s):
        leaf = path[-1].key
        if leaf == 'kernel':
            return (rng.standard_normal(s.shape) / math.sqrt(np.prod(s.shape[:-1]))).astype(s.dtype)
        if leaf in ('scale', 'var'):
            return np.ones(s.shape, s.dtype)
        return np.zeros(s.shape, s.dtype)

    return jax.tree_util.tree_map_with_path(make, abstract_variables(model, shape))


# ------------------------------------------------------------------------ param counts


@pytest.mark.parametrize('name', sorted(REFERENCE_PARAMS))
def test_param_count_matches_reference(name):
    variables = abstract_variables(models.create_model(name), (1, 64, 64, 3))
    assert num_params(variables['params']) == REFERENCE_PARAMS[name]


def test_gn_twin_has_same_params_and_no_batch_stats():
    for name in ('seresnext50_32x4d', 'legacy_senet154'):
        gn = abstract_variables(
            models.create_model(name, norm='group', weight_std=True), (1, 64, 64, 3)
        )
        assert set(gn) == {'params'}
        assert num_params(gn['params']) == REFERENCE_PARAMS[name]


def test_registry_names_and_cfgs():
    names = set(models.list_models())
    assert set(REFERENCE_PARAMS) <= names
    # timm's own `senet154` is the Gluon port with other names; no alias for the legacy one.
    assert 'senet154' not in names
    assert models.get_model_cfg('resnext50_32x4d').top1 == 77.618
    assert models.get_model_cfg('seresnet50').interpolation == 'bicubic'
    assert models.get_model_cfg('legacy_senet154').interpolation == 'bilinear'
    for name in REFERENCE_PARAMS:
        cfg = models.get_model_cfg(name)
        assert cfg.input_size == (224, 224, 3) and cfg.top1 and cfg.paper


# ------------------------------------------------------------------------------ layers


def test_squeeze_excite_conv_and_dense_agree_and_round_like_timm():
    se_conv = layers.SqueezeExcite()
    se_dense = layers.SqueezeExcite(use_conv=False)
    assert se_conv.reduced_channels(256) == 16 and se_conv.reduced_channels(2048) == 128
    assert layers.SqueezeExcite(rd_ratio=0.25).reduced_channels(36) == 8  # make_divisible(9, 8)
    assert layers.SqueezeExcite(rd_channels=5).reduced_channels(64) == 5
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 5, 64)), jnp.float32)
    conv_vars = se_conv.init(jax.random.key(0), x)
    assert conv_vars['params']['fc1']['kernel'].shape == (1, 1, 64, 8)
    assert conv_vars['params']['fc2']['bias'].shape == (64,)
    dense_vars = jax.tree.map(lambda a: a.reshape(a.shape[-2:]) if a.ndim == 4 else a, conv_vars)
    y = se_conv.apply(conv_vars, x)
    np.testing.assert_allclose(se_dense.apply(dense_vars, x), y, rtol=1e-5, atol=1e-6)
    # The gate only rescales channels, by a factor in (0, 1).
    ratio = np.asarray(y / x)
    assert np.all((ratio > 0) & (ratio < 1))
    np.testing.assert_allclose(ratio, ratio[:, :1, :1, :].repeat(5, 1).repeat(5, 2), rtol=1e-5)


def test_legacy_stem_pool_is_ceil_mode():
    from models.senet import _ceil_pool_padding

    # torch MaxPool2d(3, 2, ceil_mode=True): 112 -> 56, 32 -> 16, 97 -> 48.
    for size, out in ((112, 56), (32, 16), (97, 48)):
        lo, hi = _ceil_pool_padding(size, 3, 2)
        assert (size + lo + hi - 3) // 2 + 1 == out


# ---------------------------------------------------------------------------- parity


def _rescale_classifier(reference, resolution: int, target: float = 10.0) -> None:
    """Scales the reference's classifier so its largest parity logit is ``target``.

    With random-init weights and the randomised norm statistics of ``parity.py``, the
    logits of a ResNet-50 reach ~1e3, where float32 rounding alone (torch float32 against
    float64: 8e-4) exceeds the 1e-4 absolute tolerance. Scaling the last layer keeps the
    check relative to float32 precision without hiding a mis-mapped layer, whose error is
    of the order of the logits themselves.
    """
    reference.eval()
    randomize_norms(reference, 0)  # the same statistics assert_logits_match will set (seed 0)
    x = np.random.default_rng(0).standard_normal((2, 3, resolution, resolution)).astype(np.float32)
    classifier = reference.get_classifier() if hasattr(reference, 'get_classifier') else reference.fc
    with torch.no_grad():
        scale = target / float(reference(torch.from_numpy(x)).abs().max())
        classifier.weight.mul_(scale)
        classifier.bias.mul_(scale)


# torchvision ResNet-50 and the grouped / SE blocks at the default and an odd resolution;
# the rest at 64 px, the smallest that keeps every stage's spatial map > 1 px (and, for
# the legacy SENet, exercises the ceil-mode stem pool: 32 -> 16).
@pytest.mark.parametrize(
    'name, make_reference, resolution',
    [
        ('resnet50', lambda: torchvision.models.resnet50(), 224),
        ('resnet50', lambda: torchvision.models.resnet50(), 193),
        ('resnext50_32x4d', lambda: torchvision.models.resnext50_32x4d(), 193),
        ('seresnet50', lambda: timm.create_model('seresnet50'), 224),
        ('wide_resnet50_2', lambda: torchvision.models.wide_resnet50_2(), 64),
        ('seresnext50_32x4d', lambda: timm.create_model('seresnext50_32x4d'), 64),
        ('legacy_senet154', lambda: timm.create_model('legacy_senet154'), 64),
    ],
)
def test_logits_match_reference(name, make_reference, resolution):
    torch.manual_seed(0)
    reference = make_reference()
    _rescale_classifier(reference, resolution)
    err = assert_logits_match(name, reference, resolution=resolution)
    print(f'{name} @ {resolution}px: max |logit diff| {err:.2e}')


# ------------------------------------------------------------------ forward / backward


@pytest.mark.parametrize(
    'name, size, overrides',
    [
        ('wide_resnet50_2', 32, {'norm': 'group', 'weight_std': True}),
        ('resnext50_32x4d', 32, {'norm': 'group', 'weight_std': True, 'drop_path_rate': 0.2}),
        ('seresnet50', 32, {'norm': 'group', 'weight_std': True}),
        ('seresnext50_32x4d', 32, {'drop_path_rate': 0.2}),
        ('legacy_senet154', 32, {'norm': 'group', 'weight_std': True, 'drop_path_rate': 0.2}),
        ('legacy_senet154', 32, {}),
    ],
)
def test_forward_backward(name, size, overrides):
    model = models.create_model(name, num_classes=10, **SHALLOW, **overrides)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, size, size, 3)), jnp.float32)
    variables = _scaled_variables(model, x.shape)
    loss, logits, updates, grads = train_step(model, variables, x, jnp.array([1, 3]))
    chex.assert_shape(logits, (2, 10))
    assert logits.dtype == jnp.float32
    chex.assert_tree_all_finite((loss, logits, grads))
    # Every parameter receives gradient signal (a disconnected layer would give zeros).
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    if model.norm == 'batch':
        old = jax.tree.leaves(variables['batch_stats'])
        new = jax.tree.leaves(updates['batch_stats'])
        assert len(old) == len(new) > 0
        assert all(not np.allclose(o, n) for o, n in zip(old, new, strict=True))
    else:
        assert 'batch_stats' not in variables and updates == {}


# ---------------------------------------------------------------------------- features


@pytest.mark.parametrize(
    'name, stem_width', [('seresnext50_32x4d', 64), ('legacy_senet154', 128)]
)
def test_num_classes_zero_and_return_features_shapes(name, stem_width):
    # Shapes do not depend on depth; one block per stage keeps tracing cheap.
    x = jnp.zeros((2, 224, 224, 3))
    model = models.create_model(name, **SHALLOW)
    variables = abstract_variables(model, (1, 64, 64, 3))
    logits, feats = jax.eval_shape(functools.partial(model.apply, return_features=True), variables, x)
    assert logits.shape == (2, 1000) and logits.dtype == jnp.float32
    assert {k: v.shape for k, v in feats.items()} == {
        'stem': (2, 56, 56, stem_width),
        'stage1': (2, 56, 56, 256),
        'stage2': (2, 28, 28, 512),
        'stage3': (2, 14, 14, 1024),
        'stage4': (2, 7, 7, 2048),
        'pre_logits': (2, 2048),
    }
    headless = models.create_model(name, num_classes=0, **SHALLOW)
    head_vars = abstract_variables(headless, (1, 64, 64, 3))
    assert num_params(head_vars['params']) == num_params(variables['params']) - 2048 * 1000 - 1000
    pooled = jax.eval_shape(functools.partial(headless.apply, train=False), head_vars, x)
    assert pooled.shape == (2, 2048) and pooled.dtype == jnp.float32
