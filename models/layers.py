"""Building blocks shared by every model family, and the contract every model keeps.

Every registered model is an :class:`ImageClassifier` (or :class:`ResidualClassifier`, which
adds ``drop_path_rate``): the shared fields (``num_classes``, ``norm``, ``gn_groups``,
``weight_std``, ``dtype``, ``drop_rate``, ``padding``), their validation, and the ``__call__``
that runs the family's :meth:`~ImageClassifier.forward_features` and then the shared ending
(pool -> ``pre_logits`` -> dropout + linear classifier -> float32 logits, plus the feature
dict on request) come from there; a family states only its own fields and body.

Families never instantiate ``nn.Conv`` or a normalisation layer directly: they receive
constructors from :func:`conv_factory` and :func:`norm_factory` (the pattern of the Flax
``examples/imagenet/models.py``; :meth:`ImageClassifier.make_conv` / ``make_norm`` bind the
model's fields), so a single pair of switches (``norm='group'``, ``weight_std=True``) turns
any family into its BiT-style GroupNorm + weight-standardised twin.

Parameters are always float32; ``dtype`` is the compute dtype. Normalisation statistics
are reduced in float32 whatever the compute dtype.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxnets_errors import UserError
from models.batchnorm import BatchNorm  # noqa: F401  (part of this module's interface)
from models.dense_conv import (  # noqa: F401  (part of this module's interface)
    DENSE_IMPLS,
    conv_im2col,
    dense_implementation,
    prefers_im2col,
    selected_dense_implementation,
)
from models.depthwise import (  # noqa: F401  (part of this module's interface)
    DEPTHWISE_IMPLS,
    Padding,
    depthwise_conv_shifted,
    depthwise_implementation,
    selected_implementation,
)

Dtype = Any

PADDING_MODES = ('symmetric', 'tf_same', 'valid')
# Values of the model-level ``padding`` field; 'valid' is a per-layer choice only.
MODEL_PADDING_MODES = ('symmetric', 'tf_same')
NORMS = ('batch', 'group', 'none')

# torch.nn.Conv2d's default kaiming_normal_(mode='fan_out', nonlinearity='relu') as used by
# torchvision ResNets: untruncated normal with variance 2 / (k * k * out_channels).
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# torch.nn.Conv2d / Linear's own default, kaiming_uniform_(a=sqrt(5)): uniform with
# variance 1 / (3 * fan_in), i.e. bounds +-1/sqrt(fan_in).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    return tuple(v)  # type: ignore[return-value]


def get_padding(
    mode: str, kernel_size: int | Sequence[int], strides: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
) -> Padding:
    """Padding argument for ``nn.Conv`` / ``nn.max_pool`` in one of the named modes.

    Args:
        mode: ``'symmetric'``: PyTorch-style explicit pads of
            ``((stride - 1) + dilation * (k - 1)) // 2`` on both sides (``k // 2`` for the
            usual odd kernels), so ported torchvision/timm weights see the same pixels.
            ``'tf_same'``: TensorFlow ``SAME`` (extra pad on the bottom/right), needed by
            ports of TF-trained models (``tf_efficientnet_*``); XLA's ``'SAME'`` is exactly
            TF's rule. ``'valid'``: no padding.
        kernel_size: int or (kh, kw).
        strides: int or (sh, sw).
        dilation: int or (dh, dw).

    Returns:
        A list of ``(low, high)`` pairs or the string ``'SAME'`` / ``'VALID'``.
    """
    if mode == 'symmetric':
        sizes = zip(_pair(kernel_size), _pair(strides), _pair(dilation), strict=True)
        return [(p, p) for p in (((s - 1) + d * (k - 1)) // 2 for k, s, d in sizes)]
    if mode == 'tf_same':
        return 'SAME'
    if mode == 'valid':
        return 'VALID'
    raise ValueError(f'padding mode must be one of {PADDING_MODES}, got {mode!r}')


# ----------------------------------------------------------------------------- convolution
#
# The one place that decides how a convolution runs. Every conv of every family (nn.Conv /
# StdConv built by `conv_factory`, NFNet's ScaledStdConv, LeNet-5's scattered C3) calls
# `conv_general_dilated` below, which has lax.conv_general_dilated's signature and result:
# - dense (feature_group_count == 1): on CPU, im2col + one matrix product where measured
#   faster (models/dense_conv.py: XLA:CPU's weight-gradient convolutions and the layout
#   transposes they need dominate e.g. resnet50's step), XLA's convolution otherwise and on
#   every other backend (`lax.platform_dependent`, as below).
# - depthwise (one group per input channel): on CPU the shifted multiply-adds of
#   models/depthwise.py (XLA:CPU runs the grouped convolution's backward pass as a dense
#   one: ~10x efficientnet_b0's train-step FLOPs), elsewhere the native grouped convolution,
#   chosen by `lax.platform_dependent` (a program exported from a CPU for 'cuda'/'tpu'
#   carries the native convolution).
# - grouped (1 < groups < channels): the native convolution, under `jax.shard_map` over the
#   'data' mesh axis when one is active (`jax.set_mesh`, as the trainers do): XLA's SPMD
#   partitioner gathers the whole batch onto every device for a grouped convolution
#   (openxla/xla#47945). Inside shard_map each device convolves its own slice; shard_map's
#   transpose sums the kernel's gradient over the axis, as data parallelism does anyway.

DATA_AXIS = 'data'
def _data_axis_size(batch: int) -> int:
    """Size of the active mesh's 'data' axis when it splits `batch` evenly, else 1."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or DATA_AXIS not in mesh.axis_names:
        return 1
    n = mesh.shape[DATA_AXIS]
    return n if n > 1 and batch % n == 0 else 1


