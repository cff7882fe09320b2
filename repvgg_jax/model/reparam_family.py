"""The wider re-parameterization family: ACNet, Diverse Branch Block and MobileOne branches.

Each kind here is linear at inference time and fuses exactly into the block's
3x3 kernel and bias, like the paper's three in `repvgg_jax.model.branches` (which
imports this module, so registering happens there):

- ``conv1x3``, ``conv3x1`` (ACNet): asymmetric conv-BN, zero-padded into the
  centre row or column of the 3x3 kernel.
- ``dbb_avg`` (DBB): 1x1 conv-BN, 3x3 average pooling, BN.
- ``dbb_1x1_3x3`` (DBB): 1x1 conv-BN, then 3x3 conv-BN.
- ``parallel3x3_k{K}`` (MobileOne): K parallel 3x3 conv-BN, any K >= 1.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from repvgg_jax.model import branches as branches_lib
from repvgg_jax.model.branches import KERNEL_SIZE, BranchFamily, BranchKind, ConvBN

Array = Any
PAD = KERNEL_SIZE // 2  # What the 3x3 conv, and DBB's pooling, pad on each side.

# ----------------------------------------------------------------------------
# ACNet: asymmetric kernels, zero-padded into the 3x3 one.

CONV1X3 = branches_lib.register_branch(branches_lib.conv_bn_kind('conv1x3', (1, 3)))
CONV3X1 = branches_lib.register_branch(branches_lib.conv_bn_kind('conv3x1', (3, 1)))

# ----------------------------------------------------------------------------
# Diverse Branch Block (Ding et al., CVPR 2021).


def pad_with_bn_value(x: Array, bn: nn.Module, pad: int) -> Array:
  """Pads NHWC ``x`` by ``pad`` pixels with what ``bn`` outputs for a zero input.

  That value, ``beta - mean * gamma / std`` per channel from the running
  statistics, is what the 1x1 conv-BN before it computes on the zero padding
  of the block's input, so a following 3x3 window sees one linear map of the
  zero-padded input everywhere, borders included, and the pair fuses exactly.
  Zero padding would not. As the official DBB's ``BNAndPadLayer``, the value
  uses the running statistics in training too and passes no gradient.

  Args:
    x: the output of ``bn``.
    bn: the BatchNorm module, already called (its variables exist).
    pad: pixels on each side.
  """
  variables = bn.variables
  return _pad_with_bn_value(
    x, variables['params'], variables['batch_stats'], pad=pad, epsilon=bn.epsilon
  )


# One compiled op outside jit (eager use, tests) rather than a dozen; inlined under jit.
@functools.partial(jax.jit, static_argnames=('pad', 'epsilon'))
def _pad_with_bn_value(x, bn_params, bn_stats, *, pad: int, epsilon: float) -> Array:
  scale = bn_params['scale'] / jnp.sqrt(bn_stats['var'] + epsilon)
  value = jax.lax.stop_gradient(bn_params['bias'] - bn_stats['mean'] * scale).astype(x.dtype)
  _, height, width, _ = x.shape
  inside = np.zeros((height + 2 * pad, width + 2 * pad, 1), bool)
  inside[pad : pad + height, pad : pad + width] = True
  return jnp.where(inside, jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0))), value)


def identity_1x1_init(key, shape, dtype=jnp.float32) -> Array:
  """A ``(1, 1, in_per_group, channels)`` kernel of the (grouped) identity."""
  del key
  _, _, in_per_group, channels = shape
  return branches_lib.identity_kernel(channels, in_per_group, dtype)[PAD : PAD + 1, PAD : PAD + 1]


class Conv1x1BNPad(nn.Module):
  """A bias-free 1x1 conv (stride 1), BatchNorm, then padding with the BN's zero value."""

  features: int
  groups: int
  conv: Callable[..., nn.Module]
  norm: Callable[..., nn.Module]
  kernel_init: Callable[..., Array] | None = None  # None: the conv partial's.

  @nn.compact
  def __call__(self, x: Array) -> Array:
    init = {} if self.kernel_init is None else {'kernel_init': self.kernel_init}
    x = self.conv(
      self.features,
      (1, 1),
      strides=1,
      padding=((0, 0), (0, 0)),
      feature_group_count=self.groups,
      use_bias=False,
      name='conv',
      **init,
    )(x)
    bn = self.norm(name='bn')
    return pad_with_bn_value(bn(x), bn, PAD)


