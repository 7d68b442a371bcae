"""Inception-v4 and Inception-ResNet-v2 as in timm.

Szegedy, Ioffe, Vanhoucke, Alemi, "Inception-v4, Inception-ResNet and the Impact of Residual
Connections on Learning", AAAI 2017: Figs. 3-9 (Inception-v4) and Figs. 3, 15-18 plus the
residual scaling of Sec. 3.3 (Inception-ResNet-v2), in the layout of timm's
``inception_v4`` / ``inception_resnet_v2`` (ports of the TF-slim checkpoints; BN eps 1e-3,
299 px). Parameter counts equal timm's at 1000 classes: 42,679,816 and 55,843,464, so timm
weights load with ``models.convert_state_dict``. A separate family from
:mod:`models.inception` because the state-dict naming (``features.{i}.branch1.0``,
``repeat_1.{i}.conv2d``) shares nothing with GoogLeNet's / Inception v3's.

Most modules are parallel branches of conv + norm + ReLU layers and pools, concatenated: they
are written as data (:data:`INCEPTION_V4_BLOCKS`, :data:`INCEPTION_RESNET_V2_BLOCKS`) and
built by :class:`Branches`, which also names the layers as timm does (``branch{b}`` for a
one-layer branch, ``branch{b}_{j}`` for layer ``j`` of a sequential one, torch
``branch{b}.{j}``); the name map is derived from the same tables.

Inception-ResNet-v2 residual units compute ``relu(x + drop_path(scale * conv1x1(concat)))``
with scales 0.17 / 0.10 / 0.20 (Sec. 3.3; TF-slim's values) and support ``drop_path_rate``
(linear over the 40 residual units). Their 1x1 up-projection (``conv2d``, with bias and no
norm) stays a plain conv when ``weight_std=True``: standardising a conv that no norm
follows would multiply the residual by ~sqrt(fan_in) (11-21x here).

Initialisation is torch's default (timm leaves it): kernels uniform +-1/sqrt(fan_in)
(kaiming_uniform, a=sqrt(5)), biases likewise; norm scale 1, bias 0.

Both networks have a ``padding`` field (``'symmetric'`` or ``'tf_same'``) for uniformity with
the other families; as in TF-slim, every strided conv and pool is unpadded and every padded
one has stride 1, where TF ``SAME`` pads ``k // 2`` on both sides like torch, so both modes
compute the same network.

Feature maps (``return_features=True``): ``stem`` (35x35 at 299 px, stride 8), ``stage1``
(35x35), ``stage2`` (17x17), ``stage3`` (8x8), ``pre_logits``. Inputs must be >= 75 px.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers, registry
from models.convert import NameRule, register_name_map
from models.inception import (
    INCEPTION_MEAN,
    INCEPTION_STD,
    BasicConv2d,
    avg_pool,
    block_rules,
    conv_bn_rules,
    max_pool,
)

register_model = functools.partial(registry.register_model, family='inception_v4')

_PAPER = (
    'Szegedy, Ioffe, Vanhoucke, Alemi, "Inception-v4, Inception-ResNet and the Impact of '
    'Residual Connections on Learning", AAAI 2017'
)


class Conv(NamedTuple):
    """One conv + norm + ReLU layer of a branch: torch ``padding`` is 0 (``'valid'``) or
    ``k // 2`` (``'same'``, in the model's padding mode; see :class:`BasicConv2d`)."""

    features: int
    kernel: int | tuple[int, int] = 1
    strides: int = 1
    padding: str = 'valid'


class Pool(NamedTuple):
    """A pool layer of a branch: ``'max'`` is 3x3/2 unpadded; ``'avg'`` 3x3/1 padded by 1,
    averaging over valid pixels only (torch ``count_include_pad=False``, TF-slim's SAME)."""

    kind: str


Branch = tuple[Conv | Pool, ...]


def _s(features: int, kernel: int | tuple[int, int] = 1, strides: int = 1) -> Conv:
    return Conv(features, kernel, strides, 'same')


def _v(features: int, kernel: int | tuple[int, int] = 1, strides: int = 1) -> Conv:
    return Conv(features, kernel, strides, 'valid')


MAX, AVG = Pool('max'), Pool('avg')