def conv_general_dilated(
    lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Padding,
    lhs_dilation: Sequence[int] | None = None, rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None, feature_group_count: int = 1, batch_group_count: int = 1,
    precision: Any = None, preferred_element_type: Any = None,
) -> jax.Array:
    """``lax.conv_general_dilated`` for NHWC inputs and HWIO kernels, with the
    implementation picked per kind of convolution (see the comment above)."""
    kwargs = dict(
        lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type,
    )

    def native(x, k):
        return jax.lax.conv_general_dilated(x, k, window_strides, padding, **kwargs)

    groups = feature_group_count
    plain = (
        lhs.ndim == 4 and batch_group_count == 1 and preferred_element_type is None
        and tuple(lhs_dilation or (1, 1)) == (1, 1)
        and (dimension_numbers is None or _is_nhwc(dimension_numbers))
    )
    if not plain:
        return native(lhs, rhs)
    if groups == 1:
        impl = selected_dense_implementation()

        def im2col(x, k):
            return conv_im2col(x, k, window_strides, padding, rhs_dilation, precision)

        if impl == 'native' or (impl == 'auto' and not prefers_im2col(lhs.shape, rhs.shape, window_strides)):
            return native(lhs, rhs)
        if impl == 'im2col':
            return im2col(lhs, rhs)
        return jax.lax.platform_dependent(lhs, rhs, cpu=im2col, default=native)
    if groups == lhs.shape[-1]:
        impl = selected_implementation()

        def shifted(x, k):
            return depthwise_conv_shifted(x, k, window_strides, padding, rhs_dilation)

        if impl == 'native':
            return native(lhs, rhs)
        if impl == 'shifted':
            return shifted(lhs, rhs)
        return jax.lax.platform_dependent(lhs, rhs, cpu=shifted, default=native)
    n = _data_axis_size(lhs.shape[0])
    if n == 1:
        return native(lhs, rhs)
    spec = jax.sharding.PartitionSpec
    return jax.shard_map(native, in_specs=(spec(DATA_AXIS), spec()), out_specs=spec(DATA_AXIS))(lhs, rhs)


@contextlib.contextmanager
def native_convolutions():
    """XLA's own convolution for every dense and depthwise layer traced inside: what a
    model is, rather than how this backend runs it fastest (MAC counts, serving exports
    whose converters map convolutions to their own ops)."""
    with dense_implementation('native'), depthwise_implementation('native'):
        yield


def _is_nhwc(dimension_numbers: Any) -> bool:
    if isinstance(dimension_numbers, jax.lax.ConvDimensionNumbers):
        return tuple(dimension_numbers) == ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
    return tuple(dimension_numbers) == ('NHWC', 'HWIO', 'NHWC')


