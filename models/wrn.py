"""CIFAR Wide ResNets (WRN-d-k) as used by FixMatch and Meta Pseudo Labels.

Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016. Table 1: a 3x3 conv with 16
channels, then three groups of ``n = (d - 4) / 6`` pre-activation basic blocks
(BN-act-conv3x3-BN-act-conv3x3) with widths 16k / 32k / 64k at 32 / 16 / 8 px (groups 2
and 3 stride 2 in their first block), a final BN-act, global average pooling and a linear
classifier. Depth 28 gives 4 blocks per group. 1x1 projection shortcuts where the width or
resolution changes. Dropout between the two convs of a block is the paper's optional
regulariser (Sec. 2.4, ``block_drop_rate``; 0.3 in its experiments).

Semi-supervised details follow the FixMatch reference (google-research/fixmatch,
``libml/models.py``, class ``ResNet``; Sohn et al. 2020), which MixMatch, FixMatch and the
PyTorch ports of FixMatch and MPL share:
  * leaky ReLU with slope 0.1 (``activation='leaky_relu'``, ``leaky_slope=0.1``);
  * BatchNorm ``tf.layers.batch_normalization(momentum=0.999)`` with TF's default
    epsilon 1e-3: flax momentum 0.999 (== torch ``momentum=0.001``), ``bn_eps=1e-3``;
  * in the first block of group 1 (``activate_before_residual``) the shortcut takes the
    pre-activated input; elsewhere a projection takes the raw block input;
  * convs He-normal with stddev sqrt(2 / (k * k * out)) (= kaiming fan_out), classifier
    Glorot-normal, optional dropout before the classifier (``drop_rate``).
The TF reference gives its convs a bias (``tf.layers.conv2d`` default); the PyTorch ports
and the paper's parameter counts do not, so ``conv_bias=False`` by default (True adds
2,032 parameters to WRN-28-2, 10,096 to WRN-28-10).

Parameter counts at 10 classes (no reference implementation in timm/torchvision; checked
against published figures): WRN-28-2 1,467,610 (the "1.5M" of MixMatch Sec. 4.1 and
FixMatch Sec. 4 / Table 7, "1.47M" in the PyTorch ports); WRN-28-10 36,479,194 (36.5M in
Zagoruyko & Komodakis 2016, Tables 4 and 5).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax

from models import layers, registry

# No reference weights (no name map); 'wrn' is the family all the same.
register_model = functools.partial(
    registry.register_model, family='wrn', classifier='fc', first_conv='stem_conv'
)

_PAPER = 'Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016'
# CIFAR-10 training-set statistics as used by the FixMatch / MPL PyTorch ports.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)

ACTIVATIONS = ('relu', 'leaky_relu')


class WideBasicBlock(nn.Module):
    """Pre-activation basic block of a Wide ResNet (Zagoruyko & Komodakis 2016, Fig. 1c).

    Attributes:
        features: output width.
        strides: stride of the first conv and of the projection.
        activate_before_residual: the shortcut takes the normalised, activated input
            (FixMatch's first block); otherwise the raw input.
        conv: conv constructor from :func:`layers.conv_factory`.
        norm: norm constructor from :func:`layers.norm_factory`.
        act: activation following every norm.
        block_drop_rate: dropout between the two convs (paper Sec. 2.4).
        drop_path_rate: stochastic-depth rate of the residual branch.
        conv_bias: convs with bias (the FixMatch TF code).
    """

    features: int
    strides: int
    activate_before_residual: bool
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]
    act: Callable[[jax.Array], jax.Array]
    block_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    conv_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x_pre = self.act(self.norm(name='norm1')(x))
        shortcut = x_pre if self.activate_before_residual else x
        if self.strides != 1 or x.shape[-1] != self.features:
            shortcut = self.conv(
                self.features, 1, self.strides, use_bias=self.conv_bias, name='shortcut_conv'
            )(shortcut)
        y = self.conv(self.features, 3, self.strides, use_bias=self.conv_bias, name='conv1')(x_pre)
        y = self.act(self.norm(name='norm2')(y))
        y = nn.Dropout(self.block_drop_rate, deterministic=not train)(y)
        y = self.conv(self.features, 3, use_bias=self.conv_bias, name='conv2')(y)
        return shortcut + layers.DropPath(self.drop_path_rate)(y, train)


class WideResNet(layers.ResidualClassifier):
    """WRN-d-k for 32 px inputs.

    Features: ``stem``, ``stage1``..``stage3`` (raw block outputs), ``pre_logits`` (after
    the final norm + activation and pooling). Shared fields as
    :class:`layers.ResidualClassifier`, with FixMatch's defaults: 10 classes, ``drop_rate``
    is FixMatch's ``dropout`` flag; ``padding='tf_same'`` reproduces the TF reference's
    asymmetric padding of strided convs.

    Attributes:
        depth: total depth d; ``(d - 4) / 6`` blocks per group (28 -> 4).
        widen_factor: k; group widths are ``group_widths * k``.
        group_widths: widths of the three groups at k = 1 (Table 1: 16, 32, 64).
        stem_width: channels of the first conv (16, not widened).
        bn_momentum: BatchNorm running-average decay; 0.999 as FixMatch (torch 0.001).
        bn_eps: norm epsilon; 1e-3, TF's default in the FixMatch code.
        std_eps: StdConv epsilon.
        activation: ``'leaky_relu'`` (FixMatch / MPL) or ``'relu'`` (the WRN paper).
        leaky_slope: negative slope of the leaky ReLU (0.1 in FixMatch).
        conv_bias: convs with bias, as the FixMatch TF code (see module docstring).
        block_drop_rate: dropout inside every block (the paper's WRN-28-10 uses 0.3).
    """

    depth: int = 28
    widen_factor: int = 2
    group_widths: tuple[int, ...] = (16, 32, 64)
    stem_width: int = 16
    bn_momentum: float = 0.999
    bn_eps: float = 1e-3
    std_eps: float = 1e-8
    activation: str = 'leaky_relu'
    leaky_slope: float = 0.1
    conv_bias: bool = False
    block_drop_rate: float = 0.0
    num_classes: int = layers.kw_only(10)

    # FixMatch's classifier: Glorot-normal kernel, zero bias.
    HEAD_INIT = (nn.initializers.glorot_normal(), nn.initializers.zeros)
    CHOICES = {'activation': ACTIVATIONS}

    def check_fields(self) -> None:
        super().check_fields()
        if (self.depth - 4) % 6:
            raise self.invalid('depth', '6n + 4')

    def forward_features(self, x: jax.Array, train: bool, features: dict) -> jax.Array:
        if self.activation == 'leaky_relu':
            act = functools.partial(nn.leaky_relu, negative_slope=self.leaky_slope)
        else:
            act = nn.relu
        conv = self.make_conv(eps=self.std_eps)
        norm = self.make_norm(train, momentum=self.bn_momentum, epsilon=self.bn_eps)
        blocks_per_group = (self.depth - 4) // 6

        x = conv(self.stem_width, 3, use_bias=self.conv_bias, name='stem_conv')(x)
        features['stem'] = x

        def block(g: int, b: int, rate: float) -> WideBasicBlock:
            return WideBasicBlock(
                self.group_widths[g] * self.widen_factor, 2 if g > 0 and b == 0 else 1, g == 0 and b == 0,
                conv, norm, act, self.block_drop_rate, rate, self.conv_bias, name=f'group{g + 1}_{b}',
            )

        x = self.residual_stages(x, train, features, (blocks_per_group,) * len(self.group_widths), block)
        return act(norm(name='norm')(x))


_CIFAR = dict(
    input_size=(32, 32, 3),
    mean=CIFAR10_MEAN,
    std=CIFAR10_STD,
    crop_pct=1.0,
    num_classes=10,
    paper=_PAPER,
)


@register_model(**_CIFAR)
def wrn28_2(**kwargs) -> WideResNet:
    """WRN-28-2, 1,467,610 parameters at 10 classes (FixMatch / MPL CIFAR-10 model)."""
    return WideResNet(**{'depth': 28, 'widen_factor': 2, **kwargs})


@register_model(**_CIFAR)
def wrn28_10(**kwargs) -> WideResNet:
    """WRN-28-10, 36,479,194 parameters at 10 classes (paper: 36.5M, Tables 4-5)."""
    return WideResNet(**{'depth': 28, 'widen_factor': 10, **kwargs})
