"""The block of Section 3, in training form (a ReLU of the sum of its branches)
and deploy form (a ReLU of one 3x3 convolution with bias), and the layer
partials it is built from.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from repvgg_jax.model import branches as branches_lib
from repvgg_jax.model import variants

Array = Any

# PyTorch's default initialisation, as the reference model uses:
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for conv and dense kernels.
torch_default_kernel_init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


def torch_default_bias_init(fan_in: int) -> Callable[..., Array]:
  """PyTorch's dense bias initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class RepVGGBlock(nn.Module):
  """A re-parameterizable block (Section 3): in training form the ReLU of the sum
  of its branches, in deploy form the ReLU of one 3x3 conv with bias.

  Use it in any Linen module, compact or setup, as ``RepVGGBlock(64, strides=2)(x,
  train=train)``; `fuse_params` turns the training form's variables into the
  deploy form's wherever the block sits in a tree.

  Attributes:
    features: output channels.
    strides: the stride of every branch (1, or 2 to halve the resolution).
    groups: group count of the convolutions; divides the input and output channels.
    branches: names of registered branch kinds; those that do not apply to
      this block's shape (the identity when channels or resolution change) are
      left out, as in the paper, or replaced by their kind's fallback.
    post_norm: a BatchNorm of the branches' sum before the ReLU, named
      ``post_bn`` (QARepVGG's block: ``branches=QA_BRANCHES, post_norm=True``).
    deploy: the deploy form, a single 3x3 conv with bias named ``reparam``.
    dtype: compute dtype; parameters and BatchNorm statistics stay float32.
    precision: `jax.lax.Precision` of the convolutions.
    conv: the convolution module, `nn.Conv` or one with its arguments and
      parameters (`repvgg_jax.perf.conv_layer` for CPU kernels).
  """

  features: int
  strides: int = 1
  groups: int = 1
  branches: Sequence[str] = branches_lib.PAPER_BRANCHES
  deploy: bool = False
  dtype: Any = jnp.float32
  precision: Any = None
  conv: Callable[..., nn.Module] = nn.Conv
  post_norm: bool = False

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    kinds = self._branch_kinds(x.shape[-1])
    self._check_variables()
    conv, norm = layer_partials(train, self.dtype, self.precision, self.conv)
    if self.deploy:
      x = conv(
        self.features,
        (3, 3),
        strides=self.strides,
        padding=((1, 1), (1, 1)),
        feature_group_count=self.groups,
        use_bias=True,
        name=branches_lib.FUSED_KEY,
      )(x)
      return nn.relu(x)
    out = None
    for kind in kinds:
      y = kind.build(self.features, self.strides, self.groups, conv, norm, name=kind.name)(x)
      out = y if out is None else out + y
    self._check_kernel([kind.name for kind in kinds])
    if self.post_norm:
      out = norm(name=branches_lib.POST_NORM_KEY)(out)
    return nn.relu(out)

  def _where(self) -> str:
    return f'RepVGGBlock {"/".join(self.scope.path) or self.name or ""}'.rstrip()

  def _check_variables(self) -> None:
    """Refuses, with the fix, fused parameters for a training-time block and the reverse
    (the likeliest mix-up: Flax would only say that a parameter is missing)."""
    if self.is_initializing() or 'params' not in self.variables:
      return
    fused = self.has_variable('params', branches_lib.FUSED_KEY)
    if self.deploy and not fused:
      raise ValueError(
        f'{self._where()} is a deploy block, but its params are training-time branches '
        f'{sorted(self.variables["params"])}: fuse the variables first, '
        'repvgg_jax.fuse_params(variables).'
      )
    if fused and not self.deploy:
      raise ValueError(
        f'{self._where()} is a training-time block, but its params are fused '
        f'({branches_lib.FUSED_KEY!r}): apply them to the deploy model '
        '(create_model(..., deploy=True)).'
      )

  def _check_kernel(self, names: list[str]) -> None:
    """Refuses what trains but cannot be fused: a branch without parameters (fusion
    finds a block's branches by them) and branches with no convolution kernel between
    them (an identity alone: nothing to fold them into)."""
    params = self.variables.get('params', {})
    bare = [name for name in names if name not in params]
    if bare:
      raise ValueError(
        f'{self._where()}: the branch {bare[0]!r} has no parameters, and fusion finds a '
        "block's branches by theirs: give its module one (a BatchNorm, a per-channel scale)."
      )
    kernels = (
      kernel for n in names for kernel in branches_lib.layer_leaves(params[n], 'kernel', 4)
    )
    if next(kernels, None) is None:
      raise ValueError(
        f'{self._where()}: the branches {tuple(names)} have no convolution kernel to fuse '
        "into: add a convolutional branch such as 'conv3x3'."
      )

  def _branch_kinds(self, in_channels: int) -> list[branches_lib.BranchKind]:
    """The branches of a block of this shape; ValueError for a shape no block has."""
    where = self._where()
    for field in ('features', 'strides', 'groups'):
      value = getattr(self, field)
      if not variants.is_count(value) or value < 1:
        raise ValueError(f'{where}: {field} must be a positive int, got {value!r}.')
    if in_channels % self.groups or self.features % self.groups:
      raise ValueError(
        f'{where}: groups={self.groups} must divide the {in_channels} input channels and '
        f'the {self.features} output channels.'
      )
    names = branches_lib.branch_names(self.branches, f'{where}: branches')
    try:
      kinds = active_branches(names, in_channels, self.features, self.strides)
    except ValueError as error:  # An unknown kind.
      raise ValueError(f'{where}: {error}') from None
    if not kinds:
      raise ValueError(
        f'{where}: none of the branches {names} applies to a block from '
        f'{in_channels} to {self.features} channels at stride {self.strides}: add a '
        "convolutional branch such as 'conv3x3'."
      )
    return kinds


def layer_partials(
  train: bool,
  dtype: Any = jnp.float32,
  precision: Any = None,
  conv: Callable[..., nn.Module] = nn.Conv,
):
  """The conv and BatchNorm partials every block is built from.

  Parameters and BatchNorm statistics are float32 whatever the compute dtype;
  BatchNorm is the reference's (PyTorch's eps 1e-5, momentum 0.1). ``conv`` is
  `nn.Conv` or a module with its arguments and parameters (the seam through
  which `repvgg_jax.perf` brings its CPU kernels).
  """
  conv = functools.partial(
    conv,
    dtype=dtype,
    param_dtype=jnp.float32,
    precision=precision,
    kernel_init=torch_default_kernel_init,
  )
  norm = functools.partial(
    nn.BatchNorm,
    use_running_average=not train,
    momentum=branches_lib.BN_MOMENTUM,
    epsilon=branches_lib.BN_EPSILON,
    dtype=dtype,
    param_dtype=jnp.float32,
  )
  return conv, norm


def active_branches(names: Sequence[str], in_channels: int, features: int, strides: int):
  """The branch kinds a block of this shape has: those among ``names`` that
  apply to it, or their fallbacks where they do not and the fallback does
  (each kind once: a fallback may also be named)."""
  active = []
  for name in names:
    kind = branches_lib.get_branch(name)
    while not kind.applies(in_channels, features, strides) and kind.fallback:
      kind = branches_lib.get_branch(kind.fallback)
    if kind.applies(in_channels, features, strides) and kind not in active:
      active.append(kind)
  return active