def standardize_kernel(kernel: jax.Array, eps: float) -> jax.Array:
    """Weight standardisation (Qiao et al. 2019; used by BiT, Kolesnikov et al. 2020).

    Each output channel of an HWIO kernel is shifted and scaled to zero mean and unit
    variance over (H, W, in). Computed in float32 so a bfloat16 kernel copy cannot lose the
    small centred values.
    """
    k = kernel.astype(jnp.float32)
    axes = tuple(range(k.ndim - 1))
    mean = jnp.mean(k, axis=axes, keepdims=True)
    var = jnp.var(k, axis=axes, keepdims=True)
    return ((k - mean) * jax.lax.rsqrt(var + eps)).astype(kernel.dtype)


class StdConv(nn.Conv):
    """Weight-standardised convolution (BiT, Kolesnikov et al. 2020, Sec. 4.3).

    The stored parameter is the raw kernel; standardisation happens on every call so the
    optimiser sees the raw weights, as in the reference implementation.

    Attributes:
        eps: added to the per-channel variance. 1e-8 is timm's value for the BiT ports
            (BiT's own code uses 1e-10: ~2e-6 relative for trained kernels); larger values
            matter only for nearly constant kernels.
    """

    eps: float = 1e-8

    def param(self, name: str, init_fn: Callable[..., Any], *init_args, **init_kwargs):
        # Hooking ``param`` rather than re-implementing ``__call__`` keeps every nn.Conv
        # feature (dilation, groups, dtype promotion) without duplicating it.
        value = super().param(name, init_fn, *init_args, **init_kwargs)
        if name == 'kernel':
            value = standardize_kernel(value, self.eps)
        return value


def conv_factory(
    weight_std: bool, dtype: Dtype, padding: str = 'symmetric',
    kernel_init: Callable[..., Any] = kaiming_normal_fan_out, eps: float = 1e-8,
) -> Callable[..., nn.Module]:
    """Returns ``make(features, kernel_size, strides=1, *, padding=None, use_bias=False, name=None)``.

    Args:
        weight_std: build :class:`StdConv` instead of ``nn.Conv``.
        dtype: compute dtype; parameters stay float32.
        padding: default padding mode (see :func:`get_padding`) for every conv built;
            ``make(..., padding=mode)`` overrides it for one layer.
        kernel_init: default kernel initialiser.
        eps: StdConv epsilon.
    """
    get_padding(padding, 1)  # fail at construction on a bad mode, not at first call
    default_mode = padding

    def make(
        features: int, kernel_size: int | Sequence[int], strides: int | Sequence[int] = 1, *,
        padding: str | None = None, use_bias: bool = False, name: str | None = None, **kwargs: Any,
    ) -> nn.Module:
        kwargs.setdefault('kernel_init', kernel_init)
        mode = padding or default_mode
        common = dict(
            features=features, kernel_size=_pair(kernel_size), strides=_pair(strides),
            padding=get_padding(mode, kernel_size, strides), use_bias=use_bias, dtype=dtype,
            param_dtype=jnp.float32, conv_general_dilated=conv_general_dilated, name=name, **kwargs,
        )
        return StdConv(eps=eps, **common) if weight_std else nn.Conv(**common)

    return make


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


