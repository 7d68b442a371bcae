"""Helpers shared by the model test modules.

Most compiled functions in these tests run once or twice on a busy 2-core machine, so
they are compiled with `conftest.FAST_COMPILE` (cheap XLA:CPU passes: less compile time,
slower code), the options conftest also puts in XLA_FLAGS for the session and its
subprocesses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from conftest import FAST_COMPILE


def compile_fast(fn, *args):
    """``jax.jit(fn)`` compiled for ``args`` with ``FAST_COMPILE``."""
    return jax.jit(fn).lower(*args).compile(FAST_COMPILE)


def run_fast(fn, *args):
    return compile_fast(fn, *args)(*args)


def abstract_variables(model, shape):
    """The model's variables as shapes only (`jax.eval_shape`, nothing computed)."""
    return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))


def num_params(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def normal(shape, seed=0, scale=1.0, shift=0.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale + shift, jnp.float32)


def train_step(model, variables, x, labels):
    """One loss and gradient evaluation in train mode (dropout on, BatchNorm statistics
    updated): returns (loss, logits, updated batch_stats, gradients)."""

    def run(variables, x):
        def loss_fn(params):
            logits, updates = model.apply(
                {**variables, 'params': params}, x, train=True, mutable=['batch_stats'],
                rngs={'dropout': jax.random.key(2)},
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), (logits, updates)

        (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables['params'])
        return loss, logits, updates, grads

    return run_fast(run, variables, x)
