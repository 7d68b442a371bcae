"""GoogLeNet (Inception v1), BN-Inception (Inception v2) and Inception v3.

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
* ``inception_v3``: Szegedy et al., "Rethinking the Inception Architecture for Computer
  Vision", CVPR 2016, as timm's ``inception_v3`` (== torchvision's): BN eps 1e-3,
  299 px, 23,834,568 parameters (27,161,264 with ``aux_logits=True``).

Auxiliary classifiers (``aux_logits=True``; default off): their parameters exist from
``init`` on, they run in train mode only, and ``__call__`` still returns just the main
logits (so every trainer works unchanged). The auxiliary logits are ``sow`` n into the
``'intermediates'`` collection: ``model.apply(v, x, train=True, mutable=['batch_stats',
'intermediates'], rngs=...)`` returns them as ``intermediates['aux_logits1'][0]`` and
``['aux_logits2'][0]`` (GoogLeNet, torchvision's names) or ``['aux_logits'][0]``
(Inception v3). Without ``'intermediates'``
in ``mutable`` the sow is a no-op.

Initialisation follows each reference: GoogLeNet convs and linears N(0, 0.01), Inception v3
N(0, 0.1) (aux conv1 0.01, aux fc 0.001); torch truncates at +-2 *absolute*, which at these
stds is no truncation, so a plain normal is used. Linear biases as ``torch.nn.Linear``.
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

from models import layers
from models.convert import NameRule, register_name_map
from models.registry import register_model

_GOOGLENET_PAPER = 'Szegedy et al., "Going Deeper with Convolutions", CVPR 2015'
_BN_PAPER = (
    'Ioffe & Szegedy, "Batch Normalization: Accelerating Deep Network Training by Reducing '
    'Internal Covariate Shift", ICML 2015'
)
_V3_PAPER = 'Szegedy et al., "Rethinking the Inception Architecture for Computer Vision", CVPR 2016'
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


def adaptive_avg_pool(x: jax.Array, size: int) -> jax.Array:
    """``torch.nn.functional.adaptive_avg_pool2d`` on NHWC: bin ``i`` of ``n`` input rows
    covers ``[floor(i n / size), ceil((i + 1) n / size))`` (bins overlap when size does not
    divide n, e.g. GoogLeNet's 14 -> 4)."""
    h, w = x.shape[1:3]

    def bounds(n: int) -> list[tuple[int, int]]:
        return [((i * n) // size, -(-((i + 1) * n) // size)) for i in range(size)]

    rows = [
        jnp.stack([jnp.mean(x[:, r0:r1, c0:c1], axis=(1, 2)) for c0, c1 in bounds(w)], axis=1)
        for r0, r1 in bounds(h)
    ]
    return jnp.stack(rows, axis=1)


def check_norm(norm: str) -> None:
    if norm not in ('batch', 'group'):
        raise ValueError(f"norm must be 'batch' or 'group', got {norm!r}")


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


class GoogLeNet(nn.Module):
    """GoogLeNet / Inception v1 (torchvision layout, Szegedy et al. 2015 Table 1).

    Attributes:
        stages: modules per stage (see :data:`GOOGLENET_STAGES`).
        num_classes: classifier size; 0 returns pooled features.
        norm: ``'batch'`` or ``'group'``.
        gn_groups: groups when ``norm='group'``.
        weight_std: weight-standardised convs.
        dtype: compute dtype; parameters and logits are float32.
        drop_rate: dropout before the classifier (0.2 in torchvision).
        aux_logits: build the two auxiliary classifiers (see the module docstring).
        aux_drop_rate: dropout inside the auxiliary classifiers.
        padding: padding mode of the padded convs and pools (see the module docstring);
            ``'tf_same'`` turns the ceil-mode max-pools into TF ``SAME`` pools, which agree
            with them at even sizes and pad one pixel on both sides (one more output) at
            odd ones.
    """

    stages: tuple = GOOGLENET_STAGES
    num_classes: int = 1000
    norm: str = 'batch'
    gn_groups: int = 32
    weight_std: bool = False
    dtype: layers.Dtype = jnp.float32
    drop_rate: float = 0.2
    aux_logits: bool = False
    aux_drop_rate: float = 0.7
    padding: str = 'symmetric'

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
        """Applies the network to NHWC images; returns logits (and the feature dict)."""
        check_norm(self.norm)
        layers.check_model_padding(self.padding, type(self).__name__)
        init = nn.initializers.normal(0.01)
        conv = layers.conv_factory(self.weight_std, self.dtype, self.padding, kernel_init=init)
        norm = layers.norm_factory(self.norm, train, self.dtype, groups=self.gn_groups, epsilon=1e-3)
        cbr = functools.partial(BasicConv2d, conv=conv, norm=norm)
        run_aux = self.aux_logits and self.num_classes > 0 and (train or self.is_initializing())
        features = {}

        x = x.astype(self.dtype)
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
                x = InceptionV1Block(tuple(widths), conv, norm, name=name)(x)
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

        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        features['pre_logits'] = x
        if self.num_classes:
            x = layers.classifier_head(
                x, self.num_classes, drop_rate=self.drop_rate, train=train, dtype=self.dtype,
                kernel_init=init, name='fc',
            )
        x = x.astype(jnp.float32)
        return (x, features) if return_features else x


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


class BNInception(nn.Module):
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

    Attributes:
        stages: modules per stage (see :data:`BN_INCEPTION_STAGES`).
        num_classes: classifier size; 0 returns pooled features.
        norm: ``'batch'`` or ``'group'``.
        gn_groups: groups when ``norm='group'``.
        weight_std: weight-standardised convs.
        dtype: compute dtype; parameters and logits are float32.
        drop_rate: dropout before the classifier.
        padding: padding mode of the padded convs and pools (see the module docstring).
    """

    stages: tuple = BN_INCEPTION_STAGES
    num_classes: int = 1000
    norm: str = 'batch'
    gn_groups: int = 32
    weight_std: bool = False
    dtype: layers.Dtype = jnp.float32
    drop_rate: float = 0.0
    padding: str = 'symmetric'

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
        """Applies the network to NHWC images; returns logits (and the feature dict)."""
        check_norm(self.norm)
        layers.check_model_padding(self.padding, type(self).__name__)
        conv = layers.conv_factory(self.weight_std, self.dtype, self.padding)
        norm = layers.norm_factory(self.norm, train, self.dtype, groups=self.gn_groups)
        cbr = functools.partial(BasicConv2d, conv=conv, norm=norm, padding='same')
        pool = functools.partial(max_pool, window=3, strides=2, padding=1, mode=self.padding)
        features = {}

        x = x.astype(self.dtype)
        x = pool(cbr(64, 7, 2, name='conv1')(x))
        x = pool(cbr(192, 3, name='conv3')(cbr(64, 1, name='conv2')(x)))
        features['stem'] = x
        for s, stage in enumerate(self.stages):
            for name, strides, c1, r3, c3, rd, d3, pool_kind, pp in stage:
                x = BNInceptionBlock(
                    strides, (c1, r3, c3, rd, d3, pp), pool_kind, conv, norm, self.padding, name=name
                )(x)
            features[f'stage{s + 1}'] = x

        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        features['pre_logits'] = x
        if self.num_classes:
            x = layers.classifier_head(
                x, self.num_classes, drop_rate=self.drop_rate, train=train, dtype=self.dtype, name='fc'
            )
        x = x.astype(jnp.float32)
        return (x, features) if return_features else x


# ------------------------------------------------------------------------ Inception v3


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


class InceptionV3(nn.Module):
    """Inception v3 (timm/torchvision layout).

    Attributes:
        stages: modules per stage (see :data:`INCEPTION_V3_STAGES`).
        num_classes: classifier size; 0 returns pooled features.
        norm: ``'batch'`` or ``'group'``.
        gn_groups: groups when ``norm='group'``.
        weight_std: weight-standardised convs.
        dtype: compute dtype; parameters and logits are float32.
        drop_rate: dropout before the classifier (timm default 0).
        aux_logits: build the auxiliary classifier (see the module docstring).
        padding: padding mode of the padded convs (see the module docstring); every
            padded conv and pool of Inception v3 has stride 1 (its strided ones are
            unpadded), so ``'tf_same'`` computes the same network as ``'symmetric'``.
    """

    stages: tuple = INCEPTION_V3_STAGES
    num_classes: int = 1000
    norm: str = 'batch'
    gn_groups: int = 32
    weight_std: bool = False
    dtype: layers.Dtype = jnp.float32
    drop_rate: float = 0.0
    aux_logits: bool = False
    padding: str = 'symmetric'

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
        """Applies the network to NHWC images (>= 75 px); returns logits (and features)."""
        check_norm(self.norm)
        layers.check_model_padding(self.padding, type(self).__name__)
        init = nn.initializers.normal(0.1)
        conv = layers.conv_factory(self.weight_std, self.dtype, self.padding, kernel_init=init)
        norm = layers.norm_factory(self.norm, train, self.dtype, groups=self.gn_groups, epsilon=1e-3)
        cbr = functools.partial(BasicConv2d, conv=conv, norm=norm)
        run_aux = self.aux_logits and self.num_classes > 0 and (train or self.is_initializing())
        features = {}

        x = x.astype(self.dtype)
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
                x = _V3_BLOCKS[kind](*args, conv=conv, norm=norm, name=name)(x)
            if s == 1 and run_aux:
                aux = InceptionV3Aux(self.num_classes, conv, norm, self.dtype, name='AuxLogits')(x, train)
                if train and not self.is_initializing():
                    self.sow('intermediates', 'aux_logits', aux.astype(jnp.float32))
            features[f'stage{s + 1}'] = x

        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        features['pre_logits'] = x
        if self.num_classes:
            x = layers.classifier_head(
                x, self.num_classes, drop_rate=self.drop_rate, train=train, dtype=self.dtype,
                kernel_init=init, name='fc',
            )
        x = x.astype(jnp.float32)
        return (x, features) if return_features else x


# ------------------------------------------------------------------------------- name map

# torchvision's GoogLeNet / Inception3 and timm's InceptionV3 state-dict names (BN-Inception
# has no reference; it uses the GoogLeNet naming: conv1..3, inception3a.branch2.0, fc).
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

# ------------------------------------------------------------------------------ registry


# top1: torchvision IMAGENET1K_V1 (224 px, resize 256, centre crop).
@register_model(top1=69.778, paper=_GOOGLENET_PAPER)
def googlenet(**kwargs) -> GoogLeNet:
    """GoogLeNet, 6,624,904 parameters (13,004,888 with ``aux_logits=True``)."""
    return GoogLeNet(**kwargs)


# top1: Figure 3 of the paper (BN-x30, best single-crop validation accuracy).
@register_model(top1=74.8, paper=_BN_PAPER)
def bn_inception(**kwargs) -> BNInception:
    """BN-Inception (Inception v2), 11,285,224 parameters (Figure 5)."""
    return BNInception(**kwargs)


# top1: timm inception_v3.tv_in1k == torchvision IMAGENET1K_V1 (299 px, crop 0.875).
@register_model(
    input_size=(299, 299, 3),
    mean=INCEPTION_MEAN,
    std=INCEPTION_STD,
    interpolation='bicubic',
    top1=77.294,
    paper=_V3_PAPER,
)
def inception_v3(**kwargs) -> InceptionV3:
    """Inception v3, 23,834,568 parameters (27,161,264 with ``aux_logits=True``)."""
    return InceptionV3(**kwargs)