# Inception-v4, Szegedy et al. 2017: Fig. 3 (stem), 4 (A), 5 (B), 6 (C), 7 (reduction A with
# k, l, m, n = 192, 224, 256, 384, Table 1), 8 (reduction B). C splits branches and is
# written out in :class:`InceptionV4C`.
INCEPTION_V4_BLOCKS: dict[str, tuple[Branch, ...]] = {
    'mixed_4a': (
        (_v(64), _v(96, 3)),
        (_v(64), _s(64, (1, 7)), _s(64, (7, 1)), _v(96, 3)),
    ),
    'inception_a': (
        (_v(96),),
        (_v(64), _s(96, 3)),
        (_v(64), _s(96, 3), _s(96, 3)),
        (AVG, _v(96)),
    ),
    'reduction_a': (
        (_v(384, 3, 2),),
        (_v(192), _s(224, 3), _v(256, 3, 2)),
        (MAX,),
    ),
    'inception_b': (
        (_v(384),),
        (_v(192), _s(224, (1, 7)), _s(256, (7, 1))),
        (_v(192), _s(192, (7, 1)), _s(224, (1, 7)), _s(224, (7, 1)), _s(256, (1, 7))),
        (AVG, _v(128)),
    ),
    'reduction_b': (
        (_v(192), _v(192, 3, 2)),
        (_v(256), _s(256, (1, 7)), _s(320, (7, 1)), _v(320, 3, 2)),
        (MAX,),
    ),
}

# timm's ``features`` sequence after the three stem convs and Mixed3a/4a/5a (indices 0-5),
# one tuple per stage: (block, repeats). Fig. 9: 4 x A, reduction A, 7 x B, reduction B, 3 x C.
INCEPTION_V4_STAGES: tuple[tuple[tuple[str, int], ...], ...] = (
    (('inception_a', 4),),
    (('reduction_a', 1), ('inception_b', 7)),
    (('reduction_b', 1), ('inception_c', 3)),
)

# Inception-ResNet-v2 (TF-slim layout): mixed_5b (35x35 module after the stem), 35x35
# block35 (Fig. 16), reduction mixed_6a (Fig. 7, k, l, m, n = 256, 256, 384, 384), 17x17
# block17 (Fig. 17), reduction mixed_7a (Fig. 18), 8x8 block8 (Fig. 19). Residual blocks
# add a 1x1 projection back to the input width.
INCEPTION_RESNET_V2_BLOCKS: dict[str, tuple[Branch, ...]] = {
    'mixed_5b': (
        (_v(96),),
        (_v(48), _s(64, 5)),
        (_v(64), _s(96, 3), _s(96, 3)),
        (AVG, _v(64)),
    ),
    'block35': (
        (_v(32),),
        (_v(32), _s(32, 3)),
        (_v(32), _s(48, 3), _s(64, 3)),
    ),
    'mixed_6a': (
        (_v(384, 3, 2),),
        (_v(256), _s(256, 3), _v(384, 3, 2)),
        (MAX,),
    ),
    'block17': (
        (_v(192),),
        (_v(128), _s(160, (1, 7)), _s(192, (7, 1))),
    ),
    'mixed_7a': (
        (_v(256), _v(384, 3, 2)),
        (_v(256), _v(288, 3, 2)),
        (_v(256), _s(288, 3), _v(320, 3, 2)),
        (MAX,),
    ),
    'block8': (
        (_v(192),),
        (_v(192), _s(224, (1, 3)), _s(256, (3, 1))),
    ),
}

# (timm module name, our name prefix, block, repeats, residual scale) per stage; the last
# block8 has scale 1 and no ReLU (TF-slim), it is listed separately in the model.
INCEPTION_RESNET_V2_STAGES: tuple[tuple[tuple[str, str, str, int, float], ...], ...] = (
    (('repeat', 'block35', 'block35', 10, 0.17),),
    (('mixed_6a', 'mixed_6a', 'mixed_6a', 1, 0.0), ('repeat_1', 'block17', 'block17', 20, 0.10)),
    (('mixed_7a', 'mixed_7a', 'mixed_7a', 1, 0.0), ('repeat_2', 'block8', 'block8', 9, 0.20)),
)


