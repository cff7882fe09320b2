"""CPU convolution kernels behind one module, chosen per layer: an opt-in speed-up.

XLA's convolution (cuDNN on GPUs, YNNPACK on CPUs), the same convolution as
shifted slices and one matrix multiply (im2col), Winograd's F(2x2, 3x3) for
stride-1 3x3 layers (4/9 of the multiply-adds), and for the smallest maps one
matrix multiply over the whole map (dense). `KernelConv` creates `nn.Conv`'s
parameters (HWIO ``kernel``, ``bias``) whichever computes, so checkpoints and
`fuse_params` do not care. On GPUs and TPUs XLA's convolution is the right
choice; on CPUs none wins everywhere, and `choose_conv_impl` encodes the rules
measured there (docs/performance.md, "Convolution implementations"; `python -m
repvgg_jax.bench layers` re-measures single layers on your machine).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

CONV_IMPLS = ('auto', 'xla', 'im2col', 'winograd', 'dense')

# 'auto' on CPU: im2col at or below this many output pixels (8x8)...
SMALL_MAP_PIXELS = 64
# ...and, for training, at a stride > 1 or at most this many input channels.
NARROW_CHANNELS = 64
# In inference, XLA's for strided layers with output maps of at least this many pixels.
STRIDED_XLA_PIXELS = 2 * 2
# Winograd for stride-1 3x3 layers with output maps in these ranges of pixels
# (lower bound exclusive): inference, grouped layers in inference, and training
# (forward and backward).
WINOGRAD_INFER_PIXELS = (2 * 2, 56 * 56)
WINOGRAD_GROUPED_INFER_PIXELS = (2 * 2, 14 * 14)
WINOGRAD_TRAIN_PIXELS = (2 * 2, 8 * 8)


def check_conv_impl(conv_impl: str) -> str:
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f'conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}.')
  return conv_impl


def winograd_applies(kernel_size: Sequence[int], strides: Sequence[int]) -> bool:
  """Whether `winograd_conv` can compute a layer: 3x3 kernel, stride 1."""
  return tuple(kernel_size) == (3, 3) and tuple(strides) == (1, 1)


def dense_applies(kernel_size: Sequence[int], in_pixels: int) -> bool:
  """Whether `dense_conv` does fewer multiply-adds than im2col: fewer input pixels than taps."""
  return in_pixels < kernel_size[0] * kernel_size[1]


def choose_conv_impl(
  conv_impl: str,
  *,
  in_pixels: int,
  out_pixels: int,
  strides: tuple[int, int],
  in_channels: int,
  train: bool,
  kernel_size: tuple[int, int] = (3, 3),
  groups: int = 1,
  backend: str | None = None,
) -> str:
  """'xla', 'im2col', 'winograd' or 'dense' for one convolution.

  ``conv_impl`` 'xla' or 'im2col' is used as given; 'winograd' and 'dense'
  wherever they apply (`winograd_applies`, `dense_applies`), with 'auto's
  choice between 'xla' and 'im2col' elsewhere; 'auto' follows the rules
  measured on CPUs (module docstring) and is XLA's convolution on every other
  backend. ``in_pixels`` and ``out_pixels`` count the unpadded input map and
  the output map; ``groups`` is the layer's number of feature groups.
  """
  if check_conv_impl(conv_impl) in ('xla', 'im2col'):
    return conv_impl
  winograd = winograd_applies(kernel_size, strides)
  dense = dense_applies(kernel_size, in_pixels)
  if (conv_impl == 'winograd' and winograd) or (conv_impl == 'dense' and dense):
    return conv_impl
  if (backend or jax.default_backend()) != 'cpu':
    return 'xla'
  if conv_impl == 'auto' and dense:
    return 'dense'
  if train:
    low, high = WINOGRAD_TRAIN_PIXELS
  else:
    low, high = WINOGRAD_INFER_PIXELS if groups == 1 else WINOGRAD_GROUPED_INFER_PIXELS
  if conv_impl == 'auto' and winograd and low < out_pixels <= high:
    return 'winograd'
  if not train and max(strides) > 1 and out_pixels >= STRIDED_XLA_PIXELS:
    return 'xla'
  if out_pixels <= SMALL_MAP_PIXELS:
    return 'im2col'
  if train and (max(strides) > 1 or in_channels <= NARROW_CHANNELS):
    return 'im2col'
  return 'xla'


# Winograd F(2x2, 3x3) (Lavin and Gray, 2016): each 2x2 output tile is
# A^T [(G g G^T) * (B^T d B)] A for the 4x4 input tile d and the 3x3 kernel g,
# 16 products per tile and channel pair where direct convolution has 36. The
# entries are 0, +-1 and 1/2, so the transforms are exact in binary floating
# point up to the rounding of their sums.
_WINOGRAD_BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]])
_WINOGRAD_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
_WINOGRAD_AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]])


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
  # (docs/performance.md, "Convolution implementations").
  columns = jnp.stack(taps, axis=3)
  if groups == 1:
    columns = columns.reshape(batch, out_h, out_w, kh * kw * in_channels)
    return jnp.dot(columns, kernel.reshape(-1, features), precision=precision)
  columns = columns.reshape(batch, out_h, out_w, kh * kw, groups, in_channels // groups)
  grouped = kernel.reshape(kh * kw, in_channels // groups, groups, features // groups)
  y = jnp.einsum('nhwtgc,tcgo->nhwgo', columns, grouped, precision=precision)
  return y.reshape(batch, out_h, out_w, features)


def dense_conv(x, kernel, strides, padding, groups: int, precision=None):
  """``lax.conv_general_dilated`` (NHWC, HWIO) as one matmul over the whole map.

  The kernel is unrolled into a (pixels x in_channels, out_pixels x features)
  matrix whose block for an input and an output pixel is the kernel tap
  joining them, or zero where none does. The column for one output pixel is
  a window of the zero-padded kernel, one slice, so the unrolled kernel is
  built by copies alone. Its multiply-adds grow with the product of the map
  sizes, so it is for the small maps of `dense_applies`.
  """
  kh, kw, _, features = kernel.shape
  (sh, sw), ((top, bottom), (left, right)) = strides, padding
  batch, height, width, in_channels = x.shape
  out_h, out_w = (height + top + bottom - kh) // sh + 1, (width + left + right - kw) // sw + 1
  # Input row h meets output row p through kernel row h - sh * p + top. Pad the
  # kernel so that every such row, tap or not, indexes it: before by lo, after by hi.
  lo_h, lo_w = max(0, sh * (out_h - 1) - top), max(0, sw * (out_w - 1) - left)
  hi_h, hi_w = max(0, top + height - kh), max(0, left + width - kw)
  padded = jnp.pad(kernel, ((lo_h, hi_h), (lo_w, hi_w), (0, 0), (0, 0)))
  windows = [
    padded[r : r + height, c : c + width]
    for r in range(top + lo_h, top + lo_h - sh * out_h, -sh)
    for c in range(left + lo_w, left + lo_w - sw * out_w, -sw)
  ]
  dense = jnp.stack(windows, axis=3)  # (height, width, in_per_group, out pixel, features)
  if groups == 1:
    y = jnp.dot(
      x.reshape(batch, -1), dense.reshape(height * width * in_channels, -1), precision=precision
    )
    return y.reshape(batch, out_h, out_w, features)
  dense = dense.reshape(*dense.shape[:4], groups, features // groups)
  x = x.reshape(batch, height, width, groups, in_channels // groups)
  y = jnp.einsum('nhwgc,hwcpgo->npgo', x, dense, precision=precision)
  return y.reshape(batch, out_h, out_w, features)


def _combine(coefficients, arrays):
  """sum(c * a) over non-zero coefficients, without multiplying by +-1."""
  total = None
  for c, a in zip(coefficients, arrays, strict=True):
    if c == 0:
      continue
    term = a if c == 1 else -a if c == -1 else a * jnp.asarray(c, a.dtype)
    total = term if total is None else total + term
  return total


def winograd_conv(x, kernel, padding, groups: int, precision=None):
  """A stride-1 3x3 ``lax.conv_general_dilated`` (NHWC, HWIO) by Winograd F(2x2, 3x3).

  The padded input is cut into 4x4 tiles overlapping by two pixels, each
  transformed by B^T d B: 16 arrays of (tiles, channels), one per position
  in the transformed tile, computed from strided slices without materializing
  the tiles. Each meets the transformed kernel in one matrix multiply, and
  A^T m A turns the 16 products back into 2x2 output tiles. The 16 arrays are
  kept apart, not stacked for one batched matmul, which ran slower on XLA:CPU
  (docs/performance.md, "Convolution implementations").
  """
  if kernel.shape[:2] != (3, 3):
    raise ValueError(f'Winograd F(2x2, 3x3) needs a 3x3 kernel, got {kernel.shape[:2]}.')
  (top, bottom), (left, right) = padding
  batch, height, width, in_channels = x.shape
  features = kernel.shape[-1]
  out_h, out_w = height + top + bottom - 2, width + left + right - 2
  tiles_h, tiles_w = -(-out_h // 2), -(-out_w // 2)
  # Zero rows and columns up to whole tiles; their outputs are cropped below.
  pad_bottom, pad_right = 2 * tiles_h + 2 - height - top, 2 * tiles_w + 2 - width - left
  x = jnp.pad(x, ((0, 0), (top, pad_bottom), (left, pad_right), (0, 0)))
  transformed_kernel = jnp.dot(
    jnp.asarray(np.kron(_WINOGRAD_G, _WINOGRAD_G), kernel.dtype),
    kernel.reshape(9, -1),
    precision=precision,
  ).reshape(16, in_channels // groups, features)
  # B^T d B as rows then columns: row k of every tile is one strided slice.
  rows = [x[:, k : k + 2 * tiles_h - 1 : 2] for k in range(4)]
  rows = [_combine(coefficients, rows) for coefficients in _WINOGRAD_BT]
  products = []  # products[p][q]: position (p, q) of every transformed tile, times the kernel's.
  for p, row in enumerate(rows):
    columns = [row[:, :, k : k + 2 * tiles_w - 1 : 2] for k in range(4)]
    products.append(
      [
        _matmul(_combine(coefficients, columns), transformed_kernel[4 * p + q], groups, precision)
        for q, coefficients in enumerate(_WINOGRAD_BT)
      ]
    )
  outputs = []
  for a_row in _WINOGRAD_AT:
    partial = [_combine(a_row, [products[p][q] for p in range(4)]) for q in range(4)]
    outputs.append(jnp.stack([_combine(a_col, partial) for a_col in _WINOGRAD_AT]))
  # (i, j, batch, tile row, tile column, features) -> (batch, 2 * tile row + i, ...).
  y = jnp.stack(outputs).transpose(2, 3, 0, 4, 1, 5)
  y = y.reshape(batch, 2 * tiles_h, 2 * tiles_w, features)
  return y[:, :out_h, :out_w]


def _matmul(x, kernel, groups: int, precision):
  """(..., in_channels) @ (in_channels / groups, features), grouped."""
  if groups == 1:
    return jnp.dot(x, kernel, precision=precision)
  in_per_group, features = kernel.shape
  x = x.reshape(*x.shape[:-1], groups, in_per_group)
  kernel = kernel.reshape(in_per_group, groups, features // groups)
  y = jnp.einsum('...gc,cgo->...go', x, kernel, precision=precision)
  return y.reshape(*y.shape[:-2], features)


class KernelConv(nn.Module):
  """`nn.Conv` with explicit padding, computed by XLA's convolution, im2col, Winograd or dense.

  Takes the subset of `nn.Conv` arguments this codebase uses and creates the
  same ``kernel`` (HWIO, input channels per group) and ``bias`` parameters
  with the same initialisation, so each implementation loads the others'.

  Attributes:
    conv_impl: 'xla', 'im2col', 'winograd', 'dense' or 'auto' (`choose_conv_impl`, per layer).
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
      in_pixels=x.shape[1] * x.shape[2],
      out_pixels=out_h * out_w,
      strides=strides,
      in_channels=in_channels,
      train=self.train,
      kernel_size=(kh, kw),
      groups=groups,
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
    elif impl == 'winograd':
      y = winograd_conv(x, kernel, padding, groups, self.precision)
    elif impl == 'dense':
      y = dense_conv(x, kernel, strides, padding, groups, self.precision)
    else:
      y = im2col_conv(x, kernel, strides, padding, groups, self.precision)
    return y if bias is None else y + bias
