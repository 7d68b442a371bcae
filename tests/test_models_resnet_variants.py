"""Wide ResNet, ResNeXt, SE-ResNet/ResNeXt (models/resnet.py) and legacy SENet-154 (models/senet.py).

Logit parity with converted random-init torchvision / timm weights, the registry cfgs, the
squeeze-excitation gate and the ceil-mode stem pool. Counts, shapes, twins and train steps
of every model: tests/test_models_registry.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')
timm = pytest.importorskip('timm')

from parity import assert_logits_match, randomize_norms  # noqa: E402

import models  # noqa: E402
from models import layers  # noqa: E402

# Registered variants of models/resnet.py and models/senet.py (counts: the README table,
# equal to torchvision 0.29.1 / timm 1.0.29 sum of p.numel()).
VARIANTS = (
    'wide_resnet50_2', 'wide_resnet101_2', 'resnext50_32x4d', 'resnext101_32x8d', 'resnext101_64x4d',
    'seresnet50', 'seresnet101', 'seresnet152', 'seresnext50_32x4d', 'legacy_senet154',
)  # fmt: skip


def test_registry_names_and_cfgs():
    names = set(models.list_models())
    assert set(VARIANTS) <= names
    # timm's own `senet154` is the Gluon port with other names; no alias for the legacy one.
    assert 'senet154' not in names
    assert models.get_model_cfg('resnext50_32x4d').top1 == 77.618
    assert models.get_model_cfg('seresnet50').interpolation == 'bicubic'
    assert models.get_model_cfg('legacy_senet154').interpolation == 'bilinear'
    for name in VARIANTS:
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
