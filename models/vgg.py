"""VGG-11/13/16/19 with and without BatchNorm, as in torchvision.

Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
Recognition", ICLR 2015, Table 1 configurations A (11 weight layers), B (13), D (16) and
E (19): five blocks of 3x3 stride-1 pad-1 convs with 64, 128, 256, 512, 512 channels, each
block ending in a 2x2/2 max-pool, then FC-4096, FC-4096, FC-1000 with ReLU and dropout 0.5
after the two hidden FC layers (Sec. 3.1). As in torchvision, an adaptive average pool to
7x7 precedes the classifier (the identity at 224 px; any input >= 32 px works), and the
``_bn`` variants put a BatchNorm (eps 1e-5, torch momentum 0.1) between every conv and its
ReLU while keeping the conv biases. Parameter counts equal torchvision's at 1000 classes:
vgg11 132,863,336; vgg13 133,047,848; vgg16 138,357,544; vgg19 143,667,240; and with BN
132,868,840 / 133,053,736 / 138,365,992 / 143,678,248. Initialisation follows torchvision:
convs kaiming-normal (fan_out, relu) with zero bias, FC weights N(0, 0.01) with zero bias.

Layer names follow the Caffe release of the paper's models (``conv{block}_{i}``, ``fc6``,
``fc7``, ``fc8``), norms ``bn{block}_{i}``. ``norm='group', weight_std=True`` gives the BiT
twin. ``num_classes=0`` returns the post-ReLU fc7 output (``pre_logits``, 4096 wide), as
timm's VGG does; ``return_features`` gives ``stem`` (block 1, stride 2) and ``stage1`` to
``stage4`` (blocks 2-5, strides 4-32), each after its max-pool.

Weight conversion: torchvision's state dict numbers ``features.{i}`` by position in one
``nn.Sequential`` (conv, [BN,] ReLU, ..., max-pool), so ``features.16.weight`` is a conv
of vgg11 but a BatchNorm of vgg11_bn, and ``features.4`` a conv of vgg11_bn but a BatchNorm
of vgg13_bn. No single name map can serve all eight variants, so each variant gets its own
map, generated from its configuration; the registry finds a model's map by the factory's
module name, which :func:`_own_name_map` sets to ``models.vgg.<variant>``. torchvision
``vgg*_bn`` weights load into the ``vgg*_bn`` names (not into ``vgg*`` with
``norm='batch'``, which is the same network but uses the plain variant's map).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers
from models.alexnet import adaptive_avg_pool, flatten_chw
from models.convert import NameRule, register_name_map
from models.registry import register_model

_PAPER = (
    'Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image '
    'Recognition", ICLR 2015'
)

# Table 1: 3x3 convs per block for configurations A, B, D, E; widths shared by all.
VGG_DEPTHS: dict[str, tuple[int, ...]] = {
    'A': (1, 1, 2, 2, 2),
    'B': (2, 2, 2, 2, 2),
    'D': (2, 2, 3, 3, 3),
    'E': (2, 2, 4, 4, 4),
}
VGG_WIDTHS: tuple[int, ...] = (64, 128, 256, 512, 512)
POOLED_SIZE = 7
FC_WIDTH = 4096

# variant -> (configuration, BatchNorm)
VGG_VARIANTS: dict[str, tuple[str, bool]] = {
    'vgg11': ('A', False),
    'vgg13': ('B', False),
    'vgg16': ('D', False),
    'vgg19': ('E', False),
    'vgg11_bn': ('A', True),
    'vgg13_bn': ('B', True),
    'vgg16_bn': ('D', True),
    'vgg19_bn': ('E', True),
}


class VGG(nn.Module):
    """VGG (torchvision layout).

    Attributes:
        depths: 3x3 convs per block (a :data:`VGG_DEPTHS` row).
        widths: channels per block.
        num_classes: classifier size; 0 returns the fc7 features.
        norm: ``'none'`` (plain VGG), ``'batch'`` (the ``_bn`` variants) or ``'group'``.
        gn_groups: groups when ``norm='group'``.
        weight_std: weight-standardised convs (BiT).
        dtype: compute dtype; parameters and logits are float32.
        drop_rate: dropout after fc6 and fc7 (0.5 in the paper and torchvision).
        padding: padding mode of the 3x3 convs (see :func:`layers.get_padding`); every conv
            has stride 1, where TF ``SAME`` pads 1 on each side like torch, so
            ``'tf_same'`` computes the same network as ``'symmetric'``. The max-pools are
            unpadded in both modes.
    """

    depths: tuple[int, ...]
    widths: tuple[int, ...] = VGG_WIDTHS
    num_classes: int = 1000
    norm: str = 'none'
    gn_groups: int = 32
    weight_std: bool = False
    dtype: layers.Dtype = jnp.float32
    drop_rate: float = 0.5
    padding: str = 'symmetric'

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
        """Applies VGG to NHWC images.

        Args:
            x: images, (B, H, W, C), H and W >= 32.
            train: batch statistics and dropout on.
            return_features: also return ``{'stem', 'stage1'..'stage4', 'pre_logits'}``.

        Returns:
            float32 logits (B, num_classes) (fc7 features when ``num_classes == 0``), and
            the feature dict when ``return_features``.
        """
        if len(self.depths) != len(self.widths):
            raise ValueError('depths and widths need one entry per block')
        layers.check_model_padding(self.padding, type(self).__name__)
        conv = layers.conv_factory(self.weight_std, self.dtype, self.padding)
        norm = layers.norm_factory(self.norm, train, self.dtype, groups=self.gn_groups)
        features = {}

        x = x.astype(self.dtype)
        for b, (depth, width) in enumerate(zip(self.depths, self.widths, strict=True)):
            for i in range(depth):
                # torchvision keeps the conv bias even when BatchNorm follows.
                x = conv(width, 3, use_bias=True, name=f'conv{b + 1}_{i + 1}')(x)
                x = nn.relu(norm(name=f'bn{b + 1}_{i + 1}')(x))
            x = nn.max_pool(x, (2, 2), (2, 2), padding='VALID')
            features['stem' if b == 0 else f'stage{b}'] = x

        x = flatten_chw(adaptive_avg_pool(x, POOLED_SIZE))
        x = nn.relu(_dense(FC_WIDTH, self.dtype, 'fc6')(x))
        x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
        x = nn.relu(_dense(FC_WIDTH, self.dtype, 'fc7')(x))
        features['pre_logits'] = x.astype(jnp.float32)
        if self.num_classes:
            x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
            x = _dense(self.num_classes, self.dtype, 'fc8')(x)
        x = x.astype(jnp.float32)
        return (x, features) if return_features else x


def _dense(features: int, dtype: layers.Dtype, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.initializers.normal(0.01),
        name=name,
    )


def torchvision_name_map(config: str, batch_norm: bool) -> tuple[NameRule, ...]:
    """Rules pairing torchvision's ``features.{i}`` / ``classifier.{i}`` with our names.

    Walks the ``nn.Sequential`` torchvision builds for ``config``: per conv, the conv,
    [BatchNorm,] ReLU; per block, a max-pool; then Linear, ReLU, Dropout (x2), Linear.
    """
    rules = []
    index = 0
    for b, depth in enumerate(VGG_DEPTHS[config]):
        for i in range(depth):
            rules.append(NameRule(f'features.{index}', f'conv{b + 1}_{i + 1}', 'conv'))
            index += 1
            if batch_norm:
                rules.append(NameRule(f'features.{index}', f'bn{b + 1}_{i + 1}', 'norm'))
                index += 1
            index += 1  # ReLU
        index += 1  # max-pool
    rules += [
        NameRule('classifier.0', 'fc6', 'linear'),
        NameRule('classifier.3', 'fc7', 'linear'),
        NameRule('classifier.6', 'fc8', 'linear'),
    ]
    return tuple(rules)


def _own_name_map(fn: Callable[..., VGG]) -> Callable[..., VGG]:
    """Gives a variant its own conversion family (see the module docstring for why).

    The registry takes a model's family from the factory's ``__module__``; naming it
    ``models.vgg.<variant>`` makes the family the variant name, whose map is registered
    below from :data:`VGG_VARIANTS`.
    """
    fn.__module__ = f'{__name__}.{fn.__name__}'
    return fn


for _name, (_config, _batch_norm) in VGG_VARIANTS.items():
    register_name_map(_name, torchvision_name_map(_config, _batch_norm))


def _vgg(variant: str, **kwargs) -> VGG:
    config, batch_norm = VGG_VARIANTS[variant]
    return VGG(**{'depths': VGG_DEPTHS[config], 'norm': 'batch' if batch_norm else 'none', **kwargs})


# top1: torchvision IMAGENET1K_V1 weights (224 px, resize 256, centre crop).
@register_model(top1=69.020, paper=_PAPER)
@_own_name_map
def vgg11(**kwargs) -> VGG:
    """VGG-11 (configuration A), 132,863,336 parameters."""
    return _vgg('vgg11', **kwargs)


@register_model(top1=69.928, paper=_PAPER)
@_own_name_map
def vgg13(**kwargs) -> VGG:
    """VGG-13 (configuration B), 133,047,848 parameters."""
    return _vgg('vgg13', **kwargs)


@register_model(top1=71.592, paper=_PAPER)
@_own_name_map
def vgg16(**kwargs) -> VGG:
    """VGG-16 (configuration D), 138,357,544 parameters."""
    return _vgg('vgg16', **kwargs)


@register_model(top1=72.376, paper=_PAPER)
@_own_name_map
def vgg19(**kwargs) -> VGG:
    """VGG-19 (configuration E), 143,667,240 parameters."""
    return _vgg('vgg19', **kwargs)


@register_model(top1=70.370, paper=_PAPER)
@_own_name_map
def vgg11_bn(**kwargs) -> VGG:
    """VGG-11 with BatchNorm, 132,868,840 parameters."""
    return _vgg('vgg11_bn', **kwargs)


@register_model(top1=71.586, paper=_PAPER)
@_own_name_map
def vgg13_bn(**kwargs) -> VGG:
    """VGG-13 with BatchNorm, 133,053,736 parameters."""
    return _vgg('vgg13_bn', **kwargs)


@register_model(top1=73.360, paper=_PAPER)
@_own_name_map
def vgg16_bn(**kwargs) -> VGG:
    """VGG-16 with BatchNorm, 138,365,992 parameters."""
    return _vgg('vgg16_bn', **kwargs)


@register_model(top1=74.218, paper=_PAPER)
@_own_name_map
def vgg19_bn(**kwargs) -> VGG:
    """VGG-19 with BatchNorm, 143,678,248 parameters."""
    return _vgg('vgg19_bn', **kwargs)
