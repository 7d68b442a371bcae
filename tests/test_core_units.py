"""Unit tests of the training core's small pieces: state shardings, `gathered`, batch
arithmetic (trainers/core.py), learning-rate schedules and the weight-decay mask
(trainers/optim.py).

Nothing here trains or compiles a model. The sharding checks need 8 devices, which this
session does not have (the device count is fixed when JAX starts), so they run once, in a
fresh interpreter with 8 fake CPU devices (`run_python`), and the tests read its answer.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from test_scale import run_python

import models
from flaxnets_errors import ConfigError
from trainers import core, optim

# ----------------------------------------------------------------------------- state_shardings

# Abstract state leaves (element counts against the default min_size, 2**18 = 262,144).
_LEAVES = {
    'conv': (3, 3, 64, 512),  # 294,912: largest dim 512 divides by 8
    'dense': (1001, 512),  # 512,512: largest dim 1001 does not, the next one does
    'square': (512, 512),  # exactly 262,144: sharded (>= min_size), first of the equal dims
    'odd': (3, 5, 7, 2503),  # 262,815: no dimension divides by 8
    'small': (64, 64),  # 4,096
    'bias': (512,),
    'count': (),
}

_SHARDING_CODE = '''
import json
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from trainers import core

LEAVES = %r
state = {k: jax.ShapeDtypeStruct(s, np.float32) for k, s in LEAVES.items()}
mesh = Mesh(np.array(jax.devices()), ('data',))
one = Mesh(np.array(jax.devices()[:1]), ('data',))

def specs(shardings):
    return {k: list(s.spec) for k, s in shardings.items()}

out = {
    'devices': jax.device_count(),
    'off': specs(core.state_shardings(mesh, state, False)),
    'on': specs(core.state_shardings(mesh, state, True)),
    'min1': specs(core.state_shardings(mesh, state, True, min_size=1)),
    'one_device': specs(core.state_shardings(one, state, True)),
}
conv = jax.device_put(np.zeros(LEAVES['conv'], np.float32),
                      core.state_shardings(mesh, state, True)['conv'])
out['conv_shards'] = sorted({tuple(s.data.shape) for s in conv.addressable_shards})
out['conv_shard_devices'] = len({s.device for s in conv.addressable_shards})

x = jax.device_put(np.arange(32, dtype=np.float32).reshape(8, 4), NamedSharding(mesh, P('data')))
under_mesh = core.mesh_jit(core.gathered, mesh)(x)
without_mesh = jax.jit(core.gathered)(x)
out['gathered'] = dict(
    input=x.sharding.is_fully_replicated,
    under_mesh=under_mesh.sharding.is_fully_replicated,
    without_mesh=without_mesh.sharding.is_fully_replicated,
    values=bool((np.asarray(under_mesh) == np.arange(32).reshape(8, 4)).all()),
    eager_identity=core.gathered(x) is x,
)
print(json.dumps(out))
'''


@pytest.fixture(scope='module')
def on_8_devices() -> dict:
    return run_python(_SHARDING_CODE % (_LEAVES,), devices=8, timeout=300)


def test_shard_params_off_replicates_every_leaf(on_8_devices):
    assert on_8_devices['devices'] == 8
    assert on_8_devices['off'] == {k: [] for k in _LEAVES}


def test_large_leaves_split_over_data_along_the_largest_divisible_dim(on_8_devices):
    on = on_8_devices['on']
    assert on['conv'] == [None, None, None, 'data']
    assert on['dense'] == [None, 'data']  # 1001 % 8 != 0: the next largest dimension
    assert on['square'] == ['data', None]  # min_size is inclusive; ties go to the first dim


def test_small_scalar_and_indivisible_leaves_stay_replicated(on_8_devices):
    on = on_8_devices['on']
    assert (on['small'], on['bias'], on['count']) == ([], [], [])
    assert on['odd'] == []  # large, but no dimension divides by 8


def test_min_size_sets_what_counts_as_large(on_8_devices):
    min1 = on_8_devices['min1']
    assert min1['small'] == ['data', None]
    assert min1['bias'] == ['data']
    assert min1['count'] == []  # a scalar has no dimension to split
    assert min1['odd'] == []
    assert min1['conv'] == on_8_devices['on']['conv']


def test_one_device_mesh_never_shards(on_8_devices):
    assert on_8_devices['one_device'] == {k: [] for k in _LEAVES}


def test_sharded_leaf_puts_one_slice_on_each_device(on_8_devices):
    assert on_8_devices['conv_shards'] == [[3, 3, 64, 64]]
    assert on_8_devices['conv_shard_devices'] == 8


def test_gathered_replicates_only_under_a_mesh(on_8_devices):
    g = on_8_devices['gathered']
    assert g == dict(input=False, under_mesh=True, without_mesh=False, values=True,
                     eager_identity=True)


# ----------------------------------------------------------------------------- batch arithmetic


def test_check_batch_size_needs_a_multiple_of_devices_and_processes():
    core.check_batch_size('batch_size', 12, 4, 3)  # lcm(4, 3) = 12
    core.check_batch_size('batch_size', 7)  # this session: 1 device, 1 process
    with pytest.raises(ConfigError, match=r'batch_size=18 .*\(4\) and processes \(3\): '
                                          r'use 12 or 24 \(a multiple of 12\)'):
        core.check_batch_size('batch_size', 18, 4, 3)
    # Below the smallest multiple only the multiple itself is suggested (0 is no batch).
    with pytest.raises(ConfigError, match=r'unlabeled=5 .*: use 8 \(a multiple of 8\)'):
        core.check_batch_size('unlabeled', 5, 8, 1)
    with pytest.raises(ConfigError, match=r'batch_size=-16 must be a positive multiple of 8'):
        core.check_batch_size('batch_size', -16, 8, 1)


def test_eval_batch_size_rounds_up_to_the_split_unit():
    assert core.eval_batch_size(12, 4, 6) == 12  # already a multiple of lcm(4, 6) = 12
    assert core.eval_batch_size(13, 4, 6) == 24
    assert core.eval_batch_size(7) == 7  # 1 device, 1 process
    assert core.eval_batch_size(1, 3, 2) == 6
    for bad in (0, -8):
        with pytest.raises(ConfigError, match=f'eval_batch_size={bad} must be positive'):
            core.eval_batch_size(bad, 8, 1)


# ----------------------------------------------------------------------------- schedules


def _config(lr=0.1, batch=512, base=256, steps=1000, **schedule):
    return ml_collections.ConfigDict(dict(
        learning_rate=lr, batch_size=batch, lr_base_batch_size=base, num_train_steps=steps,
        schedule=schedule,
    ))


def _values(config, steps):
    schedule = optim.create_schedule(config)
    return [float(schedule(s)) for s in steps]


def test_learning_rate_scales_linearly_with_the_batch():
    assert optim.scaled_learning_rate(_config(lr=0.1, batch=1024, base=256)) == pytest.approx(0.4)
    assert optim.scaled_learning_rate(_config(lr=0.256, batch=256, base=4096)) == pytest.approx(0.016)
    assert optim.scaled_learning_rate(_config(lr=0.05, batch=128, base=0)) == 0.05  # 0: as is
    no_key = _config(lr=0.05, batch=128)
    del no_key['lr_base_batch_size']
    assert optim.scaled_learning_rate(no_key) == 0.05


# Peak 0.1 x 512 / 256 = 0.2; 1,000 steps, the first 100 a linear warmup from 0.
_WARMUP = {0: 0.0, 50: 0.1, 99: 0.198, 100: 0.2}


@pytest.mark.parametrize('schedule, expected', [
    (dict(name='constant', warmup_steps=100), {**_WARMUP, 550: 0.2, 1000: 0.2}),
    # cosine over the 900 steps after the warmup: half way (550) at half the peak.
    (dict(name='cosine', warmup_steps=100),
     {**_WARMUP, 325: 0.2 * 0.5 * (1 + math.cos(math.pi / 4)), 550: 0.1, 1000: 0.0}),
    (dict(name='cosine', warmup_steps=100, end_lr_factor=0.1),
     {**_WARMUP, 550: 0.2 * (0.9 * 0.5 + 0.1), 1000: 0.02}),
    # step: absolute boundaries; the factor applies from the boundary step on.
    (dict(name='step', warmup_steps=100, boundaries=(300, 600, 900), decay_factor=0.1),
     {**_WARMUP, 299: 0.2, 300: 0.02, 599: 0.02, 600: 0.002, 900: 0.0002, 1000: 0.0002}),
    # exponential counts from the end of the warmup: 0.5 per 10 steps.
    (dict(name='exponential', warmup_steps=100, decay_steps=10, decay_factor=0.5, staircase=True),
     {**_WARMUP, 109: 0.2, 110: 0.1, 135: 0.025}),
    (dict(name='exponential', warmup_steps=100, decay_steps=10, decay_factor=0.5, staircase=False),
     {**_WARMUP, 105: 0.2 * 0.5**0.5, 120: 0.05}),
    # no warmup: the peak at step 0
    (dict(name='cosine', warmup_steps=0), {0: 0.2, 500: 0.1, 1000: 0.0}),
    (dict(name='step', warmup_steps=0, boundaries=(500,), decay_factor=0.5),
     {0: 0.2, 499: 0.2, 500: 0.1}),
])
def test_schedule_values(schedule, expected):
    got = _values(_config(**schedule), list(expected))
    np.testing.assert_allclose(got, list(expected.values()), rtol=1e-5, atol=1e-9)


def test_schedule_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"Unknown schedule 'linear'.*'constant', 'cosine'"):
        optim.create_schedule(_config(name='linear', warmup_steps=0))
    with pytest.raises(ConfigError, match='decay_steps must be > 0'):
        optim.create_schedule(_config(name='exponential', warmup_steps=0, decay_factor=0.5))


# ----------------------------------------------------------------------------- weight decay


def _abstract_params(name: str):
    model = models.create_model(name, num_classes=10)
    x = jnp.zeros((1, 32, 32, 3))
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))['params']


def _by_leaf_name(tree) -> dict[str, list[bool]]:
    out: dict[str, list[bool]] = {}
    for path, value in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out.setdefault(path[-1].key, []).append(bool(value))
    return out


def test_decay_mask_takes_kernels_not_biases_or_norm_parameters():
    mask = _by_leaf_name(optim.decay_mask(_abstract_params('resnet18')))
    # 20 convolutions (stem, 16 in the blocks, 3 downsamples) and the classifier.
    assert mask == {'kernel': [True] * 21, 'bias': [False] * 21, 'scale': [False] * 20}


def test_decay_mask_skips_lenet_subsampling_coefficients():
    mask = _by_leaf_name(optim.decay_mask(_abstract_params('lenet5')))
    # c1, c3's 16 partial maps, c5, f6, fc; s2 and s4 have a trainable coefficient per map.
    assert mask['kernel'] == [True] * 20 and mask['coef'] == [False] * 2
    assert not any(mask['bias'])


_PARAMS = {
    'conv': {'kernel': jnp.full((3, 3, 2, 4), 2.0), 'bias': jnp.full((4,), 2.0)},
    'norm': {'scale': jnp.full((4,), 2.0), 'bias': jnp.full((4,), 2.0)},
}


@pytest.mark.parametrize('name', ['sgd', 'adamw'])
@pytest.mark.parametrize('decay_all', [False, True])
def test_optimizer_decays_only_the_masked_parameters(name, decay_all):
    """With zero gradients the first update is weight decay alone: -lr x wd x p for the
    decayed leaves (SGD's coupled L2 and AdamW's decoupled decay agree here), 0 elsewhere."""
    config = _config(lr=0.1, base=0, name='constant', warmup_steps=0)
    config.optimizer = ml_collections.ConfigDict(dict(
        name=name, momentum=0.9, weight_decay=0.01, decay_norm_and_bias=decay_all,
    ))
    tx = optim.create_optimizer(config, optim.create_schedule(config))
    zeros = jax.tree.map(jnp.zeros_like, _PARAMS)
    updates, _ = tx.update(zeros, tx.init(_PARAMS), _PARAMS)
    decayed = -0.1 * 0.01 * 2.0
    expected = {
        'conv': {'kernel': decayed, 'bias': decayed if decay_all else 0.0},
        'norm': {'scale': decayed if decay_all else 0.0, 'bias': decayed if decay_all else 0.0},
    }
    for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(updates)[0],
                                 jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-12, err_msg=str(path))


@pytest.mark.parametrize('name', ['squeezenet1_0', 'resnetv2_50x1_bit', 'legacy_senet154'])
def test_agc_and_fine_tuning_skip_the_declared_classifier(name):
    """AGC leaves exactly the declared classifier unclipped (BiT's `head_fc`, SENet's
    `last_linear`, SqueezeNet's conv classifier), and fine-tuning re-initialises exactly it."""
    from flax import traverse_util

    import models
    from trainers import agc, finetune

    h, w, c = models.get_model_cfg(name).input_size
    model = models.create_model(name, num_classes=7)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, h, w, c)), train=False))['params']
    mask = traverse_util.flatten_dict(agc.classifier_mask(name)(params))
    unclipped = {k for k, clip in mask.items() if not clip}
    heads = finetune.head_keys(name, 7)
    assert unclipped and unclipped == {k[1:] for k in heads if k[0] == 'params'}
    assert all(models.in_classifier(name, k) for k in unclipped)
    assert len(unclipped) < len(mask)
