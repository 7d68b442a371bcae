"""Pre-activation ResNet-v2 and BiT (Big Transfer), as timm's ``resnetv2_*`` models.

He, Zhang, Ren, Sun, "Identity Mappings in Deep Residual Networks", ECCV 2016 (ResNet-v2):
every block computes ``x + F(x)`` with the norm and activation moved in front of each conv
(Fig. 4e, "full pre-activation"), so the identity path carries no nonlinearity; one norm +
activation after the last stage feeds the classifier. Depths 50/101/152 use the bottleneck
block counts of He et al. 2016a, Table 1.

Kolesnikov et al., "Big Transfer (BiT): General Visual Representation Learning", ECCV 2020:
the same network with GroupNorm (32 groups) and weight-standardised convolutions
(Sec. 4.3), widths multiplied by 1-4 (R50x1 ... R152x4, Sec. 3.2), a 'fixed' stem (the
max-pool input is zero-padded by one pixel, mimicking TF ``SAME``) and a 1x1-conv head.

Layout follows timm ``resnetv2.py`` so its weights load with ``models.convert_state_dict``:
the bottleneck strides on its 3x3 conv; the first block of each stage projects the
*pre-activated* input with a 1x1 conv and no norm; the head is a 1x1 conv on the pooled
features (a Dense layer here; the name map reshapes it). Parameter counts equal timm's at
1000 classes (sum of ``numel()`` over ``timm.create_model(name)`` built on the meta device,
timm 1.0.29): resnetv2_50 25,549,352; resnetv2_101 44,541,480; resnetv2_152 60,185,128;
R50x1 25,549,352; R50x3 217,319,080; R101x1 44,541,480; R101x3 387,934,888;
R152x2 236,335,208; R152x4 936,533,224.

Both switches work on every variant: BiT with ``norm='batch', weight_std=False`` is the
BatchNorm ResNet-v2 at BiT width, and ``resnetv2_50`` with ``norm='group',
weight_std=True`` is BiT-R50x1 with the plain stem. GN and BN have the same parameters
(scale, bias), so counts are unchanged.

Initialisation follows timm: convs kaiming-normal (fan_out, relu), norm scale 1 / bias 0,
head weight normal(0.01) and bias 0; ``zero_init_last`` zeroes each branch's last conv.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import layers, registry
from models.convert import LeafSpec, flat, register_leaf_kind, register_name_map, within

register_model = functools.partial(
    registry.register_model, family='resnetv2', classifier='head_fc', first_conv='stem_conv'
)

_PAPER_V2 = 'He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016'
_PAPER_BIT = (
    'Kolesnikov et al., "Big Transfer (BiT): General Visual Representation Learning", ECCV 2020'
)
# timm's resnetv2 pretrained cfgs all normalise with IMAGENET_INCEPTION_MEAN/STD.
_INCEPTION_MEAN = (0.5, 0.5, 0.5)
_INCEPTION_STD = (0.5, 0.5, 0.5)

# depth -> bottleneck blocks per stage; He et al. 2016a, Table 1.
RESNETV2_DEPTHS: dict[int, tuple[int, ...]] = {
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}

STEM_TYPES = ('', 'fixed', 'same')


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {'relu': nn.relu, 'silu': nn.silu}


class PreActBottleneck(nn.Module):
    """Full pre-activation bottleneck (He et al. 2016b, Fig. 4e), stride on the 3x3 conv.

    Attributes:
        features: output channels (4x the bottleneck width by default).
        mid_features: bottleneck width.
        strides: stride of the 3x3 conv and of the projection.
        project: add the 1x1 projection shortcut (first block of every stage).
        conv: conv constructor from :func:`layers.conv_factory`.
        norm: norm constructor from :func:`layers.norm_factory`.
        act: activation following every norm.
        drop_path_rate: stochastic-depth rate of the residual branch.
        zero_init_last: start the last conv at zero (block is the identity).
    """

    features: int
    mid_features: int
    strides: int
    project: bool
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]
    act: Callable[[jax.Array], jax.Array] = nn.relu
    drop_path_rate: float = 0.0
    zero_init_last: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x_pre = self.act(self.norm(name='norm1')(x))
        # The projection sees the normalised input (timm DownsampleConv with preact=True),
        # so the identity path of later blocks stays free of norms.
        shortcut = x
        if self.project:
            shortcut = self.conv(self.features, 1, self.strides, name='downsample_conv')(x_pre)
        y = self.conv(self.mid_features, 1, name='conv1')(x_pre)
        y = self.act(self.norm(name='norm2')(y))
        y = self.conv(self.mid_features, 3, self.strides, name='conv2')(y)
        y = self.act(self.norm(name='norm3')(y))
        last_init = {'kernel_init': nn.initializers.zeros} if self.zero_init_last else {}
        y = self.conv(self.features, 1, name='conv3', **last_init)(y)
        return shortcut + layers.DropPath(self.drop_path_rate)(y, train)


class ResNetV2(layers.ResidualClassifier):
    """Pre-activation ResNet (v2) / BiT in timm's layout.

    Features: ``stem`` (after the pool), ``stage1``..``stage4`` (the raw, pre-norm block
    outputs), ``pre_logits`` (pooled after the final norm + activation). Shared fields as
    :class:`layers.ResidualClassifier` (``gn_groups`` 32 in BiT).

    Attributes:
        stage_sizes: bottleneck blocks per stage.
        widths: output channels per stage at width factor 1.
        width_factor: BiT width multiplier (R50x3: 3); scales the stem and every stage.
        stem_width: stem conv channels at width factor 1.
        stem_type: ``''`` (7x7/2 conv, max-pool padded with -inf like PyTorch),
            ``'fixed'`` (BiT: max-pool input zero-padded by 1, then unpadded pool) or
            ``'same'`` (TF ``SAME`` max-pool).
        bottle_ratio: bottleneck width / block output width.
        norm_eps: norm epsilon (1e-5 for timm's BatchNormAct2d and GroupNormAct).
        bn_momentum: BatchNorm running-average decay (flax 0.9 == torch momentum 0.1).
        std_eps: StdConv epsilon; 1e-8 as in timm's BiT models (``_create_resnetv2_bit``).
        activation: ``'relu'`` (all registered models) or ``'silu'``.
        zero_init_last: zero-init the last conv of every residual branch.
    """

    stage_sizes: tuple[int, ...]
    widths: tuple[int, ...] = (256, 512, 1024, 2048)
    width_factor: int = 1
    stem_width: int = 64
    stem_type: str = ''
    bottle_ratio: float = 0.25
    norm_eps: float = 1e-5
    bn_momentum: float = 0.9
    std_eps: float = 1e-8
    activation: str = 'relu'
    zero_init_last: bool = False

    HEAD = 'head_fc'
    # timm's head is a 1x1 conv on the pooled map (identical to a Dense layer): N(0, 0.01), 0.
    HEAD_INIT = (nn.initializers.normal(0.01), nn.initializers.zeros)
    CHOICES = {'stem_type': STEM_TYPES, 'activation': tuple(ACTIVATIONS)}

    def check_fields(self) -> None:
        super().check_fields()
        if len(self.widths) != len(self.stage_sizes):
            raise self.invalid('widths', f'one entry per stage ({len(self.stage_sizes)})')

    def forward_features(self, x: jax.Array, train: bool, features: dict) -> jax.Array:
        conv = self.make_conv(eps=self.std_eps)
        norm = self.make_norm(train, momentum=self.bn_momentum, epsilon=self.norm_eps)
        act = ACTIVATIONS[self.activation]
        wf = self.width_factor

        # Pre-activation: the stem has no norm; the first block's norm1 normalises it.
        x = conv(self.stem_width * wf, 7, 2, name='stem_conv')(x)
        if self.stem_type == 'fixed':
            # BiT pads with zeros, not -inf: this changes results where the conv output is
            # negative along the border, so it must be reproduced exactly for ported weights.
            x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
            x = nn.max_pool(x, (3, 3), (2, 2), padding='VALID')
        elif self.stem_type == 'same':
            x = nn.max_pool(x, (3, 3), (2, 2), padding='SAME')
        else:
            x = nn.max_pool(x, (3, 3), (2, 2), padding=layers.get_padding('symmetric', 3, 2))
        features['stem'] = x

        def block(s: int, b: int, rate: float) -> PreActBottleneck:
            out = self.widths[s] * wf
            return PreActBottleneck(
                out, int(out * self.bottle_ratio), 2 if s > 0 and b == 0 else 1, b == 0, conv, norm, act,
                drop_path_rate=rate, zero_init_last=self.zero_init_last, name=f'stages_{s}_{b}',
            )

        x = self.residual_stages(x, train, features, self.stage_sizes, block)
        return act(norm(name='norm')(x))


def _conv1x1_to_dense(w: np.ndarray) -> np.ndarray:
    return np.transpose(w[:, :, 0, 0])


def _dense_to_conv1x1(w: np.ndarray) -> np.ndarray:
    return np.transpose(w)[:, :, None, None]


# timm's classifier ``head.fc`` is a Conv2d(C, N, 1): OIHW (N, C, 1, 1) <-> Dense (C, N).
register_leaf_kind(
    'conv1x1_dense',
    {
        'weight': LeafSpec('params', 'kernel', _conv1x1_to_dense, _dense_to_conv1x1),
        'bias': LeafSpec('params', 'bias'),
    },
)

# timm state-dict names <-> ours. GroupNorm and BatchNorm share the 'norm' kind (GN has no
# running statistics), so BiT and its BN twin map the same way.
register_name_map(
    'resnetv2',
    (
        *flat('conv', 'stem.conv'),
        *within('stages.{s}.blocks.{b}', 'stages_{s}_{b}', 'norm', 'norm{i}'),
        *within('stages.{s}.blocks.{b}', 'stages_{s}_{b}', 'conv', 'conv{i}', 'downsample.conv'),
        *flat('norm', 'norm'),
        *flat('conv1x1_dense', 'head.fc'),
    ),
)


def _v2(depth: int) -> dict[str, Any]:
    return {'stage_sizes': RESNETV2_DEPTHS[depth]}


def _bit(depth: int, width_factor: int) -> dict[str, Any]:
    """BiT defaults of timm ``_create_resnetv2_bit``: GN(32) + StdConv(eps 1e-8), fixed stem."""
    return dict(
        stage_sizes=RESNETV2_DEPTHS[depth], width_factor=width_factor, stem_type='fixed',
        norm='group', weight_std=True, std_eps=1e-8,
    )


# Default cfgs are those of timm's default pretrained tag for each name; top1 is timm's
# results-imagenet.csv for that tag (for resnetv2_50/101 'a1h_in1k' it is measured at the
# 288 px test size). resnetv2_152 has only an 'untrained' cfg in timm. BiT R50x1 is
# 'goog_distilled_in1k' (Beyer et al. 2022, "Knowledge distillation: A good teacher is
# patient and consistent": R152x2 teacher -> R50x1 student, 224 px), R152x2 the teacher
# 'goog_teacher_in21k_ft_in1k' (224 px); the others are fine-tuned at 448 / 480 px.
_INCEPTION = dict(mean=_INCEPTION_MEAN, std=_INCEPTION_STD, interpolation='bicubic')
_V2_CFG = dict(paper=_PAPER_V2, **_INCEPTION)
_BIT_CFG = dict(paper=_PAPER_BIT, **_INCEPTION)
# timm's 448 / 480 px BiT cfgs keep bilinear resizing.
_BIT_448 = dict(input_size=(448, 448, 3), crop_pct=1.0, mean=_INCEPTION_MEAN, std=_INCEPTION_STD, paper=_PAPER_BIT)

# Registered name -> (ResNetV2 fields, ModelCfg fields); parameter counts in the README table.
RESNETV2_MODELS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    'resnetv2_50': (_v2(50), dict(crop_pct=0.95, top1=81.398, **_V2_CFG)),
    'resnetv2_101': (_v2(101), dict(crop_pct=0.95, top1=83.002, **_V2_CFG)),
    'resnetv2_152': (_v2(152), dict(crop_pct=0.875, **_V2_CFG)),
    'resnetv2_50x1_bit': (_bit(50, 1), dict(top1=82.820, **_BIT_CFG)),
    'resnetv2_50x3_bit': (_bit(50, 3), dict(top1=84.020, **_BIT_448)),
    'resnetv2_101x1_bit': (_bit(101, 1), dict(top1=82.342, **_BIT_448)),
    'resnetv2_101x3_bit': (_bit(101, 3), dict(top1=84.438, **_BIT_448)),
    'resnetv2_152x2_bit': (_bit(152, 2), dict(top1=82.876, **_BIT_CFG)),
    # 936M parameters: build it abstractly (jax.eval_shape) where nothing needs computing.
    'resnetv2_152x4_bit': (_bit(152, 4), dict(top1=84.916, **{**_BIT_448, 'input_size': (480, 480, 3)})),
}

for _name, (_fields, _cfg) in RESNETV2_MODELS.items():
    register_model(name=_name, **_cfg)(functools.partial(ResNetV2, **_fields))
