"""EfficientNet-B0..B7 and the Noisy Student EfficientNet-L2, in timm's layout.

Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks",
ICML 2019. The B0 network is Table 1 (seven stages of MBConv blocks with squeeze-excitation
and swish); B1..B7 scale it with the compound coefficients of the reference implementation
(width, depth, resolution, dropout), one row per variant in :data:`VARIANTS`. L2 is the wider
and deeper student of Xie et al., "Self-training with Noisy Student improves ImageNet
classification", CVPR 2020 (Sec. 3.1 / Table 2: 480M parameters, 88.4% top-1).

Scaling rules (as in the TF reference and timm): channels are ``width * c`` rounded to the
nearest multiple of 8, bumped up by 8 where rounding lost more than 10%
(:func:`layers.make_divisible`); block repeats are
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
in +-1/sqrt(num_classes) with zero bias. The blocks are the mobile networks' MBConv
(:class:`models.mobilenet.MobileBlock`); the squeeze-excitation gate is the shared
:class:`layers.SqueezeExcite` (its layers are named ``fc1`` / ``fc2``, timm's
``conv_reduce`` / ``conv_expand``), whose biases start like torch's defaults rather than at 0.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import flax.linen as nn
import jax

from models import layers, registry
from models.convert import register_name_map
from models.mobilenet import TIMM_LAYOUT, Block, BodySpec, mobile_body, timm_rules

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


def scale_repeats(repeats: int, depth: float) -> int:
    """Blocks in a stage after depth scaling (ceil, as the TF ``round_repeats``)."""
    return int(math.ceil(repeats * depth))


class EfficientNet(layers.ResidualClassifier):
    """EfficientNet: stem, seven MBConv stages, 1x1 head conv, pool, dropout, classifier.

    Built by the mobile networks' body (:func:`models.mobilenet.mobile_body`, whose
    :class:`~models.mobilenet.MobileBlock` is the MBConv block) from the decoded block
    strings. Features: ``stem``, ``stage1``..``stage7``, ``pre_logits``. Shared fields as
    :class:`layers.ResidualClassifier`: ``drop_rate`` defaults per variant
    (:data:`VARIANTS`); block ``i`` of ``n`` drops its branch with ``drop_path_rate * i / n``
    (the reference's linear rule; 0.2 in the paper); ``padding`` (``'symmetric'`` or
    ``'tf_same'``) also selects the BatchNorm epsilon and momentum of that port
    (:data:`BN_ARGS`) unless given below; ``weight_std`` leaves the SE gate's layers plain.

    Attributes:
        width_mult: channel multiplier (compound scaling).
        depth_mult: block-repeat multiplier (compound scaling).
        arch: block strings, one per stage (:data:`EFFICIENTNET_ARCH`).
        stem_width: stem channels before width scaling (32).
        head_width: head conv channels before width scaling (1280).
        bn_eps: BatchNorm / GroupNorm epsilon override.
        bn_momentum: BatchNorm running-average decay override (flax convention).
    """

    width_mult: float = 1.0
    depth_mult: float = 1.0
    arch: tuple[str, ...] = EFFICIENTNET_ARCH
    stem_width: int = 32
    head_width: int = 1280
    bn_eps: float | None = None
    bn_momentum: float | None = None
    drop_rate: float = layers.kw_only(0.2)
    drop_path_rate: float = layers.kw_only(0.2)

    HEAD = 'classifier'
    # TF reference dense init: uniform +-1/sqrt(num_classes), zero bias.
    HEAD_INIT = (nn.initializers.variance_scaling(1.0 / 3.0, 'fan_out', 'uniform'), nn.initializers.zeros)

    def stage_args(self) -> list[tuple[BlockArgs, int, int]]:
        """Per stage: (decoded block args, scaled repeats, scaled output channels)."""
        return [
            (
                args,
                scale_repeats(args.repeats, self.depth_mult),
                layers.make_divisible(args.out_channels * self.width_mult),
            )
            for args in map(decode_block, self.arch)
        ]

    def forward_features(self, x: jax.Array, train: bool, features: dict) -> jax.Array:
        eps, momentum = BN_ARGS[self.padding]
        # Tan & Le 2019: the SE ratio is relative to the block *input* channels (the body's
        # se_from_exp=False); the gate's activation is the block's (swish), as the TF reference.
        arch = tuple(
            (Block(a.block, repeats, a.kernel, a.stride, a.expand, a.out_channels, se=a.se_ratio),)
            for a, repeats, _ in self.stage_args()
        )
        spec = BodySpec(
            arch=arch,
            width=self.width_mult,
            stem=layers.make_divisible(self.stem_width * self.width_mult),
            head_width=layers.make_divisible(self.head_width * self.width_mult),
            head='conv_norm',
            act='swish',
            se=lambda act: functools.partial(layers.SqueezeExcite, act=act, dtype=self.dtype),
            se_from_exp=False,
            se_rounding='round',
            layout=TIMM_LAYOUT,
            bn_momentum=momentum if self.bn_momentum is None else self.bn_momentum,
            bn_eps=eps if self.bn_eps is None else self.bn_eps,
        )
        return mobile_body(self, spec, x, train, features)


# timm state-dict names <-> ours. Norm layers keep timm's 'bn' names for GroupNorm too.
register_name_map('efficientnet', timm_rules(se_names=('fc1', 'fc2')))


def _efficientnet(variant: str, default_padding: str, **kwargs) -> EfficientNet:
    """EfficientNet ``variant`` with its port's padding unless ``kwargs`` override it."""
    sc = VARIANTS[variant]
    defaults = dict(
        width_mult=sc.width, depth_mult=sc.depth, drop_rate=sc.dropout, padding=default_padding
    )
    return EfficientNet(**{**defaults, **kwargs})


