"""The RepVGG network: the multi-branch training-time model and the plain deploy model.

Both share one skeleton and one parameter layout: blocks are named
``stage{s}_block{i}`` and the classifier ``linear``. A training-time block holds
one subtree per branch (``conv3x3``, ``conv1x1``, ``identity``, ...); the deploy
block holds the fused 3x3 conv ``reparam`` with a bias.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from repvgg_jax import branches as branches_lib
from repvgg_jax import variants

Array = Any
NUM_STAGES = 5

# PyTorch's default initialisation, as the reference model uses:
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for conv and dense kernels.
torch_default_kernel_init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


def torch_default_bias_init(fan_in: int) -> Callable[..., Array]:
  """PyTorch's dense bias initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def block_name(stage: int, index: int) -> str:
  """The parameter-tree key of block ``index`` of ``stage``."""
  return f'stage{stage}_block{index}'


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


class RepVGG(nn.Module):
  """RepVGG, training-time (multi-branch) or deploy (plain 3x3 convs).

  Apply as ``model.apply(variables, images, train=False)`` on NHWC float
  images. The training-time model in train mode needs
  ``mutable=['batch_stats']``.

  Attributes:
    variant: the architecture (`repvgg_jax.variants.Variant`).
    num_classes: classifier outputs; 0 drops the classifier and returns the
      five stage outputs (for detection or segmentation backbones).
    branches: per stage (5 entries), the branch kinds of its blocks.
    deploy: build the fused plain model instead of the multi-branch one.
    dtype: compute dtype (float32 or bfloat16); parameters and BatchNorm
      statistics stay float32.
    precision: `jax.lax.Precision` of convs and the classifier (``'highest'``
      gives true float32 on accelerators that default to TF32).
    in_channels: channels of the input images.
    conv: the convolution module, `nn.Conv` or one with its arguments and
      parameters (`repvgg_jax.perf.conv_layer` for CPU kernels).
  """

  variant: variants.Variant
  num_classes: int = 1000
  branches: tuple[tuple[str, ...], ...] = (branches_lib.PAPER_BRANCHES,) * NUM_STAGES
  deploy: bool = False
  dtype: Any = jnp.float32
  precision: Any = None
  in_channels: int = 3
  conv: Callable[..., nn.Module] = nn.Conv

  @nn.compact
  def __call__(self, images: Array, train: bool = False):
    self._check_images(images)
    x = images.astype(self.dtype)
    x, stage_outputs = self.run_blocks(x, list(self.variant.blocks()), train)
    return self.head(x, stage_outputs)

  def run_blocks(self, x: Array, blocks: Sequence[variants.Block], train: bool):
    """Runs ``blocks`` (consecutive, from `Variant.blocks`) on ``x``.

    Returns:
      The last block's output and the outputs of the stages whose last block
      is among ``blocks``.
    """
    conv, norm = layer_partials(train, self.dtype, self.precision, self.conv)
    stage_outputs = []
    for block in blocks:
      name = block_name(block.stage, block.index)
      if self.deploy:
        layer = DeployBlock(block.out_channels, block.stride, block.groups, conv, name=name)
      else:
        branches = self.branches[block.stage]
        layer = RepVGGBlock(
          block.out_channels, block.stride, block.groups, branches, conv, norm, name=name
        )
      x = layer(x)
      if block.index == self.variant.stage_depths[block.stage] - 1:
        stage_outputs.append(x)
    return x, stage_outputs

  def head(self, x: Array, stage_outputs: Sequence[Array]):
    """Global average pooling and the classifier; the stage outputs without one."""
    if self.num_classes == 0:
      return tuple(stage_outputs)
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    x = nn.Dense(
      self.num_classes,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      precision=self.precision,
      kernel_init=torch_default_kernel_init,
      bias_init=torch_default_bias_init(x.shape[-1]),
      name='linear',
    )(x)
    return x.astype(jnp.float32)

  def _check_images(self, images: Array) -> None:
    shape = tuple(np.shape(images))
    expected = f'(batch, height, width, {self.in_channels})'
    if len(shape) != 4 or shape[-1] != self.in_channels:
      hint = ''
      if len(shape) == 3 and shape[-1] == self.in_channels:
        hint = ' For a single image add a batch axis: images[None].'
      elif len(shape) == 4 and shape[1] == self.in_channels:
        hint = ' This looks like NCHW: transpose with images.transpose(0, 2, 3, 1).'
      raise ValueError(
        f'{self.variant.name} expects NHWC images of shape {expected}, got shape {shape}.{hint}'
      )
    if not jnp.issubdtype(images.dtype, jnp.floating):
      raise TypeError(
        f'{self.variant.name} expects float images, got dtype {images.dtype}; '
        'convert and normalize them first, e.g. (images / 255 - mean) / std.'
      )


