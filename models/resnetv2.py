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

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import layers
from models.convert import LeafSpec, NameRule, register_leaf_kind, register_name_map
from models.registry import register_model

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


def _activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name == 'relu':
        return nn.relu
    if name == 'silu':
        return nn.silu
    raise ValueError(f"activation must be 'relu' or 'silu', got {name!r}")


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


class ResNetV2(nn.Module):
    """Pre-activation ResNet (v2) / BiT in timm's layout.

    Attributes:
        stage_sizes: bottleneck blocks per stage.
        widths: output channels per stage at width factor 1.
        width_factor: BiT width multiplier (R50x3: 3); scales the stem and every stage.
        stem_width: stem conv channels at width factor 1.
        stem_type: ``''`` (7x7/2 conv, max-pool padded with -inf like PyTorch),
            ``'fixed'`` (BiT: max-pool input zero-padded by 1, then unpadded pool) or
            ``'same'`` (TF ``SAME`` max-pool).
        bottle_ratio: bottleneck width / block output width.
        num_classes: classifier size; 0 returns the pooled features instead of logits.
        norm: ``'batch'`` or ``'group'``.
        gn_groups: groups when ``norm='group'`` (32 in BiT).
        norm_eps: norm epsilon (1e-5 for timm's BatchNormAct2d and GroupNormAct).
        bn_momentum: BatchNorm running-average decay (flax 0.9 == torch momentum 0.1).
        weight_std: weight-standardised convs (BiT).
        std_eps: StdConv epsilon; 1e-8 as in timm's BiT models (``_create_resnetv2_bit``).
        activation: ``'relu'`` (all registered models) or ``'silu'``.
        dtype: compute dtype; parameters and logits are float32.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth; block ``i`` of ``n`` uses
            ``drop_path_rate * i / (n - 1)`` (timm's linear rule).
        zero_init_last: zero-init the last conv of every residual branch.
        padding: padding mode of the convs (see :func:`layers.get_padding`).
    """

    stage_sizes: tuple[int, ...]
    widths: tuple[int, ...] = (256, 512, 1024, 2048)
    width_factor: int = 1
    stem_width: int = 64
    stem_type: str = ''
    bottle_ratio: float = 0.25
    num_classes: int = 1000
    norm: str = 'batch'
    gn_groups: int = 32
    norm_eps: float = 1e-5
    bn_momentum: float = 0.9
    weight_std: bool = False
    std_eps: float = 1e-8
    activation: str = 'relu'
    dtype: layers.Dtype = jnp.float32
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    zero_init_last: bool = False
    padding: str = 'symmetric'

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
        """Applies the network to NHWC images.

        Args:
            x: images, (B, H, W, C).
            train: batch statistics, dropout and drop-path on.
            return_features: also return ``{'stem', 'stage1'..'stage4', 'pre_logits'}``;
                stage maps are the raw (pre-norm) block outputs, ``pre_logits`` the pooled
                features after the final norm + activation.

        Returns:
            float32 logits (B, num_classes) (pooled features when ``num_classes == 0``),
            and the feature dict when ``return_features``.
        """
        if self.norm not in ('batch', 'group'):
            raise ValueError(f"ResNetV2 norm must be 'batch' or 'group', got {self.norm!r}")
        if self.stem_type not in STEM_TYPES:
            raise ValueError(f'stem_type must be one of {STEM_TYPES}, got {self.stem_type!r}')
        if len(self.widths) != len(self.stage_sizes):
            raise ValueError('widths and stage_sizes need one entry per stage')
        conv = layers.conv_factory(self.weight_std, self.dtype, self.padding, eps=self.std_eps)
        norm = layers.norm_factory(
            self.norm, train, self.dtype, groups=self.gn_groups, momentum=self.bn_momentum,
            epsilon=self.norm_eps,
        )
        act = _activation(self.activation)
        wf = self.width_factor
        features = {}

        x = x.astype(self.dtype)
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

        n_blocks = sum(self.stage_sizes)
        index = 0
        for stage, (size, width) in enumerate(zip(self.stage_sizes, self.widths, strict=True)):
            out = width * wf
            for b in range(size):
                x = PreActBottleneck(
                    features=out,
                    mid_features=int(out * self.bottle_ratio),
                    strides=2 if stage > 0 and b == 0 else 1,
                    project=b == 0,
                    conv=conv,
                    norm=norm,
                    act=act,
                    drop_path_rate=self.drop_path_rate * index / max(n_blocks - 1, 1),
                    zero_init_last=self.zero_init_last,
                    name=f'stages_{stage}_{b}',
                )(x, train)
                index += 1
            features[f'stage{stage + 1}'] = x

        x = act(norm(name='norm')(x))
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        features['pre_logits'] = x
        if self.num_classes:
            x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
            # timm's head is a 1x1 conv on the pooled map: identical to a Dense layer.
            x = nn.Dense(
                self.num_classes,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                kernel_init=nn.initializers.normal(0.01),
                bias_init=nn.initializers.zeros,
                name='head_fc',
            )(x)
        x = x.astype(jnp.float32)
        return (x, features) if return_features else x


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
        NameRule('stem.conv', 'stem_conv', 'conv'),
        NameRule('stages.{s}.blocks.{b}.norm{i}', 'stages_{s}_{b}/norm{i}', 'norm'),
        NameRule('stages.{s}.blocks.{b}.conv{i}', 'stages_{s}_{b}/conv{i}', 'conv'),
        NameRule('stages.{s}.blocks.{b}.downsample.conv', 'stages_{s}_{b}/downsample_conv', 'conv'),
        NameRule('norm', 'norm', 'norm'),
        NameRule('head.fc', 'head_fc', 'conv1x1_dense'),
    ),
)