def branch_layer_names(branches: tuple[Branch, ...]) -> list[str]:
    """timm names of the convs of ``branches``: ``branch{b}`` or ``branch{b}.{j}``."""
    return [
        f'branch{b}' if len(branch) == 1 else f'branch{b}.{j}'
        for b, branch in enumerate(branches)
        for j, layer in enumerate(branch)
        if isinstance(layer, Conv)
    ]


class Branches(nn.Module):
    """Parallel branches of :class:`Conv` / :class:`Pool` layers, concatenated on channels.

    Attributes:
        branches: one tuple of layers per branch (see the block tables).
        conv: conv constructor.
        norm: norm constructor.
    """

    branches: tuple[Branch, ...]
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        outs = []
        for b, branch in enumerate(self.branches):
            y = x
            for j, layer in enumerate(branch):
                if isinstance(layer, Pool):
                    y = max_pool(y, 3, 2) if layer.kind == 'max' else avg_pool(y, 3, 1, 1, count_include_pad=False)
                else:
                    name = f'branch{b}' if len(branch) == 1 else f'branch{b}_{j}'
                    y = BasicConv2d(*layer, conv=self.conv, norm=self.norm, name=name)(y)
            outs.append(y)
        return jnp.concatenate(outs, axis=-1)


class Mixed3a(nn.Module):
    """Stem split (Fig. 3): max-pool 3x3/2 beside a 96-wide 3x3/2 conv."""

    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]

    CONVS: ClassVar[tuple[str, ...]] = ('conv',)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = BasicConv2d(96, 3, 2, conv=self.conv, norm=self.norm, name='conv')(x)
        return jnp.concatenate([max_pool(x, 3, 2), y], axis=-1)


class Mixed5a(nn.Module):
    """Stem split (Fig. 3): a 192-wide 3x3/2 conv beside max-pool 3x3/2."""

    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]

    CONVS: ClassVar[tuple[str, ...]] = ('conv',)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = BasicConv2d(192, 3, 2, conv=self.conv, norm=self.norm, name='conv')(x)
        return jnp.concatenate([y, max_pool(x, 3, 2)], axis=-1)


class InceptionV4C(nn.Module):
    """8x8 module (Fig. 6) whose branches split into 1x3 and 3x1 outputs."""

    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]

    CONVS: ClassVar[tuple[str, ...]] = (
        'branch0', 'branch1_0', 'branch1_1a', 'branch1_1b', 'branch2_0', 'branch2_1',
        'branch2_2', 'branch2_3a', 'branch2_3b', 'branch3.1',
    )  # fmt: skip

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cbr = functools.partial(BasicConv2d, conv=self.conv, norm=self.norm, padding='same')
        b0 = cbr(256, 1, name='branch0')(x)
        b1 = cbr(384, 1, name='branch1_0')(x)
        b1 = [cbr(256, (1, 3), name='branch1_1a')(b1), cbr(256, (3, 1), name='branch1_1b')(b1)]
        b2 = cbr(384, 1, name='branch2_0')(x)
        b2 = cbr(512, (1, 3), name='branch2_2')(cbr(448, (3, 1), name='branch2_1')(b2))
        b2 = [cbr(256, (1, 3), name='branch2_3a')(b2), cbr(256, (3, 1), name='branch2_3b')(b2)]
        b3 = cbr(256, 1, name='branch3_1')(avg_pool(x, 3, 1, 1, count_include_pad=False))
        return jnp.concatenate([b0, *b1, *b2, b3], axis=-1)


def _stem(x: jax.Array, conv: Callable, norm: Callable, names: tuple[str, str, str]) -> jax.Array:
    """The three stem convs shared by both networks (Fig. 3): 32 3x3/2, 32 3x3, 64 3x3 same."""
    x = BasicConv2d(32, 3, 2, conv=conv, norm=norm, name=names[0])(x)
    x = BasicConv2d(32, 3, conv=conv, norm=norm, name=names[1])(x)
    return BasicConv2d(64, 3, padding='same', conv=conv, norm=norm, name=names[2])(x)


