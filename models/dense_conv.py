"""How a dense convolution (one group) is computed (see ``conv_general_dilated`` in
models/layers.py).

XLA:CPU runs a convolution's weight gradient as a convolution over the batch, and first
transposes the activations into a batch-innermost layout for it: in resnet50's train step
at 64 px the backward convolutions take 34% of the time and those transposes 12%
(`tools/benchmark.py --profile`). Written as *im2col* (the kernel taps' shifted views of the
input concatenated along the channels, then one matrix product with the kernel reshaped
to ``(kh * kw * C, O)``; a 1x1 convolution is a plain matrix product), the forward pass,
the input gradient and the weight gradient are all matrix products, which XLA:CPU runs
in its tuned GEMM kernels without the transposes.

Which formulation wins depends on the layer, so :func:`dense_implementation` (or
``FLAXNETS_DENSE_CONV``) chooses per convolution:

- ``'auto'`` (the default): on CPU, im2col for the layers where it was measured faster
  (:func:`prefers_im2col`), XLA's convolution otherwise and on every other backend;
- ``'im2col'`` / ``'native'``: that formulation for every dense convolution, on every
  backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp

from models.depthwise import (
    ImplementationSwitch,
    Padding,
    explicit_padding,
    output_size,
    shifted_view,
)

DENSE_IMPLS = ('auto', 'im2col', 'native')
_SWITCH = ImplementationSwitch('dense', 'FLAXNETS_DENSE_CONV', DENSE_IMPLS)


def dense_implementation(impl: str):
    """Forces how dense convolutions traced inside the block run: ``'auto'``, ``'im2col'``
    or ``'native'`` (module docstring). ``FLAXNETS_DENSE_CONV`` sets the default."""
    return _SWITCH.force(impl)


def selected_dense_implementation() -> str:
    """The implementation dense convolutions traced now use."""
    return _SWITCH.selected()


def prefers_im2col(lhs_shape: Sequence[int], rhs_shape: Sequence[int], window_strides: Sequence[int]) -> bool:
    """Whether ``'auto'`` computes this convolution as im2col on CPU.

    The rule is measured, not derived: forward + backward of each dense convolution of
    resnet50 and densenet121 (batch 32 at 64 px and batch 8 at 224 px), XLA's
    convolution against im2col on the 2-core CPU (README, "Speed on a CPU"):

    - 1x1 convolutions (any stride) are plain matrix products: 1.1-3.4x faster, every one;
    - larger kernels whose output has at most 4 pixels: XLA rewrites these (e.g.
      ResNet-50's layer4 at 64 px, 2x2 outputs) into a convolution of the kernel by the
      input that runs ~50x slower than the matrix product;
    - larger kernels over >= 256 input channels with outputs up to 14x14: 1.0-1.6x;
    - the rest (stems over 3 channels, 3x3 layers on large maps or few channels) stay
      with XLA's convolution, which is up to 3x faster there.
    """
    _, h, w, _ = lhs_shape
    kh, kw, cin, _ = rhs_shape
    if kh == kw == 1:
        return True
    pixels = -(-h // window_strides[0]) * -(-w // window_strides[1])
    return pixels <= 4 or (cin >= 256 and pixels <= 196)


def conv_im2col(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: Padding,
    rhs_dilation: Sequence[int] | None = None,
    precision=None,
) -> jax.Array:
    """Dense convolution (NHWC input, HWIO kernel, one group) as im2col and one matrix
    product; equal to ``lax.conv_general_dilated`` up to float32 summation order.

    The patch matrix holds the taps in the kernel's (row, column, channel) order, so the
    HWIO kernel reshapes to its rows without a transpose. It is ``kh * kw`` times the
    input's size (a 3x3 layer's patches are 9x its input), which autodiff keeps for the
    weight gradient; ``config.remat='block'`` recomputes it instead.
    """
    n, h, w, c = lhs.shape
    kh, kw, cin, out = rhs.shape
    if cin != c:
        raise ValueError(f'conv_im2col: input has {c} channels, kernel expects {cin} (one group only)')
    strides = tuple(window_strides)
    dilation = tuple(rhs_dilation or (1, 1))
    (pt, pb), (pl, pr) = explicit_padding(padding, (h, w), (kh, kw), strides, dilation)
    x = lhs if (pt, pb, pl, pr) == (0, 0, 0, 0) else jnp.pad(lhs, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    ho = output_size(h, (pt, pb), kh, strides[0], dilation[0])
    wo = output_size(w, (pl, pr), kw, strides[1], dilation[1])
    if ho <= 0 or wo <= 0:  # the window does not fit (XLA's convolution gives an empty map too)
        return jnp.zeros((n, max(ho, 0), max(wo, 0), out), lhs.dtype)
    full = (kh, kw, strides) == (1, 1, (1, 1))  # a 1x1 stride-1 layer reads the whole input
    taps = [x if full else shifted_view(x, (i * dilation[0], j * dilation[1]), strides, (ho, wo))
            for i in range(kh) for j in range(kw)]
    patches = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
    return _patch_matmul(patches, rhs.reshape(kh * kw * cin, out), precision)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _patch_matmul(patches, kernel, precision):
    """``patches @ kernel`` over the last axis, whose kernel gradient contracts the
    operand with fewer channels as the left one.

    That gradient sums over every pixel of the batch, the major axes of both operands, and
    XLA:CPU lays out its left operand with the pixels minor: a transpose of the whole
    operand. Autodiff puts the cotangent on the left; for an expanding 1x1 layer
    (EfficientNet's 16 -> 96 at 112 x 112 px) that transposes 6x more data than the
    patches would (the step's largest copy, 6% of efficientnet_b0's at 8 x 224 px).
    """
    return jax.lax.dot_general(patches, kernel, (((3,), (0,)), ((), ())), precision=precision)


def _patch_matmul_fwd(patches, kernel, precision):
    return _patch_matmul(patches, kernel, precision), (patches, kernel)


def _patch_matmul_bwd(precision, residuals, g):
    patches, kernel = residuals
    d_patches = jax.lax.dot_general(g, kernel, (((3,), (1,)), ((), ())), precision=precision)
    pixels = ((0, 1, 2), (0, 1, 2))
    if patches.shape[-1] <= g.shape[-1]:
        d_kernel = jax.lax.dot_general(patches, g, (pixels, ((), ())), precision=precision)
    else:
        d_kernel = jax.lax.dot_general(g, patches, (pixels, ((), ())), precision=precision).T
    return d_patches.astype(patches.dtype), d_kernel.astype(kernel.dtype)


_patch_matmul.defvjp(_patch_matmul_fwd, _patch_matmul_bwd)
