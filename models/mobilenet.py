"""MobileNet v1, v2 and v3: one network built from per-variant block tables.

* MobileNet v1: Howard et al., "MobileNets: Efficient Convolutional Neural Networks for
  Mobile Vision Applications", arXiv 2017. Body of Table 1 (a 3x3/2 stem and 13
  depthwise-separable layers, each depthwise 3x3 + BN + ReLU then pointwise 1x1 + BN +
  ReLU), width multipliers 1.0/0.75/0.5/0.25 of Table 6/7, in timm's form (ReLU6, the
  ``mobilenetv1_100`` naming). The paper gives 4.2M / 2.6M / 1.3M / 0.5M parameters (Table
  6/7, one significant decimal); ours are 4,231,976 / 2,585,560 / 1,331,592 / 470,072,
  equal at the paper's precision; within 1% for 1.0 and 0.75, while 0.5 and 0.25 are 2.4%
  and 6% from the two-digit figures (the paper rounds). ``mobilenetv1_100`` equals timm's
  count; the narrower widths have no reference model.
  Resolution is an input matter, not an architecture one: the paper's 192/160/128 rows of
  Table 7 are run with ``--config.image_size`` (the network is fully convolutional and
  globally pooled).
* MobileNet v2: Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks",
  CVPR 2018, Table 2 (t, c, n, s per stage), head 1280 (scaled for width > 1).
  ``mobilenet_v2`` is torchvision's (3,504,872 parameters, torchvision naming);
  ``mobilenetv2_140`` is timm's width-1.4 model (6,108,776 parameters, timm naming).
* MobileNet v3: Howard et al., "Searching for MobileNetV3", ICCV 2019, Table 1 (Large) and
  Table 2 (Small): hard-swish, squeeze-excite with a hard-sigmoid gate whose width is a
  quarter of the expanded width rounded to 8, and the "efficient last stage" (pool, then a
  biased 1x1 conv without norm). As timm's ``mobilenetv3_large_100`` / ``_small_100``
  (5,483,032 / 2,542,856 parameters, timm naming; torchvision's ``mobilenet_v3_*`` name
  their layers differently).

Channel counts follow timm's ``round_channels``: ``width * c`` rounded to the nearest
multiple of 8, bumped up one step if rounding lost more than 10% (torchvision's
``_make_divisible`` is the same rule, :func:`layers.make_divisible`), so all counts match
the references. The body (:func:`mobile_body`, :class:`MobileBlock`) is also EfficientNet's.

The variable names follow the reference whose weights a variant loads: timm's
``conv_stem`` / ``blocks.S.B.conv_pw`` / ``classifier`` for timm models, torchvision's
flat ``features.K`` for ``mobilenet_v2`` (selected by the :class:`Layout` field). The
layouts never share a path, so one family name map converts both ways without ambiguity.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers, registry
from models.convert import NameRule, flat, register_name_map, within

register_model = functools.partial(
    registry.register_model, family='mobilenet', classifier='classifier', first_conv='conv_stem'
)

_PAPER_V1 = (
    'Howard et al., "MobileNets: Efficient Convolutional Neural Networks for Mobile Vision '
    'Applications", arXiv 2017'
)
_PAPER_V2 = 'Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018'
_PAPER_V3 = 'Howard et al., "Searching for MobileNetV3", ICCV 2019'


def hard_sigmoid(x: jax.Array) -> jax.Array:
    """relu6(x + 3) / 6 (Howard et al. 2019, Eq. 2): a piecewise-linear sigmoid."""
    return jnp.clip(x + 3.0, 0.0, 6.0) / 6.0


def hard_swish(x: jax.Array) -> jax.Array:
    """x * relu6(x + 3) / 6 (Howard et al. 2019, Sec. 5.2)."""
    return x * hard_sigmoid(x)


@jax.custom_vjp
def swish(x: jax.Array) -> jax.Array:
    """``x * sigmoid(x)`` (``nn.swish``), whose backward pass recomputes the sigmoid from
    ``x``: autodiff keeps both ``x`` and ``sigmoid(x)``, an extra activation-sized write
    and read per layer on EfficientNet's expanded maps."""
    return x * nn.sigmoid(x)


def _swish_fwd(x):
    return swish(x), x


def _swish_bwd(x, g):
    s = nn.sigmoid(x)
    return (g * (s * (1 + x * (1 - s))),)


