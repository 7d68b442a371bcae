"""How a depthwise convolution is computed (see ``conv_general_dilated`` in models/layers.py).

XLA:CPU runs a grouped convolution's backward pass as a dense convolution, so on CPU a
depthwise convolution is computed as a sum of shifted multiply-adds over the kernel taps
(:func:`depthwise_conv_shifted`) with a written-out backward pass: the input gradient as
the same kind of sum, one per stride phase, and the kernel gradient as one variadic
reduction over all taps (2.8x faster than autodiff's transpose for EfficientNet-B0's layers,
forward + backward, 8 x 224 px). :func:`depthwise_implementation` (or ``FLAXNETS_DEPTHWISE_CONV``) forces one
formulation everywhere.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp

Padding = str | Sequence[tuple[int, int]]

class ImplementationSwitch:
    """How one kind of convolution is computed: forced by :meth:`force` (a context
    manager), else by an environment variable, else ``'auto'``. Read when a function is
    traced: one already compiled keeps the implementation it was traced with. Dense
    convolutions (models/dense_conv.py) have the other switch."""

    def __init__(self, kind: str, env: str, choices: tuple[str, ...]):
        self.kind, self.env, self.choices = kind, env, choices
        self._forced: contextvars.ContextVar[str | None] = contextvars.ContextVar(
            f'flaxnets_{kind}_impl', default=None)

    @contextlib.contextmanager
    def force(self, impl: str):
        if impl not in self.choices:
            raise ValueError(f'{self.kind} implementation must be one of {self.choices}, got {impl!r}')
        token = self._forced.set(impl)
        try:
            yield
        finally:
            self._forced.reset(token)

    def selected(self) -> str:
        impl = self._forced.get() or os.environ.get(self.env, 'auto')
        if impl not in self.choices:
            raise ValueError(f'{self.env} must be one of {self.choices}, got {impl!r}')
        return impl


DEPTHWISE_IMPLS = ('auto', 'shifted', 'native')
_SWITCH = ImplementationSwitch('depthwise', 'FLAXNETS_DEPTHWISE_CONV', DEPTHWISE_IMPLS)


def depthwise_implementation(impl: str):
    """Forces how depthwise convolutions traced inside the block run: ``'auto'`` (shifted
    multiply-adds on CPU, the native grouped convolution elsewhere), ``'shifted'`` or
    ``'native'`` everywhere. ``FLAXNETS_DEPTHWISE_CONV`` sets the default."""
    return _SWITCH.force(impl)


def selected_implementation() -> str:
    """The implementation depthwise convolutions traced now use."""
    return _SWITCH.selected()


def explicit_padding(padding, in_hw, kernel_hw, strides, dilation) -> list[tuple[int, int]]:
    """``(low, high)`` pads per spatial dimension for a padding string or explicit pads."""
    if isinstance(padding, str):
        window = [(k - 1) * d + 1 for k, d in zip(kernel_hw, dilation, strict=True)]
        return jax.lax.padtype_to_pads(in_hw, window, strides, padding)
    return [tuple(p) for p in padding]


def depthwise_conv_shifted(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: Padding,
    rhs_dilation: Sequence[int] | None = None,
) -> jax.Array:
    """Depthwise convolution (NHWC input, HWIO kernel with I == 1) as a sum of shifted
    multiply-adds, one per kernel tap: equal to ``lax.conv_general_dilated(...,
    feature_group_count=C)``, including channel multipliers (O = C * M: output channel
    ``c * M + m`` reads input channel ``c``, XLA's group order).

    Products of low-precision inputs are accumulated in float32, as XLA's convolutions do.
    The backward pass is written out (:func:`_taps`' VJP) rather than left to autodiff,
    whose transpose of every strided tap is a padded copy of the cotangent, which XLA:CPU
    evaluates as one select per tap and output element, and whose kernel gradient is one
    reduction over the whole batch per tap.
    """
    n, h, w, c = lhs.shape
    kh, kw, _, out = rhs.shape
    strides = tuple(int(s) for s in window_strides)
    dilation = tuple(int(d) for d in (rhs_dilation or (1, 1)))
    if out != c:
        lhs = jnp.repeat(lhs, out // c, axis=-1)
    pads = tuple(tuple(int(p) for p in pad)
                 for pad in explicit_padding(padding, (h, w), (kh, kw), strides, dilation))
    return _taps(lhs, rhs[:, :, 0, :], strides, pads, dilation)


def output_size(size: int, pad: tuple[int, int], k: int, stride: int, dilation: int) -> int:
    """A convolution's output length along one axis."""
    return (size + pad[0] + pad[1] - (k - 1) * dilation - 1) // stride + 1


def shifted_view(xp, offset, strides, out_hw):
    """``xp[:, r + s0 * a, c + s1 * b, :]`` for ``a, b`` over ``out_hw``: the input window
    one kernel tap at ``offset = (r, c)`` reads."""
    n, _, _, c = xp.shape
    (r0, c0), (ho, wo), (s0, s1) = offset, out_hw, strides
    return jax.lax.slice(xp, (0, r0, c0, 0),
                         (n, r0 + (ho - 1) * s0 + 1, c0 + (wo - 1) * s1 + 1, c), (1, s0, s1, 1))


def _tap_sum(xp, k, offsets, strides, out_hw, acc_dtype):
    """``sum_t shifted_view(xp, offset_t) * k_t`` over the taps; zeros when there is none."""
    n, _, _, c = xp.shape
    ho, wo = out_hw
    y = None
    for offset, kt in zip(offsets, k, strict=True):
        term = shifted_view(xp, offset, strides, out_hw).astype(acc_dtype) * kt.astype(acc_dtype)
        y = term if y is None else y + term
    return jnp.zeros((n, ho, wo, c), acc_dtype) if y is None else y


def _acc_dtype(x):
    return jnp.promote_types(x.dtype, jnp.float32)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _taps(x, k, strides, pads, dilation):
    """The depthwise convolution of ``x`` (NHWC) with ``k`` (kh, kw, C), explicit pads."""
    kh, kw, _ = k.shape
    ho, wo = (output_size(x.shape[1 + d], pads[d], k.shape[d], strides[d], dilation[d]) for d in (0, 1))
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    offsets = [(i * dilation[0], j * dilation[1]) for i in range(kh) for j in range(kw)]
    taps = [k[i, j] for i in range(kh) for j in range(kw)]
    return _tap_sum(xp, taps, offsets, strides, (ho, wo), _acc_dtype(x)).astype(x.dtype)


def _taps_fwd(x, k, strides, pads, dilation):
    return _taps(x, k, strides, pads, dilation), (x, k)


def _phase_taps(pad_lo, k, stride, dilation):
    """Per output phase ``p`` (input rows ``stride * a + p``), the kernel taps that reach it
    and the cotangent row each reads: ``dx[stride * a + p] = sum_i g[a + e_i] * k[i]``."""
    phases = []
    for p in range(stride):
        phases.append([(i, (p + pad_lo - i * dilation) // stride) for i in range(k)
                       if (p + pad_lo - i * dilation) % stride == 0])
    return phases


def _input_grad(g, k, x_shape, strides, pads, dilation):
    """The input's cotangent, one phase per stride offset: each phase is a stride-1 sum of
    shifted multiply-adds over the taps that reach it, and the phases interleave into the
    input's rows and columns. A stride-1 layer has a single phase, the transposed kernel."""
    n, h, w, c = x_shape
    kh, kw, _ = k.shape
    acc = _acc_dtype(g)
    rows = _phase_taps(pads[0][0], kh, strides[0], dilation[0])
    cols = _phase_taps(pads[1][0], kw, strides[1], dilation[1])
    a, b = -(-h // strides[0]), -(-w // strides[1])
    ho, wo = g.shape[1:3]
    row_e = [e for ph in rows for _, e in ph] or [0]
    col_e = [e for ph in cols for _, e in ph] or [0]
    lo_h, lo_w = max(0, -min(row_e)), max(0, -min(col_e))
    hi_h, hi_w = max(0, a - 1 + max(row_e) - (ho - 1)), max(0, b - 1 + max(col_e) - (wo - 1))
    gp = jnp.pad(g, ((0, 0), (lo_h, hi_h), (lo_w, hi_w), (0, 0)))
    phases = []
    for rph in rows:
        for cph in cols:
            offsets = [(lo_h + ei, lo_w + fj) for _, ei in rph for _, fj in cph]
            taps = [k[i, j] for i, _ in rph for j, _ in cph]
            phases.append(_tap_sum(gp, taps, offsets, (1, 1), (a, b), acc))
    if strides == (1, 1):
        dx = phases[0]
    else:
        dx = jnp.stack(phases).reshape(strides[0], strides[1], n, a, b, c)
        dx = dx.transpose(2, 3, 0, 4, 1, 5).reshape(n, a * strides[0], b * strides[1], c)
    return dx[:, :h, :w]


def _kernel_grad(x, g, kernel_hw, strides, pads, dilation):
    """``dk_t = sum_{n, a, b} tap_t(x)[n, a, b] * g[n, a, b]`` for every tap at once: one
    variadic reduction over the output rows (a single pass over the input and the
    cotangent), then a small one over batch and columns."""
    kh, kw = kernel_hw
    acc = _acc_dtype(x)
    n, ho, wo, c = g.shape
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    gf = g.astype(acc)
    products = []
    for i in range(kh):
        for j in range(kw):
            tap = shifted_view(xp, (i * dilation[0], j * dilation[1]), strides, (ho, wo))
            products.append(tap.astype(acc) * gf)
    zero = jnp.zeros((), acc)
    partial_sums = jax.lax.reduce(tuple(products), (zero,) * len(products),
                                  lambda u, v: tuple(p + q for p, q in zip(u, v, strict=True)), (1,))
    return jnp.stack(partial_sums).sum(axis=(1, 2)).reshape(kh, kw, c)


def _taps_bwd(strides, pads, dilation, residuals, g):
    x, k = residuals
    dx = _input_grad(g, k, x.shape, strides, pads, dilation)
    dk = _kernel_grad(x, g, k.shape[:2], strides, pads, dilation)
    return dx.astype(x.dtype), dk.astype(k.dtype)


_taps.defvjp(_taps_fwd, _taps_bwd)
