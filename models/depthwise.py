"""How a depthwise convolution is computed (see ``conv_general_dilated`` in models/layers.py).

XLA:CPU runs a grouped convolution's backward pass as a dense convolution, so on CPU a
depthwise convolution is computed as a sum of shifted multiply-adds over the kernel taps
(:func:`depthwise_conv_shifted`), which differentiates into elementwise products and
reductions. :func:`depthwise_implementation` (or ``FLAXNETS_DEPTHWISE_CONV``) forces one
formulation everywhere.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Sequence

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
    """
    n, h, w, c = lhs.shape
    kh, kw, _, out = rhs.shape
    strides = tuple(window_strides)
    dilation = tuple(rhs_dilation or (1, 1))
    if out != c:
        lhs = jnp.repeat(lhs, out // c, axis=-1)
    (pt, pb), (pl, pr) = explicit_padding(padding, (h, w), (kh, kw), strides, dilation)
    x = jnp.pad(lhs, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    hp, wp = h + pt + pb, w + pl + pr
    ho = (hp - (kh - 1) * dilation[0] - 1) // strides[0] + 1
    wo = (wp - (kw - 1) * dilation[1] - 1) // strides[1] + 1
    acc_dtype = jnp.promote_types(lhs.dtype, jnp.float32)
    y = None
    for i in range(kh):
        for j in range(kw):
            r0, c0 = i * dilation[0], j * dilation[1]
            tap = jax.lax.slice(
                x,
                (0, r0, c0, 0),
                (n, r0 + (ho - 1) * strides[0] + 1, c0 + (wo - 1) * strides[1] + 1, out),
                (1, strides[0], strides[1], 1),
            )
            term = tap.astype(acc_dtype) * rhs[i, j, 0].astype(acc_dtype)
            y = term if y is None else y + term
    return y.astype(lhs.dtype)
