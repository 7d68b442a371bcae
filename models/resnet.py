"""ResNet-18/34/50/101/152 as in torchvision ("ResNet v1.5"), and its wide, ResNeXt and SE variants.

He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016. Depths and
widths are the paper's Table 1. As in torchvision (and unlike the paper's v1), the
bottleneck block strides on its 3x3 conv instead of the first 1x1 conv, and projection
shortcuts (1x1 conv + norm, the paper's option B) are used only where the shape changes.
Parameter counts match torchvision exactly at 1000 classes (11,689,512 / 21,797,672 /
25,557,032 / 44,549,160 / 60,192,808), so torchvision weights load with
``models.convert_state_dict``.

Initialisation follows torchvision: convs kaiming-normal (fan_out, relu), norm scale 1 and
bias 0 (scale 0 on the last norm of each branch with ``zero_init_last``, Goyal et al. 2017),
and the classifier like ``torch.nn.Linear`` (uniform +-1/sqrt(fan_in) for weight and bias).

Variants of the same network, selected by module fields rather than separate code:

* Wide ResNet-50-2 / 101-2 (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016,
  in torchvision's ImageNet form): bottleneck width doubled (``base_width=128``).
* ResNeXt (Xie et al., "Aggregated Residual Transformations for Deep Neural Networks",
  CVPR 2017, Table 1): the 3x3 conv split into ``groups`` (cardinality) groups of
  ``base_width`` channels, e.g. 32x4d.
* SE-ResNet / SE-ResNeXt (Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018,
  Table 2 / Fig. 3): ``attn_layer='se'`` adds a squeeze-excitation gate (r = 16) after
  the last norm of every residual branch, as timm's ``seresnet*`` (names ``layerN.M.se.fc1``).
  SENet-154 with its own stem and blocks is the legacy family in ``models/senet.py``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers
from models.convert import NameRule, register_name_map
from models.registry import register_model

_PAPER = 'He et al., "Deep Residual Learning for Image Recognition", CVPR 2016'
_PAPER_WIDE = 'Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016'
_PAPER_RESNEXT = 'Xie et al., "Aggregated Residual Transformations for Deep Neural Networks", CVPR 2017'
_PAPER_SE = 'Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018'

# depth -> (block, blocks per stage); He et al. 2016, Table 1.
RESNET_DEPTHS: dict[int, tuple[str, tuple[int, ...]]] = {
    18: ('basic', (2, 2, 2, 2)),
    34: ('basic', (3, 4, 6, 3)),
    50: ('bottleneck', (3, 4, 6, 3)),
    101: ('bottleneck', (3, 4, 23, 3)),
    152: ('bottleneck', (3, 8, 36, 3)),
}


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34).

    Attributes:
        features: width of the block (and its output; expansion 1).
        strides: stride of the first conv.
        conv: conv constructor from :func:`layers.conv_factory`.
        norm: norm constructor from :func:`layers.norm_factory`.
        drop_path_rate: stochastic-depth rate of the residual branch.
        zero_init_last: start the branch's last norm scale at 0 (block is the identity).
        groups: must be 1 (grouped basic blocks are not defined; torchvision raises too).
        base_width: must be 64.
        attn: constructor of a channel-attention module applied to the branch output
            (named ``se``), or None.
    """

    features: int
    strides: int
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]
    drop_path_rate: float = 0.0
    zero_init_last: bool = False
    groups: int = 1
    base_width: int = 64
    attn: Callable[..., nn.Module] | None = None

    expansion: ClassVar[int] = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.groups != 1 or self.base_width != 64:
            raise ValueError('BasicBlock supports only groups=1 and base_width=64')
        last_scale = nn.initializers.zeros if self.zero_init_last else nn.initializers.ones
        y = self.conv(self.features, 3, self.strides, name='conv1')(x)
        y = nn.relu(self.norm(name='bn1')(y))
        y = self.conv(self.features, 3, name='conv2')(y)
        y = self.norm(name='bn2', scale_init=last_scale)(y)
        if self.attn is not None:
            y = self.attn(name='se')(y)
        return nn.relu(_shortcut(self, x, y.shape[-1]) + layers.DropPath(self.drop_path_rate)(y, train))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, v1.5), 1x1 expand by 4 (ResNet-50/101/152).

    The inner width is ``floor(features * base_width / 64) * groups`` (torchvision's rule):
    ``features`` for plain ResNets, ``2 * features`` for Wide ResNet-50-2 (base width 128)
    and ResNeXt-50 32x4d (32 groups of 4 * features / 64), whose 3x3 conv is grouped.

    Attributes: as :class:`BasicBlock`; ``features`` is the stage's planes, the output
    has ``4 * features`` channels; ``groups`` is the cardinality of the 3x3 conv and
    ``base_width`` the channels per group at 64 planes.
    """

    features: int
    strides: int
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]
    drop_path_rate: float = 0.0
    zero_init_last: bool = False
    groups: int = 1
    base_width: int = 64
    attn: Callable[..., nn.Module] | None = None

    expansion: ClassVar[int] = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        last_scale = nn.initializers.zeros if self.zero_init_last else nn.initializers.ones
        width = int(self.features * self.base_width / 64) * self.groups
        y = self.conv(width, 1, name='conv1')(x)
        y = nn.relu(self.norm(name='bn1')(y))
        y = self.conv(width, 3, self.strides, feature_group_count=self.groups, name='conv2')(y)
        y = nn.relu(self.norm(name='bn2')(y))
        y = self.conv(self.features * self.expansion, 1, name='conv3')(y)
        y = self.norm(name='bn3', scale_init=last_scale)(y)
        if self.attn is not None:
            y = self.attn(name='se')(y)
        return nn.relu(_shortcut(self, x, y.shape[-1]) + layers.DropPath(self.drop_path_rate)(y, train))


def _shortcut(block: BasicBlock | Bottleneck, x: jax.Array, out_features: int) -> jax.Array:
    """Identity, or 1x1 conv + norm where the stride or width changes (option B)."""
    if block.strides == 1 and x.shape[-1] == out_features:
        return x
    x = block.conv(out_features, 1, block.strides, name='downsample_conv')(x)
    return block.norm(name='downsample_bn')(x)


_BLOCKS = {'basic': BasicBlock, 'bottleneck': Bottleneck}

# attn_layer -> constructor(dtype) of the branch attention. 'se': timm's SEModule in its
# ResNets (r = 16, reduced width rounded to a multiple of 8; Hu et al. 2018, Sec. 6.1).
ATTN_LAYERS: dict[str, Callable[..., Callable[..., nn.Module]]] = {
    'se': lambda dtype: functools.partial(
        layers.SqueezeExcite, rd_ratio=1.0 / 16, rd_divisor=8, dtype=dtype
    ),
}


class ResNet(nn.Module):
    """ResNet v1.5 (torchvision layout).

    Attributes:
        stage_sizes: blocks per stage.
        block: ``'basic'`` or ``'bottleneck'``.
        widths: planes per stage (bottleneck outputs are 4x this).
        stem_width: channels of the stem conv.
        groups: cardinality of the bottleneck 3x3 convs (ResNeXt; 1 for ResNet).
        base_width: bottleneck channels per group at 64 planes (64 ResNet, 128 Wide
            ResNet-50-2, 4 for ResNeXt 32x4d).
        attn_layer: channel attention after the last norm of every branch: None or
            ``'se'`` (squeeze-excitation, see :data:`ATTN_LAYERS`).
        num_classes: classifier size; 0 returns the pooled features instead of logits.
        norm: ``'batch'`` or ``'group'``.
        gn_groups: groups when ``norm='group'``.
        weight_std: weight-standardised convs (BiT).
        dtype: compute dtype; parameters and logits are float32.
        drop_rate: dropout rate before the classifier.
        drop_path_rate: stochastic depth; block ``i`` of ``n`` uses
            ``drop_path_rate * i / (n - 1)`` (linear rule of Huang et al. 2016).
        zero_init_last: zero-init the last norm scale of every residual branch.
        stem: ``'imagenet'`` (7x7/2 conv + 3x3/2 max-pool) or ``'cifar'`` (3x3/1 conv, no
            pool; for 32 px inputs, as in He et al. 2016 Sec. 4.2).
        padding: padding mode of convs and the stem pool (see :func:`layers.get_padding`).
    """

    stage_sizes: tuple[int, ...]
    block: str = 'bottleneck'
    widths: tuple[int, ...] = (64, 128, 256, 512)
    stem_width: int = 64
    groups: int = 1
    base_width: int = 64
    attn_layer: str | None = None
    num_classes: int = 1000
    norm: str = 'batch'
    gn_groups: int = 32
    weight_std: bool = False
    dtype: layers.Dtype = jnp.float32
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    zero_init_last: bool = False
    stem: str = 'imagenet'
    padding: str = 'symmetric'

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
        """Applies the network to NHWC images.

        Args:
            x: images, (B, H, W, C).
            train: batch statistics, dropout and drop-path on.
            return_features: also return ``{'stem', 'stage1'..'stage4', 'pre_logits'}``.

        Returns:
            float32 logits (B, num_classes) (pooled features when ``num_classes == 0``),
            and the feature dict when ``return_features``.
        """
        if self.norm not in ('batch', 'group'):
            raise ValueError(f"ResNet norm must be 'batch' or 'group', got {self.norm!r}")
        if self.stem not in ('imagenet', 'cifar'):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {self.stem!r}")
        if len(self.widths) != len(self.stage_sizes):
            raise ValueError('widths and stage_sizes need one entry per stage')
        conv = layers.conv_factory(self.weight_std, self.dtype, self.padding)
        norm = layers.norm_factory(self.norm, train, self.dtype, groups=self.gn_groups)
        block_cls = _BLOCKS[self.block]
        if self.attn_layer is not None and self.attn_layer not in ATTN_LAYERS:
            raise ValueError(f'attn_layer must be None or one of {sorted(ATTN_LAYERS)}, got {self.attn_layer!r}')
        attn = ATTN_LAYERS[self.attn_layer](self.dtype) if self.attn_layer else None
        features = {}

        x = x.astype(self.dtype)
        if self.stem == 'imagenet':
            x = conv(self.stem_width, 7, 2, name='conv1')(x)
        else:
            x = conv(self.stem_width, 3, 1, name='conv1')(x)
        x = nn.relu(norm(name='bn1')(x))
        if self.stem == 'imagenet':
            x = nn.max_pool(x, (3, 3), (2, 2), padding=layers.get_padding(self.padding, 3, 2))
        features['stem'] = x

        n_blocks = sum(self.stage_sizes)
        index = 0
        for stage, (size, width) in enumerate(zip(self.stage_sizes, self.widths, strict=True)):
            for b in range(size):
                x = block_cls(
                    features=width,
                    strides=2 if stage > 0 and b == 0 else 1,
                    conv=conv,
                    norm=norm,
                    drop_path_rate=self.drop_path_rate * index / max(n_blocks - 1, 1),
                    zero_init_last=self.zero_init_last,
                    groups=self.groups,
                    base_width=self.base_width,
                    attn=attn,
                    name=f'layer{stage + 1}_{b}',
                )(x, train)
                index += 1
            features[f'stage{stage + 1}'] = x

        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        features['pre_logits'] = x
        if self.num_classes:
            x = layers.classifier_head(
                x, self.num_classes, drop_rate=self.drop_rate, train=train, dtype=self.dtype,
                name='fc',
            )
        return (x, features) if return_features else x


# torchvision (and timm ResNet) state-dict names <-> ours. Norm layers keep torchvision's
# 'bn' names for GroupNorm too, so GN variants map the same way. timm's SE ResNets add
# 'layerS.B.se.fc1/fc2' (biased 1x1 convs).
register_name_map(
    'resnet',
    (
        NameRule('conv1', 'conv1', 'conv'),
        NameRule('bn1', 'bn1', 'norm'),
        NameRule('layer{s}.{b}.conv{i}', 'layer{s}_{b}/conv{i}', 'conv'),
        NameRule('layer{s}.{b}.bn{i}', 'layer{s}_{b}/bn{i}', 'norm'),
        NameRule('layer{s}.{b}.downsample.0', 'layer{s}_{b}/downsample_conv', 'conv'),
        NameRule('layer{s}.{b}.downsample.1', 'layer{s}_{b}/downsample_bn', 'norm'),
        NameRule('layer{s}.{b}.se.fc{i}', 'layer{s}_{b}/se/fc{i}', 'conv'),
        NameRule('fc', 'fc', 'linear'),
    ),
)


def _resnet(depth: int, **kwargs) -> ResNet:
    block, stage_sizes = RESNET_DEPTHS[depth]
    return ResNet(**{'stage_sizes': stage_sizes, 'block': block, **kwargs})


# top1: torchvision IMAGENET1K_V1 weights (224 px, resize 256, centre crop).
@register_model(top1=69.758, paper=_PAPER)
def resnet18(**kwargs) -> ResNet:
    """ResNet-18, 11,689,512 parameters."""
    return _resnet(18, **kwargs)


@register_model(top1=73.314, paper=_PAPER)
def resnet34(**kwargs) -> ResNet:
    """ResNet-34, 21,797,672 parameters."""
    return _resnet(34, **kwargs)


@register_model(top1=76.130, paper=_PAPER)
def resnet50(**kwargs) -> ResNet:
    """ResNet-50, 25,557,032 parameters."""
    return _resnet(50, **kwargs)


@register_model(top1=77.374, paper=_PAPER)
def resnet101(**kwargs) -> ResNet:
    """ResNet-101, 44,549,160 parameters."""
    return _resnet(101, **kwargs)


@register_model(top1=78.312, paper=_PAPER)
def resnet152(**kwargs) -> ResNet:
    """ResNet-152, 60,192,808 parameters."""
    return _resnet(152, **kwargs)


@register_model(input_size=(32, 32, 3), num_classes=10, crop_pct=1.0, paper=_PAPER)
def resnet_tiny(**kwargs) -> ResNet:
    """One basic block per stage, widths 16-128, CIFAR stem: a seconds-to-compile test model."""
    return ResNet(
        **{
            'stage_sizes': (1, 1, 1, 1),
            'block': 'basic',
            'widths': (16, 32, 64, 128),
            'stem_width': 16,
            'stem': 'cifar',
            **kwargs,
        }
    )


# Wide ResNet and ResNeXt: torchvision's models; top1 of its IMAGENET1K_V1 weights (224 px,
# resize 256 bilinear; ResNeXt-101 64x4d has only V1 weights, evaluated at resize 232).
@register_model(top1=78.468, paper=_PAPER_WIDE)
def wide_resnet50_2(**kwargs) -> ResNet:
    """Wide ResNet-50-2: bottleneck widths doubled, 68,883,240 parameters."""
    return _resnet(50, **{'base_width': 128, **kwargs})


@register_model(top1=78.848, paper=_PAPER_WIDE)
def wide_resnet101_2(**kwargs) -> ResNet:
    """Wide ResNet-101-2: bottleneck widths doubled, 126,886,696 parameters."""
    return _resnet(101, **{'base_width': 128, **kwargs})


@register_model(top1=77.618, paper=_PAPER_RESNEXT)
def resnext50_32x4d(**kwargs) -> ResNet:
    """ResNeXt-50 (32x4d), Xie et al. 2017 Table 1; 25,028,904 parameters."""
    return _resnet(50, **{'groups': 32, 'base_width': 4, **kwargs})


@register_model(top1=79.312, paper=_PAPER_RESNEXT)
def resnext101_32x8d(**kwargs) -> ResNet:
    """ResNeXt-101 (32x8d), 88,791,336 parameters."""
    return _resnet(101, **{'groups': 32, 'base_width': 8, **kwargs})


@register_model(top1=83.246, crop_pct=224 / 232, paper=_PAPER_RESNEXT)
def resnext101_64x4d(**kwargs) -> ResNet:
    """ResNeXt-101 (64x4d), Xie et al. 2017 Table 5; 83,455,272 parameters."""
    return _resnet(101, **{'groups': 64, 'base_width': 4, **kwargs})


# SE variants: timm's resnet.py models. Data settings are timm's default pretrained cfg
# (224 px, bicubic; crop 0.95 for seresnet50.a1_in1k, 0.875 otherwise). timm ships no
# accuracy with its cfgs, so top1 is the paper's single 224-crop figure (100 - top-1 error
# of Hu et al. 2018, Table 2).
@register_model(top1=76.71, crop_pct=0.95, interpolation='bicubic', paper=_PAPER_SE)
def seresnet50(**kwargs) -> ResNet:
    """SE-ResNet-50, 28,088,024 parameters (timm)."""
    return _resnet(50, **{'attn_layer': 'se', **kwargs})


@register_model(top1=77.62, interpolation='bicubic', paper=_PAPER_SE)
def seresnet101(**kwargs) -> ResNet:
    """SE-ResNet-101, 49,326,872 parameters (timm)."""
    return _resnet(101, **{'attn_layer': 'se', **kwargs})


@register_model(top1=78.43, interpolation='bicubic', paper=_PAPER_SE)
def seresnet152(**kwargs) -> ResNet:
    """SE-ResNet-152, 66,821,848 parameters (timm)."""
    return _resnet(152, **{'attn_layer': 'se', **kwargs})


@register_model(top1=78.90, interpolation='bicubic', paper=_PAPER_SE)
def seresnext50_32x4d(**kwargs) -> ResNet:
    """SE-ResNeXt-50 (32x4d), 27,559,896 parameters (timm)."""
    return _resnet(50, **{'groups': 32, 'base_width': 4, 'attn_layer': 'se', **kwargs})
