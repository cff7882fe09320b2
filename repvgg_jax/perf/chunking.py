"""Chunked inference: the blocks with large maps run on a few images at a time.

In inference the images of a batch are independent, so the leading blocks,
those with large maps, can run on chunks of the batch in a loop (`nn.scan`)
and give the same outputs. On a CPU a chunk's activations then stay in cache
from block to block (docs/performance.md, "Chunked inference"); the whole
model in chunks, or each convolution alone, gained nothing there.
`chunked(model)` is the model with this inference, same variables, same outputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax

from repvgg_jax.model import RepVGG
from repvgg_jax.model.variants import Block

# On CPUs, inference runs the leading blocks whose output maps have at least
# CHUNK_MIN_PIXELS pixels (A0 and B0 at 224x224: stages 0-2, down to 28x28) on
# CHUNK_IMAGES images at a time.
CHUNK_MIN_PIXELS = 28 * 28
CHUNK_IMAGES = 4


def check_chunk_images(chunk_images: int | str) -> int | str:
  """``chunk_images`` itself: 'auto' or an int >= 0; anything else raises ValueError."""
  if chunk_images == 'auto' or (
    isinstance(chunk_images, int) and not isinstance(chunk_images, bool) and chunk_images >= 0
  ):
    return chunk_images
  raise ValueError(
    "chunk_images must be 'auto' or an int >= 0 (0: the whole batch at once), "
    f'got {chunk_images!r}.'
  )


def images_per_chunk(chunk_images: int | str, backend: str | None = None) -> int:
  """``chunk_images`` resolved: 'auto' is `CHUNK_IMAGES` on CPUs and 0 (none) elsewhere."""
  if check_chunk_images(chunk_images) != 'auto':
    return chunk_images
  return CHUNK_IMAGES if (backend or jax.default_backend()) == 'cpu' else 0


def chunking(
  images: int, blocks: Sequence[Block], shape: Sequence[Any], train: bool
) -> tuple[int, int]:
  """How many leading blocks run on chunks of the batch, and the images per chunk.

  Args:
    images: the most images per chunk; 0 for none.
    blocks: the variant's ``blocks()``.
    shape: the input's (batch, height, width, channels).
    train: training mode, where BatchNorm's batch statistics need the whole
      batch: never chunked.

  Returns:
    (blocks, images): (0, 0) when nothing is chunked. The chunk is the largest
    divisor of the batch up to ``images``; a batch of symbolic size (an
    export) or of at most one chunk is not chunked.
  """
  batch, height, width = shape[:3]
  if train or not images or not isinstance(batch, int):
    return 0, 0
  images = max(d for d in range(1, min(batch, images) + 1) if batch % d == 0)
  if images == batch:
    return 0, 0
  count = 0
  for block in blocks:
    height, width = -(-height // block.stride), -(-width // block.stride)
    if height * width < CHUNK_MIN_PIXELS:
      break
    count += 1
  return (count, images) if count else (0, 0)


class ChunkedRepVGG(RepVGG):
  """`RepVGG` whose inference runs the large-map blocks on chunks of images (`chunking`).

  Attributes:
    chunk_images: the most images per chunk (0: none).
  """

  chunk_images: int = CHUNK_IMAGES

  @nn.compact
  def __call__(self, images, train: bool = False):
    self._check_images(images)
    x = images.astype(self.dtype)
    blocks = self.blocks()
    count, size = (0, 0) if self._records() else self.chunking(x.shape, train)
    stage_outputs = []
    if count:
      scan = nn.scan(
        lambda module, carry, chunk: (carry, module.run_blocks(chunk, blocks[:count], train)),
        variable_broadcast=True,
        split_rngs={'params': False},
      )
      _, (x, outputs) = scan(self, None, x.reshape(-1, size, *x.shape[1:]))
      x, *stage_outputs = (y.reshape(-1, *y.shape[2:]) for y in (x, *outputs))
    x, outputs = self.run_blocks(x, blocks[count:], train)
    return self.head(x, [*stage_outputs, *outputs])

  def chunking(self, shape: Sequence[Any], train: bool) -> tuple[int, int]:
    """`chunking` of this model on inputs of ``shape``."""
    return chunking(self.chunk_images, self.blocks(), shape, train)

  def _records(self) -> bool:
    """Whether this call creates or records variables, which run unchunked.

    Inside the chunk loop every collection is read-only: initialisation,
    ``capture_intermediates``, ``sow`` and ``perturb`` go through the whole batch.
    """
    return self.is_initializing() or any(
      self.is_mutable_collection(name) for name in ('intermediates', 'perturbations')
    )


def chunked(model: RepVGG, chunk_images: int | str = 'auto', backend: str | None = None):
  """``model`` with chunked inference (`ChunkedRepVGG`), or ``model`` where there is none.

  Args:
    model: a `RepVGG` (its variables serve the chunked one unchanged).
    chunk_images: images per chunk; 0 for none; 'auto' for `CHUNK_IMAGES` on
      CPUs and none elsewhere.
    backend: default, JAX's.
  """
  images = images_per_chunk(chunk_images, backend)
  fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(RepVGG) if f.init}
  for internal in ('parent', 'name'):
    fields.pop(internal, None)
  return ChunkedRepVGG(**fields, chunk_images=images) if images else model
