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
map, generated from its configuration and registered under the variant's model name
(which :mod:`models.convert` prefers over the family's). torchvision
``vgg*_bn`` weights load into the ``vgg*_bn`` names (not into ``vgg*`` with
``norm='batch'``, which is the same network but uses the plain variant's map).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers, registry
from models.alexnet import adaptive_avg_pool, flatten_chw
from models.convert import NameRule, register_name_map

register_model = functools.partial(
    registry.register_model, family='vgg', classifier='fc8', first_conv='conv1_1'
)

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

# Registered name -> (configuration, BatchNorm, top1 of torchvision's IMAGENET1K_V1 weights
# at 224 px, resize 256, centre crop); parameter counts in the README table.
VGG_VARIANTS: dict[str, tuple[str, bool, float]] = {
    'vgg11': ('A', False, 69.020),
    'vgg13': ('B', False, 69.928),
    'vgg16': ('D', False, 71.592),
    'vgg19': ('E', False, 72.376),
    'vgg11_bn': ('A', True, 70.370),
    'vgg13_bn': ('B', True, 71.586),
    'vgg16_bn': ('D', True, 73.360),
    'vgg19_bn': ('E', True, 74.218),
}


class VGG(layers.ImageClassifier):
    """VGG (torchvision layout).

    Features: ``stem`` (block 1, stride 2) and ``stage1``..``stage4`` (blocks 2-5), each
    after its max-pool; ``pre_logits`` is the post-ReLU fc7 output (4096 wide, what
    ``num_classes=0`` returns). Shared fields as :class:`layers.ImageClassifier`, with
    ``norm='none'`` (plain VGG; ``'batch'`` gives the ``_bn`` variants) and ``drop_rate=0.5``
    (after fc6 and fc7). Every conv has stride 1, where TF ``SAME`` pads 1 on each side like
    torch, so ``padding='tf_same'`` computes the same network; the max-pools are unpadded.

    Attributes:
        depths: 3x3 convs per block (a :data:`VGG_DEPTHS` row).
        widths: channels per block.
    """

    REMAT = ('none',)  # no blocks to rematerialise

    depths: tuple[int, ...]
    widths: tuple[int, ...] = VGG_WIDTHS
    norm: str = layers.kw_only('none')
    drop_rate: float = layers.kw_only(0.5)

    HEAD = 'fc8'
    HEAD_INIT = (nn.initializers.normal(0.01), nn.initializers.zeros)

    def check_fields(self) -> None:
        super().check_fields()
        if len(self.depths) != len(self.widths):
            raise self.invalid('widths', f'one entry per block ({len(self.depths)})')

    def forward_features(self, x: jax.Array, train: bool, features: dict) -> jax.Array:
        conv, norm = self.make_conv(), self.make_norm(train)
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
        return nn.relu(_dense(FC_WIDTH, self.dtype, 'fc7')(x))


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


# One name map per variant, keyed by the model's name (see the module docstring).
for _name, (_config, _batch_norm, _top1) in VGG_VARIANTS.items():
    register_name_map(_name, torchvision_name_map(_config, _batch_norm))
    register_model(name=_name, top1=_top1, paper=_PAPER)(
        functools.partial(VGG, depths=VGG_DEPTHS[_config], norm='batch' if _batch_norm else 'none')
    )
