"""EfficientNet-B0..B7 and the Noisy Student EfficientNet-L2, in timm's layout.

Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks",
ICML 2019. The B0 network is Table 1 (seven stages of MBConv blocks with squeeze-excitation
and swish); B1..B7 scale it with the compound coefficients of the reference implementation
(width, depth, resolution, dropout), one row per variant in :data:`VARIANTS`. L2 is the wider
and deeper student of Xie et al., "Self-training with Noisy Student improves ImageNet
classification", CVPR 2020 (Sec. 3.1 / Table 2: 480M parameters, 88.4% top-1).

Scaling rules (as in the TF reference and timm): channels are ``width * c`` rounded to the
nearest multiple of 8, bumped up by 8 where rounding lost more than 10%; block repeats are
``ceil(depth * r)`` per stage. Block arguments are data: timm-style block strings such as
``'ir_r2_k3_s2_e6_c24_se0.25'`` decoded by :func:`decode_block`.

Two ports of the same architecture differ only in conventions, selected by ``padding``:

* ``'symmetric'`` (timm's ``efficientnet_b*``, trained in PyTorch): explicit symmetric
  padding ``k // 2`` (strided convs see one pixel less on the bottom/right than TF),
  BatchNorm eps 1e-5, torch momentum 0.1 (flax 0.9).
* ``'tf_same'`` (timm's ``tf_efficientnet_*``, ports of the TF / Noisy Student checkpoints):
  TensorFlow ``SAME`` padding, which at odd sizes pads one more pixel on the bottom/right
  than the top/left, BatchNorm eps 1e-3, momentum 0.99 (TF's ``batch_norm_momentum``).

Parameter counts equal timm's exactly at 1000 classes (B0 5,288,548 ... B7 66,347,960;
L2 480,309,308), and timm state dicts load with ``models.convert_state_dict``.

Initialisation follows the TF reference (timm's ``_init_weight_goog``): convs normal with
variance 2 / fan_out, where a depthwise conv's fan-out is ``k * k``; the classifier uniform
in +-1/sqrt(num_classes) with zero bias. The squeeze-excitation gate is the shared
:class:`layers.SqueezeExcite` (its layers are named ``fc1`` / ``fc2``, timm's
``conv_reduce`` / ``conv_expand``), whose biases start like torch's defaults rather than at 0.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers
from models.convert import NameRule, register_name_map
from models.registry import register_model

_PAPER = (
    'Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks", '
    'ICML 2019'
)
_PAPER_NS = (
    'Xie et al., "Self-training with Noisy Student improves ImageNet classification", CVPR 2020'
)

# EfficientNet-B0, Tan & Le 2019 Table 1: one block string per stage (stages 2-8 of the
# table; stage 1 is the stem and stage 9 the head). 'ds' is MBConv1 (no expansion conv),
# 'ir' MBConv6. se0.25: the SE bottleneck is 1/4 of the block's input channels.
EFFICIENTNET_ARCH: tuple[str, ...] = (
    'ds_r1_k3_s1_e1_c16_se0.25',
    'ir_r2_k3_s2_e6_c24_se0.25',
    'ir_r2_k5_s2_e6_c40_se0.25',
    'ir_r3_k3_s2_e6_c80_se0.25',
    'ir_r3_k5_s1_e6_c112_se0.25',
    'ir_r4_k5_s2_e6_c192_se0.25',
    'ir_r1_k3_s1_e6_c320_se0.25',
)


@dataclasses.dataclass(frozen=True)
class Scaling:
    """Compound-scaling coefficients of one variant (the reference's ``efficientnet_params``).

    Attributes:
        width: channel multiplier.
        depth: block-repeat multiplier.
        resolution: input resolution it is trained and evaluated at.
        dropout: dropout rate before the classifier.
    """

    width: float
    depth: float
    resolution: int
    dropout: float


# Tan & Le 2019 (coefficients of the released TF code, which Table 2's models use);
# L2: Xie et al. 2020, Sec. 3.1 (width 4.3, depth 5.3, trained at 800 px).
VARIANTS: dict[str, Scaling] = {
    'b0': Scaling(1.0, 1.0, 224, 0.2),
    'b1': Scaling(1.0, 1.1, 240, 0.2),
    'b2': Scaling(1.1, 1.2, 260, 0.3),
    'b3': Scaling(1.2, 1.4, 300, 0.3),
    'b4': Scaling(1.4, 1.8, 380, 0.4),
    'b5': Scaling(1.6, 2.2, 456, 0.4),
    'b6': Scaling(1.8, 2.6, 528, 0.5),
    'b7': Scaling(2.0, 3.1, 600, 0.5),
    'l2': Scaling(4.3, 5.3, 800, 0.5),
}

# BatchNorm (epsilon, flax momentum) of each padding convention; see the module docstring.
BN_ARGS: dict[str, tuple[float, float]] = {
    'symmetric': (1e-5, 0.9),
    'tf_same': (1e-3, 0.99),
}


@dataclasses.dataclass(frozen=True)
class BlockArgs:
    """One stage of blocks, as a timm block string describes it.

    Attributes:
        block: ``'ds'`` (depthwise-separable, MBConv1) or ``'ir'`` (inverted residual).
        repeats: blocks in the stage before depth scaling.
        kernel: depthwise kernel size.
        stride: stride of the stage's first block.
        expand: expansion ratio of the inverted residual (1 for 'ds').
        out_channels: output channels before width scaling.
        se_ratio: SE bottleneck width as a fraction of the block's input channels.
    """

    block: str
    repeats: int
    kernel: int
    stride: int
    expand: float
    out_channels: int
    se_ratio: float = 0.0


_BLOCK_OPTIONS = {
    'r': 'repeats',
    'k': 'kernel',
    's': 'stride',
    'e': 'expand',
    'c': 'out_channels',
    'se': 'se_ratio',
}


def decode_block(block_str: str) -> BlockArgs:
    """Decodes a timm block string, e.g. ``'ir_r2_k3_s2_e6_c24_se0.25'``.

    Only the options EfficientNet uses are accepted (type, r, k, s, e, c, se); anything
    else raises rather than being silently ignored.
    """
    block, *ops = block_str.split('_')
    if block not in ('ds', 'ir'):
        raise ValueError(f"block type must be 'ds' or 'ir', got {block!r} in {block_str!r}")
    values: dict[str, float] = {}
    for op in ops:
        m = re.fullmatch(r'([a-z]+)(\d+(?:\.\d+)?)', op)
        if not m or m.group(1) not in _BLOCK_OPTIONS:
            raise ValueError(f'unsupported option {op!r} in block string {block_str!r}')
        values[_BLOCK_OPTIONS[m.group(1)]] = float(m.group(2))
    missing = {'repeats', 'kernel', 'stride', 'out_channels'} - set(values)
    if missing:
        raise ValueError(f'block string {block_str!r} lacks {sorted(missing)}')
    return BlockArgs(
        block=block,
        repeats=int(values['repeats']),
        kernel=int(values['kernel']),
        stride=int(values['stride']),
        expand=values.get('expand', 1.0),
        out_channels=int(values['out_channels']),
        se_ratio=values.get('se_ratio', 0.0),
    )


def round_channels(channels: float, multiplier: float = 1.0, divisor: int = 8) -> int:
    """``channels * multiplier`` to the nearest multiple of ``divisor`` (TF ``round_filters``).

    Rounding never loses more than 10%: if it would, the result is bumped up one divisor.
    """
    value = channels * multiplier
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def scale_repeats(repeats: int, depth: float) -> int:
    """Blocks in a stage after depth scaling (ceil, as the TF ``round_repeats``)."""
    return int(math.ceil(repeats * depth))


# TF reference / timm ``_init_weight_goog``: normal with variance 2 / fan_out. For a
# depthwise HWIO kernel (k, k, 1, C) that fan-out is k * k per group, which is flax's fan_in.
_conv_init = layers.kaiming_normal_fan_out
_depthwise_init = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')


class DepthwiseSeparable(nn.Module):
    """MBConv1: depthwise conv, norm, swish, SE, 1x1 projection, norm (no activation).

    The residual (with drop path) is used when the block keeps shape, as in timm; B0's
    only such block follows a 32 -> 16 change, so it has none, but wider variants do.

    Attributes:
        out_channels: output channels.
        kernel: depthwise kernel size.
        strides: depthwise stride.
        se_channels: SE bottleneck width (0: no SE).
        conv: conv constructor from :func:`layers.conv_factory`.
        norm: norm constructor from :func:`layers.norm_factory`.
        act: activation.
        drop_path_rate: stochastic-depth rate of the residual branch.
        dtype: compute dtype (for the SE gate).
    """

    out_channels: int
    kernel: int
    strides: int
    se_channels: int
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]
    act: Callable[[jax.Array], jax.Array] = nn.swish
    drop_path_rate: float = 0.0
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        channels = x.shape[-1]
        y = self.conv(
            channels, self.kernel, self.strides, feature_group_count=channels,
            kernel_init=_depthwise_init, name='conv_dw',
        )(x)
        y = self.act(self.norm(name='bn1')(y))
        if self.se_channels:
            y = _squeeze_excite(self.se_channels, self.act, self.dtype)(y)
        y = self.conv(self.out_channels, 1, name='conv_pw')(y)
        y = self.norm(name='bn2')(y)
        return _residual(x, y, self.strides, self.drop_path_rate, train)


class InvertedResidual(nn.Module):
    """MBConv6 (Sandler et al. 2018 with SE): 1x1 expand, depthwise, SE, 1x1 linear projection.

    Attributes:
        out_channels: output channels.
        kernel: depthwise kernel size.
        strides: depthwise stride.
        expand: expansion ratio of the inner width.
        se_channels: SE bottleneck width (0: no SE).
        conv, norm, act, drop_path_rate, dtype: as :class:`DepthwiseSeparable`.
    """

    out_channels: int
    kernel: int
    strides: int
    expand: float
    se_channels: int
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]
    act: Callable[[jax.Array], jax.Array] = nn.swish
    drop_path_rate: float = 0.0
    dtype: layers.Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        mid = round_channels(x.shape[-1], self.expand)
        y = self.conv(mid, 1, name='conv_pw')(x)
        y = self.act(self.norm(name='bn1')(y))
        y = self.conv(
            mid, self.kernel, self.strides, feature_group_count=mid,
            kernel_init=_depthwise_init, name='conv_dw',
        )(y)
        y = self.act(self.norm(name='bn2')(y))
        if self.se_channels:
            y = _squeeze_excite(self.se_channels, self.act, self.dtype)(y)
        y = self.conv(self.out_channels, 1, name='conv_pwl')(y)
        y = self.norm(name='bn3')(y)
        return _residual(x, y, self.strides, self.drop_path_rate, train)


def _squeeze_excite(channels: int, act: Callable, dtype: layers.Dtype) -> nn.Module:
    # Swish inside the gate, as the TF reference (timm passes the block's activation).
    return layers.SqueezeExcite(
        rd_channels=channels, act=act, use_conv=True, dtype=dtype, name='se'
    )


def _residual(x: jax.Array, y: jax.Array, strides: int, rate: float, train: bool) -> jax.Array:
    if strides == 1 and x.shape[-1] == y.shape[-1]:
        return x + layers.DropPath(rate)(y, train)
    return y


class EfficientNet(nn.Module):
    """EfficientNet: stem, seven MBConv stages, 1x1 head conv, pool, dropout, classifier.

    Attributes:
        width_mult: channel multiplier (compound scaling).
        depth_mult: block-repeat multiplier (compound scaling).
        arch: block strings, one per stage (:data:`EFFICIENTNET_ARCH`).
        stem_width: stem channels before width scaling (32).
        head_width: head conv channels before width scaling (1280).
        num_classes: classifier size; 0 returns the pooled features instead of logits.
        norm: ``'batch'`` or ``'group'``.
        gn_groups: groups when ``norm='group'``.
        weight_std: weight-standardised convs (the SE gate's 1x1 layers stay plain).
        dtype: compute dtype; parameters and logits are float32.
        drop_rate: dropout rate before the classifier (per-variant default from
            :data:`VARIANTS`).
        drop_path_rate: stochastic depth; block ``i`` of ``n`` uses
            ``drop_path_rate * i / n`` (the reference's linear rule; 0.2 in the paper).
        padding: ``'symmetric'`` or ``'tf_same'``; also selects the BatchNorm epsilon and
            momentum of that port (:data:`BN_ARGS`) unless given below.
        bn_eps: BatchNorm / GroupNorm epsilon override.
        bn_momentum: BatchNorm running-average decay override (flax convention).
    """

    width_mult: float = 1.0
    depth_mult: float = 1.0
    arch: tuple[str, ...] = EFFICIENTNET_ARCH
    stem_width: int = 32
    head_width: int = 1280
    num_classes: int = 1000
    norm: str = 'batch'
    gn_groups: int = 32
    weight_std: bool = False
    dtype: layers.Dtype = jnp.float32
    drop_rate: float = 0.2
    drop_path_rate: float = 0.2
    padding: str = 'symmetric'
    bn_eps: float | None = None
    bn_momentum: float | None = None

    def stage_args(self) -> list[tuple[BlockArgs, int, int]]:
        """Per stage: (decoded block args, scaled repeats, scaled output channels)."""
        return [
            (
                args,
                scale_repeats(args.repeats, self.depth_mult),
                round_channels(args.out_channels, self.width_mult),
            )
            for args in map(decode_block, self.arch)
        ]

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
        """Applies the network to NHWC images.

        Args:
            x: images, (B, H, W, C).
            train: batch statistics, dropout and drop-path on.
            return_features: also return ``{'stem', 'stage1'..'stage7', 'pre_logits'}``.

        Returns:
            float32 logits (B, num_classes) (pooled features when ``num_classes == 0``),
            and the feature dict when ``return_features``.
        """
        if self.norm not in ('batch', 'group'):
            raise ValueError(f"EfficientNet norm must be 'batch' or 'group', got {self.norm!r}")
        if self.padding not in BN_ARGS:
            raise ValueError(
                f'EfficientNet padding must be one of {sorted(BN_ARGS)}, got {self.padding!r}'
            )
        eps, momentum = BN_ARGS[self.padding]
        eps = eps if self.bn_eps is None else self.bn_eps
        momentum = momentum if self.bn_momentum is None else self.bn_momentum
        conv = layers.conv_factory(
            self.weight_std, self.dtype, self.padding, kernel_init=_conv_init
        )
        norm = layers.norm_factory(
            self.norm, train, self.dtype, groups=self.gn_groups, momentum=momentum, epsilon=eps
        )
        act = nn.swish
        features = {}

        x = x.astype(self.dtype)
        x = conv(round_channels(self.stem_width, self.width_mult), 3, 2, name='conv_stem')(x)
        x = act(norm(name='bn1')(x))
        features['stem'] = x

        stages = self.stage_args()
        n_blocks = sum(repeats for _, repeats, _ in stages)
        index = 0
        for s, (args, repeats, out_channels) in enumerate(stages):
            for b in range(repeats):
                common = dict(
                    out_channels=out_channels,
                    kernel=args.kernel,
                    strides=args.stride if b == 0 else 1,
                    # Tan & Le 2019: the SE ratio is relative to the block *input* channels.
                    se_channels=round(x.shape[-1] * args.se_ratio),
                    conv=conv,
                    norm=norm,
                    act=act,
                    drop_path_rate=self.drop_path_rate * index / n_blocks,
                    dtype=self.dtype,
                    name=f'blocks_{s}_{b}',
                )
                if args.block == 'ds':
                    x = DepthwiseSeparable(**common)(x, train)
                else:
                    x = InvertedResidual(expand=args.expand, **common)(x, train)
                index += 1
            features[f'stage{s + 1}'] = x

        x = conv(round_channels(self.head_width, self.width_mult), 1, name='conv_head')(x)
        x = act(norm(name='bn2')(x))
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        features['pre_logits'] = x
        if self.num_classes:
            x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
            x = nn.Dense(
                self.num_classes,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                # TF reference dense init: uniform +-1/sqrt(num_classes), zero bias.
                kernel_init=nn.initializers.variance_scaling(1.0 / 3.0, 'fan_out', 'uniform'),
                bias_init=nn.initializers.zeros,
                name='classifier',
            )(x)
        x = x.astype(jnp.float32)
        return (x, features) if return_features else x


# timm state-dict names <-> ours. Norm layers keep timm's 'bn' names for GroupNorm too.
register_name_map(
    'efficientnet',
    (
        NameRule('conv_stem', 'conv_stem', 'conv'),
        NameRule('bn1', 'bn1', 'norm'),
        NameRule('blocks.{s}.{b}.conv_pw', 'blocks_{s}_{b}/conv_pw', 'conv'),
        NameRule('blocks.{s}.{b}.conv_dw', 'blocks_{s}_{b}/conv_dw', 'conv'),
        NameRule('blocks.{s}.{b}.conv_pwl', 'blocks_{s}_{b}/conv_pwl', 'conv'),
        NameRule('blocks.{s}.{b}.bn{i}', 'blocks_{s}_{b}/bn{i}', 'norm'),
        NameRule('blocks.{s}.{b}.se.conv_reduce', 'blocks_{s}_{b}/se/fc1', 'conv'),
        NameRule('blocks.{s}.{b}.se.conv_expand', 'blocks_{s}_{b}/se/fc2', 'conv'),
        NameRule('conv_head', 'conv_head', 'conv'),
        NameRule('bn2', 'bn2', 'norm'),
        NameRule('classifier', 'classifier', 'linear'),
    ),
)


def _efficientnet(variant: str, default_padding: str, **kwargs) -> EfficientNet:
    """EfficientNet ``variant`` with its port's padding unless ``kwargs`` override it."""
    sc = VARIANTS[variant]
    defaults = dict(
        width_mult=sc.width, depth_mult=sc.depth, drop_rate=sc.dropout, padding=default_padding
    )
    return EfficientNet(**{**defaults, **kwargs})


# Registered name -> (variant, padding, published top-1, citation). top1: Tan & Le 2019
# Table 2 (single crop, at the variant's resolution) for both ports -- timm ships no
# accuracies, and the tf_ ports are the paper's own checkpoints; L2: Xie et al. 2020
# Table 2. timm also has efficientnet_l2 (symmetric, no weights), not registered here.
_MODELS: dict[str, tuple[str, str, float, str]] = {
    **{
        f'{prefix}efficientnet_{v}': (v, padding, top1, _PAPER)
        for prefix, padding in (('', 'symmetric'), ('tf_', 'tf_same'))
        for v, top1 in zip(
            ('b0', 'b1', 'b2', 'b3', 'b4', 'b5', 'b6', 'b7'),
            (77.1, 79.1, 80.1, 81.6, 82.9, 83.6, 84.0, 84.3),
            strict=True,
        )
    },
    'tf_efficientnet_l2': ('l2', 'tf_same', 88.4, _PAPER_NS),
}


def _register(name: str, variant: str, default_padding: str, top1: float, paper: str) -> None:
    res = VARIANTS[variant].resolution

    def factory(**kwargs) -> EfficientNet:
        return _efficientnet(variant, default_padding, **kwargs)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f'EfficientNet-{variant.upper()} ({default_padding} padding), {res} px.'
    # Evaluation crop of the TF reference: resize to res + 32, centre crop res (timm's
    # tf_efficientnet cfgs give the same crop_pct, rounded to 3 digits).
    cfg = dict(input_size=(res, res, 3), crop_pct=res / (res + 32), interpolation='bicubic')
    globals()[name] = register_model(top1=top1, paper=paper, **cfg)(factory)


for _name, _row in _MODELS.items():
    _register(_name, *_row)

