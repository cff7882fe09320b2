"""Convolution implementations with one parameter layout (`nn.Conv`'s HWIO kernel).

XLA's CPU convolution runs on one core and is slow on small feature maps; the
same convolution as shifted slices and one matrix multiply (im2col) uses the
multi-threaded matmul instead. On GPUs XLA's convolution (cuDNN) is the right
choice. Both give the same parameter tree, so checkpoints and `fuse_params`
do not care which one computed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

CONV_IMPLS = ('auto', 'xla', 'im2col')


def resolve_conv_impl(conv_impl: str) -> str:
  """'auto' becomes 'im2col' on the CPU and 'xla' elsewhere."""
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f'conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}.')
  if conv_impl == 'auto':
    return 'im2col' if jax.default_backend() == 'cpu' else 'xla'
  return conv_impl


def _pair(value) -> tuple[int, int]:
  return (value, value) if isinstance(value, int) else tuple(value)


class Im2colConv(nn.Module):
  """`nn.Conv` with explicit padding, computed as shifted slices and one matmul.

  Takes the subset of `nn.Conv` arguments this codebase uses and creates the
  same ``kernel`` (HWIO, input channels per group) and ``bias`` parameters.
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

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel_size
    sh, sw = _pair(self.strides)
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
    x = jnp.pad(x, ((0, 0), tuple(self.padding[0]), tuple(self.padding[1]), (0, 0)))
    batch, height, width, _ = x.shape
    out_h, out_w = (height - kh) // sh + 1, (width - kw) // sw + 1
    taps = [
      x[:, i : i + sh * (out_h - 1) + 1 : sh, j : j + sw * (out_w - 1) + 1 : sw, :]
      for i in range(kh)
      for j in range(kw)
    ]
    if groups == 1:
      # Tap-major columns match the row order of the HWIO kernel flattened.
      columns = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
      y = jnp.dot(columns, kernel.reshape(-1, self.features), precision=self.precision)
    else:
      columns = jnp.stack(taps, axis=3).reshape(
        batch, out_h, out_w, kh * kw, groups, in_channels // groups
      )
      grouped = kernel.reshape(kh * kw, in_channels // groups, groups, self.features // groups)
      y = jnp.einsum('nhwtgc,tcgo->nhwgo', columns, grouped, precision=self.precision)
      y = y.reshape(batch, out_h, out_w, self.features)
    return y if bias is None else y + bias
