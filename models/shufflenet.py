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

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers, registry
from models.convert import NameRule, flat, register_name_map

register_model = functools.partial(
    registry.register_model, family="shufflenet", classifier="fc", first_conv="conv1_conv"
)

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


class ShuffleNetV2(layers.ImageClassifier):
    """ShuffleNet v2 (Ma et al. 2018, Table 5), torchvision layout.

    Shared fields as :class:`layers.ImageClassifier` (units concatenate instead of adding a
    residual, so no drop path); ``padding`` covers the convs and the stem pool.

    Attributes:
        widths: (stem, stage 2, 3, 4, final conv) channels, a row of :data:`V2_WIDTHS`.
        stage_repeats: units per stage.
    """

    widths: tuple[int, int, int, int, int] = V2_WIDTHS["x1_0"]
    stage_repeats: tuple[int, ...] = STAGE_REPEATS

    def forward_features(self, x: jax.Array, train: bool, features: dict) -> jax.Array:
        conv = self.make_conv(kernel_init=layers.torch_default_kernel_init)
        norm = self.make_norm(train)
        x = _stem(conv, norm, x, self.widths[0], self.padding)
        features["stem"] = x
        for s, (repeats, width) in enumerate(zip(self.stage_repeats, self.widths[1:4], strict=True)):
            for b in range(repeats):
                x = self.run_block(InvertedResidual(width, 2 if b == 0 else 1, conv, norm, name=f"stage{s + 2}_{b}"), x)
            features[f"stage{s + 1}"] = x
        return nn.relu(norm(name="conv5_bn")(conv(self.widths[4], 1, name="conv5_conv")(x)))


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


class ShuffleNetV1(layers.ResidualClassifier):
    """ShuffleNet v1 at 1.0x (Zhang et al. 2018, Table 1).

    Shared fields as :class:`layers.ResidualClassifier` (drop path on the stride-1 units,
    linear over all units); ``padding`` covers the convs and pools, ``'tf_same'`` keeping
    the shortcut pool's counting of padded zeros.

    Attributes:
        groups: groups g of the 1x1 convs (a key of :data:`V1_WIDTHS`).
        stem_width: Conv1 channels (24).
        stage_repeats: units per stage.
    """

    groups: int = 3
    stem_width: int = 24
    stage_repeats: tuple[int, ...] = STAGE_REPEATS

    CHOICES = {"groups": tuple(V1_WIDTHS)}

    def forward_features(self, x: jax.Array, train: bool, features: dict) -> jax.Array:
        conv = self.make_conv(kernel_init=layers.torch_default_kernel_init)
        norm = self.make_norm(train)
        x = _stem(conv, norm, x, self.stem_width, self.padding)
        features["stem"] = x

        def unit(s: int, b: int, rate: float) -> ShuffleUnit:
            return ShuffleUnit(
                V1_WIDTHS[self.groups][s], 2 if b == 0 else 1, self.groups, not (s == 0 and b == 0), conv, norm,
                rate, self.padding, name=f"stage{s + 2}_{b}",
            )

        x = self.residual_stages(x, train, features, self.stage_repeats, unit)
        return x


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
        *flat("linear", "fc"),
    ),
)


# Registered name -> (module, fields, ModelCfg fields); parameter counts in the README
# table. ShuffleNet v2: top1 of torchvision's IMAGENET1K_V1 weights (224 px; x1_5 / x2_0
# evaluated after a 232 px resize, hence their crop_pct). ShuffleNet v1: no reference
# weights in timm/torchvision, so top1 is unset; multiply-adds at 224 px (ours / Table 1):
# g1 143.1M / 143, g2 140.8M / 140, g3 137.5M / 137, g4 134.3M / 133, g8 138.4M / 137.
SHUFFLENET_MODELS: dict[str, tuple[type, dict[str, Any], dict[str, Any]]] = {
    "shufflenet_v2_x0_5": (ShuffleNetV2, dict(widths=V2_WIDTHS["x0_5"]), dict(top1=60.552, paper=_PAPER_V2)),
    "shufflenet_v2_x1_0": (ShuffleNetV2, dict(widths=V2_WIDTHS["x1_0"]), dict(top1=69.362, paper=_PAPER_V2)),
    "shufflenet_v2_x1_5": (
        ShuffleNetV2, dict(widths=V2_WIDTHS["x1_5"]), dict(top1=72.996, crop_pct=224 / 232, paper=_PAPER_V2)
    ),
    "shufflenet_v2_x2_0": (
        ShuffleNetV2, dict(widths=V2_WIDTHS["x2_0"]), dict(top1=76.230, crop_pct=224 / 232, paper=_PAPER_V2)
    ),
    "shufflenet_v1_g1": (ShuffleNetV1, dict(groups=1), dict(paper=_PAPER_V1)),
    "shufflenet_v1_g2": (ShuffleNetV1, dict(groups=2), dict(paper=_PAPER_V1)),
    "shufflenet_v1_g3": (ShuffleNetV1, dict(groups=3), dict(paper=_PAPER_V1)),
    "shufflenet_v1_g4": (ShuffleNetV1, dict(groups=4), dict(paper=_PAPER_V1)),
    "shufflenet_v1_g8": (ShuffleNetV1, dict(groups=8), dict(paper=_PAPER_V1)),
}

for _name, (_module, _fields, _cfg) in SHUFFLENET_MODELS.items():
    register_model(name=_name, **_cfg)(functools.partial(_module, **_fields))
