"""AlexNet (torchvision's and the 2012 original) and OverFeat: plain conv stacks + 3 FC layers.

One :class:`AlexNet` module runs every member; a member is a :class:`NetSpec` row of
:data:`NET_SPECS` (conv layers, pooled size before the classifier, hidden FC widths).

``alexnet`` -- torchvision's single-tower AlexNet, after Krizhevsky, "One weird trick for
parallelizing convolutional neural networks", arXiv:1404.5997, 2014, with torchvision's
layer sizes: convs 64-192-384-256-256 (11x11/4 pad 2, 5x5 pad 2, 3x3 pad 1 x3), max-pool
3x3/2 after conv1, conv2 and conv5, adaptive average pool to 6x6 (so any input >= 63 px
works), dropout -> FC 4096 -> dropout -> FC 4096 -> FC. 61,100,840 parameters at 1000
classes, equal to torchvision; torchvision weights load with ``models.convert_state_dict``.

``alexnet_original`` -- Krizhevsky, Sutskever, Hinton, "ImageNet Classification with Deep
Convolutional Neural Networks", NIPS 2012, Fig. 2 and Sec. 3. The two GPU towers are one
network whose conv2, conv4 and conv5 are grouped convolutions (``groups=2``: those kernels
see only the 48 / 192 / 192 maps of their own GPU), while conv3 and the FC layers connect
across GPUs. Local response normalisation (Sec. 3.3, k=2, n=5, alpha=1e-4, beta=0.75)
follows the ReLU of conv1 and conv2, and overlapping max-pooling (3x3/2, Sec. 3.4) follows
both LRNs and conv5. Input 227x227: the paper says 224, but an 11x11 stride-4 conv without
padding only tiles ``4 * 54 + 11 = 227`` pixels, and 227 is what gives Fig. 2's 55x55 maps.
Parameters (Fig. 2 widths, with biases)::

    conv1  96 x 11*11*3   + 96    =     34,944
    conv2 256 x  5*5*48   + 256   =    307,456   (groups=2)
    conv3 384 x  3*3*256  + 384   =    885,120
    conv4 384 x  3*3*192  + 384   =    663,936   (groups=2)
    conv5 256 x  3*3*192  + 256   =    442,624   (groups=2)
    fc6  4096 x 6*6*256   + 4096  = 37,752,832
    fc7  4096 x 4096      + 4096  = 16,781,312
    fc8  1000 x 4096      + 1000  =  4,097,000
                                    ----------
                                    60,965,224  (60,954,656 weights + 10,568 biases)

The paper states only the round figure "60 million parameters" (abstract; Sec. 4). The
exact count of its Fig. 2 network is 1.6% above that, so the 1% tolerance used for the other
paper-only members cannot hold against a figure rounded to one significant digit; the test
instead checks the exact arithmetic above, and the round figure to within 2%.
Departures: torch-default initialisation (uniform +-1/sqrt(fan_in)) instead of the paper's
N(0, 0.01) weights with unit biases in conv2/4/5 and the FC layers (Sec. 5); an adaptive
average pool to 6x6 before fc6 (the identity at 227 px) so other resolutions work; dropout
0.5 on the outputs of fc6 and fc7 (Sec. 4.2).

``overfeat_fast`` / ``overfeat_accurate`` -- Sermanet, Eigen, Zhang, Mathieu, Fergus, LeCun,
"OverFeat: Integrated Recognition, Localization and Detection using Convolutional
Networks", ICLR 2014, Table 1 (fast, 231 px input) and Table 3 (accurate, 221 px input):
ReLU after every conv and hidden FC, non-overlapping max-pooling, no contrast normalisation,
dropout 0.5 on the hidden FC layers (Sec. 3.1). Parameters from the tables::

    fast (231 px)                                accurate (221 px)
    conv1  96 x 11*11*3   + 96       34,944      conv1  96 x 7*7*3     + 96        14,208
    conv2 256 x 5*5*96    + 256     614,656      conv2 256 x 7*7*96    + 256    1,204,480
    conv3 512 x 3*3*256   + 512   1,180,160      conv3 512 x 3*3*256   + 512    1,180,160
    conv4 1024 x 3*3*512  + 1024  4,719,616      conv4 512 x 3*3*512   + 512    2,359,808
    conv5 1024 x 3*3*1024 + 1024  9,438,208      conv5 1024 x 3*3*512  + 1024   4,719,616
    fc6  3072 x 6*6*1024  + 3072 113,249,280     conv6 1024 x 3*3*1024 + 1024   9,438,208
    fc7  4096 x 3072      + 4096  12,587,008     fc7  4096 x 5*5*1024  + 4096 104,861,696
    fc8  1000 x 4096      + 1000   4,097,000     fc8  4096 x 4096      + 4096  16,781,312
                                                 fc9  1000 x 4096      + 1000   4,097,000
    total                       145,920,872      total                      144,656,488

Table 4 of the paper gives 145M (fast) and 144M (accurate) parameters: ours are 0.63% and
0.46% above, i.e. the paper truncates to whole millions. Spatial sizes: fast
231 -conv1-> 56 -pool 2/2-> 28 -conv2-> 24 -pool-> 12 -conv3..5-> 12 -pool-> 6;
accurate 221 -conv1 7x7/2-> 108 -pool 3/3-> 36 -conv2-> 30 -pool 2/2-> 15 -conv3..6-> 15
-pool 3/3-> 5 (the tables list some of these as the next layer's "input size").
Departures as for ``alexnet_original`` (initialisation, adaptive average pool before the
first FC, the identity at the default resolution).

Every member: with ``norm='batch'|'group'`` a norm layer follows each conv (before the
ReLU; the conv then has no bias, since the norm's offset replaces it); the default
``norm='none'`` is the published network. ``weight_std=True`` standardises the conv kernels
(the BiT twin is ``norm='group', weight_std=True``). ``num_classes=0`` returns the
post-ReLU output of the last hidden FC layer (``pre_logits``), as timm's VGG does.

The flattening before the first FC layer is in (C, H, W) order, like ``torch.flatten`` on
NCHW maps, so torchvision's fc6 weights load without a permutation.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import layers, registry
from models.convert import NameRule, register_name_map

register_model = functools.partial(
    registry.register_model, family='alexnet', classifier='fc8', first_conv='conv1'
)

_PAPER_OWT = (
    'Krizhevsky, "One weird trick for parallelizing convolutional neural networks", '
    'arXiv:1404.5997, 2014'
)
_PAPER_2012 = (
    'Krizhevsky, Sutskever, Hinton, "ImageNet Classification with Deep Convolutional Neural '
    'Networks", NIPS 2012'
)
_PAPER_OVERFEAT = (
    'Sermanet, Eigen, Zhang, Mathieu, Fergus, LeCun, "OverFeat: Integrated Recognition, '
    'Localization and Detection using Convolutional Networks", ICLR 2014'
)


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """One conv layer, followed by ReLU, then optional LRN and max-pool.

    Attributes:
        features: output channels.
        kernel: square kernel size.
        stride: conv stride.
        pad: zero padding on every side (explicit, as the papers and torchvision give it;
            ``AlexNet(padding='tf_same')`` replaces it by TF ``SAME``).
        groups: feature groups (2 for the 2012 net's within-GPU layers).
        lrn: local response normalisation after the ReLU (2012 net, Sec. 3.3).
        pool: ``(window, stride)`` of a VALID max-pool after the layer, or None.
    """

    features: int
    kernel: int
    stride: int = 1
    pad: int = 0
    groups: int = 1
    lrn: bool = False
    pool: tuple[int, int] | None = None


@dataclasses.dataclass(frozen=True)
class NetSpec:
    """A member of the family.

    Attributes:
        convs: the conv layers in order.
        pooled_size: side of the adaptive average pool before the first FC layer.
        hidden: widths of the hidden FC layers.
        dropout_before_hidden: torchvision's placement (dropout on the input of every
            hidden FC); False puts it on their outputs, as the papers describe.
    """

    convs: tuple[ConvSpec, ...]
    pooled_size: int
    hidden: tuple[int, ...] = (4096, 4096)
    dropout_before_hidden: bool = False


NET_SPECS: dict[str, NetSpec] = {
    # torchvision.models.alexnet.
    'alexnet': NetSpec(
        convs=(
            ConvSpec(64, 11, 4, pad=2, pool=(3, 2)),
            ConvSpec(192, 5, pad=2, pool=(3, 2)),
            ConvSpec(384, 3, pad=1),
            ConvSpec(256, 3, pad=1),
            ConvSpec(256, 3, pad=1, pool=(3, 2)),
        ),
        pooled_size=6,
        dropout_before_hidden=True,
    ),
    # Krizhevsky et al. 2012, Fig. 2 / Sec. 3.3-3.5.
    'alexnet_original': NetSpec(
        convs=(
            ConvSpec(96, 11, 4, lrn=True, pool=(3, 2)),
            ConvSpec(256, 5, pad=2, groups=2, lrn=True, pool=(3, 2)),
            ConvSpec(384, 3, pad=1),
            ConvSpec(384, 3, pad=1, groups=2),
            ConvSpec(256, 3, pad=1, groups=2, pool=(3, 2)),
        ),
        pooled_size=6,
    ),
    # Sermanet et al. 2014, Table 1.
    'overfeat_fast': NetSpec(
        convs=(
            ConvSpec(96, 11, 4, pool=(2, 2)),
            ConvSpec(256, 5, pool=(2, 2)),
            ConvSpec(512, 3, pad=1),
            ConvSpec(1024, 3, pad=1),
            ConvSpec(1024, 3, pad=1, pool=(2, 2)),
        ),
        pooled_size=6,
        hidden=(3072, 4096),
    ),
    # Sermanet et al. 2014, Table 3.
    'overfeat_accurate': NetSpec(
        convs=(
            ConvSpec(96, 7, 2, pool=(3, 3)),
            ConvSpec(256, 7, pool=(2, 2)),
            ConvSpec(512, 3, pad=1),
            ConvSpec(512, 3, pad=1),
            ConvSpec(1024, 3, pad=1),
            ConvSpec(1024, 3, pad=1, pool=(3, 3)),
        ),
        pooled_size=5,
    ),
}


def _adaptive_pool_matrix(n: int, out: int) -> np.ndarray:
    """(out, n) averaging weights of torch's AdaptiveAvgPool over one axis.

    Output cell i averages input cells [floor(i*n/out), ceil((i+1)*n/out)), so bins overlap
    when n is not a multiple of out and repeat cells when n < out.
    """
    m = np.zeros((out, n), np.float32)
    for i in range(out):
        start, end = (i * n) // out, -(-((i + 1) * n) // out)
        m[i, start:end] = 1.0 / (end - start)
    return m


def adaptive_avg_pool(x: jax.Array, size: int) -> jax.Array:
    """``torch.nn.AdaptiveAvgPool2d(size)`` on NHWC maps (the identity when already size x size)."""
    h, w = x.shape[1:3]
    if (h, w) == (size, size):
        return x
    ph = jnp.asarray(_adaptive_pool_matrix(h, size), x.dtype)
    pw = jnp.asarray(_adaptive_pool_matrix(w, size), x.dtype)
    return jnp.einsum('ih,jw,bhwc->bijc', ph, pw, x, precision=jax.lax.Precision.HIGHEST)


def flatten_chw(x: jax.Array) -> jax.Array:
    """Flattens NHWC maps in torch's (C, H, W) order so reference FC weights load as they are."""
    return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)


