"""NASNet-A large (timm ``nasnetalarge``) and mobile, built from cell descriptions as data.

Zoph, Vasudevan, Shlens, Le, "Learning Transferable Architectures for Scalable Image
Recognition", CVPR 2018. The searched NASNet-A normal and reduction cells (Fig. 4) are
:data:`NASNET_A_NORMAL` and :data:`NASNET_A_REDUCTION`: five combinations, each two
``(op, input)`` pairs added together, plus the list of hidden states concatenated as the
cell output. Inputs 0 and 1 are the (preprocessed) outputs of the cell before last and the
last cell; input ``2 + k`` is combination ``k``. One generic :class:`Cell` interprets any such
description, so another searched cell is new data, not new code.

Network (Fig. 2, ImageNet): a 3x3/2 unpadded conv stem, two reduction "stem cells", then
three stacks of N normal cells separated by reduction cells; filters double at each
reduction. ``N@P`` names the network by N and the penultimate width P = 24 F (a normal cell
outputs 6 F channels):

* ``nasnetalarge``: 6@4032, 96 stem filters, 331 px; timm's port of the TF-slim weights,
  88,753,150 parameters (equal to timm's, so its weights load with
  ``models.convert_state_dict``).
* ``nasnetamobile``: 4@1056, 32 stem filters, 224 px; paper Table 2: 5.3M parameters,
  564M multiply-adds, 74.0% top-1. timm has no mobile model; ours has 5,289,978 parameters
  and 563.6M multiply-adds at 224 px (within 1% of both).

Details follow timm's ``nasnetalarge`` (which fixes them for the mobile net as well, as in
TF-slim): every op input is ReLU'd first; separable ops are ReLU, separable conv, BN, ReLU,
separable conv, BN (the first conv strided in reductions; its width is the cell's filters);
the inputs are brought to F channels by ReLU + 1x1 conv + BN, or by a factorised reduction
(ReLU, two 1x1 convs on the input subsampled at offsets 0 and 1, concatenated, BN) when the
cell before last has twice the resolution. The cell after a reduction cell reads the
reduction's output and the reduction's own input before last (timm: ``cell_6(reduction_cell_0,
cell_4)``). TF 'SAME' padding (bottom/right extra) for
strided convs and pools, BN eps 1e-3. timm's strided 3x3 average pools count the zero
padding, its stride-1 ones do not; both are reproduced. ``padding='tf_same'`` is therefore
the default here (as in :mod:`models.nfnet`); ``'symmetric'`` pads the strided convs and
pools by ``k // 2`` on both sides instead (stride-1 layers are the same in both modes, and
the stem conv is unpadded in both).

timm names modules irregularly (``cell_stem_0``, ``cell_5``, ``reduction_cell_1``,
``comb_iter_2_right``, ``separable_1.depthwise_conv2d``); our module paths repeat them, and
the name map is generated for those three cell prefixes.

``drop_path_rate``: the paper's ScheduledDropPath (Sec. 4.1) without the schedule over
training: each non-identity op output in normal and reduction cells is dropped with
probability ``drop_path_rate * (cell + 1) / cells``. Feature maps: ``stem`` (after the stem
cells, stride 8), ``stage1``..``stage3`` (the normal-cell stacks, stride 8, 16, 32), ``pre_logits``. Initialisation is torch's default, as in timm.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers, registry
from models.convert import NameRule, flat, register_name_map

register_model = functools.partial(
    registry.register_model, family="nasnet", classifier="last_linear", first_conv="conv0_conv"
)

_PAPER = (
    'Zoph, Vasudevan, Shlens, Le, "Learning Transferable Architectures for Scalable Image '
    'Recognition", CVPR 2018'
)


OPS = ("sep3", "sep5", "sep7", "avg3", "max3", "id")


class CellSpec(NamedTuple):
    """A searched cell as data.

    Attributes:
        combs: per combination, the ``(op, input)`` pairs added together, named
            ``comb_iter_{k}_left`` / ``_right`` in that order. ``op`` is one of :data:`OPS`.
        concat: hidden states (0, 1 inputs; 2 + k combinations) concatenated as the output.
        reduction: ops reading a cell input (0 or 1) have stride 2.
    """

    combs: tuple[tuple[tuple[str, int], tuple[str, int]], ...]
    concat: tuple[int, ...]
    reduction: bool


# Zoph et al. 2018, Fig. 4 (left), in timm's operand order.
NASNET_A_NORMAL = CellSpec(
    combs=(
        (("sep5", 1), ("sep3", 0)),
        (("sep5", 0), ("sep3", 0)),
        (("avg3", 1), ("id", 0)),
        (("avg3", 0), ("avg3", 0)),
        (("sep3", 1), ("id", 1)),
    ),
    concat=(0, 2, 3, 4, 5, 6),
    reduction=False,
)

# Zoph et al. 2018, Fig. 4 (right).
NASNET_A_REDUCTION = CellSpec(
    combs=(
        (("sep5", 1), ("sep7", 0)),
        (("max3", 1), ("sep7", 0)),
        (("avg3", 1), ("sep5", 0)),
        (("id", 3), ("avg3", 2)),
        (("sep3", 2), ("max3", 1)),
    ),
    concat=(3, 4, 5, 6),
    reduction=True,
)


def _pool(kind: str, x: jax.Array, strides: int, padding: str = "tf_same") -> jax.Array:
    """3x3 pools as in timm: padded in mode ``padding`` when strided (TF SAME in timm;
    zeros counted by the average), torch padding 1 excluding the pad from the average at
    stride 1 (what TF SAME pads there too)."""
    if strides == 1:
        pad = ((1, 1), (1, 1))
        if kind == "max":
            return nn.max_pool(x, (3, 3), padding=pad)
        return nn.avg_pool(x, (3, 3), padding=pad, count_include_pad=False)
    pad = layers.get_padding(padding, 3, strides)
    if kind == "max":
        return nn.max_pool(x, (3, 3), (strides, strides), padding=pad)
    return nn.avg_pool(x, (3, 3), (strides, strides), padding=pad, count_include_pad=True)


class BranchSeparables(nn.Module):
    """ReLU, separable conv (strided), BN, ReLU, separable conv, BN (timm names).

    Attributes:
        features: output channels (also the middle width).
        kernel: depthwise kernel size.
        strides: stride of the first depthwise conv.
        conv: conv constructor from :func:`layers.conv_factory`.
        norm: norm constructor from :func:`layers.norm_factory`.
    """

    features: int
    kernel: int
    strides: int
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j, strides in ((1, self.strides), (2, 1)):
            cin = x.shape[-1]
            x = nn.relu(x)
            x = self.conv(
                cin, self.kernel, strides, feature_group_count=cin, name=f"separable_{j}_dw"
            )(x)
            x = self.conv(self.features, 1, name=f"separable_{j}_pw")(x)
            x = self.norm(name=f"bn_sep_{j}")(x)
        return x


class ActConvBn(nn.Module):
    """ReLU, 1x1 conv, BN: brings a cell input to the cell's width."""

    features: int
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(name="bn")(self.conv(self.features, 1, name="conv")(nn.relu(x)))