def _resnetv2(depth: int, **kwargs) -> ResNetV2:
    return ResNetV2(**{'stage_sizes': RESNETV2_DEPTHS[depth], **kwargs})


def _bit(depth: int, width_factor: int, **kwargs) -> ResNetV2:
    """BiT defaults of timm ``_create_resnetv2_bit``: GN(32) + StdConv(eps 1e-8), fixed stem."""
    return _resnetv2(
        depth,
        **{
            'width_factor': width_factor,
            'stem_type': 'fixed',
            'norm': 'group',
            'weight_std': True,
            'std_eps': 1e-8,
            **kwargs,
        },
    )


# Default cfgs are those of timm's default pretrained tag for each name; top1 is timm's
# results-imagenet.csv for that tag (for resnetv2_50/101 'a1h_in1k' it is measured at the
# 288 px test size). resnetv2_152 has only an 'untrained' cfg in timm.
_V2 = dict(mean=_INCEPTION_MEAN, std=_INCEPTION_STD, interpolation='bicubic')
_BIT_448 = dict(
    mean=_INCEPTION_MEAN,
    std=_INCEPTION_STD,
    input_size=(448, 448, 3),
    crop_pct=1.0,
    paper=_PAPER_BIT,
)


@register_model(crop_pct=0.95, top1=81.398, paper=_PAPER_V2, **_V2)
def resnetv2_50(**kwargs) -> ResNetV2:
    """Pre-activation ResNet-50 with BatchNorm, 25,549,352 parameters."""
    return _resnetv2(50, **kwargs)


@register_model(crop_pct=0.95, top1=83.002, paper=_PAPER_V2, **_V2)
def resnetv2_101(**kwargs) -> ResNetV2:
    """Pre-activation ResNet-101 with BatchNorm, 44,541,480 parameters."""
    return _resnetv2(101, **kwargs)


@register_model(crop_pct=0.875, paper=_PAPER_V2, **_V2)
def resnetv2_152(**kwargs) -> ResNetV2:
    """Pre-activation ResNet-152 with BatchNorm, 60,185,128 parameters (no timm weights)."""
    return _resnetv2(152, **kwargs)


# 'goog_distilled_in1k': Beyer et al. 2022, "Knowledge distillation: A good teacher is
# patient and consistent" (R152x2 teacher -> R50x1 student), 224 px.
@register_model(
    mean=_INCEPTION_MEAN, std=_INCEPTION_STD, interpolation='bicubic', top1=82.820, paper=_PAPER_BIT
)
def resnetv2_50x1_bit(**kwargs) -> ResNetV2:
    """BiT-R50x1, 25,549,352 parameters."""
    return _bit(50, 1, **kwargs)


@register_model(top1=84.020, **_BIT_448)
def resnetv2_50x3_bit(**kwargs) -> ResNetV2:
    """BiT-R50x3, 217,319,080 parameters."""
    return _bit(50, 3, **kwargs)


@register_model(top1=82.342, **_BIT_448)
def resnetv2_101x1_bit(**kwargs) -> ResNetV2:
    """BiT-R101x1, 44,541,480 parameters."""
    return _bit(101, 1, **kwargs)


@register_model(top1=84.438, **_BIT_448)
def resnetv2_101x3_bit(**kwargs) -> ResNetV2:
    """BiT-R101x3, 387,934,888 parameters."""
    return _bit(101, 3, **kwargs)


# 'goog_teacher_in21k_ft_in1k': the distillation teacher, 224 px.
@register_model(
    mean=_INCEPTION_MEAN, std=_INCEPTION_STD, interpolation='bicubic', top1=82.876, paper=_PAPER_BIT
)
def resnetv2_152x2_bit(**kwargs) -> ResNetV2:
    """BiT-R152x2, 236,335,208 parameters."""
    return _bit(152, 2, **kwargs)


@register_model(
    mean=_INCEPTION_MEAN,
    std=_INCEPTION_STD,
    input_size=(480, 480, 3),
    crop_pct=1.0,
    top1=84.916,
    paper=_PAPER_BIT,
)
def resnetv2_152x4_bit(**kwargs) -> ResNetV2:
    """BiT-R152x4, 936,533,224 parameters (build abstractly with ``jax.eval_shape``)."""
    return _bit(152, 4, **kwargs)
