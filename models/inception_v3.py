"""Inception v3, in timm's / torchvision's layout.

Szegedy et al., "Rethinking the Inception Architecture for Computer Vision", CVPR 2016, as
timm's ``inception_v3`` (== torchvision's): BN eps 1e-3, 299 px, 23,834,568 parameters
(27,161,264 with ``aux_logits=True``), built from :mod:`models.inception`'s conv + norm +
ReLU unit and pools, with the auxiliary classifier and ``padding`` semantics described
there. Initialisation follows the reference: convs and the classifier N(0, 0.1) (aux conv1
0.01, aux fc 0.001); linear biases as ``torch.nn.Linear``.

Feature maps (``return_features=True``): ``stem`` (stride 8), ``stage1`` (stride 8),
``stage2`` (stride 16), ``stage3`` (stride 32), ``pre_logits``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ClassVar

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

_PAPER = 'Szegedy et al., "Rethinking the Inception Architecture for Computer Vision", CVPR 2016'

# Inception v3 (timm/torchvision layout; Szegedy et al. 2016 Table 1 and Figs. 5-7), one
# tuple of modules per stage: (name, block type, width argument). Type 'A' takes the pool
# projection width, 'C' the 7x7 branch width (Fig. 6's n x n factorisation, n = 7).
INCEPTION_V3_STAGES: tuple[tuple[tuple[str, str, int], ...], ...] = (
    (('Mixed_5b', 'A', 32), ('Mixed_5c', 'A', 64), ('Mixed_5d', 'A', 64)),
    (
        ('Mixed_6a', 'B', 0),
        ('Mixed_6b', 'C', 128),
        ('Mixed_6c', 'C', 160),
        ('Mixed_6d', 'C', 160),
        ('Mixed_6e', 'C', 192),
    ),
    (('Mixed_7a', 'D', 0), ('Mixed_7b', 'E', 0), ('Mixed_7c', 'E', 0)),
)

class InceptionV3A(nn.Module):
    """35x35 module (Szegedy et al. 2016 Fig. 5; torchvision keeps a 5x5 branch).

    Attributes:
        pool_features: width of the pool projection.
        conv: conv constructor.
        norm: norm constructor.
    """

    pool_features: int
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]

    CONVS: ClassVar[tuple[str, ...]] = (
        'branch1x1', 'branch5x5_1', 'branch5x5_2', 'branch3x3dbl_1', 'branch3x3dbl_2',
        'branch3x3dbl_3', 'branch_pool',
    )  # fmt: skip

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cbr = functools.partial(BasicConv2d, conv=self.conv, norm=self.norm, padding='same')
        b1 = cbr(64, 1, name='branch1x1')(x)
        b5 = cbr(64, 5, name='branch5x5_2')(cbr(48, 1, name='branch5x5_1')(x))
        b3 = cbr(64, 1, name='branch3x3dbl_1')(x)
        b3 = cbr(96, 3, name='branch3x3dbl_3')(cbr(96, 3, name='branch3x3dbl_2')(b3))
        bp = cbr(self.pool_features, 1, name='branch_pool')(avg_pool(x, 3, 1, padding=1))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionV3B(nn.Module):
    """35 -> 17 grid reduction (Szegedy et al. 2016 Fig. 10)."""

    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]

    CONVS: ClassVar[tuple[str, ...]] = ('branch3x3', 'branch3x3dbl_1', 'branch3x3dbl_2', 'branch3x3dbl_3')

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cbr = functools.partial(BasicConv2d, conv=self.conv, norm=self.norm)
        b3 = cbr(384, 3, 2, name='branch3x3')(x)
        bd = cbr(64, 1, name='branch3x3dbl_1')(x)
        bd = cbr(96, 3, padding='same', name='branch3x3dbl_2')(bd)
        bd = cbr(96, 3, 2, name='branch3x3dbl_3')(bd)
        return jnp.concatenate([b3, bd, max_pool(x, 3, 2)], axis=-1)


class InceptionV3C(nn.Module):
    """17x17 module with 7x7 factorised into 1x7 and 7x1 (Szegedy et al. 2016 Fig. 6).

    Attributes:
        channels_7x7: width inside the factorised branches.
        conv: conv constructor.
        norm: norm constructor.
    """

    channels_7x7: int
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]

    CONVS: ClassVar[tuple[str, ...]] = (
        'branch1x1', 'branch7x7_1', 'branch7x7_2', 'branch7x7_3', 'branch7x7dbl_1',
        'branch7x7dbl_2', 'branch7x7dbl_3', 'branch7x7dbl_4', 'branch7x7dbl_5', 'branch_pool',
    )  # fmt: skip

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c7 = self.channels_7x7
        cbr = functools.partial(BasicConv2d, conv=self.conv, norm=self.norm, padding='same')
        b1 = cbr(192, 1, name='branch1x1')(x)
        b7 = cbr(c7, 1, name='branch7x7_1')(x)
        b7 = cbr(c7, (1, 7), name='branch7x7_2')(b7)
        b7 = cbr(192, (7, 1), name='branch7x7_3')(b7)
        bd = cbr(c7, 1, name='branch7x7dbl_1')(x)
        for i, (width, kernel) in enumerate(((c7, (7, 1)), (c7, (1, 7)), (c7, (7, 1)), (192, (1, 7)))):
            bd = cbr(width, kernel, name=f'branch7x7dbl_{i + 2}')(bd)
        bp = cbr(192, 1, name='branch_pool')(avg_pool(x, 3, 1, padding=1))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionV3D(nn.Module):
    """17 -> 8 grid reduction."""

    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]

    CONVS: ClassVar[tuple[str, ...]] = (
        'branch3x3_1', 'branch3x3_2', 'branch7x7x3_1', 'branch7x7x3_2', 'branch7x7x3_3',
        'branch7x7x3_4',
    )  # fmt: skip

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cbr = functools.partial(BasicConv2d, conv=self.conv, norm=self.norm)
        b3 = cbr(320, 3, 2, name='branch3x3_2')(cbr(192, 1, name='branch3x3_1')(x))
        b7 = cbr(192, 1, name='branch7x7x3_1')(x)
        b7 = cbr(192, (1, 7), padding='same', name='branch7x7x3_2')(b7)
        b7 = cbr(192, (7, 1), padding='same', name='branch7x7x3_3')(b7)
        b7 = cbr(192, 3, 2, name='branch7x7x3_4')(b7)
        return jnp.concatenate([b3, b7, max_pool(x, 3, 2)], axis=-1)


class InceptionV3E(nn.Module):
    """8x8 module with expanded 1x3 / 3x1 outputs (Szegedy et al. 2016 Fig. 7)."""

    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]

    CONVS: ClassVar[tuple[str, ...]] = (
        'branch1x1', 'branch3x3_1', 'branch3x3_2a', 'branch3x3_2b', 'branch3x3dbl_1',
        'branch3x3dbl_2', 'branch3x3dbl_3a', 'branch3x3dbl_3b', 'branch_pool',
    )  # fmt: skip

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cbr = functools.partial(BasicConv2d, conv=self.conv, norm=self.norm, padding='same')
        b1 = cbr(320, 1, name='branch1x1')(x)
        b3 = cbr(384, 1, name='branch3x3_1')(x)
        b3 = [cbr(384, (1, 3), name='branch3x3_2a')(b3), cbr(384, (3, 1), name='branch3x3_2b')(b3)]
        bd = cbr(384, 3, name='branch3x3dbl_2')(cbr(448, 1, name='branch3x3dbl_1')(x))
        bd = [cbr(384, (1, 3), name='branch3x3dbl_3a')(bd), cbr(384, (3, 1), name='branch3x3dbl_3b')(bd)]
        bp = cbr(192, 1, name='branch_pool')(avg_pool(x, 3, 1, padding=1))
        return jnp.concatenate([b1, *b3, *bd, bp], axis=-1)


_V3_BLOCKS: dict[str, type[nn.Module]] = {
    'A': InceptionV3A,
    'B': InceptionV3B,
    'C': InceptionV3C,
    'D': InceptionV3D,
    'E': InceptionV3E,
}


class InceptionV3Aux(nn.Module):
    """Inception v3 auxiliary classifier on the 17x17 grid (Szegedy et al. 2016 Sec. 4).

    Attributes:
        num_classes: output size.
        conv: conv constructor.
        norm: norm constructor.
        dtype: compute dtype.
    """

    num_classes: int
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]
    dtype: layers.Dtype

    CONVS: ClassVar[tuple[str, ...]] = ('conv0', 'conv1')

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = avg_pool(x, 5, 3)
        x = BasicConv2d(128, 1, conv=self.conv, norm=self.norm, name='conv0')(x)
        x = BasicConv2d(
            768, 5, conv=self.conv, norm=self.norm, kernel_init=nn.initializers.normal(0.01), name='conv1'
        )(x)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        return layers.classifier_head(
            x, self.num_classes, drop_rate=0.0, train=train, dtype=self.dtype,
            kernel_init=nn.initializers.normal(0.001), name='fc',
        )


class InceptionV3(layers.ImageClassifier):
    """Inception v3 (timm/torchvision layout); inputs >= 75 px.

    Shared fields as :class:`layers.ImageClassifier` (timm's default ``drop_rate`` 0).
    Every padded conv and pool of Inception v3 has stride 1 (its strided ones are
    unpadded), so ``padding='tf_same'`` computes the same network as ``'symmetric'``.

    Attributes:
        stages: modules per stage (see :data:`INCEPTION_V3_STAGES`).
        aux_logits: build the auxiliary classifier (see the module docstring).
    """

    stages: tuple = INCEPTION_V3_STAGES
    aux_logits: bool = False

    HEAD_INIT = (nn.initializers.normal(0.1), None)

    def forward_features(self, x: jax.Array, train: bool, features: dict) -> jax.Array:
        conv = self.make_conv(kernel_init=self.HEAD_INIT[0])
        norm = self.make_norm(train, epsilon=1e-3)
        cbr = functools.partial(BasicConv2d, conv=conv, norm=norm)
        run_aux = self.aux_logits and self.num_classes > 0 and (train or self.is_initializing())

        x = cbr(32, 3, 2, name='Conv2d_1a_3x3')(x)
        x = cbr(32, 3, name='Conv2d_2a_3x3')(x)
        x = cbr(64, 3, padding='same', name='Conv2d_2b_3x3')(x)
        x = max_pool(x, 3, 2)
        x = cbr(80, 1, name='Conv2d_3b_1x1')(x)
        x = cbr(192, 3, name='Conv2d_4a_3x3')(x)
        x = max_pool(x, 3, 2)
        features['stem'] = x
        for s, stage in enumerate(self.stages):
            for name, kind, width in stage:
                args = (width,) if kind in ('A', 'C') else ()
                x = self.run_block(_V3_BLOCKS[kind](*args, conv=conv, norm=norm, name=name), x)
            if s == 1 and run_aux:
                aux = InceptionV3Aux(self.num_classes, conv, norm, self.dtype, name='AuxLogits')(x, train)
                if train and not self.is_initializing():
                    self.sow('intermediates', 'aux_logits', aux.astype(jnp.float32))
            features[f'stage{s + 1}'] = x
        return x


# timm's InceptionV3 (== torchvision's Inception3) state-dict names, from the stage table;
# registered under the model's name within the 'inception' family.
register_name_map(
    'inception_v3',
    (
        *[
            r
            for name in ('Conv2d_1a_3x3', 'Conv2d_2a_3x3', 'Conv2d_2b_3x3', 'Conv2d_3b_1x1', 'Conv2d_4a_3x3')
            for r in conv_bn_rules(name, name)
        ],
        *[
            r
            for stage in INCEPTION_V3_STAGES
            for name, kind, _ in stage
            for r in block_rules(name, name, _V3_BLOCKS[kind].CONVS)
        ],
        *block_rules('AuxLogits', 'AuxLogits', InceptionV3Aux.CONVS),
        NameRule('AuxLogits.fc', 'AuxLogits/fc', 'linear'),
        NameRule('fc', 'fc', 'linear'),
    ),
)


# top1: timm inception_v3.tv_in1k == torchvision IMAGENET1K_V1 (299 px, crop 0.875).
@registry.register_model(
    family='inception',
    input_size=(299, 299, 3),
    mean=INCEPTION_MEAN,
    std=INCEPTION_STD,
    interpolation='bicubic',
    top1=77.294,
    paper=_PAPER,
    classifier=('fc', 'AuxLogits/fc'),
    first_conv='Conv2d_1a_3x3/conv',
)
def inception_v3(**kwargs) -> InceptionV3:
    """Inception v3, 23,834,568 parameters (27,161,264 with ``aux_logits=True``)."""
    return InceptionV3(**kwargs)
