"""Adaptive gradient clipping (AGC) as an optax transform.

Brock, De, Smith, Simonyan, "High-Performance Large-Scale Image Recognition Without
Normalization", ICML 2021, Sec. 4.1: each *unit* ``i`` of a layer (the weights feeding one
output channel / neuron) has its gradient rescaled to

    G_i <- G_i * lambda * max(||W_i||, eps) / ||G_i||   where ||G_i|| > lambda * max(||W_i||, eps),

(Frobenius norms), and the final linear layer is not clipped.

optax (>= 0.2.x, incl. the pinned 0.2.8) ships ``optax.adaptive_grad_clip`` with exactly
these units for our layouts: HWIO conv kernels reduce over (H, W, I) -> one norm per output
channel, (in, out) dense kernels over ``in`` -> one per output neuron, and vectors and
scalars (biases, gains, norm scales) are one unit each, as in DeepMind's
``nfnets/agc_optax.py``. So this module wraps it instead of re-implementing it and adds the
paper's exclusion of the classifier through ``optax.masked``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection
from typing import Any

import optax
from flax import traverse_util

# Top-level module names of the classifier in most families (ResNet/NFNet 'fc', DenseNet
# 'classifier', timm-style 'head'): the default for a bare params tree; a registered
# model's own declaration (`classifier_mask`) is exact.
CLASSIFIER_NAMES: tuple[str, ...] = ('fc', 'classifier', 'head')


def _clip_mask(params: Any, in_classifier: Callable[[tuple[str, ...]], bool]) -> Any:
    """True for every parameter whose path `in_classifier` does not claim."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({k: not in_classifier(k) for k in flat})


def skip_classifier_mask(
    params: Any, classifier_names: Collection[str] = CLASSIFIER_NAMES
) -> Any:
    """True for every parameter except those under a top-level classifier module.

    Args:
        params: the model's ``params`` tree (a nested dict).
        classifier_names: top-level keys whose subtrees are not clipped.
    """
    return _clip_mask(params, lambda path: path[0] in classifier_names)


def classifier_mask(model_name: str) -> Callable[[Any], Any]:
    """The AGC mask of a registered model: its declared classifier
    (`models.in_classifier`, from the model's ModelCfg) is not clipped."""
    import models  # noqa: PLC0415 - the optimizer module stays importable without the zoo

    return functools.partial(_clip_mask, in_classifier=functools.partial(models.in_classifier, model_name))


def adaptive_grad_clip(
    clipping: float,
    eps: float = 1e-3,
    mask: Any | Callable[[Any], Any] | None = skip_classifier_mask,
) -> optax.GradientTransformation:
    """Unit-wise adaptive gradient clipping (Brock et al. 2021, Sec. 4.1).

    Args:
        clipping: lambda, the largest allowed ratio ``||G_i|| / max(||W_i||, eps)`` per unit.
            The paper trains NFNet-F models with 0.01 at batch size 4096; Sec. 4.1 finds that
            larger batches need smaller thresholds.
        eps: floor on the parameter norm, so zero-initialised parameters (e.g. skipinit
            gains) can still move.
        mask: which parameters to clip: a pytree of bools like ``params`` or a function
            ``params -> pytree``; False leaves pass through unchanged. The default skips the
            final linear layer as the paper does (:func:`skip_classifier_mask`); None clips
            everything.

    Returns:
        An ``optax.GradientTransformation`` whose ``update`` needs ``params``. Chain it
        before the optimizer, e.g. ``optax.chain(adaptive_grad_clip(0.01), optax.sgd(...))``.
    """
    clip = optax.adaptive_grad_clip(clipping, eps)
    if mask is None:
        return clip
    return optax.masked(clip, mask)
