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
from repvgg_jax import conv as conv_lib
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
  train: bool, dtype: Any = jnp.float32, precision: Any = None, conv_impl: str = 'auto'
):
  """The conv and BatchNorm partials every block is built from.

  Parameters and BatchNorm statistics are float32 whatever the compute dtype;
  BatchNorm is the reference's (PyTorch's eps 1e-5, momentum 0.1). The conv is
  XLA's, im2col, Winograd or dense (`repvgg_jax.conv`), with one parameter layout.
  """
  conv = functools.partial(
    conv_lib.Conv,
    conv_impl=conv_impl,
    train=train,
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
    conv_impl: 'xla', 'im2col', 'winograd', 'dense' or 'auto' (per layer, by
      backend, stride and map size);
      see `repvgg_jax.conv`. Parameters are the same whichever computes.
    chunk_images: in inference, run the blocks with large maps on this many
      images at a time (0: the whole batch; 'auto': 4 on CPUs, 0 elsewhere);
      the outputs are the same (`chunking`).
  """

  variant: variants.Variant
  num_classes: int = 1000
  branches: tuple[tuple[str, ...], ...] = (branches_lib.PAPER_BRANCHES,) * NUM_STAGES
  deploy: bool = False
  dtype: Any = jnp.float32
  precision: Any = None
  in_channels: int = 3
  conv_impl: str = 'auto'
  chunk_images: int | str = 'auto'

  @nn.compact
  def __call__(self, images: Array, train: bool = False):
    self._check_images(images)
    conv, norm = layer_partials(train, self.dtype, self.precision, self.conv_impl)
    specs = list(self.variant.blocks())
    last = {stage: depth - 1 for stage, depth in enumerate(self.variant.stage_depths)}

    def run(module, carry, x, blocks):
      """``blocks`` on ``x``; their stage outputs. The body of the chunk loop too."""
      del module  # Under `nn.scan`, the blocks built here are its (lifted) children.
      stage_outputs = []
      for stage, index, _, features, strides, groups in blocks:
        name = block_name(stage, index)
        if self.deploy:
          block = DeployBlock(features, strides, groups, conv, name=name)
        else:
          block = RepVGGBlock(
            features, strides, groups, self.branches[stage], conv, norm, name=name
          )
        x = block(x)
        if index == last[stage]:
          stage_outputs.append(x)
      return carry, (x, stage_outputs)

    x = images.astype(self.dtype)
    chunked, images_per_chunk = (
      (0, 0) if self._records() else chunking(self.chunk_images, specs, x.shape, train)
    )
    stage_outputs = []
    if chunked:
      scan = nn.scan(
        functools.partial(run, blocks=specs[:chunked]),
        variable_broadcast=True,
        split_rngs={'params': False},
      )
      _, (x, outputs) = scan(self, None, x.reshape(-1, images_per_chunk, *x.shape[1:]))
      x, *stage_outputs = (y.reshape(-1, *y.shape[2:]) for y in (x, *outputs))
    _, (x, outputs) = run(self, None, x, specs[chunked:])
    stage_outputs += outputs
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

  def _records(self) -> bool:
    """Whether this call creates or records variables, which run unchunked.

    Inside the chunk loop every collection is read-only: initialisation,
    ``capture_intermediates``, ``sow`` and ``perturb`` go through the whole batch.
    """
    return self.is_initializing() or any(
      self.is_mutable_collection(name) for name in ('intermediates', 'perturbations')
    )

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


# On CPUs, inference runs the leading blocks whose output maps have at least
# this many pixels (A0 and B0 at 224x224: stages 0-2, down to 28x28) on this
# many images at a time, so each chunk's activations stay in cache from block
# to block (`chunking`).
CHUNK_MIN_PIXELS = 28 * 28
CHUNK_IMAGES = 4


def check_chunk_images(chunk_images: int | str) -> int | str:
  if chunk_images == 'auto' or (
    isinstance(chunk_images, int) and not isinstance(chunk_images, bool) and chunk_images >= 0
  ):
    return chunk_images
  raise ValueError(
    "chunk_images must be 'auto' or an int >= 0 (0: the whole batch at once), "
    f'got {chunk_images!r}.'
  )


def chunking(
  chunk_images: int | str,
  blocks: Sequence[tuple],
  shape: Sequence[Any],
  train: bool,
  backend: str | None = None,
) -> tuple[int, int]:
  """How many leading blocks run on chunks of the batch, and the images per chunk.

  In inference the images are independent, so the leading blocks, those with
  large maps, can run on a few images at a time in a loop (`nn.scan`) and give
  the same outputs (bit for bit where measured; the tests allow rounding). On
  a CPU this keeps a chunk's activations in cache between blocks: A0's fused
  model at batch 32, 224x224 ran 1.2-1.3x faster with chunks of 4 images
  through its 28x28 and larger maps, B0's 1.15x, the training-time models
  1.07-1.08x (1.02-1.18x with chunks of 2) (2-core AVX-512 VM, jax 0.10.2,
  medians side by side). Chunking each convolution alone gained nothing, nor
  did carrying the chunks on into the 14x14 stage.

  Args:
    chunk_images: images per chunk; 0 for none; 'auto' for `CHUNK_IMAGES` on
      CPUs and none elsewhere.
    blocks: the variant's ``blocks()``.
    shape: the input's (batch, height, width, channels).
    train: training mode, where BatchNorm's batch statistics need the whole
      batch: never chunked.
    backend: default, JAX's.

  Returns:
    (blocks, images): (0, 0) when nothing is chunked. The chunk is the largest
    divisor of the batch up to ``chunk_images``; a batch of symbolic size (an
    export) or of at most one chunk is not chunked. (`RepVGG` also runs
    unchunked when it initialises or records variables.)
  """
  if chunk_images == 'auto':
    chunk_images = CHUNK_IMAGES if (backend or jax.default_backend()) == 'cpu' else 0
  batch, height, width = shape[:3]
  if train or not chunk_images or not isinstance(batch, int):
    return 0, 0
  images = max(d for d in range(1, min(batch, chunk_images) + 1) if batch % d == 0)
  if images == batch:
    return 0, 0
  count = 0
  for *_, strides, _ in blocks:
    height, width = -(-height // strides), -(-width // strides)
    if height * width < CHUNK_MIN_PIXELS:
      break
    count += 1
  return (count, images) if count else (0, 0)


def chunking_of(model: RepVGG, shape: Sequence[Any], train: bool) -> tuple[int, int]:
  """`chunking` for ``model`` on inputs of ``shape``."""
  return chunking(model.chunk_images, list(model.variant.blocks()), shape, train)


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
  conv_impl: str = 'auto',
  chunk_images: int | str = 'auto',
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
    conv_impl: 'auto' (chosen per layer by backend and feature-map size, see
      `repvgg_jax.conv.choose_conv_impl`), 'xla', 'im2col', 'winograd'
      (stride-1 3x3 convolutions; the others as 'auto') or 'dense' (input
      maps with fewer pixels than kernel taps; the others as 'auto'); numerically
      equivalent, with the same parameters.
    chunk_images: images per chunk for the large-map blocks in inference
      (`chunking`): 'auto' (4 on CPUs, none elsewhere), or an int, 0 for none.

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
    conv_impl=conv_lib.check_conv_impl(conv_impl),
    chunk_images=check_chunk_images(chunk_images),
  )