def normalize_branches(branches) -> tuple[tuple[str, ...], ...]:
  """One branch set for all stages, or one per stage, as 5 tuples of names.

  Raises:
    ValueError: an unknown branch kind, a repeated one, an empty set, a wrong
      number of stages, or a set that a downsampling block cannot use (every
      set needs a branch that applies to all blocks, such as ``'conv3x3'``).
  """
  if isinstance(branches, str):
    raise ValueError(f'branches must be a sequence of branch names, got the string {branches!r}.')
  per_stage = list(branches)
  if per_stage and all(isinstance(b, str) for b in per_stage):
    per_stage = [per_stage] * NUM_STAGES
  if len(per_stage) != NUM_STAGES:
    raise ValueError(
      f'branches must be one set of branch names or one set per stage ({NUM_STAGES}), '
      f'got {len(per_stage)} entries: {branches!r}.'
    )
  result = []
  for stage, names in enumerate(per_stage):
    names = tuple(names)
    kinds = [branches_lib.get_branch(name) for name in names]
    if len(set(names)) != len(names):
      raise ValueError(f'Stage {stage} repeats a branch kind: {names}.')
    if not any(kind.applies(3, 4, 2) for kind in kinds):
      raise ValueError(
        f'Stage {stage} has branches {names}, none of which can change the resolution '
        "or channels of its first block: add a convolutional branch such as 'conv3x3'."
      )
    result.append(names)
  return tuple(result)


def create_model(
  name: str | variants.Variant,
  *,
  num_classes: int = 1000,
  deploy: bool = False,
  branches: Sequence[str] | Sequence[Sequence[str]] = branches_lib.PAPER_BRANCHES,
  dtype: Any = jnp.float32,
  precision: Any = None,
  in_channels: int = 3,
  conv: Callable[..., nn.Module] = nn.Conv,
) -> RepVGG:
  """Builds a RepVGG model by variant name.

  Args:
    name: a name from `list_models()` (case and the 'RepVGG-' prefix are
      optional: 'b1g4' works) or a `Variant`.
    num_classes: classifier outputs; 0 returns the five stage outputs instead.
    deploy: the fused plain model (load it with `fuse_params` output).
    branches: branch kinds of every block, or one set per stage; the paper's
      ``('conv3x3', 'conv1x1', 'identity')`` by default.
    dtype: compute dtype, ``jnp.float32`` or ``jnp.bfloat16``.
    precision: convolution and classifier precision, e.g. ``'highest'``.
    in_channels: image channels.
    conv: the convolution module: `nn.Conv` (XLA's convolution on every
      backend), or `repvgg_jax.perf.conv_layer(...)` for the CPU kernels; the
      parameters are the same.

  Returns:
    A `RepVGG` Linen module.
  """
  variant = variants.get_variant(name)
  if not isinstance(num_classes, int) or num_classes < 0:
    raise ValueError(f'num_classes must be an int >= 0 (0: no classifier), got {num_classes!r}.')
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
    raise ValueError(f'dtype must be float32 or bfloat16, got {jnp.dtype(dtype)}.')
  return RepVGG(
    variant=variant,
    num_classes=num_classes,
    branches=normalize_branches(branches),
    deploy=deploy,
    dtype=jnp.dtype(dtype),
    precision=precision,
    in_channels=in_channels,
    conv=conv,
  )
