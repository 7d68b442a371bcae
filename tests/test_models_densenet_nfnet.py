"""DenseNet and NFNet families, and adaptive gradient clipping (trainers/agc.py).

Logits parity of converted random-init torchvision / timm weights (tests/parity.py), the
paper-only DenseNets, NFNet's norm switch, the reference state-dict names and AGC. Counts,
shapes, twins and train steps of every model: tests/test_models_registry.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')
timm = pytest.importorskip('timm')

from modeltest import abstract_variables, normal, num_params  # noqa: E402
from parity import assert_logits_match  # noqa: E402

import models  # noqa: E402
from trainers import agc  # noqa: E402


def test_paper_only_densenets():
    # No reference implementation: the counts are ours (README table); Table 2 of the
    # paper quotes DenseNet-BC-100's as "0.8M".
    bc = abstract_variables(models.create_model('densenet_bc_100_12'), (1, 32, 32, 3))
    assert round(num_params(bc['params']) / 1e6, 1) == 0.8  # Table 2, one decimal
    blocks = [k for k in bc['params'] if k.startswith('denseblock')]
    assert len(blocks) == 3
    assert all(len(bc['params'][b]) == 16 for b in blocks)  # (100 - 4) / 6 bottleneck layers
    # Compression 0.5: 24 + 16 * 12 = 216 -> 108 maps.
    assert bc['params']['transition1']['conv']['kernel'].shape == (1, 1, 216, 108)


def test_norm_free_by_default_and_norm_switch():
    nf = abstract_variables(models.create_model('dm_nfnet_f0'), (1, 64, 64, 3))
    assert set(nf) == {'params'}
    block = nf['params']['stages_0_0']
    assert block['conv2']['kernel'].shape == (3, 3, 128, 128)  # 128 mid, group width 128
    assert block['conv2']['gain'].shape == (128,) and block['skipinit_gain'].shape == ()
    assert block['attn_last']['fc1']['kernel'].shape == (1, 1, 256, 128)  # SE ratio 0.5
    bn = abstract_variables(models.create_model('dm_nfnet_f0', norm='batch'), (1, 64, 64, 3))
    assert set(bn['batch_stats']['stages_2_5']) == {'norm1', 'norm2', 'norm2b', 'norm3'}
    plain = abstract_variables(models.create_model('dm_nfnet_f0', weight_std=False), (1, 64, 64, 3))
    assert 'gain' not in plain['params']['final_conv']


# ------------------------------------------------------------------------------- parity


@pytest.mark.parametrize('resolution', [224, 193])
def test_densenet121_matches_torchvision(resolution):
    assert_logits_match('densenet121', torchvision.models.densenet121(), resolution=resolution)


def test_densenet161_matches_torchvision_64px():
    assert_logits_match('densenet161', torchvision.models.densenet161(), resolution=64)


def _timm_nfnet(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False)
    # skipinit gains start at 0 (every residual branch off), and conv3 gains at 1: give
    # every gain a random value so the branches, gains and biases all reach the logits.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith(('gain', 'bias')):
                p.copy_(torch.rand(p.shape, generator=gen) * 0.5 + 0.5 if 'gain' in pname else
                        torch.randn(p.shape, generator=gen) * 0.1)
    return model


@pytest.mark.parametrize('resolution', [192, 97])
def test_dm_nfnet_f0_matches_timm(resolution):
    assert_logits_match('dm_nfnet_f0', _timm_nfnet('dm_nfnet_f0'), resolution=resolution, batch=1)


def test_dm_nfnet_f1_matches_timm():
    # 97 px like F0's odd-resolution test: F1's blocks have F0's shapes, so the eager op
    # compilations are shared and this costs far less than a new resolution would.
    assert_logits_match('dm_nfnet_f1', _timm_nfnet('dm_nfnet_f1'), resolution=97, batch=1)


def test_registry_cfgs():
    assert models.list_models('dm_nfnet_f*') == [f'dm_nfnet_f{i}' for i in range(7)]
    assert set(models.list_models('densenet*')) == {
        'densenet121', 'densenet161', 'densenet169', 'densenet201', 'densenet264', 'densenet_bc_100_12'
    }
    f0 = models.get_model_cfg('dm_nfnet_f0')
    assert f0.input_size == (192, 192, 3) and f0.crop_pct == 0.9 and f0.interpolation == 'bicubic'
    assert models.get_model_cfg('dm_nfnet_f6').input_size == (448, 448, 3)
    assert models.get_model_cfg('densenet121').top1 == 74.434
    bc = models.get_model_cfg('densenet_bc_100_12')
    assert bc.input_size == (32, 32, 3) and bc.num_classes == 10


def test_export_names_match_reference_state_dicts():
    """Every torchvision / timm state-dict name has a counterpart (both directions)."""
    for name, ref in (
        ('densenet121', lambda: torchvision.models.densenet121()),
        ('dm_nfnet_f0', lambda: timm.create_model('dm_nfnet_f0')),
    ):
        with torch.device('meta'):
            ref_shapes = {
                k: tuple(v.shape)
                for k, v in ref().state_dict().items()
                if not k.endswith('num_batches_tracked')
            }
        model = models.create_model(name)
        abstract = abstract_variables(model, (1, 64, 64, 3))
        zeros = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), abstract)
        exported = models.export_state_dict(name, zeros)
        assert {k: v.shape for k, v in exported.items()} == ref_shapes


# -------------------------------------------------------------------------------- AGC


def test_agc_matches_hand_computed_example():
    params = {
        # Dense kernel (in=2, out=2): units are columns. ||W_:,0|| = 5, ||W_:,1|| = 1.
        'dense': {'kernel': jnp.array([[3.0, 1.0], [4.0, 0.0]]), 'bias': jnp.array([0.0, 0.0])},
        # Conv kernel HWIO (1, 1, 2, 1): one unit, ||W|| = sqrt(2).
        'conv': {'kernel': jnp.array([1.0, 1.0]).reshape(1, 1, 2, 1)},
        'fc': {'kernel': jnp.zeros((2, 2))},
    }
    grads = {
        'dense': {'kernel': jnp.array([[0.3, 0.0], [0.4, 2.0]]), 'bias': jnp.array([3.0, 4.0])},
        'conv': {'kernel': jnp.array([0.06, 0.08]).reshape(1, 1, 2, 1)},
        'fc': {'kernel': jnp.full((2, 2), 100.0)},
    }
    tx = agc.adaptive_grad_clip(clipping=0.1, eps=1e-3)
    out, _ = tx.update(grads, tx.init(params), params)
    # Column 0: ||G|| = 0.5 = 0.1 * 5, not above the limit: unchanged. Column 1:
    # ||G|| = 2 > 0.1 * 1 -> scaled to norm 0.1.
    np.testing.assert_allclose(out['dense']['kernel'], [[0.3, 0.0], [0.4, 0.1]], rtol=1e-6)
    # Zero bias: limit 0.1 * eps = 1e-4 on the whole vector (norm 5) -> (3, 4) * 2e-5.
    np.testing.assert_allclose(out['dense']['bias'], [6e-5, 8e-5], rtol=1e-5)
    # Conv unit: ||G|| = 0.1 < 0.1 * sqrt(2): unchanged.
    np.testing.assert_allclose(out['conv']['kernel'], grads['conv']['kernel'])
    # The classifier is masked out as in the paper.
    np.testing.assert_array_equal(out['fc']['kernel'], grads['fc']['kernel'])
    # mask=None clips the classifier too (zero params: limit 1e-4 per column).
    everything = agc.adaptive_grad_clip(0.1, mask=None)
    out_all, _ = everything.update(grads, everything.init(params), params)
    np.testing.assert_allclose(np.linalg.norm(out_all['fc']['kernel'], axis=0), [1e-4, 1e-4], rtol=1e-5)


def test_agc_conv_units_are_output_channels():
    kernel = normal((3, 3, 4, 2), seed=1)
    grad = 10.0 * normal((3, 3, 4, 2), seed=2)
    tx = agc.adaptive_grad_clip(0.01)
    out, _ = tx.update({'k': grad}, tx.init({'k': kernel}), {'k': kernel})
    ratio = np.linalg.norm(np.asarray(out['k']).reshape(-1, 2), axis=0) / np.linalg.norm(
        np.asarray(kernel).reshape(-1, 2), axis=0
    )
    np.testing.assert_allclose(ratio, [0.01, 0.01], rtol=1e-5)