class AvgPoolBN(nn.Module):
  """3x3 average pooling of an already padded input (divides by 9 everywhere), then BN."""

  strides: int
  norm: Callable[..., nn.Module]

  @nn.compact
  def __call__(self, x: Array) -> Array:
    window = (KERNEL_SIZE, KERNEL_SIZE)
    x = nn.avg_pool(x, window, strides=(self.strides, self.strides), padding='VALID')
    return self.norm(name='bn')(x)


class DBBAverage(nn.Module):
  """DBB's ``1x1-BN-AVG-BN`` branch: ``{'conv1x1': {'conv', 'bn'}, 'avg': {'bn'}}``.

  The 1x1 conv has the block's output width and groups; the pooling is per
  channel, with the block's stride and the first BN's value as padding.
  """

  features: int
  strides: int
  groups: int
  conv: Callable[..., nn.Module]
  norm: Callable[..., nn.Module]

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = Conv1x1BNPad(self.features, self.groups, self.conv, self.norm, name='conv1x1')(x)
    return AvgPoolBN(self.strides, self.norm, name='avg')(x)


class DBB1x1Then3x3(nn.Module):
  """DBB's ``1x1-BN-KxK-BN`` branch: ``{'conv1x1': {'conv', 'bn'}, 'conv3x3': {'conv', 'bn'}}``.

  The inner width is the block's input width, as in the official DBB for
  this branch, and the 1x1 kernel starts as the (grouped) identity, so the
  branch starts as a 3x3 conv-BN of a BN of the input. (The official DBB
  stores the 1x1 as a zero-initialised offset from a fixed identity; here the
  kernel itself starts at the identity, which differs only in what weight
  decay pulls towards.) Both convs are grouped like the block; the 3x3 one
  has the block's stride and no padding of its own: its input is padded with
  the first BN's value.
  """

  features: int
  strides: int
  groups: int
  conv: Callable[..., nn.Module]
  norm: Callable[..., nn.Module]

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = Conv1x1BNPad(
      x.shape[-1], self.groups, self.conv, self.norm, identity_1x1_init, name='conv1x1'
    )(x)
    no_padding = ((0, 0), (0, 0))
    return ConvBN(
      self.features,
      (KERNEL_SIZE, KERNEL_SIZE),
      self.strides,
      self.groups,
      self.conv,
      self.norm,
      padding=no_padding,
      name='conv3x3',
    )(x)


