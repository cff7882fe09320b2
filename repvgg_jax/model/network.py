"""The RepVGG network: the multi-branch training-time model and the plain deploy model.

Both share one skeleton and one parameter layout: blocks are named
``stage{s}_block{i}`` and the classifier ``linear``. A training-time block holds
one subtree per branch (``conv3x3``, ``conv1x1``, ``identity``, ...); the deploy
block holds the fused 3x3 conv ``reparam`` with a bias.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from repvgg_jax.model import branches as branches_lib
from repvgg_jax.model import trees, variants
from repvgg_jax.model.blocks import (
  RepVGGBlock,
  active_branches,
  torch_default_bias_init,
  torch_default_kernel_init,
)

Array = Any
NUM_STAGES = 5


def block_name(stage: int, index: int) -> str:
  """The parameter-tree key of block ``index`` of ``stage``."""
  return f'stage{stage}_block{index}'


class RepVGG(nn.Module):
  """RepVGG, training-time (multi-branch) or deploy (plain 3x3 convs).

  Apply as ``model.apply(variables, images, train=False)`` on NHWC float
  images. The training-time model in train mode needs
  ``mutable=['batch_stats']``.

  Attributes:
    variant: the architecture (`repvgg_jax.model.variants.Variant`).
    num_classes: classifier outputs; 0 drops the classifier and returns the
      outputs of the stages in ``out_indices`` (a backbone for detection or
      segmentation; `feature_info` gives their channels and strides).
    branches: per stage (5 entries), the branch kinds of its blocks; None for
      those of the variant's block kind (the paper's, or QARepVGG's).
    deploy: build the fused plain model instead of the multi-branch one.
    dtype: compute dtype (float32 or bfloat16); parameters and BatchNorm
      statistics stay float32.
    precision: `jax.lax.Precision` of convs and the classifier (``'highest'``
      gives true float32 on accelerators that default to TF32).
    in_channels: channels of the input images.
    conv: the convolution module, `nn.Conv` or one with its arguments and
      parameters (`repvgg_jax.perf.conv_layer` for CPU kernels).
    out_indices: the stages (0-4) whose outputs a backbone returns; the
      blocks after the last of them are left out.
    frozen_stages: the first ``frozen_stages`` stages run in inference mode
      even in training (BatchNorm on its running statistics, which stay as
      they are) and pass no gradient back (neither to layers before the
      model), so the backward pass skips them:
      fine-tuning with a frozen stem; the optimizer keeps their parameters
      fixed (`repvgg_jax.train.optim`).
  """

  variant: variants.Variant
  num_classes: int = 1000
  branches: tuple[tuple[str, ...], ...] | None = None
  deploy: bool = False
  dtype: Any = jnp.float32
  precision: Any = None
  in_channels: int = 3
  conv: Callable[..., nn.Module] = nn.Conv
  out_indices: tuple[int, ...] = tuple(range(NUM_STAGES))
  frozen_stages: int = 0

  @nn.compact
  def __call__(self, images: Array, train: bool = False):
    self._check_images(images)
    x = images.astype(self.dtype)
    x, stage_outputs = self.run_blocks(x, self.blocks(), train)
    return self.head(x, stage_outputs)

  def blocks(self) -> list[variants.Block]:
    """The blocks this model runs: all of them, or a backbone's up to its last output."""
    last = NUM_STAGES - 1 if self.num_classes else max(self.out_indices)
    return [block for block in self.variant.blocks(self.in_channels) if block.stage <= last]

  def abstract_variables(self, image_size: int = 32) -> dict:
    """The variables' shapes and dtypes (`jax.ShapeDtypeStruct` leaves), computing
    nothing; they are the same at every image size."""
    images = jax.ShapeDtypeStruct((1, image_size, image_size, self.in_channels), jnp.float32)
    return jax.eval_shape(self.init, jax.random.key(0), images)

  def matches(self, params) -> bool:
    """Whether ``params`` has exactly the tree and the shapes of this model's parameters."""
    return trees.same_shapes(self.abstract_variables()['params'], params)

  def feature_info(self) -> tuple[variants.FeatureInfo, ...]:
    """Stage, channels and reduction of each output of a backbone (``num_classes=0``),
    in the order the model returns them."""
    return tuple(self.variant.feature_info()[stage] for stage in self.out_indices)

  def run_blocks(self, x: Array, blocks: Sequence[variants.Block], train: bool):
    """Runs ``blocks`` (consecutive, from `Variant.blocks`) on ``x``.

    Returns:
      The last block's output and the outputs of the stages whose last block
      is among ``blocks``.
    """
    stage_outputs = []
    kind = self.variant.block_kind
    branches = self.branches or (kind.branches,) * NUM_STAGES
    for block in blocks:
      frozen = block.stage < self.frozen_stages
      x = RepVGGBlock(
        block.out_channels,
        block.stride,
        block.groups,
        branches[block.stage],
        self.deploy,
        self.dtype,
        self.precision,
        self.conv,
        post_norm=kind.post_norm,
        name=block_name(block.stage, block.index),
      )(x, train=train and not frozen)
      if train and frozen:
        # Nothing trains below: the backward pass ends at the first trained block.
        x = jax.lax.stop_gradient(x)
      if block.index == self.variant.stage_depths[block.stage] - 1:
        stage_outputs.append(x)
    return x, stage_outputs

  def head(self, x: Array, stage_outputs: Sequence[Array]):
    """Global average pooling and the classifier; the selected stage outputs without one."""
    if self.num_classes == 0:
      return tuple(stage_outputs[stage] for stage in self.out_indices)
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
    names = branches_lib.branch_names(names, f'The branches of stage {stage}')
    if not active_branches(names, 3, 4, 2):
      raise ValueError(
        f'Stage {stage} has branches {names}, none of which can change the resolution '
        "or channels of its first block: add a convolutional branch such as 'conv3x3'."
      )
    result.append(names)
  return tuple(result)


