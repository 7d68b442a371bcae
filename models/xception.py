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

from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers
from models.convert import NameRule, register_name_map
from models.registry import register_model

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


def _classifier(model: nn.Module, x: jax.Array, train: bool, name: str) -> jax.Array:
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    if not model.num_classes:
        return x
    return layers.classifier_head(
        x, model.num_classes, drop_rate=model.drop_rate, train=train, dtype=model.dtype, name=name
    )


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


class Xception(nn.Module):
    """The Xception of Chollet 2017, Fig. 5 (timm ``legacy_xception`` layout).

    Attributes:
        blocks: the module table (:data:`LEGACY_BLOCKS`).
        num_classes: classifier size; 0 returns the pooled features instead of logits.
        norm: ``'batch'`` or ``'group'``.
        gn_groups: groups when ``norm='group'``.
        weight_std: weight-standardised convs (BiT).
        dtype: compute dtype; parameters and logits are float32.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth of the residual modules (linear over modules).
        padding: padding mode of the padded convs and max-pools (see
            :func:`layers.get_padding`); the stem convs stay unpadded in both modes.
    """

    blocks: tuple[LegacyBlock, ...] = LEGACY_BLOCKS
    num_classes: int = 1000
    norm: str = "batch"
    gn_groups: int = 32
    weight_std: bool = False
    dtype: layers.Dtype = jnp.float32
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    padding: str = "symmetric"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
        """NHWC images -> float32 logits (and the feature dict when ``return_features``)."""
        layers.check_model_padding(self.padding, type(self).__name__)
        conv = layers.conv_factory(self.weight_std, self.dtype, self.padding)
        norm = layers.norm_factory(self.norm, train, self.dtype, groups=self.gn_groups)
        features = {}
        x = x.astype(self.dtype)
        # The stem is unpadded in the paper's (Keras) network.
        x = nn.relu(norm(name="bn1")(conv(32, 3, 2, padding="valid", name="conv1")(x)))
        x = nn.relu(norm(name="bn2")(conv(64, 3, padding="valid", name="conv2")(x)))
        features["stem"] = x
        n = len(self.blocks)
        ends = _stage_ends(tuple(b.strides for b in self.blocks))
        stage = 1
        for i, cfg in enumerate(self.blocks):
            x = LegacyXceptionBlock(
                cfg,
                conv,
                norm,
                self.drop_path_rate * i / max(n - 1, 1),
                self.padding,
                name=f"block{i + 1}",
            )(x, train)
            if ends[i]:
                features[f"stage{stage}"] = x
                stage += 1
        x = conv(1024, 3, feature_group_count=1024, name="conv3_dw")(x)
        x = nn.relu(norm(name="bn3")(conv(1536, 1, name="conv3_pw")(x)))
        x = conv(1536, 3, feature_group_count=1536, name="conv4_dw")(x)
        x = nn.relu(norm(name="bn4")(conv(2048, 1, name="conv4_pw")(x)))
        features[f"stage{stage}"] = x
        x = _classifier(self, x, train, "fc")
        if return_features:
            features["pre_logits"] = jnp.mean(
                features[f"stage{stage}"].astype(jnp.float32), axis=(1, 2)
            )
        return (x, features) if return_features else x


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


class XceptionAligned(nn.Module):
    """Aligned Xception (DeepLab v3+), timm ``xception41/65/71`` layout, output stride 32.

    Attributes: as :class:`Xception`; ``blocks`` is a row of :data:`ALIGNED_BLOCKS`, and
    ``padding`` covers every conv (the stem's included; there are no pools).
    """

    blocks: tuple[AlignedBlock, ...] = ALIGNED_BLOCKS[65]
    num_classes: int = 1000
    norm: str = "batch"
    gn_groups: int = 32
    weight_std: bool = False
    dtype: layers.Dtype = jnp.float32
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    padding: str = "symmetric"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
        """NHWC images -> float32 logits (and the feature dict when ``return_features``)."""
        layers.check_model_padding(self.padding, type(self).__name__)
        conv = layers.conv_factory(
            self.weight_std, self.dtype, self.padding, kernel_init=layers.torch_default_kernel_init
        )
        # timm: BatchNorm2d(eps=1e-3, momentum=0.1), the TF checkpoints' epsilon.
        norm = layers.norm_factory(
            self.norm, train, self.dtype, groups=self.gn_groups, epsilon=1e-3
        )
        features = {}
        x = x.astype(self.dtype)
        x = nn.relu(norm(name="stem_0_bn")(conv(32, 3, 2, name="stem_0_conv")(x)))
        x = nn.relu(norm(name="stem_1_bn")(conv(64, 3, name="stem_1_conv")(x)))
        features["stem"] = x
        n = len(self.blocks)
        ends = _stage_ends(tuple(b.strides for b in self.blocks))
        stage = 1
        for i, cfg in enumerate(self.blocks):
            x = AlignedXceptionBlock(
                cfg, conv, norm, self.drop_path_rate * i / max(n - 1, 1), name=f"blocks_{i}"
            )(x, train)
            if ends[i]:
                features[f"stage{stage}"] = x
                stage += 1
        features[f"stage{stage}"] = x
        x = _classifier(self, x, train, "head_fc")
        if return_features:
            features["pre_logits"] = jnp.mean(
                features[f"stage{stage}"].astype(jnp.float32), axis=(1, 2)
            )
        return (x, features) if return_features else x