swish.defvjp(_swish_fwd, _swish_bwd)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'relu': nn.relu,
    'relu6': nn.relu6,
    'hard_swish': hard_swish,
    'hard_sigmoid': hard_sigmoid,
    'sigmoid': nn.sigmoid,
    'swish': swish,
}


# Depthwise kernels (kh, kw, 1, C): torch/timm initialise with fan_out = k*k*C / groups =
# k*k, which is flax's fan_in for this shape.
_depthwise_init = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')


class Block(NamedTuple):
    """One row of a block table (a run of ``repeats`` identical blocks).

    Attributes:
        kind: ``'ds'`` depthwise-separable (dw, pw-linear), ``'dsa'`` the same with an
            activation after the pointwise conv and never a skip (MobileNet v1),
            ``'ir'`` inverted residual (pw expand, dw, pw-linear), ``'cn'`` conv+norm+act.
        repeats: number of blocks; only the first strides.
        kernel: depthwise (or ``'cn'``) kernel size.
        stride: stride of the first block.
        exp: expansion ratio of ``'ir'`` blocks.
        out: output channels before width scaling.
        se: squeeze-excite width as a fraction of the block input (0: none).
        act: activation name, or None for the network's default.
        skip: allow the identity shortcut where shapes match.
    """

    kind: str
    repeats: int
    kernel: int
    stride: int
    exp: float
    out: int
    se: float = 0.0
    act: str | None = None
    skip: bool = True


Arch = tuple[tuple[Block, ...], ...]

# Howard et al. 2017, Table 1: 32-channel 3x3/2 stem, then dw/pw pairs.
MOBILENET_V1: Arch = (
    (Block('dsa', 1, 3, 1, 1, 64),),
    (Block('dsa', 2, 3, 2, 1, 128),),
    (Block('dsa', 2, 3, 2, 1, 256),),
    (Block('dsa', 6, 3, 2, 1, 512),),
    (Block('dsa', 2, 3, 2, 1, 1024),),
)

# Sandler et al. 2018, Table 2 (t, c, n, s); the t=1 first bottleneck is a 'ds' block.
MOBILENET_V2: Arch = (
    (Block('ds', 1, 3, 1, 1, 16),),
    (Block('ir', 2, 3, 2, 6, 24),),
    (Block('ir', 3, 3, 2, 6, 32),),
    (Block('ir', 4, 3, 2, 6, 64),),
    (Block('ir', 3, 3, 1, 6, 96),),
    (Block('ir', 3, 3, 2, 6, 160),),
    (Block('ir', 1, 3, 1, 6, 320),),
)

# Howard et al. 2019, Table 1 (exp size / #out as ratios); SE 0.25 of the expanded width.
MOBILENET_V3_LARGE: Arch = (
    (Block('ds', 1, 3, 1, 1, 16, act='relu'),),
    (Block('ir', 1, 3, 2, 4, 24, act='relu'), Block('ir', 1, 3, 1, 3, 24, act='relu')),
    (Block('ir', 3, 5, 2, 3, 40, se=0.25, act='relu'),),
    (Block('ir', 1, 3, 2, 6, 80), Block('ir', 1, 3, 1, 2.5, 80), Block('ir', 2, 3, 1, 2.3, 80)),
    (Block('ir', 2, 3, 1, 6, 112, se=0.25),),
    (Block('ir', 3, 5, 2, 6, 160, se=0.25),),
    (Block('cn', 1, 1, 1, 1, 960),),
)

