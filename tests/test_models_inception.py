"""Tests of the Inception families (models/inception.py, inception_v3.py, inception_v4.py).

The auxiliary heads' counts against torchvision/timm, BN-Inception against its paper
table, logits parity with converted random-init reference weights (at 299 px only for
Inception v3, the family's representative; the others at small odd resolutions) and the
auxiliary heads. Counts, shapes, twins and train steps of every model:
tests/test_models_registry.py.
"""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models import inception, inception_v4

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')
timm = pytest.importorskip('timm')

from modeltest import num_params, random_variables  # noqa: E402
from parity import assert_logits_match, numpy_state_dict, randomize_norms  # noqa: E402

# sum(p.numel() for p in m.parameters()) of the references, torch 2.14 / torchvision 0.29.1 /
# timm 1.0.29: torchvision.models.googlenet(aux_logits=False|True, init_weights=True),
# timm.create_model('inception_v3' [, aux_logits=True]), timm 'inception_v4',
# timm 'inception_resnet_v2'. googlenet and inception_v3 with aux equal torchvision's
# documented num_params (6,624,904 and 27,161,264).
# (Without the auxiliary heads, and for Inception-v4 / -ResNet-v2: the README table.)
AUX_PARAMS = {'googlenet': 13_004_888, 'inception_v3': 27_161_264}
SMALL = {'googlenet': 64, 'inception_v3': 75}


def _abstract_variables(model, size, batch=1):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((batch, size, size, 3)), train=False))


