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

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers
from models.convert import NameRule, register_name_map
from models.registry import register_model

_PAPER = 'Huang et al., "Densely Connected Convolutional Networks", CVPR 2017'

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

# torchvision initialises DenseNet convs with kaiming_normal_ defaults (fan_in, relu gain).
_kaiming_normal_fan_in = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')

# name -> (growth k, layers per dense block, stem width). Huang et al. 2017, Table 1
# (121/169/201/264) and the authors' DenseNet-161; Table 2 for BC-100 (k=12).
DENSENET_VARIANTS: dict[str, tuple[int, tuple[int, ...], int]] = {
    'densenet121': (32, (6, 12, 24, 16), 64),
    'densenet169': (32, (6, 12, 32, 32), 64),
    'densenet201': (32, (6, 12, 48, 32), 64),
    'densenet161': (48, (6, 12, 36, 24), 96),
    'densenet264': (32, (6, 12, 64, 48), 64),
    'densenet_bc_100_12': (12, (16, 16, 16), 24),
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


class DenseNet(nn.Module):
    """DenseNet-BC (torchvision layout for the ImageNet stem).

    Attributes:
        growth_rate: k.
        block_config: dense layers per block.
        stem_width: maps of the stem conv (2k in the paper).
        bn_size: bottleneck multiplier (4 in the paper).
        compression: transition width factor theta (0.5 for DenseNet-BC).
        num_classes: classifier size; 0 returns pooled features instead of logits.
        norm: ``'batch'`` or ``'group'``.
        gn_groups: groups when ``norm='group'``.
        weight_std: weight-standardised convs (BiT-style twin with ``norm='group'``).
        dtype: compute dtype; parameters and logits are float32.
        drop_rate: dropout before the classifier (timm's ``drop_rate``).
        block_drop_rate: dropout on every dense layer's new maps (torchvision's
            ``drop_rate``).
        stem: ``'imagenet'`` (7x7/2 conv, norm, ReLU, 3x3/2 max-pool) or ``'cifar'``
            (one 3x3/1 conv; the first dense layer's norm follows it).
        padding: padding mode of convs and the stem pool (see :func:`layers.get_padding`).
    """

    growth_rate: int = 32
    block_config: tuple[int, ...] = (6, 12, 24, 16)
    stem_width: int = 64
    bn_size: int = 4
    compression: float = 0.5
    num_classes: int = 1000
    norm: str = 'batch'
    gn_groups: int = 32
    weight_std: bool = False
    dtype: layers.Dtype = jnp.float32
    drop_rate: float = 0.0
    block_drop_rate: float = 0.0
    stem: str = 'imagenet'
    padding: str = 'symmetric'

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
        """Applies the network to NHWC images.

        Args:
            x: images, (B, H, W, C).
            train: batch statistics and dropout on.
            return_features: also return ``{'stem', 'stage1'.., 'pre_logits'}``; stage i
                is the output of dense block i (before its transition).

        Returns:
            float32 logits (B, num_classes) (pooled features when ``num_classes == 0``),
            and the feature dict when ``return_features``.
        """
        if self.norm not in ('batch', 'group'):
            raise ValueError(f"DenseNet norm must be 'batch' or 'group', got {self.norm!r}")
        if self.stem not in ('imagenet', 'cifar'):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {self.stem!r}")
        conv = layers.conv_factory(
            self.weight_std, self.dtype, self.padding, kernel_init=_kaiming_normal_fan_in
        )
        norm = layers.norm_factory(self.norm, train, self.dtype, groups=self.gn_groups)
        features = {}

        x = x.astype(self.dtype)
        if self.stem == 'imagenet':
            x = conv(self.stem_width, 7, 2, name='conv0')(x)
            x = nn.relu(norm(name='norm0')(x))
            x = nn.max_pool(x, (3, 3), (2, 2), padding=layers.get_padding(self.padding, 3, 2))
        else:
            x = conv(self.stem_width, 3, 1, name='conv0')(x)
        features['stem'] = x

        last = len(self.block_config) - 1
        for i, num_layers in enumerate(self.block_config):
            x = DenseBlock(
                num_layers,
                self.growth_rate,
                self.bn_size,
                conv,
                norm,
                self.block_drop_rate,
                name=f'denseblock{i + 1}',
            )(x, train)
            features[f'stage{i + 1}'] = x
            if i != last:
                width = int(x.shape[-1] * self.compression)
                x = Transition(width, conv, norm, name=f'transition{i + 1}')(x)

        x = nn.relu(norm(name='norm5')(x))
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        features['pre_logits'] = x
        if self.num_classes:
            x = layers.classifier_head(
                x, self.num_classes, drop_rate=self.drop_rate, train=train, dtype=self.dtype,
                bias_init=nn.initializers.zeros, name='classifier',
            )
        x = x.astype(jnp.float32)
        return (x, features) if return_features else x


# torchvision state-dict names <-> ours (norm names kept for GroupNorm twins too).
register_name_map(
    'densenet',
    (
        NameRule('features.conv0', 'conv0', 'conv'),
        NameRule('features.norm0', 'norm0', 'norm'),
        NameRule(
            'features.denseblock{b}.denselayer{l}.conv{i}', 'denseblock{b}/denselayer{l}/conv{i}', 'conv'
        ),
        NameRule(
            'features.denseblock{b}.denselayer{l}.norm{i}', 'denseblock{b}/denselayer{l}/norm{i}', 'norm'
        ),
        NameRule('features.transition{t}.conv', 'transition{t}/conv', 'conv'),
        NameRule('features.transition{t}.norm', 'transition{t}/norm', 'norm'),
        NameRule('features.norm5', 'norm5', 'norm'),
        NameRule('classifier', 'classifier', 'linear'),
    ),
)


def _densenet(name: str, **kwargs) -> DenseNet:
    growth, blocks, stem_width = DENSENET_VARIANTS[name]
    return DenseNet(
        **{'growth_rate': growth, 'block_config': blocks, 'stem_width': stem_width, **kwargs}
    )


# top1: torchvision IMAGENET1K_V1 weights (224 px, resize 256, centre crop, bilinear).
@register_model(top1=74.434, paper=_PAPER)
def densenet121(**kwargs) -> DenseNet:
    """DenseNet-121 (Table 1), 7,978,856 parameters."""
    return _densenet('densenet121', **kwargs)


@register_model(top1=75.600, paper=_PAPER)
def densenet169(**kwargs) -> DenseNet:
    """DenseNet-169 (Table 1), 14,149,480 parameters."""
    return _densenet('densenet169', **kwargs)


@register_model(top1=76.896, paper=_PAPER)
def densenet201(**kwargs) -> DenseNet:
    """DenseNet-201 (Table 1), 20,013,928 parameters."""
    return _densenet('densenet201', **kwargs)


@register_model(top1=77.138, paper=_PAPER)
def densenet161(**kwargs) -> DenseNet:
    """DenseNet-161 (k=48, authors' release), 28,681,000 parameters."""
    return _densenet('densenet161', **kwargs)


# No released weights and no reference implementation: top1 stays None.
@register_model(paper=_PAPER)
def densenet264(**kwargs) -> DenseNet:
    """DenseNet-264 as in the paper's Table 1 (plain 7x7 stem), 33,337,704 parameters."""
    return _densenet('densenet264', **kwargs)


@register_model(
    input_size=(32, 32, 3),
    mean=CIFAR10_MEAN,
    std=CIFAR10_STD,
    crop_pct=1.0,
    num_classes=10,
    paper=_PAPER,
)
def densenet_bc_100_12(**kwargs) -> DenseNet:
    """DenseNet-BC (L=100, k=12) for CIFAR (Table 2: 0.8M params), 769,162 at 10 classes."""
    return _densenet('densenet_bc_100_12', **{'stem': 'cifar', **kwargs})
