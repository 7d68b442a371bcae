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
from typing import Any, ClassVar

import flax.linen as nn
import jax

from models import layers, registry
from models.convert import NameRule, flat, register_name_map, within

register_model = functools.partial(
    registry.register_model, family='resnet', classifier='fc', first_conv='conv1'
)

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
    """Two 3x3 convs (ResNet-18/34), the residual add and the channel attention.

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
            (named :attr:`ATTN_NAME`), or None.
        down_kernel: kernel size of the projection shortcut's conv.
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
    down_kernel: int = 1

    expansion: ClassVar[int] = 1
    ATTN_NAME: ClassVar[str] = 'se'

    def branch(self, x: jax.Array, last_scale: Callable) -> jax.Array:
        if self.groups != 1 or self.base_width != 64:
            raise ValueError('BasicBlock supports only groups=1 and base_width=64')
        y = nn.relu(self.norm(name='bn1')(self.conv(self.features, 3, self.strides, name='conv1')(x)))
        return self.norm(name='bn2', scale_init=last_scale)(self.conv(self.features, 3, name='conv2')(y))

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        y = self.branch(x, nn.initializers.zeros if self.zero_init_last else nn.initializers.ones)
        if self.attn is not None:
            y = self.attn(name=self.ATTN_NAME)(y)
        shortcut = x
        if self.strides != 1 or x.shape[-1] != y.shape[-1]:
            # Option B: a (1x1) conv + norm only where the stride or width changes.
            shortcut = self.conv(y.shape[-1], self.down_kernel, self.strides, name='downsample_conv')(x)
            shortcut = self.norm(name='downsample_bn')(shortcut)
        return nn.relu(shortcut + layers.DropPath(self.drop_path_rate)(y, train))


class Bottleneck(BasicBlock):
    """1x1 reduce, 3x3 (strided, v1.5), 1x1 expand by 4 (ResNet-50/101/152).

    The inner width is ``floor(features * base_width / 64) * groups`` (torchvision's rule):
    ``features`` for plain ResNets, ``2 * features`` for Wide ResNet-50-2 (base width 128)
    and ResNeXt-50 32x4d (32 groups of 4 * features / 64), whose 3x3 conv is grouped.
    Attributes as :class:`BasicBlock`; the output has ``4 * features`` channels; ``groups``
    is the cardinality of the 3x3 conv and ``base_width`` the channels per group at 64 planes.
    """

    expansion: ClassVar[int] = 4

    def branch(self, x: jax.Array, last_scale: Callable) -> jax.Array:
        width = int(self.features * self.base_width / 64) * self.groups
        y = nn.relu(self.norm(name='bn1')(self.conv(width, 1, name='conv1')(x)))
        y = self.conv(width, 3, self.strides, feature_group_count=self.groups, name='conv2')(y)
        y = nn.relu(self.norm(name='bn2')(y))
        y = self.conv(self.features * self.expansion, 1, name='conv3')(y)
        return self.norm(name='bn3', scale_init=last_scale)(y)


_BLOCKS = {'basic': BasicBlock, 'bottleneck': Bottleneck}

# attn_layer -> constructor(dtype) of the branch attention. 'se': timm's SEModule in its
# ResNets (r = 16, reduced width rounded to a multiple of 8; Hu et al. 2018, Sec. 6.1).
ATTN_LAYERS: dict[str, Callable[..., Callable[..., nn.Module]]] = {
    'se': lambda dtype: functools.partial(
        layers.SqueezeExcite, rd_ratio=1.0 / 16, rd_divisor=8, dtype=dtype
    ),
}


class ResNet(layers.ResidualClassifier):
    """ResNet v1.5 (torchvision layout).

    Features: ``stem`` (after the max-pool), ``stage1``..``stage4``, ``pre_logits``. The
    shared fields (``num_classes``, ``norm``, ..., ``drop_path_rate``) are
    :class:`layers.ResidualClassifier`'s; ``padding`` covers the convs and the stem pool.

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
        zero_init_last: zero-init the last norm scale of every residual branch.
        stem: ``'imagenet'`` (7x7/2 conv + 3x3/2 max-pool) or ``'cifar'`` (3x3/1 conv, no
            pool; for 32 px inputs, as in He et al. 2016 Sec. 4.2).
    """

    stage_sizes: tuple[int, ...]
    block: str = 'bottleneck'
    widths: tuple[int, ...] = (64, 128, 256, 512)
    stem_width: int = 64
    groups: int = 1
    base_width: int = 64
    attn_layer: str | None = None
    zero_init_last: bool = False
    stem: str = 'imagenet'

    CHOICES = {'block': tuple(_BLOCKS), 'attn_layer': (None, *ATTN_LAYERS), 'stem': ('imagenet', 'cifar')}

    def check_fields(self) -> None:
        super().check_fields()
        if len(self.widths) != len(self.stage_sizes):
            raise self.invalid('widths', f'one entry per stage ({len(self.stage_sizes)})')

    def forward_features(self, x: jax.Array, train: bool, features: dict) -> jax.Array:
        conv, norm = self.make_conv(), self.make_norm(train)
        attn = ATTN_LAYERS[self.attn_layer](self.dtype) if self.attn_layer else None
        imagenet = self.stem == 'imagenet'
        x = conv(self.stem_width, 7 if imagenet else 3, 2 if imagenet else 1, name='conv1')(x)
        x = nn.relu(norm(name='bn1')(x))
        if imagenet:
            x = nn.max_pool(x, (3, 3), (2, 2), padding=layers.get_padding(self.padding, 3, 2))
        features['stem'] = x

        block = functools.partial(
            _BLOCKS[self.block], conv=conv, norm=norm, zero_init_last=self.zero_init_last,
            groups=self.groups, base_width=self.base_width, attn=attn,
        )
        return self.residual_stages(
            x, train, features, self.stage_sizes,
            lambda s, b, rate: block(
                self.widths[s], 2 if s > 0 and b == 0 else 1, drop_path_rate=rate, name=f'layer{s + 1}_{b}'
            ),
        )


# torchvision (and timm ResNet) state-dict names <-> ours. Norm layers keep torchvision's
# 'bn' names for GroupNorm too, so GN variants map the same way. timm's SE ResNets add
# 'layerS.B.se.fc1/fc2' (biased 1x1 convs).
# The rows of a block (also the legacy SENet's, models/senet.py).
BLOCK_RULES: tuple[NameRule, ...] = (
    *within('layer{s}.{b}', 'layer{s}_{b}', 'conv', 'conv{i}'),
    *within('layer{s}.{b}', 'layer{s}_{b}', 'norm', 'bn{i}'),
    NameRule('layer{s}.{b}.downsample.0', 'layer{s}_{b}/downsample_conv', 'conv'),
    NameRule('layer{s}.{b}.downsample.1', 'layer{s}_{b}/downsample_bn', 'norm'),
)
register_name_map(
    'resnet',
    (
        *flat('conv', 'conv1'),
        *flat('norm', 'bn1'),
        *BLOCK_RULES,
        NameRule('layer{s}.{b}.se.fc{i}', 'layer{s}_{b}/se/fc{i}', 'conv'),
        *flat('linear', 'fc'),
    ),
)


def _depth(depth: int, **fields) -> dict[str, Any]:
    block, stage_sizes = RESNET_DEPTHS[depth]
    return {'stage_sizes': stage_sizes, 'block': block, **fields}


_SE = dict(interpolation='bicubic', paper=_PAPER_SE)

# Registered name -> (ResNet fields, ModelCfg fields); parameter counts in the README table.
# ResNet, Wide ResNet and ResNeXt are torchvision's models, top1 of its IMAGENET1K_V1 weights
# (224 px, resize 256 bilinear; ResNeXt-101 64x4d has only V1 weights, evaluated at resize
# 232). SE variants are timm's resnet.py models with timm's default pretrained cfg (224 px,
# bicubic; crop 0.95 for seresnet50.a1_in1k, 0.875 otherwise); timm ships no accuracy with
# its cfgs, so top1 is the paper's single 224-crop figure (100 - top-1 error of Hu et al.
# 2018, Table 2).
RESNET_MODELS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    'resnet18': (_depth(18), dict(top1=69.758, paper=_PAPER)),
    'resnet34': (_depth(34), dict(top1=73.314, paper=_PAPER)),
    'resnet50': (_depth(50), dict(top1=76.130, paper=_PAPER)),
    'resnet101': (_depth(101), dict(top1=77.374, paper=_PAPER)),
    'resnet152': (_depth(152), dict(top1=78.312, paper=_PAPER)),
    # One basic block per stage, widths 16-128, CIFAR stem: a seconds-to-compile test model.
    'resnet_tiny': (
        dict(stage_sizes=(1, 1, 1, 1), block='basic', widths=(16, 32, 64, 128), stem_width=16, stem='cifar'),
        dict(input_size=(32, 32, 3), num_classes=10, crop_pct=1.0, paper=_PAPER),
    ),
    'wide_resnet50_2': (_depth(50, base_width=128), dict(top1=78.468, paper=_PAPER_WIDE)),
    'wide_resnet101_2': (_depth(101, base_width=128), dict(top1=78.848, paper=_PAPER_WIDE)),
    'resnext50_32x4d': (_depth(50, groups=32, base_width=4), dict(top1=77.618, paper=_PAPER_RESNEXT)),
    'resnext101_32x8d': (_depth(101, groups=32, base_width=8), dict(top1=79.312, paper=_PAPER_RESNEXT)),
    'resnext101_64x4d': (
        _depth(101, groups=64, base_width=4), dict(top1=83.246, crop_pct=224 / 232, paper=_PAPER_RESNEXT)
    ),
    'seresnet50': (_depth(50, attn_layer='se'), dict(top1=76.71, crop_pct=0.95, **_SE)),
    'seresnet101': (_depth(101, attn_layer='se'), dict(top1=77.62, **_SE)),
    'seresnet152': (_depth(152, attn_layer='se'), dict(top1=78.43, **_SE)),
    'seresnext50_32x4d': (_depth(50, groups=32, base_width=4, attn_layer='se'), dict(top1=78.90, **_SE)),
}

for _name, (_fields, _cfg) in RESNET_MODELS.items():
    register_model(name=_name, **_cfg)(functools.partial(ResNet, **_fields))