def variant_from_config(config) -> variants.Variant:
  """The variant of ``config.model``: ``name``, scaled where ``num_blocks`` or
  ``width_multipliers`` are set (e.g. for quick experiments and tests).

  Raises:
    ValueError: an unknown name, or a scale no network has.
  """
  variant = variants.get_variant(config.model.name)
  overrides = {
    key: tuple(config.model.get(key))
    for key in ('num_blocks', 'width_multipliers')
    if config.model.get(key) is not None
  }
  if overrides:
    variant = dataclasses.replace(variant, name=f'{variant.name}-custom', **overrides)
  return variant


def model_from_config(config, *, deploy: bool = False, conv=nn.Conv, dtype=None) -> RepVGG:
  """The RepVGG of a training config: ``config.model`` (``name``, ``branches``,
  ``dtype``; ``num_blocks`` and ``width_multipliers`` scale the variant when set)
  and ``config.dataset.num_classes``. ``dtype`` replaces the run's computation
  dtype (the fused model is deployed, quantized and exported in float32)."""
  return create_model(
    variant_from_config(config),
    num_classes=config.dataset.num_classes,
    deploy=deploy,
    branches=config.model.branches,
    dtype=jnp.dtype(dtype or config.model.dtype),
    conv=conv,
    frozen_stages=config.get('freeze_stages', 0),
  )


def create_model(
  variant: str | variants.Variant,
  /,
  *,
  num_classes: int = 1000,
  deploy: bool = False,
  branches: Sequence[str] | Sequence[Sequence[str]] | None = None,
  dtype: Any = jnp.float32,
  precision: Any = None,
  in_channels: int = 3,
  conv: Callable[..., nn.Module] = nn.Conv,
  out_indices: Sequence[int] = tuple(range(NUM_STAGES)),
  frozen_stages: int = 0,
  name: str | None = None,
) -> RepVGG:
  """Builds a RepVGG model by variant name.

  Args:
    variant: a name from `list_models()` (case and the 'RepVGG-' prefix are
      optional: 'b1g4' works; 'QARepVGG-B1g4' or 'qarepvgg_b1g4' for
      QARepVGG's blocks) or a `Variant`.
    num_classes: classifier outputs; 0 returns stage outputs instead (those
      of ``out_indices``, by default all five; `RepVGG.feature_info` gives
      their channels and strides).
    deploy: the fused plain model (load it with `fuse_params` output).
    branches: branch kinds of every block, or one set per stage; by default
      those of the variant's block kind: the paper's ``('conv3x3', 'conv1x1',
      'identity')`` for RepVGG, ``('conv3x3', 'conv1x1_identity')`` and a
      BatchNorm of the sum for QARepVGG.
    dtype: compute dtype, ``jnp.float32`` or ``jnp.bfloat16``.
    precision: convolution and classifier precision, e.g. ``'highest'``.
    in_channels: image channels.
    conv: the convolution module: `nn.Conv` (XLA's convolution on every
      backend), or `repvgg_jax.perf.conv_layer(...)` for the CPU kernels; the
      parameters are the same.
    out_indices: the stages (0-4) whose outputs a backbone (``num_classes=0``)
      returns, as timm's ``out_indices``; the blocks after the last are left out.
    frozen_stages: leading stages (0-5) that run BatchNorm in inference mode
      also in training and pass no gradient back (`RepVGG.frozen_stages`).
    name: the module's name, for a submodule of a larger network (as any
      Linen module's ``name=``).

  Returns:
    A `RepVGG` Linen module.
  """
  variant = variants.get_variant(variant)
  if not variants.is_count(num_classes) or num_classes < 0:
    raise ValueError(f'num_classes must be an int >= 0 (0: no classifier), got {num_classes!r}.')
  out_indices = _check_out_indices(out_indices, num_classes)
  if not variants.is_count(frozen_stages) or not 0 <= frozen_stages <= NUM_STAGES:
    raise ValueError(f'frozen_stages must be an int from 0 to {NUM_STAGES}, got {frozen_stages!r}.')
  if not variants.is_count(in_channels) or in_channels < 1:
    raise ValueError(f'in_channels must be a positive int, got {in_channels!r}.')
  if dtype is None or jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
    got = None if dtype is None else jnp.dtype(dtype)
    raise ValueError(f'dtype must be float32 or bfloat16, got {got}.')
  return RepVGG(
    variant=variant,
    num_classes=int(num_classes),
    branches=None if branches is None else normalize_branches(branches),
    deploy=deploy,
    dtype=jnp.dtype(dtype),
    precision=precision,
    in_channels=in_channels,
    conv=conv,
    out_indices=out_indices,
    frozen_stages=frozen_stages,
    name=name,
  )


def _check_out_indices(out_indices: Sequence[int], num_classes: int) -> tuple[int, ...]:
  """``out_indices`` as a sorted tuple of distinct stages, or a ValueError."""
  everything = tuple(range(NUM_STAGES))
  if variants.is_count(out_indices):
    stages = (int(out_indices),)
  elif isinstance(out_indices, Collection) and all(variants.is_count(s) for s in out_indices):
    stages = tuple(map(int, out_indices))
  else:
    stages = ()  # Refused below.
  if not stages or any(s not in everything for s in stages) or len(set(stages)) != len(stages):
    raise ValueError(
      f'out_indices must be distinct stages among {everything}, got {out_indices!r}.'
    )
  if num_classes and sorted(stages) != list(everything):
    raise ValueError(
      f'out_indices={out_indices!r} selects stage outputs, which only a backbone returns: '
      'pass num_classes=0.'
    )
  return tuple(sorted(stages))
