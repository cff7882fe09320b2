"""One convolution module, two ways to compute it, chosen per layer.

XLA's convolution (cuDNN on GPUs, YNNPACK on CPUs) and the same convolution as
shifted slices and one matrix multiply (im2col) share `nn.Conv`'s parameters
(HWIO ``kernel``, ``bias``), so checkpoints and `fuse_params` do not care which
one computed. On GPUs and TPUs XLA's is the right choice. On CPUs neither wins
everywhere; measured per layer of A0 on a 2-core AVX-512 VM (jax 0.10.2):

- On maps of 8x8 and below XLA's collapses: it rewrites the convolution into
  forms that run at a few GFLOP/s, 10-15x slower than im2col on 2x2 maps.
- Its backward pass is slow wherever the convolution has a stride of 2 or few
  (<= 64) input channels: 2.6x slower than im2col at 112->56, 48 channels.
- Elsewhere (inference on large maps; training with wide layers) XLA's is up
  to 4x faster than im2col, whose nine shifted copies cost memory traffic.

`choose_conv_impl` encodes these rules for ``'auto'``; `python -m
repvgg_jax.bench layers` re-measures them on your machine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

CONV_IMPLS = ('auto', 'xla', 'im2col')

# 'auto' on CPU: im2col at or below this many output pixels (8x8)...
SMALL_MAP_PIXELS = 64
# ...and, for training, at a stride > 1 or at most this many input channels.
NARROW_CHANNELS = 64


def check_conv_impl(conv_impl: str) -> str:
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f'conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}.')
  return conv_impl


def choose_conv_impl(
  conv_impl: str,
  *,
  out_pixels: int,
  strides: tuple[int, int],
  in_channels: int,
  train: bool,
  backend: str | None = None,
) -> str:
  """'xla' or 'im2col' for one convolution; ``conv_impl`` other than 'auto' wins."""
  if check_conv_impl(conv_impl) != 'auto':
    return conv_impl
  if (backend or jax.default_backend()) != 'cpu':
    return 'xla'
  if out_pixels <= SMALL_MAP_PIXELS:
    return 'im2col'
  if train and (max(strides) > 1 or in_channels <= NARROW_CHANNELS):
    return 'im2col'
  return 'xla'


def _pair(value) -> tuple[int, int]:
  return (value, value) if isinstance(value, int) else tuple(value)


def im2col_conv(x, kernel, strides, padding, groups: int, precision=None):
  """``lax.conv_general_dilated`` (NHWC, HWIO) as shifted slices and one matmul."""
  kh, kw, _, features = kernel.shape
  sh, sw = strides
  x = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  batch, height, width, in_channels = x.shape
  out_h, out_w = (height - kh) // sh + 1, (width - kw) // sw + 1
  taps = [
    x[:, i : i + sh * (out_h - 1) + 1 : sh, j : j + sw * (out_w - 1) + 1 : sw, :]
    for i in range(kh)
    for j in range(kw)
  ]
  # Tap-major columns (batch, out_h, out_w, tap, channel) match the HWIO kernel's
  # row order. Stacked, not concatenated: through the concatenation XLA:CPU fused
  # each block's output into every tap, recomputing the residual chain before it
  # (A0 at 32x32 compiled 1.5-3x and ran 1.2-1.6x slower).
  columns = jnp.stack(taps, axis=3)
  if groups == 1:
    columns = columns.reshape(batch, out_h, out_w, kh * kw * in_channels)
    return jnp.dot(columns, kernel.reshape(-1, features), precision=precision)
  columns = columns.reshape(batch, out_h, out_w, kh * kw, groups, in_channels // groups)
  grouped = kernel.reshape(kh * kw, in_channels // groups, groups, features // groups)
  y = jnp.einsum('nhwtgc,tcgo->nhwgo', columns, grouped, precision=precision)
  return y.reshape(batch, out_h, out_w, features)


class Conv(nn.Module):
  """`nn.Conv` with explicit padding, computed by XLA's convolution or im2col.

  Takes the subset of `nn.Conv` arguments this codebase uses and creates the
  same ``kernel`` (HWIO, input channels per group) and ``bias`` parameters
  with the same initialisation, so either implementation loads the other's.

  Attributes:
    conv_impl: 'xla', 'im2col' or 'auto' (`choose_conv_impl`, per layer).
    train: whether this layer is trained (the backward pass enters the choice).
  """

  features: int
  kernel_size: Sequence[int]
  strides: int | Sequence[int] = 1
  padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0))
  feature_group_count: int = 1
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()
  bias_init: Callable[..., Any] = nn.initializers.zeros_init()
  conv_impl: str = 'auto'
  train: bool = False

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel_size
    strides = _pair(self.strides)
    groups, in_channels = self.feature_group_count, x.shape[-1]
    if in_channels % groups or self.features % groups:
      raise ValueError(
        f'{in_channels} -> {self.features} channels do not split into {groups} groups.'
      )
    kernel = self.param(
      'kernel', self.kernel_init, (kh, kw, in_channels // groups, self.features), self.param_dtype
    )
    bias = (
      self.param('bias', self.bias_init, (self.features,), self.param_dtype)
      if self.use_bias
      else None
    )
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    padding = tuple(tuple(p) for p in self.padding)
    out_h = (x.shape[1] + sum(padding[0]) - kh) // strides[0] + 1
    out_w = (x.shape[2] + sum(padding[1]) - kw) // strides[1] + 1
    impl = choose_conv_impl(
      self.conv_impl,
      out_pixels=out_h * out_w,
      strides=strides,
      in_channels=in_channels,
      train=self.train,
    )
    if impl == 'xla':
      y = jax.lax.conv_general_dilated(
        x,
        kernel,
        strides,
        padding,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        feature_group_count=groups,
        precision=self.precision,
      )
    else:
      y = im2col_conv(x, kernel, strides, padding, groups, self.precision)
    return y if bias is None else y + bias
