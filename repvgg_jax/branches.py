"""Branch kinds of a re-parameterizable block, each with its own fusion rule.

A block's output before the ReLU is the sum of its branches. Every branch kind
here is linear at inference time, so it has an exact rule turning its
parameters and BatchNorm statistics into a 3x3 kernel (HWIO, grouped like the
block) and a bias; the block's fused kernel is the sum over its branches.

Adding a branch kind (ACNet's 1x3, DBB's average pooling, ...) is one new
`BranchKind` passed to `register_branch`: a module that computes it and a
function that fuses it. Nothing else changes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

BN_EPSILON = 1e-5  # As PyTorch's BatchNorm2d, which the reference uses.
BN_MOMENTUM = 0.9  # Flax's convention; PyTorch's momentum=0.1.
KERNEL_SIZE = 3  # The deploy kernel every branch fuses into.

Array = Any
Tree = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class BranchKind:
  """One kind of branch.

  Attributes:
    name: the branch's key in the block's parameter tree (and in configs).
    build: ``build(features, strides, groups, conv, norm)`` returns the Linen
      module computing the branch (conv and norm are the block's layer
      partials); the block names it ``name``.
    fuse: ``fuse(params, batch_stats, in_per_group)`` maps the branch's
      subtrees to a ``(3, 3, in_per_group, features)`` kernel, where
      ``in_per_group = in_channels // groups``, and a ``(features,)`` bias.
      Called with float64 arrays.
    applies: ``applies(in_channels, features, stride)`` says whether a block of
      that shape has this branch (the identity needs equal channels, stride 1).
  """

  name: str
  build: Callable[..., nn.Module]
  fuse: Callable[[Tree, Tree, int], tuple[Array, Array]]
  applies: Callable[[int, int, int], bool] = lambda in_channels, features, stride: True


BRANCH_KINDS: dict[str, BranchKind] = {}


def register_branch(kind: BranchKind) -> BranchKind:
  """Adds a branch kind to the registry that blocks and `fuse_params` use."""
  if kind.name in BRANCH_KINDS:
    raise ValueError(f'A branch kind named {kind.name!r} is already registered.')
  BRANCH_KINDS[kind.name] = kind
  return kind


def get_branch(name: str) -> BranchKind:
  """The registered branch kind called ``name``, or a ValueError listing them."""
  try:
    return BRANCH_KINDS[name]
  except KeyError:
    known = ', '.join(sorted(BRANCH_KINDS))
    raise ValueError(f'Unknown branch kind {name!r}. Known kinds: {known}.') from None


# ----------------------------------------------------------------------------
# Fusion primitives shared by the branch kinds.


def bn_scale_shift(bn_params: Tree, bn_stats: Tree) -> tuple[Array, Array]:
  """Inference-mode BatchNorm as ``x * scale + shift`` per channel."""
  scale = bn_params['scale'] / jnp.sqrt(bn_stats['var'] + BN_EPSILON)
  return scale, bn_params['bias'] - bn_stats['mean'] * scale


def fuse_conv_bn(kernel: Array, bn_params: Tree, bn_stats: Tree) -> tuple[Array, Array]:
  """Folds a BatchNorm into the preceding bias-free conv: ``W * s``, ``beta - mu * s``."""
  scale, shift = bn_scale_shift(bn_params, bn_stats)
  return kernel * scale, shift


def pad_to_3x3(kernel: Array) -> Array:
  """Zero-pads an odd ``kh x kw`` HWIO kernel to 3x3 with its centre at the centre tap."""
  kh, kw = kernel.shape[:2]
  if kh % 2 == 0 or kw % 2 == 0 or kh > KERNEL_SIZE or kw > KERNEL_SIZE:
    raise ValueError(f'Cannot centre a {kh}x{kw} kernel in a 3x3 one.')
  ph, pw = (KERNEL_SIZE - kh) // 2, (KERNEL_SIZE - kw) // 2
  return jnp.pad(kernel, ((ph, ph), (pw, pw), (0, 0), (0, 0)))


def identity_kernel(channels: int, in_per_group: int, dtype=jnp.float32) -> Array:
  """The 3x3 HWIO kernel of the identity on ``channels`` channels.

  Output channel ``i`` reads input channel ``i % in_per_group`` of its own
  group at the centre tap, so the kernel is valid for grouped convs too.
  """
  out = jnp.arange(channels)
  kernel = jnp.zeros((KERNEL_SIZE, KERNEL_SIZE, in_per_group, channels), dtype)
  return kernel.at[1, 1, out % in_per_group, out].set(1)


# ----------------------------------------------------------------------------
# The paper's branches.


class ConvBN(nn.Module):
  """A bias-free conv with symmetric explicit padding, then BatchNorm.

  Padding is ``k // 2`` on each side (never 'SAME', which pads asymmetrically
  at stride 2 on even sizes), so every odd kernel samples the same centre
  pixels as the 3x3 branch and fuses into it.
  """

  features: int
  kernel_size: tuple[int, int]
  strides: int
  groups: int
  conv: Callable[..., nn.Module]
  norm: Callable[..., nn.Module]

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kh, kw = self.kernel_size
    x = self.conv(
      self.features,
      self.kernel_size,
      strides=self.strides,
      padding=((kh // 2, kh // 2), (kw // 2, kw // 2)),
      feature_group_count=self.groups,
      use_bias=False,
      name='conv',
    )(x)
    return self.norm(name='bn')(x)


def _conv_bn_kind(name: str, kernel_size: tuple[int, int]) -> BranchKind:
  def build(features, strides, groups, conv, norm, name=name):
    return ConvBN(features, kernel_size, strides, groups, conv, norm, name=name)

  def fuse(params, batch_stats, in_per_group):
    del in_per_group  # Read off the kernel itself.
    kernel, bias = fuse_conv_bn(params['conv']['kernel'], params['bn'], batch_stats['bn'])
    return pad_to_3x3(kernel), bias

  return BranchKind(name, build, fuse)


def _identity_build(features, strides, groups, conv, norm, name='identity'):
  del features, strides, groups, conv  # A BatchNorm of the input alone.
  return norm(name=name)


def _identity_fuse(params, batch_stats, in_per_group):
  channels = params['scale'].shape[0]
  scale, shift = bn_scale_shift(params, batch_stats)
  return identity_kernel(channels, in_per_group, scale.dtype) * scale, shift


CONV3X3 = register_branch(_conv_bn_kind('conv3x3', (3, 3)))
CONV1X1 = register_branch(_conv_bn_kind('conv1x1', (1, 1)))
IDENTITY = register_branch(
  BranchKind(
    'identity',
    _identity_build,
    _identity_fuse,
    applies=lambda in_channels, features, stride: in_channels == features and stride == 1,
  )
)

# The paper's block: 3x3 conv-BN + 1x1 conv-BN + identity BN.
PAPER_BRANCHES = ('conv3x3', 'conv1x1', 'identity')
