"""DenseNet-121/169/201/161/264 (ImageNet) and DenseNet-BC-100 (k=12, CIFAR).

Huang, Liu, van der Maaten, Weinberger, "Densely Connected Convolutional Networks", CVPR
2017. Every variant is DenseNet-BC: each layer is BN-ReLU-Conv(1x1, ``bn_size * k``)-BN-
ReLU-Conv(3x3, k) and appends its k maps to everything before it (Sec. 3, "Bottleneck
layers"); transitions are BN-ReLU-Conv(1x1)-AvgPool(2x2) halving the width (compression
0.5). The network is pre-activation, so a norm precedes every conv and ``norm5`` + ReLU
close the last block.

ImageNet variants are Table 1 (growth k=32, stem 2k, blocks (6,12,24,16) / (6,12,32,32) /
(6,12,48,32) / (6,12,64,48)) plus DenseNet-161 (k=48, stem 96, blocks (6,12,36,24)) from
the authors' release. 121/169/201/161 are torchvision's layout exactly (7,978,856 /
14,149,480 / 20,013,928 / 28,681,000 parameters), so torchvision (and timm ``tv_in1k``)
weights load with ``models.convert_state_dict``.

``densenet264`` is the paper's Table 1 column (k=32, 64-channel 7x7 stem): 33,337,704
parameters by our count; neither torchvision nor timm has it (timm's ``densenet264d`` has a
deep 3-conv stem and growth 48: a different network), so there is no parity reference.

``densenet_bc_100_12`` is the CIFAR model of Table 2 (L=100, k=12: three blocks of 16
bottleneck layers, a 3x3 stem conv with 2k maps, 32 px input): 769,162 parameters at 10
classes. Table 2 gives "0.8M", rounded to 0.1M: our count rounds to it but is 3.9 % below
800,000 (C10+ error 4.51 %).

Dropout follows the two references: ``drop_rate`` is timm's classifier dropout;
``block_drop_rate`` is what torchvision's ``DenseNet(drop_rate=...)`` does, dropout on the
k new maps of every dense layer (the paper's Sec. 4.2 CIFAR setting without augmentation,
0.2). DenseNet has no residual branches, hence no ``drop_path_rate``.

Initialisation follows torchvision: convs kaiming-normal (fan_in, relu), norm scale 1 and
bias 0, classifier weight like ``torch.nn.Linear`` and bias 0.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers, registry
from models.convert import NameRule, flat, register_name_map, within

register_model = functools.partial(
    registry.register_model, family='densenet', classifier='classifier', first_conv='conv0'
)

_PAPER = 'Huang et al., "Densely Connected Convolutional Networks", CVPR 2017'

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

# torchvision initialises DenseNet convs with kaiming_normal_ defaults (fan_in, relu gain).
_kaiming_normal_fan_in = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')

# name -> (growth k, layers per dense block, stem width, stem). Huang et al. 2017, Table 1
# (121/169/201/264) and the authors' DenseNet-161; Table 2 for BC-100 (k=12).
DENSENET_VARIANTS: dict[str, tuple[int, tuple[int, ...], int, str]] = {
    'densenet121': (32, (6, 12, 24, 16), 64, 'imagenet'),
    'densenet169': (32, (6, 12, 32, 32), 64, 'imagenet'),
    'densenet201': (32, (6, 12, 48, 32), 64, 'imagenet'),
    'densenet161': (48, (6, 12, 36, 24), 96, 'imagenet'),
    'densenet264': (32, (6, 12, 64, 48), 64, 'imagenet'),
    'densenet_bc_100_12': (12, (16, 16, 16), 24, 'cifar'),
}


class DenseLayer(nn.Module):
    """BN-ReLU-Conv(1x1) - BN-ReLU-Conv(3x3): k new feature maps (pre-activation).

    Attributes:
        growth_rate: k, maps this layer adds.
        bn_size: bottleneck width multiplier (``bn_size * k`` maps after the 1x1 conv).
        conv: conv constructor from :func:`layers.conv_factory`.
        norm: norm constructor from :func:`layers.norm_factory`.
        drop_rate: dropout on the new maps (torchvision's ``drop_rate``).
    """

    growth_rate: int
    bn_size: int
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]
    drop_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        y = nn.relu(self.norm(name='norm1')(x))
        y = self.conv(self.bn_size * self.growth_rate, 1, name='conv1')(y)
        y = nn.relu(self.norm(name='norm2')(y))
        y = self.conv(self.growth_rate, 3, name='conv2')(y)
        return nn.Dropout(self.drop_rate, deterministic=not train)(y)


class DenseBlock(nn.Module):
    """``num_layers`` dense layers, each fed the concatenation of all earlier maps.

    Attributes: as :class:`DenseLayer`, plus ``num_layers``.
    """

    num_layers: int
    growth_rate: int
    bn_size: int
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]
    drop_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for i in range(self.num_layers):
            new = DenseLayer(
                self.growth_rate,
                self.bn_size,
                self.conv,
                self.norm,
                self.drop_rate,
                name=f'denselayer{i + 1}',
            )(x, train)
            # One growing concatenation is the same as torchvision's list of maps
            # concatenated before every layer, without re-concatenating.
            x = jnp.concatenate([x, new], axis=-1)
        return x


class Transition(nn.Module):
    """BN-ReLU-Conv(1x1) to ``features`` maps, then 2x2 average pooling (stride 2).

    Attributes:
        features: output width (``compression * input width``).
        conv: conv constructor.
        norm: norm constructor.
    """

    features: int
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(self.norm(name='norm')(x))
        x = self.conv(self.features, 1, name='conv')(x)
        # torch AvgPool2d(2, 2): floor mode, so an odd row/column is dropped.
        return nn.avg_pool(x, (2, 2), (2, 2), padding='VALID')


class DenseNet(layers.ImageClassifier):
    """DenseNet-BC (torchvision layout for the ImageNet stem).

    Features: ``stem``, ``stage1``.. (the output of each dense block, before its
    transition), ``pre_logits``. Shared fields as :class:`layers.ImageClassifier`
    (``drop_rate`` is timm's classifier dropout; no residual branches, so no drop path).

    Attributes:
        growth_rate: k.
        block_config: dense layers per block.
        stem_width: maps of the stem conv (2k in the paper).
        bn_size: bottleneck multiplier (4 in the paper).
        compression: transition width factor theta (0.5 for DenseNet-BC).
        block_drop_rate: dropout on every dense layer's new maps (torchvision's
            ``drop_rate``).
        stem: ``'imagenet'`` (7x7/2 conv, norm, ReLU, 3x3/2 max-pool) or ``'cifar'``
            (one 3x3/1 conv; the first dense layer's norm follows it).
    """

    growth_rate: int = 32
    block_config: tuple[int, ...] = (6, 12, 24, 16)
    stem_width: int = 64
    bn_size: int = 4
    compression: float = 0.5
    block_drop_rate: float = 0.0
    stem: str = 'imagenet'

    HEAD = 'classifier'
    HEAD_INIT = (None, nn.initializers.zeros)  # torch.nn.Linear's weight init, zero bias
    CHOICES = {'stem': ('imagenet', 'cifar')}

    def forward_features(self, x: jax.Array, train: bool, features: dict) -> jax.Array:
        conv = self.make_conv(kernel_init=_kaiming_normal_fan_in)
        norm = self.make_norm(train)
        if self.stem == 'imagenet':
            x = conv(self.stem_width, 7, 2, name='conv0')(x)
            x = nn.relu(norm(name='norm0')(x))
            x = nn.max_pool(x, (3, 3), (2, 2), padding=layers.get_padding(self.padding, 3, 2))
        else:
            x = conv(self.stem_width, 3, 1, name='conv0')(x)
        features['stem'] = x

        last = len(self.block_config) - 1
        for i, num_layers in enumerate(self.block_config):
            x = self.run_block(DenseBlock(
                num_layers,
                self.growth_rate,
                self.bn_size,
                conv,
                norm,
                self.block_drop_rate,
                name=f'denseblock{i + 1}',
            ), x, train)
            features[f'stage{i + 1}'] = x
            if i != last:
                width = int(x.shape[-1] * self.compression)
                x = Transition(width, conv, norm, name=f'transition{i + 1}')(x)
        return nn.relu(norm(name='norm5')(x))


# torchvision state-dict names <-> ours (norm names kept for GroupNorm twins too).
register_name_map(
    'densenet',
    (
        NameRule('features.conv0', 'conv0', 'conv'),
        NameRule('features.norm0', 'norm0', 'norm'),
        *within('features.denseblock{b}.denselayer{l}', 'denseblock{b}/denselayer{l}', 'conv', 'conv{i}'),
        *within('features.denseblock{b}.denselayer{l}', 'denseblock{b}/denselayer{l}', 'norm', 'norm{i}'),
        *within('features.transition{t}', 'transition{t}', 'conv', 'conv'),
        *within('features.transition{t}', 'transition{t}', 'norm', 'norm'),
        NameRule('features.norm5', 'norm5', 'norm'),
        *flat('linear', 'classifier'),
    ),
)


# Registered name -> ModelCfg fields (the architecture is its DENSENET_VARIANTS row);
# parameter counts in the README table. top1: torchvision IMAGENET1K_V1 weights (224 px,
# resize 256, centre crop, bilinear). DenseNet-264 (the paper's Table 1 column, plain 7x7
# stem) has no released weights and no reference implementation: top1 stays None.
# DenseNet-BC (L=100, k=12) is the CIFAR model of Table 2 ("0.8M" parameters).
DENSENET_MODELS: dict[str, dict[str, Any]] = {
    'densenet121': dict(top1=74.434),
    'densenet169': dict(top1=75.600),
    'densenet201': dict(top1=76.896),
    'densenet161': dict(top1=77.138),
    'densenet264': dict(),
    'densenet_bc_100_12': dict(input_size=(32, 32, 3), mean=CIFAR10_MEAN, std=CIFAR10_STD, crop_pct=1.0, num_classes=10),
}

for _name, _cfg in DENSENET_MODELS.items():
    _growth, _blocks, _stem_width, _stem = DENSENET_VARIANTS[_name]
    register_model(name=_name, paper=_PAPER, **_cfg)(
        functools.partial(DenseNet, growth_rate=_growth, block_config=_blocks, stem_width=_stem_width, stem=_stem)
    )