class InceptionV4(layers.ImageClassifier):
    """Inception-v4 (timm layout; Szegedy et al. 2017 Fig. 9).

    Shared fields as :class:`layers.ImageClassifier` (timm's default ``drop_rate`` 0;
    ``padding`` gives the same network in both modes, see the module docstring).

    Attributes:
        stages: (block, repeats) per stage (see :data:`INCEPTION_V4_STAGES`).
    """

    stages: tuple = INCEPTION_V4_STAGES

    HEAD = 'last_linear'

    def forward_features(self, x: jax.Array, train: bool, features: dict) -> jax.Array:
        conv = self.make_conv(kernel_init=layers.torch_default_kernel_init)
        norm = self.make_norm(train, epsilon=1e-3)
        x = _stem(x, conv, norm, ('features_0', 'features_1', 'features_2'))
        x = Mixed3a(conv, norm, name='features_3')(x)
        x = Branches(INCEPTION_V4_BLOCKS['mixed_4a'], conv, norm, name='features_4')(x)
        x = Mixed5a(conv, norm, name='features_5')(x)
        features['stem'] = x
        index = 6
        for s, stage in enumerate(self.stages):
            for block, repeats in stage:
                for _ in range(repeats):
                    if block == 'inception_c':
                        module = InceptionV4C(conv, norm, name=f'features_{index}')
                    else:
                        module = Branches(INCEPTION_V4_BLOCKS[block], conv, norm, name=f'features_{index}')
                    x = self.run_block(module, x)
                    index += 1
            features[f'stage{s + 1}'] = x
        return x


class ResidualBlock(nn.Module):
    """Inception-ResNet unit: ``act(x + drop_path(scale * proj(concat(branches(x)))))``.

    Attributes:
        branches: the branch table of the block.
        scale: residual scaling (Sec. 3.3).
        conv: conv constructor of the branches.
        proj_conv: constructor of the 1x1 projection (plain conv with bias, see the module
            docstring).
        norm: norm constructor.
        drop_path_rate: stochastic-depth rate of the residual branch.
        activate: ReLU after the sum (off for the last block8).
    """

    branches: tuple[Branch, ...]
    scale: float
    conv: Callable[..., nn.Module]
    proj_conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]
    drop_path_rate: float = 0.0
    activate: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        y = Branches(self.branches, self.conv, self.norm, name='branches')(x)
        _, bias_init = layers.torch_linear_init(y.shape[-1])
        y = self.proj_conv(x.shape[-1], 1, use_bias=True, bias_init=bias_init, name='conv2d')(y)
        x = x + layers.DropPath(self.drop_path_rate)(y * self.scale, train)
        return nn.relu(x) if self.activate else x


class InceptionResNetV2(layers.ResidualClassifier):
    """Inception-ResNet-v2 (timm / TF-slim layout; Szegedy et al. 2017 Fig. 15).

    Shared fields as :class:`layers.ResidualClassifier`: ``weight_std`` covers the branch
    convs, not the residual projections; residual unit ``i`` of ``n`` (40) drops its branch
    with ``drop_path_rate * i / (n - 1)``; ``padding`` gives the same network in both modes.

    Attributes:
        stages: see :data:`INCEPTION_RESNET_V2_STAGES`.
    """

    stages: tuple = INCEPTION_RESNET_V2_STAGES

    HEAD = 'classif'

    def forward_features(self, x: jax.Array, train: bool, features: dict) -> jax.Array:
        conv = self.make_conv(kernel_init=layers.torch_default_kernel_init)
        proj_conv = layers.conv_factory(False, self.dtype, kernel_init=layers.torch_default_kernel_init)
        norm = self.make_norm(train, epsilon=1e-3)
        blocks = INCEPTION_RESNET_V2_BLOCKS
        n_units = 1 + sum(r for stage in self.stages for _, _, b, r, _ in stage if b.startswith('block'))
        unit = 0

        x = _stem(x, conv, norm, ('conv2d_1a', 'conv2d_2a', 'conv2d_2b'))
        x = max_pool(x, 3, 2)
        x = BasicConv2d(80, 1, conv=conv, norm=norm, name='conv2d_3b')(x)
        x = BasicConv2d(192, 3, conv=conv, norm=norm, name='conv2d_4a')(x)
        x = max_pool(x, 3, 2)
        x = Branches(blocks['mixed_5b'], conv, norm, name='mixed_5b')(x)
        features['stem'] = x

        def residual(x, block, scale, name, activate=True):
            nonlocal unit
            rate = self.drop_path_at(unit, n_units)
            unit += 1
            return self.run_block(ResidualBlock(
                blocks[block], scale, conv, proj_conv, norm, rate, activate, name=name
            ), x, train)

        for s, stage in enumerate(self.stages):
            for _, ours, block, repeats, scale in stage:
                if not block.startswith('block'):
                    x = self.run_block(Branches(blocks[block], conv, norm, name=ours), x)
                    continue
                for i in range(repeats):
                    x = residual(x, block, scale, f'{ours}_{i}')
            if s == len(self.stages) - 1:
                x = residual(x, 'block8', 1.0, 'block8', activate=False)
                x = BasicConv2d(1536, 1, conv=conv, norm=norm, name='conv2d_7b')(x)
            features[f'stage{s + 1}'] = x
        return x