class Cell(nn.Module):
    """Interprets a :class:`CellSpec` (the searched cell) on two inputs.

    Attributes:
        spec: the cell description.
        filters: F, the width of every op in the cell.
        conv: conv constructor from :func:`layers.conv_factory`.
        norm: norm constructor from :func:`layers.norm_factory`.
        prev: how the input before last is preprocessed: ``'conv'`` (ReLU + 1x1 conv + BN),
            ``'factorized'`` (factorised reduction, when it has twice the resolution) or
            ``'none'`` (the first stem cell, whose two inputs are the same raw stem output).
        drop_path_rate: drop-path probability of each non-identity op output.
        padding: padding mode of the strided pools (the convs pad in ``conv``'s mode).
    """

    spec: CellSpec
    filters: int
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]
    prev: str = "conv"
    drop_path_rate: float = 0.0
    padding: str = "tf_same"

    def _factorized_reduction(self, x: jax.Array) -> jax.Array:
        x = nn.relu(x)
        half = self.filters // 2
        p1 = self.conv(half, 1, name="path_1_conv")(x[:, ::2, ::2])
        # timm: ZeroPad2d((-1, 1, -1, 1)) shifts by one pixel, zero-filling the far edge.
        shifted = jnp.pad(x[:, 1:, 1:], ((0, 0), (0, 1), (0, 1), (0, 0)))
        p2 = self.conv(half, 1, name="path_2_conv")(shifted[:, ::2, ::2])
        return self.norm(name="final_path_bn")(jnp.concatenate([p1, p2], axis=-1))

    def _op(self, op: str, x: jax.Array, strides: int, name: str, train: bool) -> jax.Array:
        if op == "id":
            if strides != 1:
                raise ValueError("identity ops cannot reduce; NASNet-A has none that do")
            return x
        if op.startswith("sep"):
            y = BranchSeparables(
                self.filters, int(op[3:]), strides, self.conv, self.norm, name=name
            )(x)
        elif op in ("avg3", "max3"):
            y = _pool(op[:3], x, strides, self.padding)
        else:
            raise ValueError(f"unknown op {op!r}; known: {OPS}")
        return layers.DropPath(self.drop_path_rate)(y, train)

    @nn.compact
    def __call__(self, x: jax.Array, x_prev: jax.Array, train: bool = False) -> jax.Array:
        if self.prev == "conv":
            h_prev = ActConvBn(self.filters, self.conv, self.norm, name="conv_prev_1x1")(x_prev)
        elif self.prev == "factorized":
            h_prev = self._factorized_reduction(x_prev)
        elif self.prev == "none":
            h_prev = x_prev
        else:
            raise ValueError(f"prev must be 'conv', 'factorized' or 'none', got {self.prev!r}")
        states = [h_prev, ActConvBn(self.filters, self.conv, self.norm, name="conv_1x1")(x)]
        for k, pair in enumerate(self.spec.combs):
            total = 0
            for (op, i), side in zip(pair, ("left", "right"), strict=True):
                strides = 2 if self.spec.reduction and i < 2 else 1
                total = total + self._op(op, states[i], strides, f"comb_iter_{k}_{side}", train)
            states.append(total)
        return jnp.concatenate([states[i] for i in self.spec.concat], axis=-1)