# One family, two timm naming schemes: the rules cannot collide (legacy names start with
# conv/bn/block{n}/fc, aligned ones with stem/blocks/head).
register_name_map(
    "xception",
    (
        # legacy_xception
        NameRule("conv{i}", "conv{i}", "conv"),
        NameRule("bn{i}", "bn{i}", "norm"),
        NameRule("block{b}.skip", "block{b}/skip", "conv"),
        NameRule("block{b}.skipbn", "block{b}/skipbn", "norm"),
        NameRule("block{b}.rep.{i}.conv1", "block{b}/rep{i}_dw", "conv"),
        NameRule("block{b}.rep.{i}.pointwise", "block{b}/rep{i}_pw", "conv"),
        NameRule("block{b}.rep.{i}", "block{b}/rep{i}", "norm"),
        NameRule("conv{i}.conv1", "conv{i}_dw", "conv"),
        NameRule("conv{i}.pointwise", "conv{i}_pw", "conv"),
        NameRule("fc", "fc", "linear"),
        # xception41/65/71
        NameRule("stem.{i}.conv", "stem_{i}_conv", "conv"),
        NameRule("stem.{i}.bn", "stem_{i}_bn", "norm"),
        NameRule("blocks.{b}.shortcut.conv", "blocks_{b}/shortcut_conv", "conv"),
        NameRule("blocks.{b}.shortcut.bn", "blocks_{b}/shortcut_bn", "norm"),
        NameRule("blocks.{b}.stack.conv{i}.conv_dw", "blocks_{b}/conv{i}_dw", "conv"),
        NameRule("blocks.{b}.stack.conv{i}.bn_dw", "blocks_{b}/conv{i}_bn_dw", "norm"),
        NameRule("blocks.{b}.stack.conv{i}.conv_pw", "blocks_{b}/conv{i}_pw", "conv"),
        NameRule("blocks.{b}.stack.conv{i}.bn_pw", "blocks_{b}/conv{i}_bn_pw", "norm"),
        NameRule("head.fc", "head_fc", "linear"),
    ),
)

_ALIGNED_CFG = dict(
    input_size=(299, 299, 3),
    mean=_INCEPTION_MEAN,
    std=_INCEPTION_MEAN,
    interpolation="bicubic",
    paper=_PAPER_ALIGNED,
)


# Data settings: timm's pretrained cfgs. top1: the paper's Table 1 (Keras weights, 79.0%).
@register_model(
    input_size=(299, 299, 3),
    mean=_INCEPTION_MEAN,
    std=_INCEPTION_MEAN,
    crop_pct=0.8975,
    interpolation="bicubic",
    top1=79.0,
    paper=_PAPER,
)
def legacy_xception(**kwargs) -> Xception:
    """Xception (Chollet 2017, Fig. 5), 22,855,952 parameters."""
    return Xception(**kwargs)


# Data settings: timm's tf_in1k pretrained cfgs. Neither timm's cfgs nor the DeepLab v3+
# paper give a per-variant ImageNet top-1 of these checkpoints, so top1 is left unset.
@register_model(crop_pct=0.903, **_ALIGNED_CFG)
def xception41(**kwargs) -> XceptionAligned:
    """Aligned Xception-41, 26,969,560 parameters."""
    return XceptionAligned(**{"blocks": ALIGNED_BLOCKS[41], **kwargs})


@register_model(crop_pct=0.903, **_ALIGNED_CFG)
def xception65(**kwargs) -> XceptionAligned:
    """Aligned Xception-65, 39,916,312 parameters."""
    return XceptionAligned(**{"blocks": ALIGNED_BLOCKS[65], **kwargs})


@register_model(crop_pct=0.903, **_ALIGNED_CFG)
def xception71(**kwargs) -> XceptionAligned:
    """Aligned Xception-71, 42,338,736 parameters."""
    return XceptionAligned(**{"blocks": ALIGNED_BLOCKS[71], **kwargs})