# Howard et al. 2019, Table 2.
MOBILENET_V3_SMALL: Arch = (
    (Block('ds', 1, 3, 2, 1, 16, se=0.25, act='relu'),),
    (Block('ir', 1, 3, 2, 4.5, 24, act='relu'), Block('ir', 1, 3, 1, 3.67, 24, act='relu')),
    (Block('ir', 1, 5, 2, 4, 40, se=0.25), Block('ir', 2, 5, 1, 6, 40, se=0.25)),
    (Block('ir', 2, 5, 1, 3, 48, se=0.25),),
    (Block('ir', 3, 5, 2, 6, 96, se=0.25),),
    (Block('cn', 1, 1, 1, 1, 576),),
)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Names of the top-level modules, chosen to equal the reference's state-dict prefixes.

    Attributes:
        stem_conv: name of the stem conv.
        stem_norm: name of the stem norm.
        block: ``block(stage, index_in_stage, flat_index)`` -> name of a block.
        head_conv: name of the 1x1 head conv.
        head_norm: name of the head norm.
        classifier: name of the final dense layer.
    """

    stem_conv: str
    stem_norm: str
    block: Callable[[int, int, int], str]
    head_conv: str
    head_norm: str
    classifier: str


def _timm_block(stage: int, index: int, flat: int) -> str:
    del flat
    return f'blocks_{stage}_{index}'


def _torchvision_v2_block(stage: int, index: int, flat: int) -> str:
    del stage, index
    return f'features_{flat + 1}'


# timm's EfficientNet / MobileNetV3 classes (the head norm is unused by MobileNet v3).
TIMM_LAYOUT = Layout('conv_stem', 'bn1', _timm_block, 'conv_head', 'bn2', 'classifier')
# torchvision's MobileNetV2: features.0 stem, features.1..17 blocks, features.18 head.
TORCHVISION_V2_LAYOUT = Layout(
    'features_0_conv', 'features_0_norm', _torchvision_v2_block, 'features_18_conv', 'features_18_norm',
    'classifier_1',
)


def _se_width(mid_channels: int, ratio: float, exp: float, from_exp: bool, rounding: str) -> int:
    # timm's EfficientNet states the SE ratio relative to the block input but applies
    # ratio / exp to the (rounded) expanded width; MobileNet v3 applies it to the expanded
    # width directly (``se_from_exp``). Same arithmetic here keeps the counts equal.
    value = mid_channels * (ratio if from_exp else ratio / exp)
    return layers.make_divisible(value) if rounding == 'divisible' else round(value)


class MobileBlock(nn.Module):
    """One ``'ds'``/``'dsa'``/``'ir'``/``'cn'`` block (timm's names: conv_pw, bn1, ...): the
    MBConv of MobileNet v2/v3, MnasNet and EfficientNet (``'ir'``; ``'ds'`` is MBConv1).

    Attributes:
        kind: block kind (see :class:`Block`).
        features: output channels.
        kernel: depthwise (or ``'cn'``) kernel size.
        strides: stride.
        mid: expanded width of ``'ir'`` blocks.
        se_width: squeeze-excite bottleneck width (0: none).
        skip: identity shortcut (only where shapes match).
        act: block activation.
        se: constructor of the squeeze-excite module (a :class:`layers.SqueezeExcite`
            partial, called with ``rd_channels`` and ``name='se'``).
        conv: conv constructor from :func:`layers.conv_factory`.
        norm: norm constructor from :func:`layers.norm_factory`.
        drop_path_rate: stochastic depth of the residual branch.
    """

    kind: str
    features: int
    kernel: int
    strides: int
    mid: int
    se_width: int
    skip: bool
    act: Callable[[jax.Array], jax.Array]
    se: Callable[..., nn.Module] | None
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]
    drop_path_rate: float = 0.0

    def _depthwise(self, x: jax.Array, name: str) -> jax.Array:
        return self.conv(
            x.shape[-1], self.kernel, self.strides, feature_group_count=x.shape[-1],
            kernel_init=_depthwise_init, name=name,
        )(x)

    def _se(self, x: jax.Array) -> jax.Array:
        return self.se(rd_channels=self.se_width, name='se')(x) if self.se_width else x

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        shortcut = x
        if self.kind == 'cn':
            y = self.act(self.norm(name='bn1')(self.conv(self.features, self.kernel, self.strides, name='conv')(x)))
        elif self.kind in ('ds', 'dsa'):
            y = self.act(self.norm(name='bn1')(self._depthwise(x, 'conv_dw')))
            y = self._se(y)
            y = self.norm(name='bn2')(self.conv(self.features, 1, name='conv_pw')(y))
            if self.kind == 'dsa':
                y = self.act(y)
        elif self.kind == 'ir':
            y = self.act(self.norm(name='bn1')(self.conv(self.mid, 1, name='conv_pw')(x)))
            y = self.act(self.norm(name='bn2')(self._depthwise(y, 'conv_dw')))
            y = self._se(y)
            y = self.norm(name='bn3')(self.conv(self.features, 1, name='conv_pwl')(y))
        else:
            raise ValueError(f'unknown block kind {self.kind!r}')
        if self.skip and self.strides == 1 and x.shape[-1] == self.features:
            return shortcut + layers.DropPath(self.drop_path_rate)(y, train)
        return y


@dataclasses.dataclass(frozen=True)
class BodySpec:
    """What :func:`mobile_body` builds: a MobileNet's fields, or another family's (EfficientNet)
    translated into them.

    Attributes:
        arch: block table (output widths before ``width`` scaling).
        width: channel multiplier of the blocks.
        stem: stem channels.
        head_width: channels of the head conv (0: none).
        head: ``'conv_norm'`` or ``'efficient'`` (see :class:`MobileNet`).
        act: default activation name.
        se: block activation -> squeeze-excite constructor (see :class:`MobileBlock`).
        se_from_exp: SE ratio relative to the expanded width, else to the block input.
        se_rounding: ``'round'`` or ``'divisible'`` (to 8).
        layout: module names.
        bn_momentum: flax BatchNorm momentum.
        bn_eps: norm epsilon.
    """

    arch: Arch
    width: float
    stem: int
    head_width: int
    head: str
    act: str
    se: Callable[[Callable[[jax.Array], jax.Array]], Callable[..., nn.Module]]
    se_from_exp: bool
    se_rounding: str
    layout: Layout
    bn_momentum: float
    bn_eps: float


def mobile_body(
    model: layers.ResidualClassifier, spec: BodySpec, x: jax.Array, train: bool, features: dict
) -> jax.Array:
    """Stem, the MBConv stages of ``spec.arch`` and the head of a mobile network, in
    ``model``'s scope; block ``i`` of ``n`` drops its branch with ``drop_path_rate * i / n``
    (timm's rule for these networks). Returns the map to pool, or the pooled vector after
    the efficient head."""
    conv = model.make_conv()
    norm = model.make_norm(train, momentum=spec.bn_momentum, epsilon=spec.bn_eps)
    act = ACTIVATIONS[spec.act]
    names = spec.layout

    x = act(norm(name=names.stem_norm)(conv(spec.stem, 3, 2, name=names.stem_conv)(x)))
    features['stem'] = x

    n_blocks = sum(row.repeats for stage in spec.arch for row in stage)
    flat = 0
    for s, stage in enumerate(spec.arch):
        index = 0
        for row in stage:
            block_act = ACTIVATIONS[row.act or spec.act]
            for r in range(row.repeats):
                in_ch = x.shape[-1]
                mid = layers.make_divisible(in_ch * row.exp) if row.kind == 'ir' else in_ch
                se_width = _se_width(mid, row.se, row.exp, spec.se_from_exp, spec.se_rounding) if row.se else 0
                x = model.run_block(MobileBlock(
                    kind=row.kind,
                    features=layers.make_divisible(row.out * spec.width),
                    kernel=row.kernel,
                    strides=row.stride if r == 0 else 1,
                    mid=mid,
                    se_width=se_width,
                    skip=row.skip and row.kind != 'dsa',
                    act=block_act,
                    se=spec.se(block_act) if se_width else None,
                    conv=conv,
                    norm=norm,
                    drop_path_rate=model.drop_path_rate * flat / n_blocks,
                    name=names.block(s, index, flat),
                ), x, train)
                index += 1
                flat += 1
        features[f'stage{s + 1}'] = x

    if spec.head == 'conv_norm' and spec.head_width:
        x = act(norm(name=names.head_norm)(conv(spec.head_width, 1, name=names.head_conv)(x)))
    elif spec.head == 'efficient' and spec.head_width:
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True)
        # A plain biased conv: no norm follows it, so weight standardisation (whose scale
        # a norm would undo) is not applied here.
        x = nn.Conv(
            spec.head_width, (1, 1), dtype=model.dtype, param_dtype=jnp.float32, name=names.head_conv
        )(x.astype(model.dtype))
        x = act(x).astype(jnp.float32).reshape(x.shape[0], -1)
    return x


class MobileNet(layers.ResidualClassifier):
    """Stem, a table of mobile blocks, a head and a classifier (MobileNet v1/v2/v3, MnasNet).

    Features: ``stem``, ``stage1``.. (one per row group of ``arch``), ``pre_logits``. Shared
    fields as :class:`layers.ResidualClassifier`; block ``i`` of ``n`` drops its residual
    branch with ``drop_path_rate * i / n`` (timm's rule for these networks).

    Attributes:
        arch: block table, one tuple of :class:`Block` rows per stage.
        width: channel multiplier of every block (and the stem unless ``fix_stem``).
        stem_width: stem channels before scaling.
        fix_stem: keep the stem at ``stem_width``.
        head_width: channels of the 1x1 head conv, used as given; 0 for no head conv.
        head: ``'conv_norm'`` (conv, norm, act before pooling: v2, MnasNet) or
            ``'efficient'`` (pool, biased conv, act: v3's efficient last stage).
        act: default activation (blocks may override it in the table).
        se_act: activation inside SE modules; None uses the block's.
        se_gate: SE gate: ``'sigmoid'`` or ``'hard_sigmoid'``.
        se_rounding: SE width rounding: ``'round'`` (MnasNet) or ``'divisible'`` (v3, to 8).
        se_from_exp: SE ratio relative to the expanded width (v3) instead of the block
            input (MnasNet).
        layout: module names (see :class:`Layout`).
        bn_momentum: flax BatchNorm momentum (0.9 is torch's 0.1).
        bn_eps: norm epsilon.
    """

    arch: Arch
    width: float = 1.0
    stem_width: int = 32
    fix_stem: bool = False
    head_width: int = 1280
    head: str = 'conv_norm'
    act: str = 'relu6'
    se_act: str | None = None
    se_gate: str = 'sigmoid'
    se_rounding: str = 'round'
    se_from_exp: bool = False
    layout: Layout = TIMM_LAYOUT
    bn_momentum: float = 0.9
    bn_eps: float = 1e-5

    CHOICES = {
        'head': ('conv_norm', 'efficient'),
        'act': tuple(ACTIVATIONS),
        'se_act': (None, *ACTIVATIONS),
        'se_gate': tuple(ACTIVATIONS),
        'se_rounding': ('round', 'divisible'),
    }

    def se_module(self, block_act: Callable[[jax.Array], jax.Array]) -> Callable[..., nn.Module]:
        # timm's efficient-block SE: plain biased 1x1 convs with flax's default init.
        return functools.partial(
            layers.SqueezeExcite, names=('conv_reduce', 'conv_expand'),
            act=ACTIVATIONS[self.se_act] if self.se_act else block_act, gate=ACTIVATIONS[self.se_gate],
            kernel_init=nn.initializers.lecun_normal(), bias_init=nn.initializers.zeros, dtype=self.dtype,
        )

    def forward_features(self, x: jax.Array, train: bool, features: dict) -> jax.Array:
        stem = self.stem_width if self.fix_stem else layers.make_divisible(self.stem_width * self.width)
        spec = BodySpec(
            self.arch, self.width, stem, self.head_width, self.head, self.act, self.se_module,
            self.se_from_exp, self.se_rounding, self.layout, self.bn_momentum, self.bn_eps,
        )
        return mobile_body(self, spec, x, train, features)

    def classifier(self, x: jax.Array, train: bool, **kwargs) -> jax.Array:
        return super().classifier(x, train, name=self.layout.classifier)


# Rows shared by every timm-named efficient network (also used by models/mnasnet.py).
# (EfficientNet's differ only in its SE layers' names, ``se/fc1`` / ``se/fc2``.)
def timm_rules(se_names: tuple[str, str] = ('conv_reduce', 'conv_expand')) -> tuple[NameRule, ...]:
    """timm's ``conv_stem`` / ``blocks.S.B.conv_pw`` / ``classifier`` names <-> ours."""
    block = ('blocks.{s}.{b}', 'blocks_{s}_{b}')
    return (
        *flat('conv', 'conv_stem'),
        *flat('norm', 'bn1'),
        *within(*block, 'conv', 'conv_pw', 'conv_dw', 'conv_pwl', 'conv'),
        *within(*block, 'norm', 'bn{i}'),
        NameRule('blocks.{s}.{b}.se.conv_reduce', f'blocks_{{s}}_{{b}}/se/{se_names[0]}', 'conv'),
        NameRule('blocks.{s}.{b}.se.conv_expand', f'blocks_{{s}}_{{b}}/se/{se_names[1]}', 'conv'),
        *flat('conv', 'conv_head'),
        *flat('norm', 'bn2'),
        *flat('linear', 'classifier'),
    )


TIMM_RULES = timm_rules()

register_name_map(
    'mobilenet',
    TIMM_RULES
    + (
        # torchvision mobilenet_v2: the t=1 first block has no expansion conv, so its
        # indices differ from the other blocks' (listed first: first match wins).
        NameRule('features.1.conv.0.0', 'features_1/conv_dw', 'conv'),
        NameRule('features.1.conv.0.1', 'features_1/bn1', 'norm'),
        NameRule('features.1.conv.1', 'features_1/conv_pw', 'conv'),
        NameRule('features.1.conv.2', 'features_1/bn2', 'norm'),
        NameRule('features.{k}.conv.0.0', 'features_{k}/conv_pw', 'conv'),
        NameRule('features.{k}.conv.0.1', 'features_{k}/bn1', 'norm'),
        NameRule('features.{k}.conv.1.0', 'features_{k}/conv_dw', 'conv'),
        NameRule('features.{k}.conv.1.1', 'features_{k}/bn2', 'norm'),
        NameRule('features.{k}.conv.2', 'features_{k}/conv_pwl', 'conv'),
        NameRule('features.{k}.conv.3', 'features_{k}/bn3', 'norm'),
        NameRule('features.{k}.0', 'features_{k}_conv', 'conv'),
        NameRule('features.{k}.1', 'features_{k}_norm', 'norm'),
        *flat('linear', 'classifier.1'),
    ),
)


def _v1(width: float) -> dict[str, Any]:
    return dict(arch=MOBILENET_V1, width=width, head_width=0)


def _v3(arch: Arch, **fields) -> dict[str, Any]:
    return dict(
        arch=arch, stem_width=16, head='efficient', act='hard_swish', se_act='relu', se_gate='hard_sigmoid',
        se_rounding='divisible', se_from_exp=True, **fields,
    )


# MobileNet v1: timm's data cfg of mobilenetv1_100.ra4_e3600_r224_in1k (mean/std 0.5); top1 =
# paper, Table 6/7 at 224 px (timm ships no accuracy in its cfgs). Parameters (README table)
# vs the paper's Table 6: 4.2M / 2.6M / 1.3M / 0.5M.
_V1_CFG = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation='bicubic', paper=_PAPER_V1)
# timm data cfgs (bicubic, crop 0.875); top1 = paper, Table 4 (MobileNetV2 1.4) and Table 3
# (v3 Large 1.0 / Small 1.0).
_V2_CFG = dict(interpolation='bicubic', paper=_PAPER_V2)
_V3_CFG = dict(interpolation='bicubic', paper=_PAPER_V3)

# Registered name -> (MobileNet fields, ModelCfg fields); parameter counts in the README table.
MOBILENET_MODELS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    'mobilenetv1_100': (_v1(1.0), dict(top1=70.6, **_V1_CFG)),
    'mobilenetv1_075': (_v1(0.75), dict(top1=68.4, **_V1_CFG)),
    'mobilenetv1_050': (_v1(0.5), dict(top1=63.7, **_V1_CFG)),
    'mobilenetv1_025': (_v1(0.25), dict(top1=50.6, **_V1_CFG)),
    # torchvision's (dropout 0.2, its names); top1 of its IMAGENET1K_V1 weights (224 px,
    # resize 256 bilinear).
    'mobilenet_v2': (
        dict(arch=MOBILENET_V2, layout=TORCHVISION_V2_LAYOUT, drop_rate=0.2),
        dict(top1=71.878, paper=_PAPER_V2, classifier='classifier_1', first_conv='features_0_conv'),
    ),
    # timm's; head 1792 = round(1.4 * 1280).
    'mobilenetv2_140': (
        dict(arch=MOBILENET_V2, width=1.4, head_width=layers.make_divisible(1280 * 1.4)), dict(top1=74.7, **_V2_CFG)
    ),
    'mobilenetv3_large_100': (_v3(MOBILENET_V3_LARGE), dict(top1=75.2, **_V3_CFG)),
    'mobilenetv3_small_100': (_v3(MOBILENET_V3_SMALL, head_width=1024), dict(top1=67.4, **_V3_CFG)),
}

for _name, (_fields, _cfg) in MOBILENET_MODELS.items():
    register_model(name=_name, **_cfg)(functools.partial(MobileNet, **_fields))
