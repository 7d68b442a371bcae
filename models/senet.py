"""SENet-154 in the layout of the original (Caffe) release, timm's ``legacy_senet154``.

Hu, Shen, Albanie, Sun, Wu, "Squeeze-and-Excitation Networks", CVPR 2018 / TPAMI 2019.
SENet-154 is SE-ResNeXt-152 (64x4d) with the modifications of the paper's Appendix:
a deep stem (three 3x3 convs, 64-64-128 channels) instead of the 7x7 conv, bottleneck
1x1 convs at half the output width, 3x3 stride-2 projection shortcuts (1x1 only in
stage 1, where only the width changes), and dropout 0.2 before the classifier. The
squeeze-excitation gate uses r = 16 (Sec. 6.1) with biased 1x1 convs.

Differences from :mod:`models.resnet` that are part of the reference and kept here, so
its weights (state-dict names ``layer0.conv1``, ``layerN.M.se_module.fc1``,
``last_linear``) load with ``models.convert_state_dict``:

* the stem pool is a 3x3/2 max-pool with ``ceil_mode=True`` and no padding (Caffe
  compatibility): the bottom/right edge gets a partial window instead of a padded one;
* in every block the stride sits on the grouped 3x3 conv (as in ResNet v1.5).

timm also has a ``senet154`` (the Gluon port, a ``resnet.py`` model with different
names); that one is not this module, so no ``senet154`` alias is registered here.
Parameters: 115,088,984 (timm ``legacy_senet154``, sum of ``numel()``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import ClassVar

import flax.linen as nn
import jax

from models import layers, registry
from models.convert import NameRule, register_name_map
from models.resnet import BLOCK_RULES, BasicBlock

register_model = functools.partial(
    registry.register_model, family='senet', classifier='last_linear', first_conv='layer0_conv1'
)

_PAPER = 'Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018'

# name -> (blocks per stage, cardinality, stem width); Hu et al. 2018, Appendix / Table 14.
SENET_VARIANTS: dict[str, tuple[tuple[int, ...], int, int]] = {
    'senet154': ((3, 8, 36, 3), 64, 128),
}


def _ceil_pool_padding(size: int, window: int, stride: int) -> tuple[int, int]:
    """Bottom/right padding that turns a VALID pool into torch's ``ceil_mode=True`` pool."""
    out = math.ceil((size - window) / stride) + 1
    # torch drops a last window that would start outside the input; with no left
    # padding it never does, since (out - 1) * stride <= size - window + stride - 1.
    return 0, max((out - 1) * stride + window - size, 0)


class SEBottleneck(BasicBlock):
    """SENet-154 bottleneck: 1x1 (2 * planes), grouped 3x3 (4 * planes), 1x1, SE gate
    (``attn``, named ``se_module``); the residual add and shortcut of the ResNet blocks.

    Attributes as :class:`models.resnet.BasicBlock`: ``features`` is the planes (a quarter
    of the output width), ``strides`` strides the grouped 3x3 conv and the projection
    shortcut, whose kernel is ``down_kernel`` (3, or 1 in stage 1).
    """

    expansion: ClassVar[int] = 4
    ATTN_NAME: ClassVar[str] = 'se_module'

    def branch(self, x: jax.Array, last_scale: Callable) -> jax.Array:
        out = self.features * self.expansion
        y = nn.relu(self.norm(name='bn1')(self.conv(self.features * 2, 1, name='conv1')(x)))
        y = self.conv(out, 3, self.strides, feature_group_count=self.groups, name='conv2')(y)
        y = nn.relu(self.norm(name='bn2')(y))
        return self.norm(name='bn3', scale_init=last_scale)(self.conv(out, 1, name='conv3')(y))


class SENet(layers.ResidualClassifier):
    """SENet (legacy Caffe layout; see the module docstring).

    Features: ``stem`` (after the ceil-mode pool), ``stage1``..``stage4``, ``pre_logits``.
    Shared fields as :class:`layers.ResidualClassifier` (``drop_rate`` 0.2 as the
    reference; ``drop_path_rate`` linear in the block index); with ``padding='tf_same'`` the
    ceil-mode stem pool becomes a TF ``SAME`` pool, which agrees with it at even sizes and
    pads one pixel on both sides (one more output) at odd ones.

    Attributes:
        stage_sizes: blocks per stage (four stages).
        groups: cardinality of the grouped 3x3 convs.
        stem_width: output channels of the deep stem (its first two convs have 64).
        reduction: SE reduction ratio.
        zero_init_last: zero-init the last norm scale of every residual branch.
    """

    stage_sizes: tuple[int, ...] = (3, 8, 36, 3)
    groups: int = 64
    stem_width: int = 128
    reduction: int = 16
    zero_init_last: bool = False
    drop_rate: float = layers.kw_only(0.2)

    HEAD = 'last_linear'

    def check_fields(self) -> None:
        super().check_fields()
        if len(self.stage_sizes) != 4:
            raise self.invalid('stage_sizes', 'four stages')

    def forward_features(self, x: jax.Array, train: bool, features: dict) -> jax.Array:
        conv, norm = self.make_conv(), self.make_norm(train)
        for i, (width, stride) in enumerate(((64, 2), (64, 1), (self.stem_width, 1)), start=1):
            x = conv(width, 3, stride, name=f'layer0_conv{i}')(x)
            x = nn.relu(norm(name=f'layer0_bn{i}')(x))
        if self.padding == 'tf_same':
            pads = 'SAME'
        else:
            pads = [_ceil_pool_padding(n, 3, 2) for n in x.shape[1:3]]
        x = nn.max_pool(x, (3, 3), (2, 2), padding=pads)
        features['stem'] = x

        def block(s: int, b: int, rate: float) -> SEBottleneck:
            planes = 64 * 2**s
            # The reference's SEModule takes channels // reduction, no rounding to 8.
            attn = functools.partial(
                layers.SqueezeExcite, rd_channels=planes * 4 // self.reduction, dtype=self.dtype
            )
            return SEBottleneck(
                planes, 2 if s > 0 and b == 0 else 1, conv, norm, drop_path_rate=rate,
                zero_init_last=self.zero_init_last, groups=self.groups, attn=attn,
                down_kernel=1 if s == 0 else 3, name=f'layer{s + 1}_{b}',
            )

        return self.residual_stages(x, train, features, self.stage_sizes, block)


# timm legacy SENet state-dict names <-> ours (norm names kept for GroupNorm too).
register_name_map(
    'senet',
    (
        NameRule('layer0.conv{i}', 'layer0_conv{i}', 'conv'),
        NameRule('layer0.bn{i}', 'layer0_bn{i}', 'norm'),
        *BLOCK_RULES,
        NameRule('layer{s}.{b}.se_module.fc{i}', 'layer{s}_{b}/se_module/fc{i}', 'conv'),
        NameRule('last_linear', 'last_linear', 'linear'),
    ),
)


def _senet(variant: str, **kwargs) -> SENet:
    stage_sizes, groups, stem_width = SENET_VARIANTS[variant]
    return SENet(**{'stage_sizes': stage_sizes, 'groups': groups, 'stem_width': stem_width, **kwargs})


# Data settings: timm's legacy_senet154.in1k cfg (224 px, bilinear, crop 0.875). top1: the
# paper's single 224-crop result, 100 - 18.68 (Hu et al. 2018, Table 8).
@register_model(top1=81.32, paper=_PAPER)
def legacy_senet154(**kwargs) -> SENet:
    """SENet-154 (legacy Caffe layout), 115,088,984 parameters (timm)."""
    return _senet('senet154', **kwargs)
