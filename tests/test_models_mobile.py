"""Tests of the mobile families: SqueezeNet, MobileNet v1/v2/v3, MnasNet.

Parameter counts against the references, logits parity with converted random-init
torchvision / timm weights, forward + backward with BatchNorm and GroupNorm + weight
standardisation, and feature shapes. Full-resolution parity runs for one representative
per family (squeezenet1_0, mobilenetv3_large_100, mnasnet1_0); the other variants run at
small or odd resolutions to keep the file fast on CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import models

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')
timm = pytest.importorskip('timm')
from parity import assert_logits_match  # noqa: E402

# sum(p.numel() for p in ref.parameters()) of torchvision 0.29 / timm 1.0 models built with
# random init at 1000 classes (e.g. torchvision.models.squeezenet1_0(),
# timm.create_model('mobilenetv1_100')). MobileNet v1 0.75/0.5/0.25 have no reference
# model: their counts are ours, checked against the paper's Table 6 below.
REFERENCE_PARAMS = {
    'squeezenet1_0': 1_248_424,  # torchvision
    'squeezenet1_1': 1_235_496,  # torchvision
    'mobilenetv1_100': 4_231_976,  # timm
    'mobilenet_v2': 3_504_872,  # torchvision
    'mobilenetv2_140': 6_108_776,  # timm
    'mobilenetv3_large_100': 5_483_032,  # timm
    'mobilenetv3_small_100': 2_542_856,  # timm
    'mnasnet0_5': 2_218_512,  # torchvision
    'mnasnet0_75': 3_170_208,  # torchvision
    'mnasnet1_0': 4_383_312,  # torchvision
    'mnasnet1_3': 6_282_256,  # torchvision
    'semnasnet_100': 3_887_038,  # timm
}
# Howard et al. 2017, Table 6 (millions, one decimal; 224 px rows of Table 7).
MOBILENET_V1_PAPER = {
    'mobilenetv1_100': 4.2,
    'mobilenetv1_075': 2.6,
    'mobilenetv1_050': 1.3,
    'mobilenetv1_025': 0.5,
}


def _num_params(name: str, **overrides) -> int:
    model = models.create_model(name, **overrides)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes['params']))


@pytest.mark.parametrize('name', sorted(REFERENCE_PARAMS))
def test_param_count_equals_reference(name):
    assert _num_params(name) == REFERENCE_PARAMS[name]


@pytest.mark.parametrize('name', sorted(MOBILENET_V1_PAPER))
def test_mobilenet_v1_param_count_matches_paper(name):
    # The paper states millions to one decimal, so all four must round to it; within 1%
    # is only meaningful for 1.0 (4.23M) and 0.75 (2.59M): 0.5's 1.33M and 0.25's 0.47M
    # are 2.4% and 6% from the two-digit figures while agreeing at their precision.
    ours = _num_params(name) / 1e6
    paper = MOBILENET_V1_PAPER[name]
    assert round(ours, 1) == paper
    if paper >= 2.0:
        assert abs(ours - paper) / paper < 0.01


def _tv(name):
    return lambda: getattr(torchvision.models, name)()


def _timm(name):
    return lambda: timm.create_model(name, pretrained=False)


# (name, reference constructor, resolution, atol). mobilenetv3_large_100 at 224 px has
# logits of magnitude ~100 with the randomised norms; torch's own float32 result differs
# from its float64 one by 1.3e-4 there, so 1e-4 absolute is below float32 resolution and
# the tolerance is 5e-4 (relative ~5e-6). Everything else meets 1e-4.
PARITY = [
    ('squeezenet1_0', _tv('squeezenet1_0'), 224, 1e-4),
    ('squeezenet1_0', _tv('squeezenet1_0'), 97, 1e-4),
    ('squeezenet1_1', _tv('squeezenet1_1'), 97, 1e-4),
    ('mobilenetv3_large_100', _timm('mobilenetv3_large_100'), 224, 5e-4),
    ('mobilenetv3_large_100', _timm('mobilenetv3_large_100'), 97, 1e-4),
    ('mobilenetv3_small_100', _timm('mobilenetv3_small_100'), 64, 1e-4),
    ('mobilenet_v2', _tv('mobilenet_v2'), 97, 1e-4),
    ('mobilenetv2_140', _timm('mobilenetv2_140'), 64, 1e-4),
    ('mobilenetv1_100', _timm('mobilenetv1_100'), 97, 1e-4),
    ('mnasnet1_0', _tv('mnasnet1_0'), 224, 1e-4),
    ('mnasnet1_0', _tv('mnasnet1_0'), 97, 1e-4),
    ('mnasnet0_5', _tv('mnasnet0_5'), 64, 1e-4),
    ('semnasnet_100', _timm('semnasnet_100'), 64, 1e-4),
]


@pytest.mark.parametrize(
    'name,make_ref,resolution,atol', PARITY, ids=[f'{p[0]}-{p[2]}' for p in PARITY]
)
def test_logits_match_reference(name, make_ref, resolution, atol):
    torch.manual_seed(0)
    assert_logits_match(name, make_ref(), resolution=resolution, atol=atol)


def test_export_round_trips():
    # The torchvision and timm layouts share one family map; export must pick the right one.
    for name, make_ref in (('mobilenet_v2', _tv('mobilenet_v2')), ('mnasnet0_5', _tv('mnasnet0_5')),
                           ('semnasnet_100', _timm('semnasnet_100'))):
        state = {k: v.numpy() for k, v in make_ref().state_dict().items() if 'num_batches' not in k}
        exported = models.export_state_dict(name, models.convert_state_dict(name, state))
        assert sorted(exported) == sorted(state)


def _train_step(name: str, size: int, **overrides):
    """One SGD step in train mode; returns (loss, grads, old and new variables)."""
    model = models.create_model(name, num_classes=5, **overrides)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, size, size, 3)), jnp.float32)
    labels = jnp.array([1, 3])
    variables = jax.jit(lambda: model.init(jax.random.key(0), x, train=False))()

    def loss_fn(params, state):
        logits, new_state = model.apply(
            {'params': params, **state}, x, train=True, mutable=list(state),
            rngs={'dropout': jax.random.key(1)},
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), new_state

    state = {k: v for k, v in variables.items() if k != 'params'}
    (loss, new_state), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables['params'], state)
    return loss, grads, state, new_state


@pytest.mark.parametrize(
    'name,size,norm,weight_std',
    [
        ('squeezenet1_1', 32, 'group', True),
        ('mobilenetv3_small_100', 32, 'group', True),
        ('mnasnet0_5', 32, 'batch', False),
    ],
)
def test_forward_backward(name, size, norm, weight_std):
    extra = {} if name.startswith('squeezenet') else {'drop_path_rate': 0.1}
    loss, grads, state, new_state = _train_step(
        name, size, norm=norm, weight_std=weight_std, drop_rate=0.2, **extra
    )
    assert np.isfinite(float(loss))
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert any(float(jnp.max(jnp.abs(g))) > 0 for g in leaves)
    if norm == 'batch':
        before, after = jax.tree.leaves(state['batch_stats']), jax.tree.leaves(new_state['batch_stats'])
        assert any(not np.allclose(a, b) for a, b in zip(before, after, strict=True))
    else:
        assert 'batch_stats' not in state


@pytest.mark.parametrize(
    'name,width,stages',
    [
        ('squeezenet1_0', 512, 3),
        ('mobilenetv1_025', 256, 5),
        ('mobilenet_v2', 1280, 7),
        ('mobilenetv3_large_100', 1280, 7),
        ('mnasnet1_0', 1280, 7),
    ],
)
def test_features_and_headless(name, width, stages):
    model = models.create_model(name, num_classes=0)
    x = jnp.zeros((2, 64, 64, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    out, feats = jax.eval_shape(lambda v: model.apply(v, x, return_features=True), variables)
    assert out.shape == (2, width) and out.dtype == jnp.float32
    assert set(feats) == {'stem', 'pre_logits', *(f'stage{i + 1}' for i in range(stages))}
    assert feats['pre_logits'].shape == (2, width)
    assert feats[f'stage{stages}'].shape[1:3] in ((2, 2), (3, 3))  # stride 32 (ceil pools)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model = models.create_model('mobilenetv3_small_100', dtype=jnp.bfloat16)
    x = jnp.zeros((1, 32, 32, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))
    assert jax.eval_shape(lambda v: model.apply(v, x), variables).dtype == jnp.float32