class LocalResponseNorm(nn.Module):
    """Local response normalisation across channels (Krizhevsky et al. 2012, Sec. 3.3).

    ``b_i = a_i / (k + alpha * sum_{j=i-n//2}^{i+n//2} a_j^2) ** beta`` with the sum clipped
    to existing channels. The paper's ``alpha`` multiplies the plain sum; torch's and Caffe's
    ``LocalResponseNorm`` divide their ``alpha`` by ``n``, so this equals
    ``torch.nn.LocalResponseNorm(n, alpha=n * alpha, beta, k)``. Computed in float32.

    Attributes:
        size: n, the number of adjacent channels summed (odd).
        k: additive constant.
        alpha: scale of the sum of squares.
        beta: exponent.
    """

    size: int = 5
    k: float = 2.0
    alpha: float = 1e-4
    beta: float = 0.75

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        c, half = x.shape[-1], self.size // 2
        sq = jnp.pad(xf * xf, [(0, 0)] * (x.ndim - 1) + [(half, self.size - 1 - half)])
        window = sum(sq[..., j : j + c] for j in range(self.size))
        return (xf / (self.k + self.alpha * window) ** self.beta).astype(x.dtype)


class AlexNet(layers.ImageClassifier):
    """A conv stack + FC classifier described by a :class:`NetSpec` (see module docstring).

    Features: ``stem`` (conv block 1 after its LRN / pool), ``stage1``.. (every later conv
    block), ``pre_logits`` (the last hidden FC layer's output, also what ``num_classes=0``
    returns). Shared fields as :class:`layers.ImageClassifier`, with the papers' defaults
    ``norm='none'`` and ``drop_rate=0.5`` (the hidden FC layers' dropout). ``padding`` covers
    the padded convs (``ConvSpec.pad > 0``): ``'symmetric'`` uses the spec's explicit pads,
    ``'tf_same'`` TF ``SAME``, also for torchvision's 11x11/4 conv1 whose pad 2 is not
    ``k // 2`` (ceil(n / 4) outputs, which the adaptive pool absorbs); unpadded convs and the
    max-pools stay VALID in both modes.

    Attributes:
        spec: the layer table.
    """

    REMAT = ('none',)  # no blocks to rematerialise

    spec: NetSpec
    norm: str = layers.kw_only('none')
    drop_rate: float = layers.kw_only(0.5)

    def forward_features(self, x: jax.Array, train: bool, features: dict) -> jax.Array:
        # torch's default conv / linear init: uniform +-1/sqrt(fan_in) for weight and bias.
        conv = self.make_conv('valid', kernel_init=layers.torch_default_kernel_init)
        norm = self.make_norm(train)
        use_bias = self.norm == 'none'
        for i, layer in enumerate(self.spec.convs):
            mode = 'valid'
            if layer.pad and self.padding == 'tf_same':
                mode = 'tf_same'
            elif layer.pad:
                x = jnp.pad(x, ((0, 0), (layer.pad, layer.pad), (layer.pad, layer.pad), (0, 0)))
            fan_in = layer.kernel * layer.kernel * x.shape[-1] // layer.groups
            x = conv(
                layer.features,
                layer.kernel,
                layer.stride,
                padding=mode,
                use_bias=use_bias,
                feature_group_count=layer.groups,
                bias_init=layers.torch_linear_init(fan_in)[1],
                name=f'conv{i + 1}',
            )(x)
            x = nn.relu(norm(name=f'norm{i + 1}')(x))
            if layer.lrn:
                x = LocalResponseNorm()(x)
            if layer.pool:
                window, stride = layer.pool
                x = nn.max_pool(x, (window, window), (stride, stride), padding='VALID')
            features['stem' if i == 0 else f'stage{i}'] = x

        x = flatten_chw(adaptive_avg_pool(x, self.spec.pooled_size))
        n_convs = len(self.spec.convs)
        for j, width in enumerate(self.spec.hidden):
            if self.spec.dropout_before_hidden:
                x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
            x = nn.relu(_dense(width, x.shape[-1], self.dtype, f'fc{n_convs + 1 + j}')(x))
            if not self.spec.dropout_before_hidden and j < len(self.spec.hidden) - 1:
                x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
        return x.astype(jnp.float32)

    def classifier(self, x: jax.Array, train: bool, **kwargs) -> jax.Array:
        # fc8 (fc9 in OverFeat-accurate); torchvision drops out before the hidden FCs only.
        name = f'fc{len(self.spec.convs) + len(self.spec.hidden) + 1}'
        drop_rate = 0.0 if self.spec.dropout_before_hidden else None
        return super().classifier(x, train, name=name, drop_rate=drop_rate)


