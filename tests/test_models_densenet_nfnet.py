"""DenseNet and NFNet families, and adaptive gradient clipping (trainers/agc.py).

Parameter counts via ``jax.eval_shape`` against hard-coded reference numbers; logits
parity of converted random-init torchvision / timm weights (tests/parity.py); forward +
backward of shrunk members (``create_model`` overrides of the registered variants, to keep
compilation short on CPU) with GroupNorm + weight standardisation and with BatchNorm.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')
timm = pytest.importorskip('timm')

from modeltest import abstract_variables, normal, num_params, train_step  # noqa: E402
from parity import assert_logits_match  # noqa: E402

import models  # noqa: E402
from trainers import agc  # noqa: E402

# Reference parameter counts at 1000 classes: torchvision ``sum(p.numel())`` (equal to the
# ``num_params`` of its weight enums), and timm 1.0.29 ``dm_nfnet_f*`` built on
# torch.device('meta').
REFERENCE_PARAMS = {
    'densenet121': 7_978_856,
    'densenet169': 14_149_480,
    'densenet201': 20_013_928,
    'densenet161': 28_681_000,
    'dm_nfnet_f0': 71_489_284,
    'dm_nfnet_f1': 132_634_256,
    'dm_nfnet_f2': 193_779_228,
    'dm_nfnet_f3': 254_924_200,
    'dm_nfnet_f4': 316_069_172,
    'dm_nfnet_f5': 377_214_144,
    'dm_nfnet_f6': 438_359_116,
}
# No reference implementation: our count, checked against the paper below.
DENSENET264_PARAMS = 33_337_704  # Huang et al. 2017, Table 1 config (no parameter figure there)
DENSENET_BC_100_12_PARAMS = 769_162  # Table 2 quotes "0.8M"


# Small members built through create_model overrides (same modules, fewer/narrower layers).
TINY_DENSENET = dict(growth_rate=8, block_config=(2, 2, 2, 2), stem_width=16)
TINY_NFNET = dict(
    depths=(1, 2, 1, 1), widths=(32, 64, 96, 96), stem_widths=(8, 8, 16, 32), group_size=16
)


# --------------------------------------------------------------------------- param counts


@pytest.mark.parametrize('name', sorted(REFERENCE_PARAMS))
def test_param_count_matches_reference(name):
    variables = abstract_variables(models.create_model(name), (1, 64, 64, 3))
    assert num_params(variables['params']) == REFERENCE_PARAMS[name]


def test_paper_only_densenets():
    d264 = abstract_variables(models.create_model('densenet264'), (1, 64, 64, 3))
    assert num_params(d264['params']) == DENSENET264_PARAMS
    bc = abstract_variables(models.create_model('densenet_bc_100_12'), (1, 32, 32, 3))
    n = num_params(bc['params'])
    assert n == DENSENET_BC_100_12_PARAMS
    assert round(n / 1e6, 1) == 0.8  # Table 2, one decimal
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


# ----------------------------------------------------------------- forward and backward


@pytest.mark.parametrize(
    'name, tiny, overrides',
    [
        ('densenet121', TINY_DENSENET, {'norm': 'group', 'weight_std': True}),
        ('densenet121', TINY_DENSENET, {'block_drop_rate': 0.1, 'drop_rate': 0.2}),
        ('dm_nfnet_f0', TINY_NFNET, {'norm': 'group', 'weight_std': True, 'drop_path_rate': 0.1}),
        ('dm_nfnet_f0', TINY_NFNET, {'norm': 'batch'}),
    ],
)
def test_forward_backward(name, tiny, overrides):
    model = models.create_model(name, num_classes=5, **tiny, **overrides)
    # DenseNet's 32x downsampling needs 64 px for GroupNorm to see more than one pixel per
    # channel in the last block.
    x = normal((2, 64, 64, 3))
    # Random variables instead of a compiled init (one compilation less). For NFNets this
    # also opens the skipinit gains (0 at init), so every branch receives gradient.
    rng = np.random.default_rng(0)
    abstract = abstract_variables(model, x.shape)
    variables = {
        'params': jax.tree.map(
            lambda s: (rng.standard_normal(s.shape) * 0.2).astype(s.dtype), abstract['params']
        )
    }
    if 'batch_stats' in abstract:
        variables['batch_stats'] = jax.tree.map(
            lambda s: (np.abs(rng.standard_normal(s.shape)) + 0.5).astype(s.dtype),
            abstract['batch_stats'],
        )
    loss, logits, updates, grads = train_step(model, variables, x, jnp.array([1, 3]))
    chex.assert_shape(logits, (2, 5))
    assert logits.dtype == jnp.float32
    chex.assert_tree_all_finite((loss, logits, grads))
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
    if overrides.get('norm', model.norm) == 'batch':
        old = jax.tree.leaves(variables['batch_stats'])
        new = jax.tree.leaves(updates['batch_stats'])
        assert len(old) == len(new) > 0
        assert all(not np.allclose(o, n) for o, n in zip(old, new, strict=True))
    else:
        assert 'batch_stats' not in variables and updates == {}


# ---------------------------------------------------------------------------- features


@pytest.mark.parametrize(
    'name, size, expected',
    [
        (
            'densenet121',
            224,
            {
                'stem': (2, 56, 56, 64),
                'stage1': (2, 56, 56, 256),
                'stage2': (2, 28, 28, 512),
                'stage3': (2, 14, 14, 1024),
                'stage4': (2, 7, 7, 1024),
                'pre_logits': (2, 1024),
            },
        ),
        (
            'densenet_bc_100_12',
            32,
            {
                'stem': (2, 32, 32, 24),
                'stage1': (2, 32, 32, 216),
                'stage2': (2, 16, 16, 300),
                'stage3': (2, 8, 8, 342),
                'pre_logits': (2, 342),
            },
        ),
        (
            'dm_nfnet_f0',
            192,
            {
                'stem': (2, 48, 48, 128),
                'stage1': (2, 48, 48, 256),
                'stage2': (2, 24, 24, 512),
                'stage3': (2, 12, 12, 1536),
                'stage4': (2, 6, 6, 1536),
                'pre_logits': (2, 3072),
            },
        ),
    ],
)
def test_return_features_and_headless_shapes(name, size, expected):
    model = models.create_model(name)
    x = jnp.zeros((2, size, size, 3))
    variables = abstract_variables(model, (1, size, size, 3))
    logits, feats = jax.eval_shape(functools.partial(model.apply, return_features=True), variables, x)
    assert logits.shape == (2, model.num_classes) and logits.dtype == jnp.float32
    assert {k: v.shape for k, v in feats.items()} == expected
    headless = models.create_model(name, num_classes=0)
    head_vars = abstract_variables(headless, (1, size, size, 3))
    assert not {'fc', 'classifier'} & set(head_vars['params'])
    pooled = jax.eval_shape(headless.apply, head_vars, x)
    assert pooled.shape == expected['pre_logits'] and pooled.dtype == jnp.float32


def test_bfloat16_compute_keeps_float32_params_and_logits():
    for name, tiny in (('densenet121', TINY_DENSENET), ('dm_nfnet_f0', TINY_NFNET)):
        model = models.create_model(name, dtype=jnp.bfloat16, **tiny)
        variables = abstract_variables(model, (1, 32, 32, 3))
        assert {p.dtype for p in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
        _, feats = jax.eval_shape(
            functools.partial(model.apply, return_features=True), variables, jnp.zeros((1, 32, 32, 3))
        )
        assert feats['stage2'].dtype == jnp.bfloat16
        assert jax.eval_shape(model.apply, variables, jnp.zeros((1, 32, 32, 3))).dtype == jnp.float32


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