class GroupNorm(nn.Module):
    """Group normalisation (Wu & He 2018) whose group count adapts to narrow layers.

    ``groups`` (32 in the paper) is used when it divides the channel count; otherwise the
    largest divisor of the channel count that is <= ``groups`` (e.g. 6 channels -> 6
    groups, 84 -> 28), so the same switch works on LeNet-sized layers. Statistics are
    computed in float32.

    Attributes:
        groups: preferred number of groups.
        epsilon: added to the group variance.
        dtype: output dtype.
        scale_init: initialiser of the per-channel scale.
        bias_init: initialiser of the per-channel bias.
    """

    groups: int = 32
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    scale_init: Callable[..., Any] = nn.initializers.ones
    bias_init: Callable[..., Any] = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        g = _largest_divisor_at_most(c, self.groups)
        xf = x.astype(jnp.float32).reshape(*x.shape[:-1], g, c // g)
        axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
        mean = jnp.mean(xf, axis=axes, keepdims=True)
        var = jnp.var(xf, axis=axes, keepdims=True)
        y = ((xf - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        scale = self.param('scale', self.scale_init, (c,), jnp.float32)
        bias = self.param('bias', self.bias_init, (c,), jnp.float32)
        return (y * scale + bias).astype(self.dtype)


class Identity(nn.Module):
    """Stands in for a norm layer when ``norm='none'``; accepts and ignores norm kwargs."""

    scale_init: Callable[..., Any] | None = None

    def __call__(self, x: jax.Array) -> jax.Array:
        return x


def norm_factory(
    norm: str, train: bool, dtype: Dtype, groups: int = 32, momentum: float = 0.9, epsilon: float = 1e-5
) -> Callable[..., nn.Module]:
    """Returns a constructor ``make(name=..., scale_init=...)`` of normalisation layers.

    Args:
        norm: ``'batch'``, ``'group'`` or ``'none'``.
        train: BatchNorm uses batch statistics and updates ``batch_stats`` when True.
        dtype: compute/output dtype; scale and bias are float32.
        groups: GroupNorm groups (see :class:`GroupNorm` for narrow layers).
        momentum: BatchNorm running-average decay. Flax's 0.9 is torch's ``momentum=0.1``.
        epsilon: added to the variance.

    BatchNorm has no ``axis_name``: the trainer jits over a globally sharded batch, so the
    statistics XLA computes are already global (synchronised BN for free).
    """
    if norm == 'batch':
        return functools.partial(
            BatchNorm, use_running_average=not train, momentum=momentum, epsilon=epsilon,
            dtype=dtype, param_dtype=jnp.float32,
        )
    if norm == 'group':
        return functools.partial(GroupNorm, groups=groups, epsilon=epsilon, dtype=dtype)
    if norm == 'none':
        return Identity
    raise ValueError(f'norm must be one of {NORMS}, got {norm!r}')


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): drops a whole residual branch per example.

    Kept branches are scaled by ``1 / (1 - rate)`` so the expectation matches eval mode.
    Uses the ``'dropout'`` rng stream.

    Attributes:
        rate: probability of dropping the branch of an example.
    """

    rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if not train or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jax.random.bernoulli(self.make_rng('dropout'), keep, shape)
        return jnp.where(mask, x / keep, jnp.zeros_like(x))


def torch_linear_init(fan_in: int) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``(kernel_init, bias_init)`` reproducing ``torch.nn.Linear.reset_parameters``.

    Both are uniform in +-1/sqrt(fan_in) (kaiming_uniform with a=sqrt(5) for the weight).
    """
    bound = 1.0 / math.sqrt(fan_in)
    kernel_init = torch_default_kernel_init

    def bias_init(key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return kernel_init, bias_init


def classifier_head(
    x: jax.Array, num_classes: int, *, drop_rate: float, train: bool, dtype: Dtype, name: str,
    kernel_init: Callable | None = None, bias_init: Callable | None = None,
) -> jax.Array:
    """Dropout then a Dense head with ``torch.nn.Linear``'s initialisation (unless
    ``kernel_init`` / ``bias_init`` replace it, as a reference's own init does); float32
    output. Called inside a module's ``@nn.compact`` method, the head's parameters live
    under ``name`` in that module's scope (``fc``, ``last_linear``, ... as the reference).
    """
    x = nn.Dropout(drop_rate, deterministic=not train)(x)
    torch_kernel_init, torch_bias_init = torch_linear_init(x.shape[-1])
    x = nn.Dense(
        num_classes, dtype=dtype, param_dtype=jnp.float32, name=name,
        kernel_init=kernel_init or torch_kernel_init, bias_init=bias_init or torch_bias_init,
    )(x)
    return x.astype(jnp.float32)


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None, round_limit: float = 0.9) -> int:
    """``value`` rounded to the nearest multiple of ``divisor`` (at least ``min_value``,
    default ``divisor``), one ``divisor`` more where rounding lost more than
    ``1 - round_limit`` of it.

    The channel rounding of every reference that rounds widths: TF's ``round_filters``
    (EfficientNet), torchvision's ``_make_divisible`` (MobileNet, MnasNet), timm's
    ``make_divisible`` (NFNet). ``round_limit=0`` never bumps: timm's ``SEModule`` widths.
    """
    rounded = max(min_value or divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < round_limit * value else rounded


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation channel gate (Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018).

    Global average pool ("squeeze"), a bottleneck of two fully connected layers with
    ``act`` in between, and ``gate`` (sigmoid) on the result ("excitation"), which scales
    the input per channel (Fig. 1 / Sec. 3 of the paper; reduction ratio r = 16, Sec. 6.1).

    The two layers are named ``fc1`` / ``fc2`` (timm's ``SEModule``, the legacy SENet's
    ``se_module``) unless ``names`` says otherwise (the MobileNets keep timm's
    ``conv_reduce`` / ``conv_expand``). ``use_conv=True`` stores them as 1x1 convolutions,
    kernel (1, 1, C, R), as timm and Caffe-era SENets do (the ``'conv'`` leaf kind);
    ``use_conv=False`` as dense layers, kernel (C, R). Both compute the same.

    The gate layers are never weight-standardised and have no norm (a 1x1 pooled vector;
    the references keep plain biased layers in the GN/WS twins too).

    Attributes:
        rd_ratio: reduced width as a fraction of the input channels (1/r).
        rd_channels: explicit reduced width; overrides ``rd_ratio``.
        rd_divisor: reduced width rounded to a multiple of this (8 in timm's ResNets; 1
            gives ``round(C * rd_ratio)``, equal to ``C // r`` whenever r divides C).
        names: names of the reducing and expanding layers.
        act: activation between the two layers.
        gate: gating function applied to the excitation.
        use_conv: 1x1 convolutions (True) or dense layers (False); see above.
        use_bias: biases on both layers (True in every reference).
        dtype: compute dtype; the squeeze mean is taken in float32.
        kernel_init: initialiser of both kernels (torch ResNets: kaiming-normal fan_out).
        bias_init: initialiser of both biases; None is torch's default (uniform
            +-1/sqrt(fan_in)).
    """

    rd_ratio: float = 1.0 / 16
    rd_channels: int | None = None
    rd_divisor: int = 8
    names: tuple[str, str] = ('fc1', 'fc2')
    act: Callable[[jax.Array], jax.Array] = nn.relu
    gate: Callable[[jax.Array], jax.Array] = nn.sigmoid
    use_conv: bool = True
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    kernel_init: Callable[..., Any] = kaiming_normal_fan_out
    bias_init: Callable[..., Any] | None = None

    def reduced_channels(self, channels: int) -> int:
        """Width of the bottleneck for an input of ``channels`` channels."""
        if self.rd_channels:
            return self.rd_channels
        return make_divisible(channels * self.rd_ratio, self.rd_divisor, min_value=1, round_limit=0.0)

    def _layer(self, features: int, fan_in: int, name: str) -> nn.Module:
        # torch's default bias init (uniform +-1/sqrt(fan_in)) for Conv2d and Linear alike.
        bias_init = self.bias_init or torch_linear_init(fan_in)[1]
        common = dict(
            features=features, use_bias=self.use_bias, dtype=self.dtype, param_dtype=jnp.float32,
            kernel_init=self.kernel_init, bias_init=bias_init, name=name,
        )
        return nn.Conv(kernel_size=(1, 1), **common) if self.use_conv else nn.Dense(**common)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        reduced = self.reduced_channels(channels)
        s = jnp.mean(x.astype(jnp.float32), axis=tuple(range(1, x.ndim - 1)), keepdims=self.use_conv)
        s = s.astype(self.dtype)
        s = self.act(self._layer(reduced, channels, self.names[0])(s))
        s = self.gate(self._layer(channels, reduced, self.names[1])(s))
        if not self.use_conv:
            s = s.reshape(s.shape[0], *(1,) * (x.ndim - 2), channels)
        return x * s.astype(x.dtype)


# ------------------------------------------------------------------------- model contract


REMAT_MODES = ('none', 'block')


class ModelFieldError(UserError, ValueError):
    """A model field set to a value the model cannot take; the message names the model,
    the field, the value and the valid values."""


def kw_only(default: Any) -> Any:
    """A keyword-only field with ``default``: how :class:`ImageClassifier` declares the
    shared fields (so a family's own fields, required ones included, can follow them) and
    how a family gives one another default (``norm: str = layers.kw_only('none')``)."""
    return dataclasses.field(default=default, kw_only=True)


# Numeric bounds of the shared fields: (lowest, highest or None); drop rates exclude 1.
_FIELD_BOUNDS: dict[str, tuple[float, float | None]] = {
    'num_classes': (0, None), 'gn_groups': (1, None), 'drop_rate': (0.0, 1.0), 'drop_path_rate': (0.0, 1.0),
}


class ImageClassifier(nn.Module):
    """The contract of every registered model: shared fields, validation, factories, ending.

    ``model.apply(variables, images, train=False, return_features=False)`` takes NHWC
    images and returns float32 logits ``(B, num_classes)``, the float32 pooled features
    (``pre_logits``) when ``num_classes == 0``, and with ``return_features`` also a dict of
    feature maps: ``'stem'``, ``'stage1'``, ... as the family's docstring lists them, and
    ``'pre_logits'``. A family implements :meth:`forward_features` (the network up to the
    map or vector that is pooled) and sets :attr:`HEAD` (the classifier's module name) and,
    where the reference initialises its classifier its own way, :attr:`HEAD_INIT`.

    Fields are validated on construction (:class:`ModelFieldError`): ``norm``, ``padding``
    and a family's :attr:`CHOICES` among their values, numbers within :data:`_FIELD_BOUNDS`.

    Attributes:
        num_classes: classifier size; 0 returns the pooled features instead of logits.
        norm: ``'batch'``, ``'group'`` or ``'none'`` (see :func:`norm_factory`).
        gn_groups: groups when ``norm='group'`` (fewer on narrow layers, see
            :class:`GroupNorm`).
        weight_std: weight-standardised convs (BiT, :class:`StdConv`).
        dtype: compute dtype; parameters and logits are float32.
        drop_rate: dropout rate before the classifier.
        padding: padding mode of the padded convs and pools, ``'symmetric'`` (PyTorch's
            explicit pads) or ``'tf_same'`` (see :func:`get_padding`); unpadded layers stay
            unpadded in both modes.
        remat: ``'none'``, or ``'block'``: every block (residual or MBConv block, dense
            block, Inception module, cell: what the family runs through :meth:`run_block`)
            keeps only its input for the backward pass and recomputes its insides there
            (``nn.remat``). Same parameters, same numbers, less activation memory for one
            more forward pass. A family without blocks (:attr:`REMAT` ``('none',)``)
            refuses ``'block'``.
    """

    num_classes: int = kw_only(1000)
    norm: str = kw_only('batch')
    gn_groups: int = kw_only(32)
    weight_std: bool = kw_only(False)
    dtype: Dtype = kw_only(jnp.float32)
    drop_rate: float = kw_only(0.0)
    padding: str = kw_only('symmetric')
    remat: str = kw_only('none')

    HEAD: ClassVar[str] = 'fc'
    # The remat modes the family supports: ('none',) where it has no blocks.
    REMAT: ClassVar[Sequence[str]] = REMAT_MODES
    # (kernel_init, bias_init) of the classifier; None: torch.nn.Linear's.
    HEAD_INIT: ClassVar[tuple[Callable[..., Any] | None, Callable[..., Any] | None]] = (None, None)
    # Family fields with a fixed set of valid values: field -> valid values.
    CHOICES: ClassVar[Mapping[str, Sequence[Any]]] = {}

    def __post_init__(self):
        self.check_fields()
        super().__post_init__()

    def check_fields(self) -> None:
        """Raises :class:`ModelFieldError` for the first field outside its valid values (a
        family with structural constraints extends this)."""
        choices = {'norm': NORMS, 'padding': MODEL_PADDING_MODES, 'remat': self.REMAT, **self.CHOICES}
        for field, valid in choices.items():
            if getattr(self, field) not in valid:
                raise self.invalid(field, ', '.join(map(repr, valid)))
        for field, (low, high) in _FIELD_BOUNDS.items():
            value = getattr(self, field, None)
            if value is not None and not (low <= value and (high is None or value < high)):
                raise self.invalid(field, f'>= {low}' if high is None else f'>= {low} and < {high}')

    def invalid(self, field: str, valid: str) -> ModelFieldError:
        """The error for ``field``'s current value, ``valid`` describing the valid values."""
        value = getattr(self, field)
        return ModelFieldError(f'{type(self).__name__}: {field}={value!r} is not valid; valid values: {valid}')

    def make_conv(self, padding: str | None = None, **kwargs: Any) -> Callable[..., nn.Module]:
        """:func:`conv_factory` for this model's ``weight_std``, ``dtype`` and ``padding``
        (or another default ``padding`` mode, e.g. ``'valid'`` for an unpadded family)."""
        return conv_factory(self.weight_std, self.dtype, padding or self.padding, **kwargs)

    def make_norm(self, train: bool, **kwargs: Any) -> Callable[..., nn.Module]:
        """:func:`norm_factory` for this model's ``norm``, ``dtype`` and ``gn_groups``."""
        return norm_factory(self.norm, train, self.dtype, groups=self.gn_groups, **kwargs)

    def run_block(self, block: nn.Module, *args: Any) -> Any:
        """``block(*args)``, under ``nn.remat`` when ``remat == 'block'``: the arrays among
        ``args`` are the rematerialised function's inputs, the rest (``train``, flags) stay
        Python values. Parameter paths are the block's either way."""
        if self.remat == 'none':
            return block(*args)
        is_array = [isinstance(a, jax.Array) for a in args]

        def call(module: nn.Module, *arrays: jax.Array) -> Any:
            it = iter(arrays)
            return module(*(next(it) if array else a for a, array in zip(args, is_array, strict=False)))

        return nn.remat(call)(block, *(a for a, array in zip(args, is_array, strict=False) if array))

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
        """NHWC images -> logits (see the class docstring); ``train``: batch statistics,
        dropout and drop path on; ``return_features``: also return the feature dict."""
        features: dict[str, jax.Array] = {}
        x = self.forward_features(x.astype(self.dtype), train, features)
        x = self.forward_head(x, train, features)
        return (x, features) if return_features else x

    def forward_features(self, x: jax.Array, train: bool, features: dict[str, jax.Array]) -> jax.Array:
        """The family's network up to what is pooled; records its feature maps in ``features``."""
        raise NotImplementedError

    def forward_head(self, x: jax.Array, train: bool, features: dict[str, jax.Array]) -> jax.Array:
        """Global average pool (of a map), ``pre_logits``, then :meth:`classifier`."""
        if x.ndim > 2:
            x = jnp.mean(x.astype(jnp.float32), axis=tuple(range(1, x.ndim - 1)))
        x = features['pre_logits'] = x.astype(jnp.float32)
        if self.num_classes:
            x = self.classifier(x, train).astype(jnp.float32)
        return x

    def classifier(self, x: jax.Array, train: bool, *, name: str | None = None,
                   drop_rate: float | None = None) -> jax.Array:
        """Dropout (``drop_rate``) and the linear classifier named :attr:`HEAD`."""
        kernel_init, bias_init = self.HEAD_INIT
        return classifier_head(
            x, self.num_classes, drop_rate=self.drop_rate if drop_rate is None else drop_rate,
            train=train, dtype=self.dtype, name=name or self.HEAD, kernel_init=kernel_init,
            bias_init=bias_init,
        )


class ResidualClassifier(ImageClassifier):
    """An :class:`ImageClassifier` with residual branches, hence stochastic depth.

    Attributes:
        drop_path_rate: stochastic depth (:class:`DropPath`) of the residual branches;
            unless the family says otherwise, block ``i`` of ``n`` uses
            ``drop_path_rate * i / (n - 1)`` (:meth:`drop_path_at`, the linear rule of
            Huang et al. 2016).
    """

    drop_path_rate: float = kw_only(0.0)

    def drop_path_at(self, index: int, total: int) -> float:
        """Drop-path rate of block ``index`` (from 0) of ``total``: linear up to ``drop_path_rate``."""
        return self.drop_path_rate * index / max(total - 1, 1)

    def residual_stages(
        self, x: jax.Array, train: bool, features: dict[str, jax.Array], depths: Sequence[int],
        block: Callable[[int, int, float], nn.Module],
    ) -> jax.Array:
        """Runs ``depths[s]`` blocks in stage ``s``, ``block(stage, index, drop_path_rate)``
        building each (rates by :meth:`drop_path_at` over all blocks); the output of stage
        ``s`` is ``features[f'stage{s + 1}']``."""
        total, index = sum(depths), 0
        for stage, depth in enumerate(depths):
            for b in range(depth):
                x = self.run_block(block(stage, b, self.drop_path_at(index, total)), x, train)
                index += 1
            features[f'stage{stage + 1}'] = x
        return x
