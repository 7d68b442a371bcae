"""`remat='block'` (`config.remat`): every family's blocks rematerialised, the same
parameters and numbers, less memory; families without blocks refuse it."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from modeltest import abstract_variables, normal, random_variables, train_step
from test_models_registry import TRAIN_STEPS

import models
from flaxnets_errors import ConfigError
from models.layers import ModelFieldError
from trainers import configuration

REMAT_PRIMITIVES = ('checkpoint', 'remat', 'remat2')


def _remat_calls(model, shape) -> int:
    """How many rematerialised calls a train-mode forward pass makes (traced only)."""
    variables = abstract_variables(model, shape)

    def forward(variables, x):
        return model.apply(variables, x, train=True, mutable=['batch_stats'],
                           rngs={'dropout': jax.random.key(0)})[0]

    jaxpr = jax.make_jaxpr(forward)(variables, jax.ShapeDtypeStruct(shape, jnp.float32))
    return sum(eqn.primitive.name in REMAT_PRIMITIVES for eqn in jaxpr.jaxpr.eqns)


@pytest.mark.parametrize('name', sorted(TRAIN_STEPS))
def test_every_family_rematerialises_its_blocks_or_refuses(name):
    size, overrides = TRAIN_STEPS[name]
    shape = (2, size, size, models.get_model_cfg(name).input_size[2])
    plain = models.create_model(name, num_classes=5, **overrides)
    if plain.REMAT == ('none',):
        with pytest.raises(ModelFieldError, match=r"remat='block' is not valid; valid values: 'none'"):
            models.create_model(name, num_classes=5, remat='block', **overrides)
        return
    remat = models.create_model(name, num_classes=5, remat='block', **overrides)
    # The same variables (paths, shapes), so checkpoints load either way.
    chex.assert_trees_all_equal_shapes_and_dtypes(abstract_variables(plain, shape),
                                                  abstract_variables(remat, shape))
    assert _remat_calls(plain, shape) == 0
    assert _remat_calls(remat, shape) >= 2


@pytest.mark.parametrize('name', ['resnet_tiny', 'efficientnet_b0'])
def test_remat_gives_the_same_step_and_keeps_fewer_activations(name):
    """residual_stages (ResNet) and the MBConv body (EfficientNet): equal loss, gradients
    and BatchNorm updates; autodiff keeps a fraction of the activations for the backward."""
    from tools.benchmark import saved_activation_bytes

    size, overrides = TRAIN_STEPS[name]
    overrides = {k: v for k, v in overrides.items() if k != 'drop_path_rate'}
    x = normal((8, 64, 64, 3), seed=1)
    labels = jnp.arange(8) % 5
    plain = models.create_model(name, num_classes=5, drop_rate=0.0, **overrides)
    remat = plain.clone(remat='block')
    variables = random_variables(plain, x.shape)
    a, b = train_step(plain, variables, x, labels), train_step(remat, variables, x, labels)
    chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-6)
    kept = [saved_activation_bytes(m, variables, x, labels) for m in (plain, remat)]
    assert kept[1] < 0.5 * kept[0], kept


def test_config_remat_is_checked_before_anything_runs():
    from configs import default

    config = default.get_config()
    assert config.remat == 'none'
    config.remat = 'blocks'
    with pytest.raises(ConfigError, match=r"config.remat='blocks' \(must be one of .*'block'"):
        configuration.check_values(config)
    assert 'remat' in configuration.HARMLESS_FIELDS  # a resume may switch it: same numbers


def test_benchmark_reports_memory_with_and_without_remat(capsys):
    from tools import benchmark

    runs = [benchmark.main(['--model', 'resnet18', '--resolution', '64', '--batch-size', '16',
                            '--devices', '1', '--remat', remat, '--no-compile', '--json'])
            for remat in ('none', 'block')]
    capsys.readouterr()
    assert [r['remat'] for r in runs] == ['none', 'block']
    assert runs[1]['activations_gib'] < 0.5 * runs[0]['activations_gib']
    # resnet18's state: 11.7M float32 parameters and as many momentum buffers.
    np.testing.assert_allclose(runs[0]['state_gib'] * 2**30, 2 * 4 * 11_689_512, rtol=1e-3)
    assert runs[0]['state_gib'] == runs[1]['state_gib']