def _he_reinit(torch_model) -> None:
    """LeCun-normal conv/linear weights: timm's Inception v3 init (N(0, 0.1) on every conv)
    with randomised BN statistics gives ~1e9 logits, where float32 cannot resolve 1e-4."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in torch_model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / math.sqrt(m.weight[0].numel()))


# --------------------------------------------------------------------------- param counts


@pytest.mark.parametrize('name', sorted(AUX_PARAMS))
def test_aux_head_param_count_matches_reference(name):
    variables = _abstract_variables(models.create_model(name, aux_logits=True), SMALL[name])
    assert num_params(variables['params']) == AUX_PARAMS[name]


def _figure5_param_count(num_classes: int) -> int:
    """Parameters implied by Ioffe & Szegedy 2015 Figure 5, computed from the table alone:
    every conv is k*k*in*out weights + BN scale and offset (2*out), no conv bias."""

    def conv(k, cin, cout):
        return k * k * cin * cout + 2 * cout

    total = conv(7, 3, 64) + conv(1, 64, 64) + conv(3, 64, 192)
    width = 192
    for stage in inception.BN_INCEPTION_STAGES:
        for _, _, c1, r3, c3, rd, d3, _, pp in stage:
            total += (conv(1, width, c1) if c1 else 0) + conv(1, width, r3) + conv(3, r3, c3)
            total += conv(1, width, rd) + conv(3, rd, d3) + conv(3, d3, d3)
            total += conv(1, width, pp) if pp else 0
            width = c1 + c3 + d3 + (pp if pp else width)
    assert width == 1024  # Figure 5: 7x7x1024 before the average pool
    return total + (width * num_classes + num_classes if num_classes else 0)


def test_bn_inception_follows_figure5():
    # Rows of Figure 5 (#1x1, #3x3 reduce, #3x3, double #3x3 reduce, double #3x3, pool proj).
    rows = {row[0]: row[2:] for stage in inception.BN_INCEPTION_STAGES for row in stage}
    assert rows['inception3a'] == (64, 64, 64, 64, 96, 'avg', 32)
    assert rows['inception3c'] == (0, 128, 160, 64, 96, 'max', 0)
    assert rows['inception4e'] == (0, 128, 192, 192, 256, 'max', 0)
    assert rows['inception5b'] == (352, 192, 320, 192, 224, 'max', 128)
    for num_classes in (1000, 0):
        model = models.create_model('bn_inception', num_classes=num_classes)
        variables = _abstract_variables(model, 224)
        ours = num_params(variables['params'])
        assert ours == _figure5_param_count(num_classes)
    assert _figure5_param_count(1000) == 11_285_224  # the figure in the docstring
    # Output shapes at 224 px (Figure 5 "output size" column; 4c/4d/4e see the docstring).
    logits, feats = jax.eval_shape(
        functools.partial(model.clone(num_classes=1000).apply, return_features=True),
        _abstract_variables(model.clone(num_classes=1000), 224),
        jnp.zeros((2, 224, 224, 3)),
    )
    assert logits.shape == (2, 1000)
    assert {k: v.shape for k, v in feats.items()} == {
        'stem': (2, 28, 28, 192),
        'stage1': (2, 28, 28, 320),
        'stage2': (2, 14, 14, 608),
        'stage3': (2, 7, 7, 1024),
        'pre_logits': (2, 1024),
    }


# ------------------------------------------------------------------------------ parity


@pytest.mark.parametrize('resolution', [224, 193])
def test_googlenet_parity(resolution):
    ref = torchvision.models.googlenet(aux_logits=False, init_weights=True)
    assert assert_logits_match('googlenet', ref, resolution=resolution, batch=1) <= 1e-4


def test_googlenet_aux_heads_match_torchvision_in_train_mode():
    torch.manual_seed(0)
    ref = torchvision.models.googlenet(aux_logits=True, init_weights=True, dropout=0.0, dropout_aux=0.0)
    randomize_norms(ref)
    variables = models.convert_state_dict('googlenet', numpy_state_dict(ref), aux_logits=True)
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    ref.train()
    with torch.no_grad():
        expected = ref(torch.from_numpy(x))
    model = models.create_model('googlenet', aux_logits=True, drop_rate=0.0, aux_drop_rate=0.0)
    logits, state = model.apply(
        variables, x.transpose(0, 2, 3, 1), train=True, mutable=['batch_stats', 'intermediates']
    )
    aux = state['intermediates']
    np.testing.assert_allclose(logits, expected.logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(aux['aux_logits1'][0], expected.aux_logits1.numpy(), atol=1e-4)
    np.testing.assert_allclose(aux['aux_logits2'][0], expected.aux_logits2.numpy(), atol=1e-4)
    # Train mode without 'intermediates' mutable: logits only, nothing sown.
    out, state = model.apply(variables, x.transpose(0, 2, 3, 1), train=True, mutable=['batch_stats'])
    assert set(state) == {'batch_stats'} and out.shape == (2, 1000)


def test_inception_v3_aux_weights_convert():
    ref = timm.create_model('inception_v3', aux_logits=True)
    variables = models.convert_state_dict('inception_v3', numpy_state_dict(ref), aux_logits=True)
    assert variables['params']['AuxLogits']['conv1']['conv']['kernel'].shape == (5, 5, 128, 768)
    assert variables['params']['AuxLogits']['fc']['kernel'].shape == (768, 1000)


@pytest.mark.parametrize('resolution', [299, 203])
def test_inception_v3_parity(resolution):
    ref = timm.create_model('inception_v3')
    _he_reinit(ref)
    assert assert_logits_match('inception_v3', ref, resolution=resolution, batch=1) <= 1e-4


@pytest.mark.parametrize('name', ['inception_v4', 'inception_resnet_v2'])
def test_inception_v4_family_parity(name):
    ref = timm.create_model(name)
    assert assert_logits_match(name, ref, resolution=107, batch=1) <= 1e-4


def test_bn_inception_state_dict_round_trip():
    model = models.create_model('bn_inception')
    variables = random_variables(model, (1, 64, 64, 3))
    state_dict = models.export_state_dict('bn_inception', variables)
    assert state_dict['inception3c.branch3.2.conv.weight'].shape == (96, 96, 3, 3)
    assert state_dict['inception5b.branch4.1.bn.running_var'].shape == (128,)
    assert 'inception3c.branch1.conv.weight' not in state_dict  # stride-2 modules: no 1x1
    chex.assert_trees_all_equal(models.convert_state_dict('bn_inception', state_dict), variables)


def test_registry_cfgs():
    assert set(models.list_models('*inception*')) >= {
        'bn_inception', 'inception_v3', 'inception_v4', 'inception_resnet_v2'
    }
    assert models.get_model_cfg('googlenet').input_size == (224, 224, 3)
    for name in ('inception_v3', 'inception_v4', 'inception_resnet_v2'):
        cfg = models.get_model_cfg(name)
        assert cfg.input_size == (299, 299, 3) and cfg.mean == (0.5, 0.5, 0.5)
        assert cfg.interpolation == 'bicubic'
    assert models.get_model_cfg('inception_resnet_v2').crop_pct == 0.8975
    assert inception_v4.InceptionResNetV2().drop_path_rate == 0.0
    with pytest.raises(TypeError, match='drop_path_rate'):
        models.create_model('inception_v4', drop_path_rate=0.1)  # no residual branches