def compose_1x1_then_kxk(first: Array, first_bias: Array, second: Array) -> tuple[Array, Array]:
  """One conv equal to a grouped 1x1 conv with bias followed by a grouped KxK conv.

  Args:
    first: ``(1, 1, in_per_group, mid)`` HWIO kernel.
    first_bias: ``(mid,)``; the KxK conv's input must be padded with it.
    second: ``(kh, kw, mid / groups, out)`` HWIO kernel.

  Returns:
    The ``(kh, kw, in_per_group, out)`` kernel (group by group, the 1x1's
    outputs of a group feed only that group's KxK filters) and the ``(out,)``
    bias, the KxK kernel applied to the constant ``first_bias``.
  """
  in_per_group, mid = first.shape[2:]
  kh, kw, mid_per_group, out = second.shape
  groups = mid // mid_per_group
  first = first.reshape(in_per_group, groups, mid_per_group)
  second = second.reshape(kh, kw, mid_per_group, groups, out // groups)
  kernel = jnp.einsum('cgm,hwmgo->hwcgo', first, second, precision='highest')
  bias = jnp.einsum('hwmgo,gm->go', second, first_bias.reshape(groups, mid_per_group))
  return kernel.reshape(kh, kw, in_per_group, out), bias.reshape(out)


def _fold_bn(kernel: Array, bias: Array, bn_params, bn_stats) -> tuple[Array, Array]:
  """A conv with bias followed by a BatchNorm, as one conv with bias."""
  scale, shift = branches_lib.bn_scale_shift(bn_params, bn_stats)
  return kernel * scale, bias * scale + shift


def _fuse_first(params, batch_stats) -> tuple[Array, Array]:
  """The DBB branches' 1x1 conv-BN as a 1x1 kernel and bias."""
  first = params['conv1x1']
  return branches_lib.fuse_conv_bn(
    first['conv']['kernel'], first['bn'], batch_stats['conv1x1']['bn']
  )


def _dbb_avg_fuse(params, batch_stats, in_per_group):
  del in_per_group  # Read off the kernel itself.
  kernel, bias = _fuse_first(params, batch_stats)
  # Average pooling is a per-channel 3x3 kernel of 1/9: after a 1x1 conv it
  # spreads each 1x1 tap over the window. The BN-valued padding makes the bias
  # a constant, which pooling leaves as it is.
  _, _, in_per_group, out = kernel.shape
  kernel = jnp.broadcast_to(kernel, (KERNEL_SIZE, KERNEL_SIZE, in_per_group, out))
  kernel = kernel / KERNEL_SIZE**2
  return _fold_bn(kernel, bias, params['avg']['bn'], batch_stats['avg']['bn'])


def _dbb_1x1_3x3_fuse(params, batch_stats, in_per_group):
  del in_per_group  # Read off the kernels.
  first, first_bias = _fuse_first(params, batch_stats)
  kernel, bias = compose_1x1_then_kxk(first, first_bias, params['conv3x3']['conv']['kernel'])
  return _fold_bn(kernel, bias, params['conv3x3']['bn'], batch_stats['conv3x3']['bn'])


def _dbb_1x1_3x3_channels(params) -> tuple[int, int]:
  """``(in_per_group, out)``; the inner 1x1 -> 3x3 width must chain."""
  first, second = params['conv1x1'], params['conv3x3']
  in_per_group, mid = first['conv']['kernel'].shape[2:]
  out = second['conv']['kernel'].shape[3]
  if first['bn']['scale'].shape != (mid,) or second['bn']['scale'].shape != (out,):
    raise ValueError(
      f'has BatchNorm scales of shapes {first["bn"]["scale"].shape} and '
      f'{second["bn"]["scale"].shape} after convs with {mid} and {out} outputs'
    )
  # The inner width is the block's input width, so the 3x3 conv reads as many
  # channels per group as the 1x1 conv does.
  if second['conv']['kernel'].shape[2] != in_per_group:
    raise ValueError(
      f'has a 3x3 kernel of shape {second["conv"]["kernel"].shape} after a 1x1 kernel of '
      f'shape {first["conv"]["kernel"].shape}: they do not chain'
    )
  return in_per_group, out


def _builder(module: type[nn.Module], name: str) -> Callable[..., nn.Module]:
  """A `BranchKind.build` for a module taking the block's shape and layer partials."""

  def build(features, strides, groups, conv, norm, name=name):
    return module(features, strides, groups, conv, norm, name=name)

  return build


DBB_AVG = branches_lib.register_branch(
  BranchKind('dbb_avg', _builder(DBBAverage, 'dbb_avg'), _dbb_avg_fuse)
)
DBB_1X1_3X3 = branches_lib.register_branch(
  BranchKind(
    'dbb_1x1_3x3',
    _builder(DBB1x1Then3x3, 'dbb_1x1_3x3'),
    _dbb_1x1_3x3_fuse,
    channels=_dbb_1x1_3x3_channels,
  )
)

# ----------------------------------------------------------------------------
# MobileOne: K parallel 3x3 conv-BN, one kind per K.


class ParallelConvBN(nn.Module):
  """``count`` parallel 3x3 conv-BN, summed; named ``conv3x3_0`` ... ``conv3x3_{count-1}``."""

  features: int
  strides: int
  groups: int
  conv: Callable[..., nn.Module]
  norm: Callable[..., nn.Module]
  count: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    size = (KERNEL_SIZE, KERNEL_SIZE)
    outputs = [
      ConvBN(self.features, size, self.strides, self.groups, self.conv, self.norm, name=key)(x)
      for key in _parallel_keys(self.count)
    ]
    return sum(outputs[1:], outputs[0])


def _parallel_keys(count: int) -> list[str]:
  return [f'conv3x3_{i}' for i in range(count)]


def parallel_kind(match: re.Match) -> BranchKind:
  """The kind ``parallel3x3_k{K}``: K parallel 3x3 conv-BN, fused by summing."""
  count = int(match.group(1))
  name = f'parallel3x3_k{count}'
  keys = _parallel_keys(count)

  def build(features, strides, groups, conv, norm, name=name):
    return ParallelConvBN(features, strides, groups, conv, norm, count, name=name)

  def fuse(params, batch_stats, in_per_group):
    del in_per_group  # Read off the kernels.
    fused = [
      branches_lib.fuse_conv_bn(
        params[key]['conv']['kernel'], params[key]['bn'], batch_stats[key]['bn']
      )
      for key in keys
    ]
    return sum(k for k, _ in fused), sum(b for _, b in fused)

  def channels(params):
    if sorted(params) != sorted(keys):
      raise ValueError(f'has layers {sorted(params)}, not the {count} of {name}: {keys}')
    return branches_lib.uniform_channels(params)

  return BranchKind(name, build, fuse, channels=channels)


PARALLEL3X3 = branches_lib.register_branch_family(
  BranchFamily(
    'parallel3x3_k{K} (K >= 1)', re.compile(r'parallel3x3_k([1-9][0-9]*)'), parallel_kind
  )
)
