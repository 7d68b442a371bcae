"""Learning-rate schedules and optimizers, built from the run config.

Everything the optimizer does is described by `config.optimizer`, `config.schedule`,
`config.learning_rate`, `config.lr_base_batch_size` and `config.grad_clip_norm`; nothing
is hidden in the step.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from flaxnets_errors import ConfigError

SCHEDULES = ('constant', 'cosine', 'step', 'exponential')
OPTIMIZERS = ('sgd', 'rmsprop_tf', 'adamw', 'lars')


def scaled_learning_rate(config: ml_collections.ConfigDict) -> float:
    """Peak LR: `learning_rate` is quoted per `lr_base_batch_size` images (0 = no scaling).

    The linear scaling rule of Goyal et al. 2017 ("0.1 per 256") and of EfficientNet
    ("0.256 per 4096").
    """
    base = config.get('lr_base_batch_size', 0)
    if base:
        return config.learning_rate * config.batch_size / base
    return config.learning_rate


def create_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Builds the LR schedule: linear warmup from 0, then the named decay.

    `config.schedule` fields:
      name: 'constant' | 'cosine' | 'step' | 'exponential'.
      warmup_steps: linear warmup length (steps).
      end_lr_factor: cosine only, final LR as a fraction of the peak.
      boundaries: step only, the steps at which the LR is multiplied by `decay_factor`.
      decay_factor: step: factor at each boundary; exponential: rate per `decay_steps`.
      decay_steps, staircase: exponential only (EfficientNet: 0.97 every 2.4 epochs).
    """
    sc = config.schedule
    peak = scaled_learning_rate(config)
    total = config.num_train_steps
    warmup = int(sc.get('warmup_steps', 0))
    if sc.name not in SCHEDULES:
        raise ConfigError(
            f'Unknown schedule {sc.name!r}: config.schedule.name must be one of {SCHEDULES}.'
        )
    if sc.name == 'constant':
        main = optax.constant_schedule(peak)
    elif sc.name == 'cosine':
        main = optax.cosine_decay_schedule(
            peak, decay_steps=max(1, total - warmup), alpha=sc.get('end_lr_factor', 0.0)
        )
    elif sc.name == 'step':
        # Boundaries are absolute step numbers in the config; the joined schedule counts
        # from the end of the warmup, so shift them.
        main = optax.piecewise_constant_schedule(
            peak, {int(b) - warmup: sc.decay_factor for b in sc.boundaries}
        )
    else:
        if not sc.get('decay_steps'):
            raise ConfigError('config.schedule.decay_steps must be > 0 for the exponential schedule.')
        main = optax.exponential_decay(
            peak,
            transition_steps=sc.decay_steps,
            decay_rate=sc.decay_factor,
            staircase=sc.get('staircase', True),
        )
    if warmup <= 0:
        return main
    warm = optax.linear_schedule(0.0, peak, warmup)
    return optax.join_schedules([warm, main], [warmup])


def decay_mask(params: Any) -> Any:
    """True for the parameters that take weight decay: kernels, not biases or norm scales.

    The rule is by rank (ndim >= 2), which covers every family here: conv and dense kernels
    are decayed; biases, BatchNorm/GroupNorm scales and offsets, and per-map scalars
    (LeNet-5's subsampling coefficients) are not.
    """
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def create_optimizer(
    config: ml_collections.ConfigDict, schedule: optax.Schedule
) -> optax.GradientTransformation:
    """The optimizer named by `config.optimizer.name`, with clipping and weight decay.

    - 'sgd': SGD with (Nesterov) momentum and coupled L2 weight decay (torchvision).
    - 'rmsprop_tf': RMSProp as TensorFlow 1 implements it and EfficientNet used it: the
      second moment starts at 1, epsilon inside the square root, momentum applied after
      the LR scaling.
    - 'adamw': decoupled weight decay (Loshchilov & Hutter 2019).
    - 'lars': layer-wise adaptive rate scaling (You et al. 2017), no decay or trust ratio
      on biases and norm parameters.
    Weight decay skips biases and norm parameters unless
    `optimizer.decay_norm_and_bias` is True. `optimizer.agc_clipping` > 0 adds adaptive
    gradient clipping (Brock et al. 2021; the classifier is not clipped).
    """
    oc = config.optimizer
    name = oc.name
    if name not in OPTIMIZERS:
        raise ConfigError(
            f'Unknown optimizer {name!r}: config.optimizer.name must be one of {OPTIMIZERS}.'
        )
    wd = oc.get('weight_decay', 0.0)
    mask = None if oc.get('decay_norm_and_bias', False) else decay_mask
    momentum = oc.get('momentum', 0.9) or None

    parts = []
    if oc.get('agc_clipping', 0.0):
        # NFNets: unit-wise adaptive clipping instead of (or before) global-norm clipping.
        from trainers.agc import adaptive_grad_clip, classifier_mask

        parts.append(adaptive_grad_clip(oc.agc_clipping, eps=oc.get('agc_eps', 1e-3),
                                        mask=classifier_mask(config.model)))
    if config.get('grad_clip_norm', 0.0):
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    if name in ('sgd', 'rmsprop_tf') and wd:
        parts.append(optax.add_decayed_weights(wd, mask=mask))
    if name == 'sgd':
        parts.append(optax.sgd(schedule, momentum=momentum, nesterov=oc.get('nesterov', False)))
    elif name == 'rmsprop_tf':
        parts.append(
            optax.rmsprop(
                schedule,
                decay=oc.get('rmsprop_decay', 0.9),
                eps=oc.get('rmsprop_eps', 1e-3),
                initial_scale=1.0,
                eps_in_sqrt=True,
                momentum=momentum,
                nesterov=oc.get('nesterov', False),
            )
        )
    elif name == 'adamw':
        parts.append(
            optax.adamw(
                schedule,
                b1=oc.get('b1', 0.9),
                b2=oc.get('b2', 0.999),
                eps=oc.get('eps', 1e-8),
                weight_decay=wd,
                mask=mask,
            )
        )
    else:
        lars_mask = mask if mask is not None else True
        parts.append(
            optax.lars(
                schedule,
                weight_decay=wd,
                weight_decay_mask=lars_mask,
                trust_coefficient=oc.get('lars_trust_coefficient', 0.001),
                trust_ratio_mask=lars_mask,
                momentum=oc.get('momentum', 0.9),
                nesterov=oc.get('nesterov', False),
            )
        )
    return optax.chain(*parts)
