"""Xception (the paper's network) and the aligned Xception-41/65/71 of DeepLab, as in timm.

Chollet, "Xception: Deep Learning with Depthwise Separable Convolutions", CVPR 2017, Fig. 5:
a 3x3/2 + 3x3 conv stem, an entry flow of three residual modules (128, 256, 728 channels,
each two separable convs and a 3x3/2 max-pool, 1x1/2 conv + BN shortcut), a middle flow of
eight modules of three separable 728-wide convs with identity shortcuts, and an exit flow
(728 -> 1024 module, then separable 1536 and 2048 convs). Registered as timm's
``legacy_xception`` (the Keras weights' port; 22,855,952 parameters, 299 px).

Chen et al., "Encoder-Decoder with Atrous Separable Convolution for Semantic Image
Segmentation" (DeepLab v3+), ECCV 2018, Sec. 3.2 / Fig. 4 modify it ("aligned Xception"):
max-pools become strided separable convs, every module has three separable convs with BN and
ReLU after both the depthwise and the pointwise conv, the middle flow is deeper (8 / 16 / 16
modules) and Xception-71 adds entry-flow modules. Registered as timm's ``xception41`` /
``xception65`` / ``xception71`` (26,969,560 / 39,916,312 / 42,338,736 parameters; BN eps
1e-3). timm's pre-activation ``xception41p`` / ``xception65p`` are not implemented.

Both families are built from module tables (:data:`LEGACY_BLOCKS`, :data:`ALIGNED_BLOCKS`);
the timm name maps follow from the same tables. Initialisation follows each reference:
kaiming-normal (fan_out) convs in the legacy net, torch's default (uniform +-1/sqrt(fan_in))
in the aligned ones, ``torch.nn.Linear``'s init for the classifier.

``drop_path_rate`` drops the residual branch of each module (linear over the modules, the
aligned nets' rule in timm; timm's legacy net has no drop path). Feature maps
(``return_features=True``): ``stem`` (stride 2), ``stage1``..``stage4`` (stride 4, 8, 16,
32: the last module at each resolution, the exit convs for ``stage4``), ``pre_logits``.
The legacy net's unpadded stem needs inputs >= 71 px (the paper's minimum in Keras).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax

from models import layers, registry
from models.convert import NameRule, flat, register_name_map, within

register_model = functools.partial(registry.register_model, family="xception")

_PAPER = 'Chollet, "Xception: Deep Learning with Depthwise Separable Convolutions", CVPR 2017'
_PAPER_ALIGNED = (
    'Chen et al., "Encoder-Decoder with Atrous Separable Convolution for Semantic Image '
    'Segmentation", ECCV 2018 (aligned Xception)'
)
_INCEPTION_MEAN = (0.5, 0.5, 0.5)


class LegacyBlock(NamedTuple):
    """One module of Fig. 5: ``reps`` x (ReLU, separable conv, BN), then a max-pool if strided.

    ``grow_first``: the first separable conv changes the width (entry flow); otherwise the
    last one does (the exit-flow module 728 -> 728 -> 1024). ``start_with_relu=False`` for
    the first module, which follows the stem's ReLU.
    """

    in_features: int
    features: int
    reps: int
    strides: int = 1
    start_with_relu: bool = True
    grow_first: bool = True


# Chollet 2017, Fig. 5 (timm ``block1`` .. ``block12``).
LEGACY_BLOCKS: tuple[LegacyBlock, ...] = (
    LegacyBlock(64, 128, 2, 2, start_with_relu=False),
    LegacyBlock(128, 256, 2, 2),
    LegacyBlock(256, 728, 2, 2),
    *(LegacyBlock(728, 728, 3) for _ in range(8)),
    LegacyBlock(728, 1024, 2, 2, grow_first=False),
)


class AlignedBlock(NamedTuple):
    """One aligned-Xception module: three separable convs of widths ``features`` (the last
    strided), a 1x1 conv + BN shortcut where the shape changes, or no skip at all."""

    in_features: int
    features: tuple[int, int, int]
    strides: int = 1
    no_skip: bool = False
    start_with_relu: bool = True


def _a(cin: int, cout: int | tuple[int, int, int], strides: int = 1, **kw) -> AlignedBlock:
    return AlignedBlock(cin, cout if isinstance(cout, tuple) else (cout,) * 3, strides, **kw)


def _aligned_exit() -> tuple[AlignedBlock, ...]:
    return (
        _a(728, (728, 1024, 1024), 2),
        _a(1024, (1536, 1536, 2048), no_skip=True, start_with_relu=False),
    )


# Chen et al. 2018, Fig. 4 and timm's xception_aligned.py block tables.
ALIGNED_BLOCKS: dict[int, tuple[AlignedBlock, ...]] = {
    41: (
        _a(64, 128, 2),
        _a(128, 256, 2),
        _a(256, 728, 2),
        *(_a(728, 728) for _ in range(8)),
        *_aligned_exit(),
    ),
    65: (
        _a(64, 128, 2),
        _a(128, 256, 2),
        _a(256, 728, 2),
        *(_a(728, 728) for _ in range(16)),
        *_aligned_exit(),
    ),
    71: (
        _a(64, 128, 2),
        _a(128, 256, 1),
        _a(256, 256, 2),
        _a(256, 728, 1),
        _a(728, 728, 2),
        *(_a(728, 728) for _ in range(16)),
        *_aligned_exit(),
    ),
}


def _legacy_rep_indices(block: LegacyBlock) -> list[tuple[int, int]]:
    """(separable conv, BN) positions of each rep in timm's ``rep`` Sequential.

    timm lists ReLU, separable conv, BN per rep and drops the leading ReLU when the module
    does not start with one, which shifts every index by one.
    """
    shift = 0 if block.start_with_relu else 1
    return [(3 * i + 1 - shift, 3 * i + 2 - shift) for i in range(block.reps)]


def _stage_ends(strides: tuple[int, ...]) -> list[bool]:
    """True for the last module at each resolution (a stride-2 module follows)."""
    return [i + 1 < len(strides) and strides[i + 1] > 1 for i in range(len(strides))]


class LegacyXceptionBlock(nn.Module):
    """A Fig. 5 module (see :class:`LegacyBlock`); names follow timm's ``rep`` indices.

    Attributes:
        cfg: the module's row of :data:`LEGACY_BLOCKS`.
        conv: conv constructor from :func:`layers.conv_factory`.
        norm: norm constructor from :func:`layers.norm_factory`.
        drop_path_rate: stochastic-depth rate of the residual branch.
        padding: padding mode of the strided max-pool (the convs pad in ``conv``'s mode).
    """

    cfg: LegacyBlock
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]
    drop_path_rate: float = 0.0
    padding: str = "symmetric"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c = self.cfg
        y = x
        cin = c.in_features
        for i, (sep, bn) in enumerate(_legacy_rep_indices(c)):
            if c.grow_first:
                cout = c.features
            else:
                cout = c.in_features if i < c.reps - 1 else c.features
            if i > 0 or c.start_with_relu:
                y = nn.relu(y)
            y = self.conv(cin, 3, feature_group_count=cin, name=f"rep{sep}_dw")(y)
            y = self.conv(cout, 1, name=f"rep{sep}_pw")(y)
            y = self.norm(name=f"rep{bn}")(y)
            cin = cout
        if c.strides != 1:
            pads = layers.get_padding(self.padding, 3, c.strides)
            y = nn.max_pool(y, (3, 3), (c.strides, c.strides), padding=pads)
        if c.strides != 1 or c.in_features != c.features:
            x = self.conv(c.features, 1, c.strides, name="skip")(x)
            x = self.norm(name="skipbn")(x)
        return x + layers.DropPath(self.drop_path_rate)(y, train)


class Xception(layers.ResidualClassifier):
    """The Xception of Chollet 2017, Fig. 5 (timm ``legacy_xception`` layout).

    Shared fields as :class:`layers.ResidualClassifier` (drop path linear over the
    modules); ``padding`` covers the padded convs and max-pools, the stem convs stay
    unpadded in both modes.

    Attributes:
        blocks: the module table (:data:`LEGACY_BLOCKS`).
    """

    blocks: tuple[LegacyBlock, ...] = LEGACY_BLOCKS

    def forward_features(self, x: jax.Array, train: bool, features: dict) -> jax.Array:
        conv, norm = self.make_conv(), self.make_norm(train)
        # The stem is unpadded in the paper's (Keras) network.
        x = nn.relu(norm(name="bn1")(conv(32, 3, 2, padding="valid", name="conv1")(x)))
        x = nn.relu(norm(name="bn2")(conv(64, 3, padding="valid", name="conv2")(x)))
        features["stem"] = x
        n = len(self.blocks)
        ends = _stage_ends(tuple(b.strides for b in self.blocks))
        stage = 1
        for i, cfg in enumerate(self.blocks):
            x = self.run_block(LegacyXceptionBlock(
                cfg, conv, norm, self.drop_path_at(i, n), self.padding, name=f"block{i + 1}"
            ), x, train)
            if ends[i]:
                features[f"stage{stage}"] = x
                stage += 1
        x = conv(1024, 3, feature_group_count=1024, name="conv3_dw")(x)
        x = nn.relu(norm(name="bn3")(conv(1536, 1, name="conv3_pw")(x)))
        x = conv(1536, 3, feature_group_count=1536, name="conv4_dw")(x)
        x = nn.relu(norm(name="bn4")(conv(2048, 1, name="conv4_pw")(x)))
        features[f"stage{stage}"] = x
        return x


class AlignedXceptionBlock(nn.Module):
    """An aligned-Xception module (timm ``XceptionModule``, see :class:`AlignedBlock`).

    Attributes:
        cfg: the module's row of :data:`ALIGNED_BLOCKS`.
        conv: conv constructor from :func:`layers.conv_factory`.
        norm: norm constructor from :func:`layers.norm_factory`.
        drop_path_rate: stochastic-depth rate of the residual branch.
    """

    cfg: AlignedBlock
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]
    drop_path_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c = self.cfg
        y = x
        cin = c.in_features
        for i, cout in enumerate(c.features):
            strides = c.strides if i == 2 else 1
            # Pre-activation ReLU before each separable conv, or (exit module) ReLU after
            # both of its norms instead.
            inner = nn.relu if not c.start_with_relu else (lambda v: v)
            if c.start_with_relu:
                y = nn.relu(y)
            y = self.conv(cin, 3, strides, feature_group_count=cin, name=f"conv{i + 1}_dw")(y)
            y = inner(self.norm(name=f"conv{i + 1}_bn_dw")(y))
            y = self.conv(cout, 1, name=f"conv{i + 1}_pw")(y)
            y = inner(self.norm(name=f"conv{i + 1}_bn_pw")(y))
            cin = cout
        if c.no_skip:
            return y
        if c.strides != 1 or c.in_features != c.features[-1]:
            x = self.conv(c.features[-1], 1, c.strides, name="shortcut_conv")(x)
            x = self.norm(name="shortcut_bn")(x)
        return x + layers.DropPath(self.drop_path_rate)(y, train)


class XceptionAligned(layers.ResidualClassifier):
    """Aligned Xception (DeepLab v3+), timm ``xception41/65/71`` layout, output stride 32.

    Shared fields as :class:`Xception`; ``padding`` covers every conv (the stem's included;
    there are no pools).

    Attributes:
        blocks: a row of :data:`ALIGNED_BLOCKS`.
    """

    blocks: tuple[AlignedBlock, ...] = ALIGNED_BLOCKS[65]

    HEAD = "head_fc"

    def forward_features(self, x: jax.Array, train: bool, features: dict) -> jax.Array:
        conv = self.make_conv(kernel_init=layers.torch_default_kernel_init)
        # timm: BatchNorm2d(eps=1e-3, momentum=0.1), the TF checkpoints' epsilon.
        norm = self.make_norm(train, epsilon=1e-3)
        x = nn.relu(norm(name="stem_0_bn")(conv(32, 3, 2, name="stem_0_conv")(x)))
        x = nn.relu(norm(name="stem_1_bn")(conv(64, 3, name="stem_1_conv")(x)))
        features["stem"] = x
        n = len(self.blocks)
        ends = _stage_ends(tuple(b.strides for b in self.blocks))
        stage = 1
        for i, cfg in enumerate(self.blocks):
            x = self.run_block(AlignedXceptionBlock(cfg, conv, norm, self.drop_path_at(i, n), name=f"blocks_{i}"), x, train)
            if ends[i]:
                features[f"stage{stage}"] = x
                stage += 1
        features[f"stage{stage}"] = x
        return x


# One family, two timm naming schemes: the rules cannot collide (legacy names start with
# conv/bn/block{n}/fc, aligned ones with stem/blocks/head).
register_name_map(
    "xception",
    (
        # legacy_xception
        *flat("conv", "conv{i}"),
        *flat("norm", "bn{i}"),
        *within("block{b}", "block{b}", "conv", "skip"),
        *within("block{b}", "block{b}", "norm", "skipbn"),
        NameRule("block{b}.rep.{i}.conv1", "block{b}/rep{i}_dw", "conv"),
        NameRule("block{b}.rep.{i}.pointwise", "block{b}/rep{i}_pw", "conv"),
        NameRule("block{b}.rep.{i}", "block{b}/rep{i}", "norm"),
        NameRule("conv{i}.conv1", "conv{i}_dw", "conv"),
        NameRule("conv{i}.pointwise", "conv{i}_pw", "conv"),
        *flat("linear", "fc"),
        # xception41/65/71
        *flat("conv", "stem.{i}.conv"),
        *flat("norm", "stem.{i}.bn"),
        *within("blocks.{b}", "blocks_{b}", "conv", "shortcut.conv"),
        *within("blocks.{b}", "blocks_{b}", "norm", "shortcut.bn"),
        NameRule("blocks.{b}.stack.conv{i}.conv_dw", "blocks_{b}/conv{i}_dw", "conv"),
        NameRule("blocks.{b}.stack.conv{i}.bn_dw", "blocks_{b}/conv{i}_bn_dw", "norm"),
        NameRule("blocks.{b}.stack.conv{i}.conv_pw", "blocks_{b}/conv{i}_pw", "conv"),
        NameRule("blocks.{b}.stack.conv{i}.bn_pw", "blocks_{b}/conv{i}_bn_pw", "norm"),
        *flat("linear", "head.fc"),
    ),
)

# Registered name -> (module, fields, ModelCfg fields); parameter counts in the README
# table. Data settings: timm's pretrained cfgs (tf_in1k for the aligned nets).
# legacy_xception's top1: the paper's Table 1 (Keras weights, 79.0%); neither timm's cfgs
# nor the DeepLab v3+ paper give a per-variant ImageNet top-1 of the aligned checkpoints.
_CFG = dict(input_size=(299, 299, 3), mean=_INCEPTION_MEAN, std=_INCEPTION_MEAN, interpolation="bicubic")
_ALIGNED_CFG = dict(crop_pct=0.903, paper=_PAPER_ALIGNED, classifier="head_fc", first_conv="stem_0_conv", **_CFG)
XCEPTION_MODELS: dict[str, tuple[type, dict[str, Any], dict[str, Any]]] = {
    "legacy_xception": (
        Xception, {}, dict(crop_pct=0.8975, top1=79.0, paper=_PAPER, classifier="fc", first_conv="conv1", **_CFG)
    ),
    "xception41": (XceptionAligned, dict(blocks=ALIGNED_BLOCKS[41]), _ALIGNED_CFG),
    "xception65": (XceptionAligned, dict(blocks=ALIGNED_BLOCKS[65]), _ALIGNED_CFG),
    "xception71": (XceptionAligned, dict(blocks=ALIGNED_BLOCKS[71]), _ALIGNED_CFG),
}

for _name, (_module, _fields, _cfg) in XCEPTION_MODELS.items():
    register_model(name=_name, **_cfg)(functools.partial(_module, **_fields))
