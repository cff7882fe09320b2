"""Training batches of a small dataset held in host memory, augmented with NumPy.

For a dataset stored at the model's input size and augmented only by pad-and-crop and
flips (the digits, CIFAR), rebuilding a tf.data pipeline every epoch and augmenting image
by image cost more host time than the training step of a small model on a small CPU
(docs/performance.md, "Where the goals stand"). Here the split is decoded once and
each batch is a few vectorized NumPy operations. As on the tf.data path,
a batch is a pure function of ``(seed, step)``, so a resumed run sees the same pixels; the
two paths draw different shuffles and crops.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from repvgg_jax.data import MEAN_RGB, STDDEV_RGB, batching

AUGMENTATIONS = ('pad_crop', 'none')
_MEAN = np.array(MEAN_RGB, np.float32)
_STDDEV = np.array(STDDEV_RGB, np.float32)


def check_supported(builder: tfds.core.DatasetBuilder, config) -> None:
  """Raises ValueError, with the fix, when ``config`` cannot train from memory."""
  if config.train_augment not in AUGMENTATIONS:
    raise ValueError(
      f'dataset.in_memory supports train_augment {AUGMENTATIONS}, not '
      f'{config.train_augment!r}: set --config.dataset.in_memory=False to augment with tf.data.'
    )
  if config.get('randaugment_layers', 0):
    raise ValueError(
      'dataset.in_memory augments with NumPy, without RandAugment: set '
      '--config.dataset.in_memory=False, or randaugment_layers=0.'
    )
  stored = tuple(builder.info.features['image'].shape)
  wanted = (config.image_size, config.image_size, 3)
  if stored != wanted:
    raise ValueError(
      f'dataset.in_memory needs images stored at the input size {wanted}, but '
      f'{builder.name} stores {stored}: set --config.dataset.in_memory=False to resize them '
      'with tf.data.'
    )


def load_split(dataset: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
  """Every image (uint8, ``(N, S, S, 3)``) and label (int32) of a split's ``dataset``."""
  # Chunks, not batch_size=-1: that needs a known size, which tfds's mock datasets lack.
  chunks = list(tfds.as_numpy(dataset.batch(4096)))
  images = np.concatenate([chunk['image'] for chunk in chunks]).astype(np.uint8, copy=False)
  return images, np.concatenate([chunk['label'] for chunk in chunks]).astype(np.int32)


def normalize(images: np.ndarray) -> np.ndarray:
  """uint8 RGB to float32 normalized per channel, as ``input_pipeline.normalize_image``."""
  out = images.astype(np.float32)
  out /= np.float32(255.0)  # In place: the same float32 operations, without temporaries.
  # Along whole image rows, not broadcast over the last axis of 3: that took several
  # times as long (docs/performance.md, "Where the goals stand").
  rows = out.reshape(-1, out.shape[-2] * out.shape[-1])
  width = out.shape[-2]
  rows -= np.tile(_MEAN, width)
  rows /= np.tile(_STDDEV, width)
  return out


def pad_and_crop(images: np.ndarray, offsets: np.ndarray, pad_pixels: int) -> np.ndarray:
  """Each image zero-padded by ``pad_pixels`` and cropped back at its own ``(top, left)``.

  Args:
    images: ``(B, H, W, C)``.
    offsets: ``(B, 2)`` integers in ``[0, 2 * pad_pixels]``; ``(p, p)`` is the image itself.
    pad_pixels: padding on each side.

  Returns:
    ``(B, H, W, C)`` crops of the padded images.
  """
  _, height, width, _ = images.shape
  padding = ((0, 0), (pad_pixels, pad_pixels), (pad_pixels, pad_pixels), (0, 0))
  padded = np.pad(images, padding)
  # One slice per image, not one gather with (B, H, W) index arrays, which took several
  # times as long (docs/performance.md, "Where the goals stand").
  return np.stack(
    [padded[i, top : top + height, left : left + width] for i, (top, left) in enumerate(offsets)]
  )


def augment(images: np.ndarray, rng: np.random.Generator, config) -> np.ndarray:
  """``config``'s crop and flip, one draw per image, then normalization to float32."""
  count = len(images)
  if config.train_augment == 'pad_crop':
    offsets = rng.integers(0, 2 * config.pad_pixels + 1, size=(count, 2))
    images = pad_and_crop(images, offsets, config.pad_pixels)
  if config.flip:
    flips = rng.random(count) < 0.5
    images = images.copy()
    images[flips] = images[flips][:, :, ::-1]
  return normalize(images)


def train_batches(
  images: np.ndarray,
  labels: np.ndarray,
  config,
  *,
  seed: int,
  start_step: int,
  steps_per_epoch: int,
  local_batch: int,
  process_index: int,
) -> Iterator[dict[str, np.ndarray]]:
  """This process's batches from ``start_step`` on, forever.

  Epoch ``e`` reads the first ``steps_per_epoch * local_batch`` examples of a permutation
  drawn from ``(seed, e, process_index)``; batch ``b`` of it draws its crops and flips from
  ``(seed, e, process_index, b)``.
  """
  for epoch, first_batch in batching.epochs_from(start_step, steps_per_epoch):
    order = np.random.default_rng([seed, epoch, process_index]).permutation(len(labels))
    for index in range(first_batch, steps_per_epoch):
      chosen = order[index * local_batch : (index + 1) * local_batch]
      rng = np.random.default_rng([seed, epoch, process_index, index])
      yield {'image': augment(images[chosen], rng, config), 'label': labels[chosen]}
