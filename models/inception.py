"""GoogLeNet (Inception v1) and BN-Inception (Inception v2); Inception v3 is
:mod:`models.inception_v3`, built from this module's units.

* ``googlenet``: Szegedy et al., "Going Deeper with Convolutions", CVPR 2015, Table 1, as
  torchvision implements it: BatchNorm (eps 1e-3) after every conv, and the torchvision
  quirk of a **3x3** conv in the "5x5" branch (pytorch/vision#906), so torchvision weights
  load. 6,624,904 parameters (13,004,888 with ``aux_logits=True``), equal to
  ``torchvision.models.googlenet(aux_logits=False / True)``. ``transform_input=False``
  semantics: inputs are normalised by the pipeline with the ImageNet mean/std of the cfg
  (torchvision's pretrained weights instead expect its ``transform_input=True`` remap).
* ``bn_inception``: Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network
  Training by Reducing Internal Covariate Shift", ICML 2015, Figure 5. No timm/torchvision
  reference exists; the layer table below is Figure 5 verbatim. See :class:`BNInception`
  for the parameter count derived from it and the two places the figure is ambiguous.

Auxiliary classifiers (``aux_logits=True``; default off): their parameters exist from
``init`` on, they run in train mode only, and ``__call__`` still returns just the main
logits (so every trainer works unchanged). The auxiliary logits are ``sow`` n into the
``'intermediates'`` collection: ``model.apply(v, x, train=True, mutable=['batch_stats',
'intermediates'], rngs=...)`` returns them as ``intermediates['aux_logits1'][0]`` and
``['aux_logits2'][0]`` (GoogLeNet, torchvision's names) or ``['aux_logits'][0]``
(Inception v3). Without ``'intermediates'`` in ``mutable`` the sow is a no-op.

Initialisation follows each reference: GoogLeNet convs and linears N(0, 0.01); torch
truncates at +-2 *absolute*, which at this std is no truncation, so a plain normal is used.
Linear biases as ``torch.nn.Linear``.
BN-Inception (no reference) uses He-normal (fan_out) convs. Norm scale 1, bias 0.

Padding (the ``padding`` field of every network): ``'symmetric'`` (default) is the
references' torch padding; ``'tf_same'`` makes every padded conv and every padded strided
pool TF ``SAME`` (:func:`layers.get_padding`), while unpadded convs and pools stay VALID.
Stride-1 pools pad ``k // 2`` on both sides, as ``SAME`` does, so they do not depend on the
mode.

Feature maps (``return_features=True``): ``stem`` (stride 8), ``stage1`` (stride 8),
``stage2`` (stride 16), ``stage3`` (stride 32), ``pre_logits``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers, registry
from models.alexnet import adaptive_avg_pool
from models.convert import NameRule, register_name_map

register_model = functools.partial(registry.register_model, family='inception', classifier='fc')

_GOOGLENET_PAPER = 'Szegedy et al., "Going Deeper with Convolutions", CVPR 2015'
_BN_PAPER = (
    'Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing '
    'Internal Covariate Shift", ICML 2015'
)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)

# ------------------------------------------------------------------------- variant tables

# GoogLeNet, Szegedy et al. 2015 Table 1, one tuple of modules per stage:
# (name, #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj).
GOOGLENET_STAGES: tuple[tuple[tuple[str, int, int, int, int, int, int], ...], ...] = (
    (('inception3a', 64, 96, 128, 16, 32, 32), ('inception3b', 128, 128, 192, 32, 96, 64)),
    (
        ('inception4a', 192, 96, 208, 16, 48, 64),
        ('inception4b', 160, 112, 224, 24, 64, 64),
        ('inception4c', 128, 128, 256, 24, 64, 64),
        ('inception4d', 112, 144, 288, 32, 64, 64),
        ('inception4e', 256, 160, 320, 32, 128, 128),
    ),
    (('inception5a', 256, 160, 320, 32, 128, 128), ('inception5b', 384, 192, 384, 48, 128, 128)),
)

# BN-Inception, Ioffe & Szegedy 2015 Figure 5, one tuple of modules per stage:
# (name, stride, #1x1, #3x3 reduce, #3x3, double #3x3 reduce, double #3x3, pool, pool proj);
# #1x1 = 0: no 1x1 branch; pool proj = 0: "pass through" (the pooled input is concatenated).
BN_INCEPTION_STAGES: tuple[tuple[tuple[str, int, int, int, int, int, int, str, int], ...], ...] = (
    (
        ('inception3a', 1, 64, 64, 64, 64, 96, 'avg', 32),
        ('inception3b', 1, 64, 64, 96, 64, 96, 'avg', 64),
    ),
    (
        ('inception3c', 2, 0, 128, 160, 64, 96, 'max', 0),
        ('inception4a', 1, 224, 64, 96, 96, 128, 'avg', 128),
        ('inception4b', 1, 192, 96, 128, 96, 128, 'avg', 128),
        ('inception4c', 1, 160, 128, 160, 128, 160, 'avg', 128),
        ('inception4d', 1, 96, 128, 192, 160, 192, 'avg', 128),
    ),
    (
        ('inception4e', 2, 0, 128, 192, 192, 256, 'max', 0),
        ('inception5a', 1, 352, 192, 320, 160, 224, 'avg', 128),
        ('inception5b', 1, 352, 192, 320, 192, 224, 'max', 128),
    ),
)

# ------------------------------------------------------------------------ building blocks


class BasicConv2d(nn.Module):
    """Conv (no bias) + norm + ReLU, the unit every Inception network is built from.

    Attributes:
        features: output channels.
        kernel_size: int or (kh, kw).
        strides: conv stride.
        padding: ``'valid'`` (torch ``padding=0``) or ``'same'`` (torch ``padding=k // 2``),
            the only two paddings the references use. ``'same'`` pads in the model's
            padding mode, the default of ``conv`` (see :func:`layers.conv_factory`).
        conv: conv constructor from :func:`layers.conv_factory` (required).
        norm: norm constructor from :func:`layers.norm_factory` (required).
        kernel_init: overrides the conv factory's initialiser for this layer (None: keep).
    """

    features: int
    kernel_size: int | tuple[int, int]
    strides: int = 1
    padding: str = 'valid'
    conv: Callable[..., nn.Module] | None = None
    norm: Callable[..., nn.Module] | None = None
    kernel_init: Callable | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding not in ('valid', 'same'):
            raise ValueError(f"BasicConv2d padding must be 'valid' or 'same', got {self.padding!r}")
        kwargs = {} if self.kernel_init is None else {'kernel_init': self.kernel_init}
        padding = 'valid' if self.padding == 'valid' else None  # None: the factory's mode
        x = self.conv(
            self.features, self.kernel_size, self.strides, padding=padding, name='conv', **kwargs
        )(x)
        return nn.relu(self.norm(name='bn')(x))


def max_pool(
    x: jax.Array,
    window: int,
    strides: int,
    padding: int = 0,
    ceil_mode: bool = False,
    mode: str = 'symmetric',
) -> jax.Array:
    """``torch.nn.MaxPool2d`` on NHWC, including ``ceil_mode``.

    With ``ceil_mode`` the output has ``ceil((n + 2p - k) / s) + 1`` positions, minus one if
    the last window would start in the right padding (torch's rule); the extra right/bottom
    positions are padded with -inf so they never win. ``mode='tf_same'`` (a model's
    ``padding`` field) makes a pool that pads at all (``padding > 0`` or ``ceil_mode``) a TF
    ``SAME`` pool; unpadded pools stay VALID.
    """
    if mode == 'tf_same' and (padding or ceil_mode):
        return nn.max_pool(x, (window, window), (strides, strides), padding='SAME')
    pads = []
    for n in x.shape[1:3]:
        if ceil_mode:
            out = -(-(n + 2 * padding - window) // strides) + 1
            if (out - 1) * strides >= n + padding:
                out -= 1
        else:
            out = (n + 2 * padding - window) // strides + 1
        pads.append((padding, (out - 1) * strides + window - n - padding))
    return nn.max_pool(x, (window, window), (strides, strides), padding=pads)


def avg_pool(
    x: jax.Array,
    window: int,
    strides: int,
    padding: int = 0,
    count_include_pad: bool = True,
    mode: str = 'symmetric',
) -> jax.Array:
    """``torch.nn.AvgPool2d`` on NHWC (floor mode); a padded pool is TF ``SAME`` instead
    when ``mode='tf_same'`` (``count_include_pad`` keeps its meaning)."""
    pads = 'SAME' if mode == 'tf_same' and padding else ((padding, padding), (padding, padding))
    return nn.avg_pool(
        x, (window, window), (strides, strides), padding=pads, count_include_pad=count_include_pad
    )


def conv_bn_rules(ref: str, ours: str) -> tuple[NameRule, NameRule]:
    """Name-map rows of one :class:`BasicConv2d` (torch ``BasicConv2d`` / timm ``ConvNormAct``)."""
    return NameRule(f'{ref}.conv', f'{ours}/conv', 'conv'), NameRule(f'{ref}.bn', f'{ours}/bn', 'norm')


def block_rules(ref: str, ours: str, convs: Sequence[str]) -> list[NameRule]:
    """Rows of every :class:`BasicConv2d` of a block; ``convs`` are reference suffixes and
    ours are the same with ``.`` -> ``_`` (torch ``branch2.0`` is our ``branch2_0``)."""
    return [r for c in convs for r in conv_bn_rules(f'{ref}.{c}', f'{ours}/{c.replace(".", "_")}')]


# --------------------------------------------------------------------- GoogLeNet (v1)


class InceptionV1Block(nn.Module):
    """GoogLeNet module (Szegedy et al. 2015, Fig. 2b) as in torchvision.

    Attributes:
        widths: (#1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj) of Table 1.
        conv: conv constructor.
        norm: norm constructor.
    """

    widths: tuple[int, int, int, int, int, int]
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]

    CONVS: ClassVar[tuple[str, ...]] = (
        'branch1', 'branch2.0', 'branch2.1', 'branch3.0', 'branch3.1', 'branch4.1'
    )  # fmt: skip

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c1, r3, c3, r5, c5, pp = self.widths
        cbr = functools.partial(BasicConv2d, conv=self.conv, norm=self.norm)
        b1 = cbr(c1, 1, name='branch1')(x)
        b2 = cbr(c3, 3, padding='same', name='branch2_1')(cbr(r3, 1, name='branch2_0')(x))
        # torchvision's "5x5" branch is a 3x3 conv (pytorch/vision#906); its weights need it.
        b3 = cbr(c5, 3, padding='same', name='branch3_1')(cbr(r5, 1, name='branch3_0')(x))
        b4 = cbr(pp, 1, name='branch4_1')(max_pool(x, 3, 1, padding=1, ceil_mode=True))
        return jnp.concatenate([b1, b2, b3, b4], axis=-1)


class InceptionV1Aux(nn.Module):
    """GoogLeNet auxiliary classifier (Sec. 5) as in torchvision: adaptive 4x4 average
    pool, 1x1 conv 128, fc 1024 + ReLU, dropout, fc.

    Attributes:
        num_classes: output size.
        conv: conv constructor.
        norm: norm constructor.
        drop_rate: dropout before the last fc (0.7 in the paper and torchvision).
        dtype: compute dtype.
        kernel_init: initialiser of both fc kernels.
    """

    num_classes: int
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]
    drop_rate: float
    dtype: layers.Dtype
    kernel_init: Callable

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = BasicConv2d(128, 1, conv=self.conv, norm=self.norm, name='conv')(adaptive_avg_pool(x, 4))
        # torch flattens NCHW: transpose so fc1's weight keeps torchvision's column order.
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
        head = functools.partial(
            layers.classifier_head, train=train, dtype=self.dtype, kernel_init=self.kernel_init
        )
        x = nn.relu(head(x, 1024, drop_rate=0.0, name='fc1'))
        return head(x, self.num_classes, drop_rate=self.drop_rate, name='fc2')


class GoogLeNet(layers.ImageClassifier):
    """GoogLeNet / Inception v1 (torchvision layout, Szegedy et al. 2015 Table 1).

    Shared fields as :class:`layers.ImageClassifier` (``drop_rate`` 0.2 as torchvision);
    ``padding='tf_same'`` turns the ceil-mode max-pools into TF ``SAME`` pools, which agree
    with them at even sizes and pad one pixel on both sides (one more output) at odd ones.

    Attributes:
        stages: modules per stage (see :data:`GOOGLENET_STAGES`).
        aux_logits: build the two auxiliary classifiers (see the module docstring).
        aux_drop_rate: dropout inside the auxiliary classifiers.
    """

    stages: tuple = GOOGLENET_STAGES
    aux_logits: bool = False
    aux_drop_rate: float = 0.7
    drop_rate: float = layers.kw_only(0.2)

    HEAD_INIT = (nn.initializers.normal(0.01), None)

    def forward_features(self, x: jax.Array, train: bool, features: dict) -> jax.Array:
        init = self.HEAD_INIT[0]
        conv = self.make_conv(kernel_init=init)
        norm = self.make_norm(train, epsilon=1e-3)
        cbr = functools.partial(BasicConv2d, conv=conv, norm=norm)
        run_aux = self.aux_logits and self.num_classes > 0 and (train or self.is_initializing())

        x = cbr(64, 7, 2, padding='same', name='conv1')(x)
        x = max_pool(x, 3, 2, ceil_mode=True, mode=self.padding)
        x = cbr(64, 1, name='conv2')(x)
        x = cbr(192, 3, padding='same', name='conv3')(x)
        x = max_pool(x, 3, 2, ceil_mode=True, mode=self.padding)
        features['stem'] = x

        aux = {}
        for s, stage in enumerate(self.stages):
            if s == 1:
                x = max_pool(x, 3, 2, ceil_mode=True, mode=self.padding)
            elif s == 2:
                x = max_pool(x, 2, 2, ceil_mode=True, mode=self.padding)
            for name, *widths in stage:
                x = self.run_block(InceptionV1Block(tuple(widths), conv, norm, name=name), x)
                # Aux heads tap the outputs of 4a and 4d (Szegedy et al. 2015, Sec. 5).
                if run_aux and name in ('inception4a', 'inception4d'):
                    key = 'aux1' if name == 'inception4a' else 'aux2'
                    aux[key] = InceptionV1Aux(
                        self.num_classes, conv, norm, self.aux_drop_rate, self.dtype, init, name=key
                    )(x, train)
            features[f'stage{s + 1}'] = x
        if train and not self.is_initializing():
            for key, value in aux.items():
                self.sow('intermediates', f'aux_logits{key[-1]}', value.astype(jnp.float32))
        return x


# --------------------------------------------------------------- BN-Inception (v2)


class BNInceptionBlock(nn.Module):
    """BN-Inception module (Ioffe & Szegedy 2015, Figure 5 and Sec. 4.1): the 5x5 branch is
    two stacked 3x3 convs; stride-2 modules have no 1x1 branch, stride their last 3x3s and
    concatenate the max-pooled input ("pass through").

    Attributes:
        strides: 1, or 2 for the grid-reducing modules (3c, 4e).
        widths: (#1x1, #3x3 reduce, #3x3, double #3x3 reduce, double #3x3, pool proj).
        pool: ``'avg'`` or ``'max'``.
        conv: conv constructor.
        norm: norm constructor.
        padding: padding mode of the pool (the convs pad in ``conv``'s mode).
    """

    strides: int
    widths: tuple[int, int, int, int, int, int]
    pool: str
    conv: Callable[..., nn.Module]
    norm: Callable[..., nn.Module]
    padding: str = 'symmetric'

    CONVS: ClassVar[tuple[str, ...]] = (
        'branch1', 'branch2.0', 'branch2.1', 'branch3.0', 'branch3.1', 'branch3.2', 'branch4.1'
    )  # fmt: skip

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c1, r3, c3, rd, d3, pp = self.widths
        s = self.strides
        cbr = functools.partial(BasicConv2d, conv=self.conv, norm=self.norm, padding='same')
        outs = [cbr(c1, 1, name='branch1')(x)] if c1 else []
        outs.append(cbr(c3, 3, s, name='branch2_1')(cbr(r3, 1, name='branch2_0')(x)))
        y = cbr(d3, 3, name='branch3_1')(cbr(rd, 1, name='branch3_0')(x))
        outs.append(cbr(d3, 3, s, name='branch3_2')(y))
        # Pad 1 (not Caffe's ceil-mode, pad 0) keeps every branch at ceil(n / s) for any n.
        if self.pool == 'max':
            y = max_pool(x, 3, s, padding=1, mode=self.padding)
        else:
            y = avg_pool(x, 3, s, padding=1, mode=self.padding)
        outs.append(cbr(pp, 1, name='branch4_1')(y) if pp else y)
        return jnp.concatenate(outs, axis=-1)


class BNInception(layers.ImageClassifier):
    """BN-Inception / Inception v2 (Ioffe & Szegedy 2015, Figure 5).

    Stem ``conv1`` 7x7/2 64, max-pool 3x3/2, ``conv2`` 1x1 64 (the table's "#3x3 reduce"),
    ``conv3`` 3x3 192, max-pool 3x3/2, then the modules of :data:`BN_INCEPTION_STAGES`,
    global average pool and the linear classifier. BN after every conv (so convs carry no
    bias, Sec. 3.2); no dropout by default (Sec. 4.2.1, "Remove Dropout").

    Parameter count derived from Figure 5 (conv weights + BN scale/offset per conv + the
    1024 x 1000 linear with bias): 11,285,224 at 1000 classes (10,260,224 without the
    classifier), which this module has exactly.

    Ambiguities of Figure 5, resolved as the common (Caffe-derived) implementations do:
    the "depth" column says 576 for 4c/4d and 1024 for 4e, but the filter counts of the
    table concatenate to 608, 608 and 1056; we follow the filter counts. Pool padding is
    not given; we pad 3x3 pools by 1 so all branches agree at any input size.

    Shared fields as :class:`layers.ImageClassifier`.

    Attributes:
        stages: modules per stage (see :data:`BN_INCEPTION_STAGES`).
    """

    stages: tuple = BN_INCEPTION_STAGES

    def forward_features(self, x: jax.Array, train: bool, features: dict) -> jax.Array:
        conv, norm = self.make_conv(), self.make_norm(train)
        cbr = functools.partial(BasicConv2d, conv=conv, norm=norm, padding='same')
        pool = functools.partial(max_pool, window=3, strides=2, padding=1, mode=self.padding)

        x = pool(cbr(64, 7, 2, name='conv1')(x))
        x = pool(cbr(192, 3, name='conv3')(cbr(64, 1, name='conv2')(x)))
        features['stem'] = x
        for s, stage in enumerate(self.stages):
            for name, strides, c1, r3, c3, rd, d3, pool_kind, pp in stage:
                x = self.run_block(BNInceptionBlock(
                    strides, (c1, r3, c3, rd, d3, pp), pool_kind, conv, norm, self.padding, name=name
                ), x)
            features[f'stage{s + 1}'] = x
        return x


# ------------------------------------------------------------------------------- name map

# torchvision's GoogLeNet state-dict names (BN-Inception has no reference; it uses the
# GoogLeNet naming: conv1..3, inception3a.branch2.0, fc).
# Generated from the variant tables: module names contain letters ('inception4e',
# 'Mixed_6b'), which NameRule placeholders (decimal integers) cannot stand for.
_V1_BLOCK_NAMES = sorted({row[0] for stages in (GOOGLENET_STAGES, BN_INCEPTION_STAGES) for st in stages for row in st})
register_name_map(
    'inception',
    (
        *[r for name in ('conv1', 'conv2', 'conv3') for r in conv_bn_rules(name, name)],
        *[r for name in _V1_BLOCK_NAMES for r in block_rules(name, name, BNInceptionBlock.CONVS)],
        *conv_bn_rules('aux{a}.conv', 'aux{a}/conv'),
        NameRule('aux{a}.fc{i}', 'aux{a}/fc{i}', 'linear'),
        NameRule('fc', 'fc', 'linear'),
    ),
)

# ------------------------------------------------------------------------------ registry


# top1: torchvision IMAGENET1K_V1 (224 px, resize 256, centre crop).
@register_model(
    top1=69.778, paper=_GOOGLENET_PAPER, classifier=('fc', 'aux1/fc2', 'aux2/fc2'), first_conv='conv1/conv'
)
def googlenet(**kwargs) -> GoogLeNet:
    """GoogLeNet, 6,624,904 parameters (13,004,888 with ``aux_logits=True``)."""
    return GoogLeNet(**kwargs)


# top1: Figure 3 of the paper (BN-x30, best single-crop validation accuracy).
@register_model(top1=74.8, paper=_BN_PAPER, first_conv='conv1/conv')
def bn_inception(**kwargs) -> BNInception:
    """BN-Inception (Inception v2), 11,285,224 parameters (Figure 5)."""
    return BNInception(**kwargs)