# ------------------------------------------------------------------------------- name map


def _v4_rules() -> list[NameRule]:
    rules = [r for i in range(3) for r in conv_bn_rules(f'features.{i}', f'features_{i}')]
    rules += block_rules('features.3', 'features_3', Mixed3a.CONVS)
    rules += block_rules('features.4', 'features_4', branch_layer_names(INCEPTION_V4_BLOCKS['mixed_4a']))
    rules += block_rules('features.5', 'features_5', Mixed5a.CONVS)
    # Literal indices: InceptionC's 'branch1_0' and a sequential 'branch1.0' are both our
    # 'branch1_0', so each index gets the rows of its own block type only.
    index = 6
    for stage in INCEPTION_V4_STAGES:
        for block, repeats in stage:
            for _ in range(repeats):
                if block == 'inception_c':
                    convs = InceptionV4C.CONVS
                else:
                    convs = branch_layer_names(INCEPTION_V4_BLOCKS[block])
                rules += block_rules(f'features.{index}', f'features_{index}', convs)
                index += 1
    return rules + [NameRule('last_linear', 'last_linear', 'linear')]


def _inception_resnet_v2_rules() -> list[NameRule]:
    blocks = INCEPTION_RESNET_V2_BLOCKS
    stem = ('conv2d_1a', 'conv2d_2a', 'conv2d_2b', 'conv2d_3b', 'conv2d_4a', 'conv2d_7b')
    rules = [r for name in stem for r in conv_bn_rules(name, name)]
    rules += block_rules('mixed_5b', 'mixed_5b', branch_layer_names(blocks['mixed_5b']))
    for stage in INCEPTION_RESNET_V2_STAGES:
        for ref, ours, block, _, _ in stage:
            convs = branch_layer_names(blocks[block])
            if not block.startswith('block'):
                rules += block_rules(ref, ours, convs)
                continue
            rules += block_rules(f'{ref}.{{i}}', f'{ours}_{{i}}/branches', convs)
            rules.append(NameRule(f'{ref}.{{i}}.conv2d', f'{ours}_{{i}}/conv2d', 'conv'))
    rules += block_rules('block8', 'block8/branches', branch_layer_names(blocks['block8']))
    rules.append(NameRule('block8.conv2d', 'block8/conv2d', 'conv'))
    return rules + [NameRule('classif', 'classif', 'linear')]


register_name_map('inception_v4', (*_v4_rules(), *_inception_resnet_v2_rules()))

# ------------------------------------------------------------------------------ registry

_CFG = dict(
    input_size=(299, 299, 3),
    mean=INCEPTION_MEAN,
    std=INCEPTION_STD,
    interpolation='bicubic',
    paper=_PAPER,
)


# top1: TF-slim's published accuracy of the checkpoint timm ports (inception_v4.tf_in1k).
@register_model(top1=80.2, crop_pct=0.875, classifier='last_linear', first_conv='features_0/conv', **_CFG)
def inception_v4(**kwargs) -> InceptionV4:
    """Inception-v4, 42,679,816 parameters."""
    return InceptionV4(**kwargs)


# top1: TF-slim's published accuracy of the checkpoint timm ports (inception_resnet_v2.tf_in1k).
@register_model(top1=80.4, crop_pct=0.8975, classifier='classif', first_conv='conv2d_1a/conv', **_CFG)
def inception_resnet_v2(**kwargs) -> InceptionResNetV2:
    """Inception-ResNet-v2, 55,843,464 parameters."""
    return InceptionResNetV2(**kwargs)
