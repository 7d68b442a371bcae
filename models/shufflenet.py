"""ShuffleNet v2 (torchvision layout) and ShuffleNet v1 (from the paper).

ShuffleNet v2: Ma, Zhang, Zheng, Sun, "ShuffleNet V2: Practical Guidelines for Efficient CNN
Architecture Design", ECCV 2018, Table 5 and Fig. 3(c)/(d): a 3x3/2 conv (24) and 3x3/2
max-pool stem, three stages of 4 / 8 / 4 units and a 1x1 conv (1024, 2048 at 2x) before the
pool. A stride-1 unit splits the channels in half, transforms one half (1x1, 3x3 depthwise,
1x1) and concatenates; a stride-2 unit transforms both halves (the left one by a 3x3/2
depthwise + 1x1), doubling the width. Both end with a channel shuffle of two groups.
Registered as torchvision's ``shufflenet_v2_x0_5`` / ``x1_0`` / ``x1_5`` / ``x2_0`` with
1,366,792 / 2,278,604 / 3,503,624 / 7,393,996 parameters, equal to torchvision's, so its
weights load with ``models.convert_state_dict``.

ShuffleNet v1: Zhang, Zhou, Lin, Sun, "ShuffleNet: An Extremely Efficient Convolutional
Neural Network for Mobile Devices", CVPR 2018, Table 1 and Fig. 2(b)/(c), at 1.0x with
g = 1, 2, 3, 4, 8 groups (``shufflenet_v1_g{g}``). A unit is a grouped 1x1 conv to a
bottleneck of 1/4 of the unit's output width, a channel shuffle, a 3x3 depthwise conv and a
grouped 1x1 conv; stride-1 units add the input (then ReLU), stride-2 units concatenate a
3x3/2 average pool of it (so the branch produces ``out - in`` channels). As the paper says
(Sec. 3.3), the first 1x1 conv of stage 2 is not grouped (its input has only 24
channels). There is no reference implementation in timm or torchvision and the paper
gives complexity, not parameter counts: Table 1's complexity column (143 / 140 / 137 /
133 / 137 MFLOPs for g = 1 / 2 / 3 / 4 / 8, multiply-adds at 224 px) is what these
networks are checked against. Ours, counted exactly from the forward pass at 224 px
(convolutions and the classifier): 143.1 / 140.8 / 137.5 / 134.3 / 138.4 M multiply-adds, all
within 1% of the table, and 1,531,936 / 1,733,848 / 1,865,728 / 1,968,344 / 2,434,768
parameters (the paper states no parameter counts).

All convs are bias-free and followed by BN (eps 1e-5, torch momentum 0.1); only the 3x3
depthwise convs have no ReLU after them (Fig. 2 / Fig. 3 of the papers). Initialisation is
torch's default, as torchvision leaves it: kernels uniform +-1/sqrt(fan_in), classifier like
``torch.nn.Linear``. ShuffleNet v1 stride-1 units are residual and support
``drop_path_rate``; v2 units have no residual addition (concatenation), so v2 has no
``drop_path_rate``.

Feature maps (``return_features=True``): ``stem`` (after the max-pool, stride 4),
``stage1``..``stage3`` (torchvision's ``stage2``..``stage4``; stride 8, 16, 32),
``pre_logits``.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers
from models.convert import NameRule, register_name_map
from models.registry import register_model

_PAPER_V2 = (
    'Ma, Zhang, Zheng, Sun, "ShuffleNet V2: Practical Guidelines for Efficient CNN '
    'Architecture Design", ECCV 2018'
)
_PAPER_V1 = (
    'Zhang, Zhou, Lin, Sun, "ShuffleNet: An Extremely Efficient Convolutional Neural Network '
    'for Mobile Devices", CVPR 2018'
)


# Units per stage, Ma et al. 2018 Table 5 and Zhang et al. 2018 Table 1.
STAGE_REPEATS = (4, 8, 4)

# width multiplier -> (stem, stage 2, 3, 4, final 1x1 conv) channels; Ma et al. 2018, Table 5.
V2_WIDTHS: dict[str, tuple[int, int, int, int, int]] = {
    "x0_5": (24, 48, 96, 192, 1024),
    "x1_0": (24, 116, 232, 464, 1024),
    "x1_5": (24, 176, 352, 704, 1024),
    "x2_0": (24, 244, 488, 976, 2048),
}

# groups -> stage 2, 3, 4 output channels at 1.0x; Zhang et al. 2018, Table 1.
V1_WIDTHS: dict[int, tuple[int, int, int]] = {
    1: (144, 288, 576),
    2: (200, 400, 800),
    3: (240, 480, 960),
    4: (272, 544, 1088),
    8: (384, 768, 1536),
}


def channel_shuffle(x: jax.Array, groups: int) -> jax.Array:
    """Interleaves ``groups`` channel groups (Zhang et al. 2018, Sec. 3.1, Fig. 1(c)).

    Viewing the C channels as (groups, C / groups) and transposing gives channel order
    ``g0[0], g1[0], ..., g0[1], g1[1], ...``, exactly torch's NCHW ``view``/``transpose``.
    """
    *lead, c = x.shape
    return x.reshape(*lead, groups, c // groups).swapaxes(-1, -2).reshape(*lead, c)


def _stem(conv, norm, x: jax.Array, features: int, padding: str) -> jax.Array:
    x = nn.relu(norm(name="conv1_bn")(conv(features, 3, 2, name="conv1_conv")(x)))
    return nn.max_pool(x, (3, 3), (2, 2), padding=layers.get_padding(padding, 3, 2))


def _head(model: nn.Module, x: jax.Array, train: bool) -> jax.Array:
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    if not model.num_classes:
        return pooled
    return layers.classifier_head(
        pooled, model.num_classes, drop_rate=model.drop_rate, train=train, dtype=model.dtype, name="fc"
    )


class InvertedResidual(nn.Module):
    """A ShuffleNet v2 unit (Ma et al. 2018, Fig. 3(c) stride 1, (d) stride 2).

    Layers are named after their index in torchvision's ``branch1`` / ``branch2``
    Sequentials (``branch2_0`` is ``branch2.0``), so the name map is a pattern.

    Attributes:
        features: output channels.
        strides: 1 or 2.
        conv: conv constructor from :func:`layers.conv_factory`.
        norm: norm constructor from :func:`layers.norm_factory`.
    """

    features: int
    strides: int
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        half = self.features // 2
        if self.strides == 1:
            left, right = jnp.split(x, 2, axis=-1)
        else:
            cin = x.shape[-1]
            left = self.conv(cin, 3, self.strides, feature_group_count=cin, name="branch1_0")(x)
            left = self.norm(name="branch1_1")(left)
            left = nn.relu(self.norm(name="branch1_3")(self.conv(half, 1, name="branch1_2")(left)))
            right = x
        y = nn.relu(self.norm(name="branch2_1")(self.conv(half, 1, name="branch2_0")(right)))
        y = self.conv(half, 3, self.strides, feature_group_count=half, name="branch2_3")(y)
        y = self.norm(name="branch2_4")(y)
        y = nn.relu(self.norm(name="branch2_6")(self.conv(half, 1, name="branch2_5")(y)))
        return channel_shuffle(jnp.concatenate([left, y], axis=-1), 2)


class ShuffleNetV2(nn.Module):
    """ShuffleNet v2 (Ma et al. 2018, Table 5), torchvision layout.

    Attributes:
        widths: (stem, stage 2, 3, 4, final conv) channels, a row of :data:`V2_WIDTHS`.
        stage_repeats: units per stage.
        num_classes: classifier size; 0 returns the pooled features instead of logits.
        norm: ``'batch'`` or ``'group'``.
        gn_groups: groups when ``norm='group'``.
        weight_std: weight-standardised convs (BiT).
        dtype: compute dtype; parameters and logits are float32.
        drop_rate: dropout before the classifier.
        padding: padding mode of the convs and the stem pool (see
            :func:`layers.get_padding`).
    """

    widths: tuple[int, int, int, int, int] = V2_WIDTHS["x1_0"]
    stage_repeats: tuple[int, ...] = STAGE_REPEATS
    num_classes: int = 1000
    norm: str = "batch"
    gn_groups: int = 32
    weight_std: bool = False
    dtype: layers.Dtype = jnp.float32
    drop_rate: float = 0.0
    padding: str = "symmetric"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
        """NHWC images -> float32 logits (and the feature dict when ``return_features``)."""
        layers.check_model_padding(self.padding, type(self).__name__)
        conv = layers.conv_factory(
            self.weight_std, self.dtype, self.padding, kernel_init=layers.torch_default_kernel_init
        )
        norm = layers.norm_factory(self.norm, train, self.dtype, groups=self.gn_groups)
        features = {}
        x = _stem(conv, norm, x.astype(self.dtype), self.widths[0], self.padding)
        features["stem"] = x
        for s, (repeats, width) in enumerate(
            zip(self.stage_repeats, self.widths[1:4], strict=True)
        ):
            for b in range(repeats):
                x = InvertedResidual(
                    width, 2 if b == 0 else 1, conv, norm, name=f"stage{s + 2}_{b}"
                )(x)
            features[f"stage{s + 1}"] = x
        x = nn.relu(norm(name="conv5_bn")(conv(self.widths[4], 1, name="conv5_conv")(x)))
        features["pre_logits"] = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        x = _head(self, x, train)
        return (x, features) if return_features else x


class ShuffleUnit(nn.Module):
    """A ShuffleNet v1 unit (Zhang et al. 2018, Fig. 2(b) stride 1, (c) stride 2).

    Attributes:
        features: output channels of the unit.
        strides: 1 (residual add) or 2 (concatenate a 3x3/2 average pool of the input).
        groups: groups of the 1x1 convs.
        group_first: whether the first 1x1 conv is grouped (not in the first unit of
            stage 2, Sec. 3.3).
        conv: conv constructor from :func:`layers.conv_factory`.
        norm: norm constructor from :func:`layers.norm_factory`.
        drop_path_rate: stochastic-depth rate of the residual branch (stride-1 units).
        padding: padding mode of the shortcut's average pool (the convs pad in ``conv``'s
            mode).
    """

    features: int
    strides: int
    groups: int
    group_first: bool
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]
    drop_path_rate: float = 0.0
    padding: str = "symmetric"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        cin = x.shape[-1]
        mid = self.features // 4
        out = self.features - cin if self.strides == 2 else self.features
        first_groups = self.groups if self.group_first else 1
        y = self.conv(mid, 1, feature_group_count=first_groups, name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        if first_groups > 1:
            y = channel_shuffle(y, first_groups)
        y = self.conv(mid, 3, self.strides, feature_group_count=mid, name="conv2")(y)
        y = self.norm(name="bn2")(y)
        y = self.conv(out, 1, feature_group_count=self.groups, name="conv3")(y)
        y = self.norm(name="bn3")(y)
        if self.strides == 2:
            # torch AvgPool2d(3, 2, 1) with count_include_pad=True, as in the authors' code.
            shortcut = nn.avg_pool(
                x,
                (3, 3),
                (2, 2),
                padding=layers.get_padding(self.padding, 3, 2),
                count_include_pad=True,
            )
            return nn.relu(jnp.concatenate([shortcut, y], axis=-1))
        return nn.relu(x + layers.DropPath(self.drop_path_rate)(y, train))


class ShuffleNetV1(nn.Module):
    """ShuffleNet v1 at 1.0x (Zhang et al. 2018, Table 1).

    Attributes:
        groups: groups g of the 1x1 convs (a key of :data:`V1_WIDTHS`).
        stem_width: Conv1 channels (24).
        stage_repeats: units per stage.
        num_classes: classifier size; 0 returns the pooled features instead of logits.
        norm: ``'batch'`` or ``'group'``.
        gn_groups: groups when ``norm='group'``.
        weight_std: weight-standardised convs (BiT).
        dtype: compute dtype; parameters and logits are float32.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth of the stride-1 units (linear over all units).
        padding: padding mode of the convs and pools (see :func:`layers.get_padding`);
            ``'tf_same'`` keeps the shortcut pool's counting of padded zeros.
    """

    groups: int = 3
    stem_width: int = 24
    stage_repeats: tuple[int, ...] = STAGE_REPEATS
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
        if self.groups not in V1_WIDTHS:
            raise ValueError(f"groups must be one of {sorted(V1_WIDTHS)}, got {self.groups}")
        layers.check_model_padding(self.padding, type(self).__name__)
        conv = layers.conv_factory(
            self.weight_std, self.dtype, self.padding, kernel_init=layers.torch_default_kernel_init
        )
        norm = layers.norm_factory(self.norm, train, self.dtype, groups=self.gn_groups)
        features = {}
        x = _stem(conv, norm, x.astype(self.dtype), self.stem_width, self.padding)
        features["stem"] = x
        n = sum(self.stage_repeats)
        index = 0
        for s, (repeats, width) in enumerate(
            zip(self.stage_repeats, V1_WIDTHS[self.groups], strict=True)
        ):
            for b in range(repeats):
                x = ShuffleUnit(
                    features=width,
                    strides=2 if b == 0 else 1,
                    groups=self.groups,
                    group_first=not (s == 0 and b == 0),
                    conv=conv,
                    norm=norm,
                    drop_path_rate=self.drop_path_rate * index / max(n - 1, 1),
                    padding=self.padding,
                    name=f"stage{s + 2}_{b}",
                )(x, train)
                index += 1
            features[f"stage{s + 1}"] = x
        features["pre_logits"] = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        x = _head(self, x, train)
        return (x, features) if return_features else x


# (branch, index in torchvision's Sequential, kind) of every layer with weights.
_BRANCH_LAYERS = (
    (1, 0, "conv"),
    (1, 1, "norm"),
    (1, 2, "conv"),
    (1, 3, "norm"),
    (2, 0, "conv"),
    (2, 1, "norm"),
    (2, 3, "conv"),
    (2, 4, "norm"),
    (2, 5, "conv"),
    (2, 6, "norm"),
)

# torchvision state-dict names <-> ours. ShuffleNet v1 has no reference weights; its names
# (stage{s}_{b}/conv{i}, bn{i}) are ours alone and not in the map.
register_name_map(
    "shufflenet",
    (
        NameRule("conv1.0", "conv1_conv", "conv"),
        NameRule("conv1.1", "conv1_bn", "norm"),
        *(
            NameRule(f"stage{{s}}.{{b}}.branch{r}.{i}", f"stage{{s}}_{{b}}/branch{r}_{i}", kind)
            for r, i, kind in _BRANCH_LAYERS
        ),
        NameRule("conv5.0", "conv5_conv", "conv"),
        NameRule("conv5.1", "conv5_bn", "norm"),
        NameRule("fc", "fc", "linear"),
    ),
)


def _v2(width: str, **kwargs) -> ShuffleNetV2:
    return ShuffleNetV2(**{"widths": V2_WIDTHS[width], **kwargs})


# top1: torchvision's IMAGENET1K_V1 weights (224 px; x1_5 / x2_0 evaluated after a 232 px
# resize, hence their crop_pct).
@register_model(top1=60.552, paper=_PAPER_V2)
def shufflenet_v2_x0_5(**kwargs) -> ShuffleNetV2:
    """ShuffleNet v2 0.5x, 1,366,792 parameters."""
    return _v2("x0_5", **kwargs)


@register_model(top1=69.362, paper=_PAPER_V2)
def shufflenet_v2_x1_0(**kwargs) -> ShuffleNetV2:
    """ShuffleNet v2 1.0x, 2,278,604 parameters."""
    return _v2("x1_0", **kwargs)


@register_model(top1=72.996, crop_pct=224 / 232, paper=_PAPER_V2)
def shufflenet_v2_x1_5(**kwargs) -> ShuffleNetV2:
    """ShuffleNet v2 1.5x, 3,503,624 parameters."""
    return _v2("x1_5", **kwargs)


@register_model(top1=76.230, crop_pct=224 / 232, paper=_PAPER_V2)
def shufflenet_v2_x2_0(**kwargs) -> ShuffleNetV2:
    """ShuffleNet v2 2.0x, 7,393,996 parameters."""
    return _v2("x2_0", **kwargs)


# ShuffleNet v1: no reference weights in timm/torchvision, so top1 is left unset.
def _v1(groups: int, **kwargs) -> ShuffleNetV1:
    return ShuffleNetV1(**{"groups": groups, **kwargs})


@register_model(paper=_PAPER_V1)
def shufflenet_v1_g1(**kwargs) -> ShuffleNetV1:
    """ShuffleNet 1x, g = 1 (Table 1: 143 MFLOPs): 1,531,936 parameters, 143.1M multiply-adds at 224 px."""
    return _v1(1, **kwargs)


@register_model(paper=_PAPER_V1)
def shufflenet_v1_g2(**kwargs) -> ShuffleNetV1:
    """ShuffleNet 1x, g = 2 (Table 1: 140 MFLOPs): 1,733,848 parameters, 140.8M multiply-adds at 224 px."""
    return _v1(2, **kwargs)


@register_model(paper=_PAPER_V1)
def shufflenet_v1_g3(**kwargs) -> ShuffleNetV1:
    """ShuffleNet 1x, g = 3 (Table 1: 137 MFLOPs): 1,865,728 parameters, 137.5M multiply-adds at 224 px."""
    return _v1(3, **kwargs)


@register_model(paper=_PAPER_V1)
def shufflenet_v1_g4(**kwargs) -> ShuffleNetV1:
    """ShuffleNet 1x, g = 4 (Table 1: 133 MFLOPs): 1,968,344 parameters, 134.3M multiply-adds at 224 px."""
    return _v1(4, **kwargs)


@register_model(paper=_PAPER_V1)
def shufflenet_v1_g8(**kwargs) -> ShuffleNetV1:
    """ShuffleNet 1x, g = 8 (Table 1: 137 MFLOPs): 2,434,768 parameters, 138.4M multiply-adds at 224 px."""
    return _v1(8, **kwargs)
