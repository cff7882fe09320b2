"""The blocks of Section 3: the training-time block, a ReLU of the sum of its
branches, and the deploy block, a ReLU of one 3x3 convolution with bias; and
the layer partials both are built from.
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
  """Training-time block: ReLU of the sum of its branches.

  Attributes:
    features: output channels.
    strides: 1 or 2.
    groups: group count of the convolutional branches.
    branches: names of registered branch kinds; those that do not apply to
      this block's shape (the identity when channels or resolution change) are
      left out, as in the paper.
    conv: partial of `nn.Conv` (dtype, precision, initialisation).
    norm: partial of `nn.BatchNorm` (train or inference mode, dtype).
  """

  features: int
  strides: int
  groups: int
  branches: Sequence[str]
  conv: Callable[..., nn.Module]
  norm: Callable[..., nn.Module]

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kinds = active_branches(self.branches, x.shape[-1], self.features, self.strides)
    out = None
    for kind in kinds:
      y = kind.build(
        self.features, self.strides, self.groups, self.conv, self.norm, name=kind.name
      )(x)
      out = y if out is None else out + y
    return nn.relu(out)


class DeployBlock(nn.Module):
  """Deploy block: ReLU of one 3x3 conv with bias (the fused branches)."""

  features: int
  strides: int
  groups: int
  conv: Callable[..., nn.Module]

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = self.conv(
      self.features,
      (3, 3),
      strides=self.strides,
      padding=((1, 1), (1, 1)),
      feature_group_count=self.groups,
      use_bias=True,
      name='reparam',
    )(x)
    return nn.relu(x)


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
  """The branch kinds among ``names`` that a block of this shape has."""
  kinds = [branches_lib.get_branch(name) for name in names]
  return [kind for kind in kinds if kind.applies(in_channels, features, strides)]
