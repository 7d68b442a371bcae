"""Tests of the mobile families: SqueezeNet, MobileNet v1/v2/v3, MnasNet.

MobileNet v1 against the paper's counts, logits parity with converted random-init
torchvision / timm weights (full resolution for one representative per family:
squeezenet1_0, mobilenetv3_large_100, mnasnet1_0; the other variants at small or odd
resolutions to keep the file fast on CPU) and the export round trips of both naming
schemes. Counts (equal to torchvision 0.29's / timm 1.0's), shapes, twins and train steps
of every model: tests/test_models_registry.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')
timm = pytest.importorskip('timm')
from parity import assert_logits_match  # noqa: E402

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