# Registered name -> (variant, padding, published top-1). top1: Tan & Le 2019 Table 2
# (single crop, at the variant's resolution) for both ports -- timm ships no accuracies,
# and the tf_ ports are the paper's own checkpoints; L2: Xie et al. 2020 Table 2. timm
# also has efficientnet_l2 (symmetric, no weights), not registered here.
EFFICIENTNET_MODELS: dict[str, tuple[str, str, float]] = {
    'efficientnet_b0': ('b0', 'symmetric', 77.1),
    'efficientnet_b1': ('b1', 'symmetric', 79.1),
    'efficientnet_b2': ('b2', 'symmetric', 80.1),
    'efficientnet_b3': ('b3', 'symmetric', 81.6),
    'efficientnet_b4': ('b4', 'symmetric', 82.9),
    'efficientnet_b5': ('b5', 'symmetric', 83.6),
    'efficientnet_b6': ('b6', 'symmetric', 84.0),
    'efficientnet_b7': ('b7', 'symmetric', 84.3),
    'tf_efficientnet_b0': ('b0', 'tf_same', 77.1),
    'tf_efficientnet_b1': ('b1', 'tf_same', 79.1),
    'tf_efficientnet_b2': ('b2', 'tf_same', 80.1),
    'tf_efficientnet_b3': ('b3', 'tf_same', 81.6),
    'tf_efficientnet_b4': ('b4', 'tf_same', 82.9),
    'tf_efficientnet_b5': ('b5', 'tf_same', 83.6),
    'tf_efficientnet_b6': ('b6', 'tf_same', 84.0),
    'tf_efficientnet_b7': ('b7', 'tf_same', 84.3),
    'tf_efficientnet_l2': ('l2', 'tf_same', 88.4),
}

for _name, (_variant, _padding, _top1) in EFFICIENTNET_MODELS.items():
    _res = VARIANTS[_variant].resolution
    # Evaluation crop of the TF reference: resize to res + 32, centre crop res (timm's
    # tf_efficientnet cfgs give the same crop_pct, rounded to 3 digits).
    registry.register_model(
        name=_name,
        family='efficientnet',
        classifier='classifier',
        first_conv='conv_stem',
        input_size=(_res, _res, 3),
        crop_pct=_res / (_res + 32),
        interpolation='bicubic',
        top1=_top1,
        paper=_PAPER_NS if _variant == 'l2' else _PAPER,
    )(functools.partial(_efficientnet, _variant, _padding))