def _dense(features: int, fan_in: int, dtype: layers.Dtype, name: str) -> nn.Dense:
    kernel_init, bias_init = layers.torch_linear_init(fan_in)
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=kernel_init,
        bias_init=bias_init,
        name=name,
    )


# torchvision AlexNet state-dict names (nn.Sequential indices) <-> ours. The other members
# have no reference weights; their conv1-5 / fc6-8 map to the same names, while layers
# torchvision's AlexNet lacks (OverFeat-accurate's conv6 and fc9, the norm layers of the
# norm twins) have no reference name, so export_state_dict raises for those models.
register_name_map(
    'alexnet',
    (
        *(NameRule(f'features.{i}', f'conv{n}', 'conv') for n, i in enumerate((0, 3, 6, 8, 10), start=1)),
        *(NameRule(f'classifier.{i}', f'fc{n}', 'linear') for n, i in enumerate((1, 4, 6), start=6)),
    ),
)


# Registered name (a NET_SPECS row) -> ModelCfg fields; parameter counts in the README table.
ALEXNET_MODELS: dict[str, dict[str, Any]] = {
    # top1: torchvision IMAGENET1K_V1 weights (224 px, resize 256, centre crop).
    'alexnet': dict(top1=56.522, paper=_PAPER_OWT),
    # top1: 100 - 40.7, Table 2 of the paper (1 CNN, ILSVRC-2012 val, average of 10 patches).
    'alexnet_original': dict(input_size=(227, 227, 3), crop_pct=227 / 256, top1=59.3, paper=_PAPER_2012),
    # top1: 100 - 39.28, Table 2 of the paper (1 fast model, 1 scale, coarse stride).
    'overfeat_fast': dict(input_size=(231, 231, 3), crop_pct=231 / 256, top1=60.72, paper=_PAPER_OVERFEAT),
    # top1: 100 - 35.60, Table 2 of the paper (1 accurate model, 4 corners + centre + flip).
    'overfeat_accurate': dict(
        input_size=(221, 221, 3), crop_pct=221 / 256, top1=64.40, paper=_PAPER_OVERFEAT, classifier='fc9'
    ),
}

for _name, _cfg in ALEXNET_MODELS.items():
    register_model(name=_name, **_cfg)(functools.partial(AlexNet, spec=NET_SPECS[_name]))
