"""Branch kinds of a re-parameterizable block, each with its own fusion rule.

A block's output before the ReLU is the sum of its branches. Every branch kind
here is linear at inference time, so it has an exact rule turning its
parameters and BatchNorm statistics into a 3x3 kernel (HWIO, grouped like the
block) and a bias; the block's fused kernel is the sum over its branches.

Adding a branch kind is one new `BranchKind` passed to `register_branch`: a
module that computes it and a function that fuses it. Nothing else changes.
A parametrized family of kinds (``parallel3x3_k{K}``) is a `BranchFamily`: a
name pattern and a factory, resolved by `get_branch`. The paper's three kinds
live here; ACNet's, the Diverse Branch Block's and MobileOne's are in
`repvgg_jax.model.reparam_family`, registered when `repvgg_jax.model` is imported.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Collection, Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

BN_EPSILON = 1e-5  # As PyTorch's BatchNorm2d, which the reference uses.
BN_MOMENTUM = 0.9  # Flax's convention; PyTorch's momentum=0.1.
KERNEL_SIZE = 3  # The deploy kernel every branch fuses into.
FUSED_KEY = 'reparam'  # Its name in a deploy block's parameter tree.
POST_NORM_KEY = 'post_bn'  # A BatchNorm of the branches' sum (QARepVGG), in a block's tree.

Array = Any
Tree = Mapping[str, Any]


def layer_leaves(tree: Tree, leaf: str, ndim: int):
  """All arrays named ``leaf`` with ``ndim`` dimensions in a subtree, depth first."""
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from layer_leaves(value, leaf, ndim)
    elif key == leaf and len(value.shape) == ndim:
      yield value


def uniform_channels(params: Tree) -> tuple[int | None, int]:
  """Block channels of a branch whose every conv maps the block's input to its output.

  Every HWIO kernel must read ``in_per_group`` channels and write
  ``out_channels``, and every BatchNorm must have ``out_channels`` entries
  (a conv-BN, parallel conv-BNs, a lone BN).

  Returns:
    ``(in_per_group, out_channels)``; ``in_per_group`` is None when the branch
    has no kernel (a lone BatchNorm says nothing about the groups).

  Raises:
    ValueError: the branch's layers disagree in channels.
  """
  kernels = list(layer_leaves(params, 'kernel', 4))
  scales = list(layer_leaves(params, 'scale', 1))
  if not kernels and not scales:
    raise ValueError(f'has neither a kernel nor a BatchNorm: {sorted(params)}')
  in_per_group, out_channels = kernels[0].shape[2:] if kernels else (None, scales[0].shape[0])
  for kernel in kernels:
    if kernel.shape[2:] != (in_per_group, out_channels):
      raise ValueError(
        f'has a kernel of shape {kernel.shape}, but the block maps {in_per_group} channels '
        f'per group to {out_channels}'
      )
  for scale in scales:
    if scale.shape != (out_channels,):
      raise ValueError(
        f'has a BatchNorm scale of shape {scale.shape}, but the block has {out_channels} '
        'output channels'
      )
  return in_per_group, out_channels


@dataclasses.dataclass(frozen=True)
class BranchKind:
  """One kind of branch.

  Attributes:
    name: the branch's key in the block's parameter tree (and in configs).
    build: ``build(features, strides, groups, conv, norm)`` returns the Linen
      module computing the branch (conv and norm are the block's layer
      partials); the block names it ``name``. Its layers' names must not
      depend on the block's shape: `fuse_params` recognises blocks by the
      layers of one built at 64 channels, stride 1 (a layout that changes with
      the stride is two kinds, the other one its ``fallback``).
    fuse: ``fuse(params, batch_stats, in_per_group)`` maps the branch's
      subtrees to a ``(3, 3, in_per_group, features)`` kernel, where
      ``in_per_group = in_channels // groups``, and a ``(features,)`` bias.
      Called with float64 arrays.
    applies: ``applies(in_channels, features, stride)`` says whether a block of
      that shape has this branch (the identity needs equal channels, stride 1).
    channels: ``channels(params)`` reads ``(in_per_group, features)`` of the
      block off the branch's parameter shapes (``in_per_group`` None when they
      do not tell), raising ValueError when the branch's own layers disagree;
      `repvgg_jax.model.shapes.block_channels` checks a block's branches against
      each other with it. The default, `uniform_channels`, suits branches whose
      kernels all map the block's input to its output; a branch with a different
      inner width (DBB's 1x1 -> 3x3) brings its own.
    fallback: the kind a block has instead where this one does not apply
      (QARepVGG's 1x1-plus-identity becomes a plain 1x1 where the identity
      cannot be), or None.
  """

  name: str
  build: Callable[..., nn.Module]
  fuse: Callable[[Tree, Tree, int], tuple[Array, Array]]
  applies: Callable[[int, int, int], bool] = lambda in_channels, features, stride: True
  channels: Callable[[Tree], tuple[int | None, int]] = uniform_channels
  fallback: str | None = None


@dataclasses.dataclass(frozen=True)
class BranchFamily:
  """A parametrized family of branch kinds, such as ``parallel3x3_k{K}``.

  Attributes:
    template: the names' form, for messages, e.g. ``'parallel3x3_k{K} (K >= 1)'``.
    pattern: a regular expression; the names it matches in full are members.
    make: ``make(match)`` returns the `BranchKind` of a matching name (named
      exactly that name, which is also its parameter-tree key).
  """

  template: str
  pattern: re.Pattern
  make: Callable[[re.Match], BranchKind]


BRANCH_KINDS: dict[str, BranchKind] = {}
BRANCH_FAMILIES: dict[str, BranchFamily] = {}
_FAMILY_MEMBERS: dict[str, BranchKind] = {}  # Resolved once, so each name has one kind.


def _family_of(name: str) -> tuple[BranchFamily, re.Match] | None:
  for family in BRANCH_FAMILIES.values():
    match = family.pattern.fullmatch(name)
    if match:
      return family, match
  return None


def register_branch(kind: BranchKind) -> BranchKind:
  """Adds a branch kind to the registry that blocks and `fuse_params` use."""
  if not isinstance(kind, BranchKind):
    raise TypeError(f'register_branch takes a BranchKind, got {type(kind).__name__}.')
  if kind.name in (FUSED_KEY, POST_NORM_KEY):
    raise ValueError(f'{kind.name!r} names the layer it is in block trees: choose another name.')
  if kind.name in BRANCH_KINDS:
    raise ValueError(f'A branch kind named {kind.name!r} is already registered.')
  family = _family_of(kind.name)
  if family:
    raise ValueError(f'{kind.name!r} is a name of the branch family {family[0].template!r}.')
  BRANCH_KINDS[kind.name] = kind
  return kind


def register_branch_family(family: BranchFamily) -> BranchFamily:
  """Adds a parametrized family of branch kinds, resolved by name in `get_branch`."""
  if family.template in BRANCH_FAMILIES:
    raise ValueError(f'A branch family {family.template!r} is already registered.')
  claimed = [name for name in BRANCH_KINDS if family.pattern.fullmatch(name)]
  if claimed:
    raise ValueError(f'Family {family.template!r} matches registered kinds {claimed}.')
  BRANCH_FAMILIES[family.template] = family
  return family


def known_branches() -> str:
  """The registered kinds and families, for error messages."""
  families = '; families: ' + ', '.join(BRANCH_FAMILIES) if BRANCH_FAMILIES else ''
  return ', '.join(sorted(BRANCH_KINDS)) + families


def branch_names(names, what: str) -> tuple[str, ...]:
  """``names`` (any collection of branch-kind names but a string) as a tuple; a
  ValueError naming ``what`` for anything else, or for a name given twice."""
  if isinstance(names, str) or not isinstance(names, Collection):
    raise ValueError(f'{what} must be a collection of branch names, got {names!r}.')
  names = tuple(names)
  if len(set(names)) != len(names):
    raise ValueError(f'{what} repeats a branch kind: {names}.')
  return names


def get_branch(name: str) -> BranchKind:
  """The branch kind called ``name`` (registered, or a family member), or a ValueError."""
  if not isinstance(name, str):
    raise ValueError(f'A branch kind is named by a string, got {name!r}.')
  kind = BRANCH_KINDS.get(name) or _FAMILY_MEMBERS.get(name)
  if kind is not None:
    return kind
  found = _family_of(name)
  if found is None:
    raise ValueError(f'Unknown branch kind {name!r}. Known kinds: {known_branches()}.')
  kind = found[0].make(found[1])
  if kind.name != name:
    raise ValueError(f'Family {found[0].template} made a kind named {kind.name!r} for {name!r}.')
  _FAMILY_MEMBERS[name] = kind
  return kind


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
  pixels as the 3x3 branch and fuses into it. ``padding`` overrides it (0 for
  a conv whose input is already padded).
  """

  features: int
  kernel_size: tuple[int, int]
  strides: int
  groups: int
  conv: Callable[..., nn.Module]
  norm: Callable[..., nn.Module]
  padding: tuple[tuple[int, int], tuple[int, int]] | None = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kh, kw = self.kernel_size
    x = self.conv(
      self.features,
      self.kernel_size,
      strides=self.strides,
      padding=self.padding or ((kh // 2, kh // 2), (kw // 2, kw // 2)),
      feature_group_count=self.groups,
      use_bias=False,
      name='conv',
    )(x)
    return self.norm(name='bn')(x)


def conv_bn_kind(name: str, kernel_size: tuple[int, int]) -> BranchKind:
  """A conv-BN branch with an odd kernel of at most 3x3, fused zero-padded to 3x3."""

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


CONV3X3 = register_branch(conv_bn_kind('conv3x3', (3, 3)))
CONV1X1 = register_branch(conv_bn_kind('conv1x1', (1, 1)))
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


# ----------------------------------------------------------------------------
# QARepVGG's branches (Chu et al., AAAI 2024): the 1x1 conv and the identity
# without BatchNorm. Unnormalised, the two are one linear map, x -> W1 x + x,
# so they form one branch whose parameters say whether the identity is in it:
# a block whose identity cannot be (channels or resolution change) has the
# plain 1x1 branch instead.


class Conv1x1(nn.Module):
  """A bias-free 1x1 conv without BatchNorm, plus the identity when ``identity``."""

  features: int
  strides: int
  groups: int
  conv: Callable[..., nn.Module]
  identity: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    y = self.conv(
      self.features,
      (1, 1),
      strides=self.strides,
      padding=((0, 0), (0, 0)),
      feature_group_count=self.groups,
      use_bias=False,
      name='conv',
    )(x)
    return y + x if self.identity else y


def _conv1x1_nobn_build(features, strides, groups, conv, norm, name='conv1x1_nobn'):
  del norm
  return Conv1x1(features, strides, groups, conv, name=name)


def _conv1x1_identity_build(features, strides, groups, conv, norm, name='conv1x1_identity'):
  del norm
  return Conv1x1(features, strides, groups, conv, identity=True, name=name)


def _conv1x1_fuse(identity: bool):
  def fuse(params, batch_stats, in_per_group):
    del batch_stats  # No BatchNorm.
    kernel = pad_to_3x3(params['conv']['kernel'])
    channels = kernel.shape[-1]
    if identity:
      kernel = kernel + identity_kernel(channels, in_per_group, kernel.dtype)
    return kernel, jnp.zeros(channels, kernel.dtype)

  return fuse


CONV1X1_NOBN = register_branch(
  BranchKind('conv1x1_nobn', _conv1x1_nobn_build, _conv1x1_fuse(identity=False))
)
CONV1X1_IDENTITY = register_branch(
  BranchKind(
    'conv1x1_identity',
    _conv1x1_identity_build,
    _conv1x1_fuse(identity=True),
    applies=IDENTITY.applies,
    fallback='conv1x1_nobn',
  )
)

# QARepVGG's block: 3x3 conv-BN + (1x1 conv + identity), then the BatchNorm of
# the sum (`POST_NORM_KEY`, built by the block).
QA_BRANCHES = ('conv3x3', 'conv1x1_identity')
