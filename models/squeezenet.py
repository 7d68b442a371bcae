"""SqueezeNet 1.0 and 1.1 as in torchvision.

Iandola et al., "SqueezeNet: AlexNet-level accuracy with 50x fewer parameters and <0.5MB
model size", arXiv 2016. Fire modules (a 1x1 "squeeze" conv feeding parallel 1x1 and 3x3
"expand" convs whose outputs are concatenated) with the widths of the paper's Table 1
(v1.0); v1.1 is torchvision's cheaper variant (3x3/2 stem of 64 channels, pooling moved
earlier). The classifier is dropout, a 1x1 conv to the classes, ReLU and global average
pooling. Max-pools round up (torch ``ceil_mode=True``). Parameter counts equal
torchvision's: 1,248,424 (1.0) and 1,235,496 (1.1).

The reference has no normalisation: ``norm='none'`` (default) is the reference network;
``norm='batch' | 'group'`` adds a norm after every conv of the body (the convs then have no
bias), which is how the GroupNorm + weight-standardised twin is built. There are no
residual branches, so there is no ``drop_path_rate``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers, registry
from models.convert import flat, register_name_map, within

register_model = functools.partial(
    registry.register_model, family='squeezenet', classifier='classifier_1', first_conv='features_0'
)

_PAPER = (
    'Iandola et al., "SqueezeNet: AlexNet-level accuracy with 50x fewer parameters and '
    '<0.5MB model size", arXiv 2016'
)

# Fire widths (squeeze, expand1x1, expand3x3) per stage; a 3x3/2 max-pool precedes every
# stage after the first. Iandola et al. 2016, Table 1 (1.0); torchvision (1.1).
SQUEEZENET_STAGES: dict[str, tuple[tuple[tuple[int, int, int], ...], ...]] = {
    '1_0': (
        ((16, 64, 64), (16, 64, 64), (32, 128, 128)),
        ((32, 128, 128), (48, 192, 192), (48, 192, 192), (64, 256, 256)),
        ((64, 256, 256),),
    ),
    '1_1': (
        ((16, 64, 64), (16, 64, 64)),
        ((32, 128, 128), (32, 128, 128)),
        ((48, 192, 192), (48, 192, 192), (64, 256, 256), (64, 256, 256)),
    ),
}
# version -> (stem channels, stem kernel).
SQUEEZENET_STEMS: dict[str, tuple[int, int]] = {'1_0': (96, 7), '1_1': (64, 3)}

# torchvision initialises the body convs with kaiming_uniform_ (gain sqrt(2), fan_in).
_torch_conv_init = nn.initializers.variance_scaling(2.0, 'fan_in', 'uniform')


def _max_pool_ceil(x: jax.Array, padding: str = 'symmetric') -> jax.Array:
    """3x3/2 max-pool with torch's ``ceil_mode=True`` (pads the bottom/right with -inf), or
    TF ``SAME`` when ``padding='tf_same'``."""
    if padding == 'tf_same':
        return nn.max_pool(x, (3, 3), (2, 2), padding='SAME')
    pads = []
    for size in x.shape[1:3]:
        out = math.ceil((size - 3) / 2) + 1
        pads.append((0, (out - 1) * 2 + 3 - size))
    return nn.max_pool(x, (3, 3), (2, 2), padding=pads)


class Fire(nn.Module):
    """Fire module (Iandola et al. 2016, Sec. 3.2).

    Attributes:
        squeeze: width of the squeeze 1x1 conv.
        expand1x1: width of the 1x1 expand conv.
        expand3x3: width of the 3x3 expand conv.
        conv: conv constructor from :func:`layers.conv_factory`.
        norm: norm constructor, or None for the reference network (biased convs).
    """

    squeeze: int
    expand1x1: int
    expand3x3: int
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module] | None = None

    def _conv_act(self, x: jax.Array, features: int, kernel: int, name: str) -> jax.Array:
        x = self.conv(features, kernel, use_bias=self.norm is None, name=name)(x)
        if self.norm is not None:
            x = self.norm(name=f'{name}_norm')(x)
        return nn.relu(x)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = self._conv_act(x, self.squeeze, 1, 'squeeze')
        return jnp.concatenate(
            [self._conv_act(x, self.expand1x1, 1, 'expand1x1'), self._conv_act(x, self.expand3x3, 3, 'expand3x3')],
            axis=-1,
        )


class SqueezeNet(layers.ImageClassifier):
    """SqueezeNet (torchvision layout; our module names mirror ``features.K``).

    Features: ``stem``, ``stage1``..``stage3``, ``pre_logits`` (the pooled last Fire, what
    ``num_classes=0`` returns). Shared fields as :class:`layers.ImageClassifier`, with the
    reference's ``norm='none'`` and ``drop_rate=0.5`` (before the classifier conv);
    ``weight_std`` covers the classifier conv too. ``padding`` covers the 3x3 expand convs
    and the max-pools (the stem conv is unpadded in both modes); with ``'tf_same'`` the
    ceil-mode pools become TF ``SAME`` pools, which agree with them at even sizes and pad
    one pixel on both sides (one more output) at odd ones.

    Attributes:
        version: ``'1_0'`` or ``'1_1'`` (keys of :data:`SQUEEZENET_STAGES`).
    """

    version: str = '1_0'
    norm: str = layers.kw_only('none')
    drop_rate: float = layers.kw_only(0.5)

    HEAD = 'classifier_1'
    CHOICES = {'version': tuple(SQUEEZENET_STAGES)}

    def _conv(self):
        # The 3x3 expand convs pad by 1 (torchvision); the 1x1 convs are unpadded in either mode.
        return self.make_conv(kernel_init=_torch_conv_init)

    def forward_features(self, x: jax.Array, train: bool, features: dict) -> jax.Array:
        conv = self._conv()
        norm = None if self.norm == 'none' else self.make_norm(train)
        width, kernel = SQUEEZENET_STEMS[self.version]
        x = conv(width, kernel, 2, padding='valid', use_bias=norm is None, name='features_0')(x)
        if norm is not None:
            x = norm(name='features_0_norm')(x)
        x = _max_pool_ceil(nn.relu(x), self.padding)
        features['stem'] = x

        # Our names carry torchvision's Sequential index: conv 0, ReLU 1, pool 2, then Fire
        # modules with one pool between stages.
        index = 3
        for s, stage in enumerate(SQUEEZENET_STAGES[self.version]):
            if s > 0:
                x = _max_pool_ceil(x, self.padding)
                index += 1
            for squeeze, e1, e3 in stage:
                x = self.run_block(Fire(squeeze, e1, e3, conv, norm, name=f'features_{index}'), x)
                index += 1
            features[f'stage{s + 1}'] = x
        return x

    def forward_head(self, x: jax.Array, train: bool, features: dict) -> jax.Array:
        # The classifier is a conv on the map, pooled after its ReLU.
        features['pre_logits'] = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        if not self.num_classes:
            return features['pre_logits']
        x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
        # torchvision: normal(0, 0.01) for the final conv, bias 0.
        x = self._conv()(
            self.num_classes, 1, use_bias=True, kernel_init=nn.initializers.normal(0.01), name=self.HEAD
        )(x)
        return jnp.mean(nn.relu(x).astype(jnp.float32), axis=(1, 2))


# torchvision names (features.K.squeeze / .expand1x1 / .expand3x3, classifier.1); the norm
# layers of the norm='batch'|'group' twins have no reference counterpart.
register_name_map(
    'squeezenet',
    (
        *flat('conv', 'features.0'),
        *within('features.{i}', 'features_{i}', 'conv', 'squeeze', 'expand1x1', 'expand3x3'),
        *flat('conv', 'classifier.1'),
    ),
)


# top1: torchvision IMAGENET1K_V1 weights (224 px, resize 256 bilinear).
@register_model(top1=58.092, paper=_PAPER)
def squeezenet1_0(**kwargs) -> SqueezeNet:
    """SqueezeNet 1.0, 1,248,424 parameters (torchvision)."""
    return SqueezeNet(**{'version': '1_0', **kwargs})


@register_model(top1=58.178, paper=_PAPER)
def squeezenet1_1(**kwargs) -> SqueezeNet:
    """SqueezeNet 1.1, 1,235,496 parameters (torchvision)."""
    return SqueezeNet(**{'version': '1_1', **kwargs})