class NASNet(layers.ResidualClassifier):
    """NASNet-A ``N@P`` for ImageNet (Zoph et al. 2018, Fig. 2), timm module layout.

    Shared fields as :class:`layers.ResidualClassifier`; ``drop_path_rate`` is the paper's
    ScheduledDropPath without the schedule (see the module docstring) and ``padding``
    defaults to the reference's ``'tf_same'``.

    Attributes:
        cells_per_stage: N, normal cells per stack.
        penultimate_filters: P; the cells' base width is F = P / 24.
        stem_filters: channels of the 3x3/2 stem conv.
        normal_cell: the normal cell description.
        reduction_cell: the reduction cell description.
    """

    cells_per_stage: int = 6
    penultimate_filters: int = 4032
    stem_filters: int = 96
    normal_cell: CellSpec = NASNET_A_NORMAL
    reduction_cell: CellSpec = NASNET_A_REDUCTION
    padding: str = layers.kw_only("tf_same")

    HEAD = "last_linear"

    def forward_features(self, x: jax.Array, train: bool, features: dict) -> jax.Array:
        # TF 'SAME' is the symmetric torch padding for stride 1 and timm's dynamic
        # (bottom/right) padding for stride 2: exactly timm's pad_type='same'.
        conv = self.make_conv(kernel_init=layers.torch_default_kernel_init)
        norm = self.make_norm(train, epsilon=1e-3)
        filters = self.penultimate_filters // 24
        n = self.cells_per_stage
        total_cells = 3 * n + 2

        def rate(index: int) -> float:
            return self.drop_path_rate * (index + 1) / total_cells

        def cell(*spec, **kwargs):
            # A cell is called as cell(...)(x, x_prev, train), through run_block (remat).
            module = Cell(*spec, conv=conv, norm=norm, padding=self.padding, **kwargs)
            return functools.partial(self.run_block, module)

        x0 = norm(name="conv0_bn")(conv(self.stem_filters, 3, 2, padding="valid", name="conv0_conv")(x))
        s0 = cell(self.reduction_cell, filters // 4, prev="none", name="cell_stem_0")(x0, x0, train)
        s1 = cell(self.reduction_cell, filters // 2, prev="factorized", name="cell_stem_1")(s0, x0, train)
        features["stem"] = s1
        prev, cur = s0, s1
        index = 0
        for stage in range(3):
            width = filters * 2**stage
            if stage > 0:
                # As in timm (and the TF-slim checkpoints it ports): the cell after a
                # reduction takes the reduction's output and the reduction's own input
                # before last (cell_6 reads reduction_cell_0 and cell_4).
                cur = cell(
                    self.reduction_cell, width, drop_path_rate=rate(index), name=f"reduction_cell_{stage - 1}"
                )(cur, prev, train)
                index += 1
            for c in range(n):
                # The first cell after a reduction (and the one after the stem, whose
                # before-last input is cell_stem_0) sees that input at twice the resolution.
                nxt = cell(
                    self.normal_cell,
                    width,
                    prev="factorized" if c == 0 else "conv",
                    drop_path_rate=rate(index),
                    name=f"cell_{stage * n + c}",
                )(cur, prev, train)
                prev, cur = cur, nxt
                index += 1
            features[f"stage{stage + 1}"] = cur
        return nn.relu(cur)


def _cell_rules(prefix: str) -> list[NameRule]:
    """timm names <-> ours for every cell called ``{prefix}_{i}``."""
    p = f"{prefix}_{{i}}"
    rules = [
        NameRule(f"{p}.conv_1x1.conv", f"{p}/conv_1x1/conv", "conv"),
        NameRule(f"{p}.conv_1x1.bn", f"{p}/conv_1x1/bn", "norm"),
        NameRule(f"{p}.conv_prev_1x1.conv", f"{p}/conv_prev_1x1/conv", "conv"),
        NameRule(f"{p}.conv_prev_1x1.bn", f"{p}/conv_prev_1x1/bn", "norm"),
        NameRule(f"{p}.path_{{j}}.conv", f"{p}/path_{{j}}_conv", "conv"),
        NameRule(f"{p}.final_path_bn", f"{p}/final_path_bn", "norm"),
    ]
    for side in ("left", "right"):
        b = f"{p}.comb_iter_{{k}}_{side}"
        o = f"{p}/comb_iter_{{k}}_{side}"
        rules += [
            NameRule(f"{b}.separable_{{j}}.depthwise_conv2d", f"{o}/separable_{{j}}_dw", "conv"),
            NameRule(f"{b}.separable_{{j}}.pointwise_conv2d", f"{o}/separable_{{j}}_pw", "conv"),
            NameRule(f"{b}.bn_sep_{{j}}", f"{o}/bn_sep_{{j}}", "norm"),
        ]
    return rules


register_name_map(
    "nasnet",
    (
        NameRule("conv0.conv", "conv0_conv", "conv"),
        NameRule("conv0.bn", "conv0_bn", "norm"),
        *(r for prefix in ("cell_stem", "cell", "reduction_cell") for r in _cell_rules(prefix)),
        *flat("linear", "last_linear"),
    ),
)

# Registered name -> (NASNet fields, ModelCfg fields); parameter counts in the README table.
# nasnetalarge: timm's tf_in1k data cfg, top1 of the paper's Table 2 (NASNet-A 6@4032).
# nasnetamobile: the paper's mobile setting (Table 2: 4@1056, 224 px, 74.0% top-1, 5.3M
# parameters) with TF-slim's eval preprocessing (Inception mean/std, central crop 0.875).
_CFG = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic", paper=_PAPER)
NASNET_MODELS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "nasnetalarge": ({}, dict(input_size=(331, 331, 3), crop_pct=0.911, top1=82.7, **_CFG)),
    "nasnetamobile": (
        dict(cells_per_stage=4, penultimate_filters=1056, stem_filters=32),
        dict(input_size=(224, 224, 3), crop_pct=0.875, top1=74.0, **_CFG),
    ),
}

for _name, (_fields, _cfg) in NASNET_MODELS.items():
    register_model(name=_name, **_cfg)(functools.partial(NASNet, **_fields))
