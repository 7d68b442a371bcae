"""NFNet-F0..F6, normalizer-free ResNets with the DeepMind weights' layout (timm ``dm_nfnet_*``).

Brock, De, Smith, Simonyan, "High-Performance Large-Scale Image Recognition Without
Normalization", ICML 2021. Depths, widths and resolutions are the paper's Table 1 (widths
256/512/1536/1536 for all variants, depths ``(1, 2, 6, 3) * N`` for FN-1, train/test
resolution below). The architecture facts follow the released DeepMind model as timm ports
it (``timm.models.nfnet``, ``dm_nfnet_f*``), so those weights load with
``models.convert_state_dict`` and parameter counts equal timm's exactly:

* Scaled weight standardisation (Brock et al. 2021a, "Characterizing signal propagation",
  Sec. 5): every conv uses ``gain * (W - mean) / sqrt(var + 1e-5) / sqrt(fan_in)`` per
  output unit, with a learnable per-channel ``gain`` and a bias. Standardisation happens
  on every call; the optimiser sees the raw kernel.
* TensorFlow ``SAME`` padding (extra pad bottom/right on stride 2), as in the JAX original.
* GELU (exact erf form) times gamma = 1.7015043497085571, the constant that restores unit
  variance for unit-Gaussian inputs.
* Bottleneck block with two grouped 3x3 convs (group width 128), ratio 0.5; squeeze-excite
  with ratio 0.5 after the last 1x1 conv, scaled by 2 (``attn_gain``); skipinit: a scalar
  gain initialised at 0 multiplies the residual branch; residual ``x + alpha * f(x / beta)``
  with alpha = 0.2 and beta = sqrt of the analytically tracked variance (reset to 1 at each
  stage's first block, which owns an avg-pool + 1x1-conv shortcut).
* Deep stem of four 3x3 convs (16, 32, 64, 128 maps; strides 2, 1, 1, 2), and a final 1x1
  conv to 2x the last width (3072) before pooling.
* Stochastic depth (``drop_path_rate``, linear in block index) and classifier dropout
  (``drop_rate``). Table 1 trains with dropout 0.2/0.3/0.4/0.4/0.5/0.5/0.5 for F0..F6;
  the defaults here are timm's (0), the training config sets them.

``norm``: NFNets are designed *without* normalisation (``norm='none'``, the default and the
only setting the reference weights fit). ``norm='batch'|'group'`` inserts a norm layer after
every conv of the residual branch (conv1, conv2, conv2b, conv3; before the activation) so
the family takes part in the zoo-wide norm switch, e.g. to measure what the NF design buys
over a normalised twin. That is a design inversion: the signal-propagation constants
(alpha, beta, gamma) are then no longer what keeps activations at unit scale, and the stem,
shortcut and final convs stay normless. ``weight_std`` (default True) selects the scaled
weight-standardised conv; False gives plain biased convs (an ablation; no ``gain``
parameters, so reference weights do not load).

Initialisation follows timm: kernels normal with variance 1/fan_in, biases 0, gains 1,
skipinit gains 0, classifier weight normal(0, 0.01) and bias 0.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import layers, registry
from models.convert import (
    LEAF_KINDS,
    LeafSpec,
    NameRule,
    flat,
    register_leaf_kind,
    register_name_map,
    within,
)

register_model = functools.partial(
    registry.register_model, family='nfnet', classifier='fc', first_conv='stem_conv1'
)

_PAPER = (
    'Brock et al., "High-Performance Large-Scale Image Recognition Without Normalization", '
    'ICML 2021'
)

# DeepMind's nfnets/base.py constant for GELU (timm ``_nonlin_gamma['gelu']``).
GELU_GAMMA = 1.7015043497085571

NFNET_WIDTHS = (256, 512, 1536, 1536)

# name -> (blocks per stage, train res, test res, crop_pct, ImageNet top-1 %).
# Depths and resolutions: Table 1. Top-1: Table 3 (F6 is the SAM-trained model, as are the
# released weights). crop_pct: timm's pretrained cfg of the DeepMind weights.
NFNET_VARIANTS: dict[str, tuple[tuple[int, ...], int, int, float, float]] = {
    'dm_nfnet_f0': ((1, 2, 6, 3), 192, 256, 0.9, 83.6),
    'dm_nfnet_f1': ((2, 4, 12, 6), 224, 320, 0.91, 84.7),
    'dm_nfnet_f2': ((3, 6, 18, 9), 256, 352, 0.92, 85.1),
    'dm_nfnet_f3': ((4, 8, 24, 12), 320, 416, 0.94, 85.7),
    'dm_nfnet_f4': ((5, 10, 30, 15), 384, 512, 0.951, 85.9),
    'dm_nfnet_f5': ((6, 12, 36, 18), 416, 544, 0.954, 86.0),
    'dm_nfnet_f6': ((7, 14, 42, 21), 448, 576, 0.956, 86.5),
}

# torch kaiming_normal_(mode='fan_in', nonlinearity='linear'): untruncated, variance 1/fan_in.
_fan_in_normal = nn.initializers.variance_scaling(1.0, 'fan_in', 'normal')


def gamma_gelu(x: jax.Array) -> jax.Array:
    """GELU (erf form, as torch's default) rescaled to unit output variance."""
    return jax.nn.gelu(x, approximate=False) * GELU_GAMMA


class ScaledStdConv(nn.Module):
    """Conv with scaled weight standardisation and a learnable gain (Brock et al. 2021a).

    The kernel of each output unit is standardised over (H, W, in / groups), scaled by
    ``gain / sqrt(fan_in)`` and used with a bias, as timm's ``ScaledStdConv2dSame``: the
    variance is the biased one and ``eps`` is added inside the square root.

    Attributes:
        features: output channels.
        kernel_size: square kernel size.
        strides: square stride.
        groups: feature groups.
        padding: padding mode (see :func:`layers.get_padding`).
        eps: added to the per-unit kernel variance.
        gain_init: initial value of the per-channel gain.
        dtype: compute dtype; parameters are float32, standardisation runs in float32.
    """

    features: int
    kernel_size: int
    strides: int = 1
    groups: int = 1
    padding: str = 'tf_same'
    eps: float = 1e-5
    gain_init: float = 1.0
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        shape = (k, k, x.shape[-1] // self.groups, self.features)
        kernel = self.param('kernel', _fan_in_normal, shape, jnp.float32)
        gain = self.param('gain', nn.initializers.constant(self.gain_init), (self.features,), jnp.float32)
        bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
        fan_in = np.prod(shape[:-1])
        mean = jnp.mean(kernel, axis=(0, 1, 2), keepdims=True)
        var = jnp.var(kernel, axis=(0, 1, 2), keepdims=True)
        w = (kernel - mean) * jax.lax.rsqrt(var + self.eps) * (gain / math.sqrt(fan_in))
        y = layers.conv_general_dilated(
            x.astype(self.dtype),
            w.astype(self.dtype),
            window_strides=(self.strides, self.strides),
            padding=layers.get_padding(self.padding, k, self.strides),
            dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
            feature_group_count=self.groups,
        )
        return y + bias.astype(self.dtype)


def nf_conv_factory(weight_std: bool, dtype: layers.Dtype, padding: str = 'tf_same', eps: float = 1e-5):
    """``make(features, kernel_size, strides=1, *, groups=1, gain_init=1.0, name=None)``.

    ``weight_std=True`` builds :class:`ScaledStdConv` (the NF design); False a plain biased
    conv from :func:`layers.conv_factory` with the same initialisation.
    """
    plain = layers.conv_factory(False, dtype, padding, kernel_init=_fan_in_normal)

    def make(
        features: int,
        kernel_size: int,
        strides: int = 1,
        *,
        groups: int = 1,
        gain_init: float = 1.0,
        name: str | None = None,
    ) -> nn.Module:
        if weight_std:
            return ScaledStdConv(
                features, kernel_size, strides, groups, padding, eps, gain_init, dtype, name=name
            )
        return plain(features, kernel_size, strides, use_bias=True, feature_group_count=groups, name=name)

    return make


def _avg_pool_ceil(x: jax.Array) -> jax.Array:
    """torch ``AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)``.

    An odd row/column gets its own window averaged over the pixels it covers.
    """
    pads = [(0, d % 2) for d in x.shape[1:3]]
    return nn.avg_pool(x, (2, 2), (2, 2), padding=pads, count_include_pad=False)


class NFBlock(nn.Module):
    """NFNet bottleneck: ``x + alpha * skip_gain * SE(f(act(x) * beta))`` (pre-activation).

    Attributes:
        features: output width.
        strides: stride of the first 3x3 conv (and of the shortcut's pool).
        alpha: residual branch scale.
        beta: input scale ``1 / expected std`` of the block input.
        conv: constructor from :func:`nf_conv_factory`.
        norm: norm constructor (``layers.norm_factory``); None for the NF design.
        group_size: channels per group of the 3x3 convs.
        bottle_ratio: bottleneck width / output width.
        se_ratio: squeeze-excite reduction.
        attn_gain: scale of the SE output (2, so the 0.5-mean sigmoid keeps variance).
        drop_path_rate: stochastic depth of the residual branch.
        dtype: compute dtype.
    """

    features: int
    strides: int
    alpha: float
    beta: float
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module] | None = None
    group_size: int = 128
    bottle_ratio: float = 0.5
    se_ratio: float = 0.5
    attn_gain: float = 2.0
    drop_path_rate: float = 0.0
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        mid = layers.make_divisible(self.features * self.bottle_ratio, 8)
        groups = mid // self.group_size
        mid = self.group_size * groups

        def normed(y, name):
            return y if self.norm is None else self.norm(name=name)(y)

        out = gamma_gelu(x) * self.beta
        shortcut = x
        if x.shape[-1] != self.features or self.strides != 1:
            pooled = _avg_pool_ceil(out) if self.strides > 1 else out
            shortcut = self.conv(self.features, 1, name='downsample_conv')(pooled)

        y = normed(self.conv(mid, 1, name='conv1')(out), 'norm1')
        y = self.conv(mid, 3, self.strides, groups=groups, name='conv2')(gamma_gelu(y))
        y = normed(y, 'norm2')
        y = normed(self.conv(mid, 3, groups=groups, name='conv2b')(gamma_gelu(y)), 'norm2b')
        y = normed(self.conv(self.features, 1, name='conv3')(gamma_gelu(y)), 'norm3')
        y = self.attn_gain * layers.SqueezeExcite(
            rd_ratio=self.se_ratio, rd_divisor=8, kernel_init=_fan_in_normal,
            bias_init=nn.initializers.zeros, dtype=self.dtype, name='attn_last',
        )(y)
        y = layers.DropPath(self.drop_path_rate)(y, train)
        skip_gain = self.param('skipinit_gain', nn.initializers.zeros, (), jnp.float32)
        return (y * skip_gain.astype(y.dtype)) * self.alpha + shortcut


class NFNet(layers.ResidualClassifier):
    """Normalizer-free ResNet (NFNet-F family, DeepMind/timm ``dm_nfnet`` layout).

    Features: ``stem``, ``stage1``..``stage4``, ``pre_logits``. Shared fields as
    :class:`layers.ResidualClassifier`, with the NF design's defaults: ``norm='none'``
    (``'batch'`` / ``'group'`` insert a norm after every residual-branch conv, see the
    module docstring), ``weight_std=True`` (scaled weight standardisation) and
    ``padding='tf_same'`` as the released (JAX) weights.

    Attributes:
        depths: blocks per stage.
        widths: output width per stage.
        stem_widths: channels of the four stem convs.
        final_conv_mult: final 1x1 conv width as a multiple of the last stage width.
        alpha: residual scale.
        group_size: channels per group of the 3x3 convs.
        bottle_ratio: bottleneck width / output width.
        se_ratio: squeeze-excite reduction.
    """

    depths: tuple[int, ...] = (1, 2, 6, 3)
    widths: tuple[int, ...] = NFNET_WIDTHS
    stem_widths: tuple[int, ...] = (16, 32, 64, 128)
    final_conv_mult: float = 2.0
    alpha: float = 0.2
    group_size: int = 128
    bottle_ratio: float = 0.5
    se_ratio: float = 0.5
    norm: str = layers.kw_only('none')
    weight_std: bool = layers.kw_only(True)
    padding: str = layers.kw_only('tf_same')

    HEAD_INIT = (nn.initializers.normal(0.01), nn.initializers.zeros)

    def check_fields(self) -> None:
        super().check_fields()
        if len(self.widths) != len(self.depths):
            raise self.invalid('widths', f'one entry per stage ({len(self.depths)})')

    def forward_features(self, x: jax.Array, train: bool, features: dict) -> jax.Array:
        conv = nf_conv_factory(self.weight_std, self.dtype, self.padding)
        norm = None if self.norm == 'none' else self.make_norm(train)

        stem_strides = (2, 1, 1, 2)
        for i, (width, stride) in enumerate(zip(self.stem_widths, stem_strides, strict=True)):
            if i:
                x = gamma_gelu(x)
            x = conv(width, 3, stride, name=f'stem_conv{i + 1}')(x)
        features['stem'] = x

        def block(s: int, b: int, rate: float) -> NFBlock:
            # The input variance, tracked analytically: alpha^2 per block since the last
            # stage-opening block (whose conv shortcut restores unit variance); a stage's
            # first block sees the previous stage's accumulated variance. The stem already
            # reduces by 4, so the first stage keeps the resolution.
            expected_var = 1.0
            for _ in range(b if b > 0 else (self.depths[s - 1] if s > 0 else 0)):
                expected_var += self.alpha**2
            return NFBlock(
                self.widths[s], 2 if s > 0 and b == 0 else 1, self.alpha, 1.0 / math.sqrt(expected_var), conv,
                norm, self.group_size, self.bottle_ratio, self.se_ratio, drop_path_rate=rate, dtype=self.dtype,
                name=f'stages_{s}_{b}',
            )

        x = self.residual_stages(x, train, features, self.depths, block)
        x = conv(int(self.widths[-1] * self.final_conv_mult), 1, name='final_conv')(x)
        return gamma_gelu(x)


def _gain_to_ours(g: np.ndarray) -> np.ndarray:
    return np.reshape(g, (-1,))


def _gain_to_ref(g: np.ndarray) -> np.ndarray:
    return np.reshape(g, (-1, 1, 1, 1))


# timm's ScaledStdConv2dSame stores the gain as (out, 1, 1, 1); skipinit_gain is a scalar
# parameter of the block module itself.
register_leaf_kind(
    'nf_conv',
    {
        **LEAF_KINDS['conv'],
        'gain': LeafSpec('params', 'gain', _gain_to_ours, _gain_to_ref),
    },
)
register_leaf_kind('nf_block', {'skipinit_gain': LeafSpec('params', 'skipinit_gain')})

# timm state-dict names <-> ours.
register_name_map(
    'nfnet',
    (
        *flat('nf_conv', 'stem.conv{i}'),
        *flat('nf_block', 'stages.{s}.{b}'),
        *within('stages.{s}.{b}', 'stages_{s}_{b}', 'nf_conv', 'downsample.conv', 'conv{i}', 'conv2b'),
        NameRule('stages.{s}.{b}.attn_last.fc{i}', 'stages_{s}_{b}/attn_last/fc{i}', 'conv'),
        *flat('nf_conv', 'final_conv'),
        NameRule('head.fc', 'fc', 'linear'),
    ),
)


# Every NFNET_VARIANTS row is a registered model (parameter counts in the README table),
# evaluated by default at its train resolution.
for _name, (_depths, _train_res, _, _crop_pct, _top1) in NFNET_VARIANTS.items():
    register_model(
        name=_name, input_size=(_train_res, _train_res, 3), crop_pct=_crop_pct, interpolation='bicubic',
        top1=_top1, paper=_PAPER,
    )(functools.partial(NFNet, depths=_depths))
