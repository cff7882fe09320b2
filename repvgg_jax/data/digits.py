"""A tiny offline image dataset: scikit-learn's handwritten digits as a tfds builder.

It lets training and its tests run end to end without a network or a large download:
importing this module registers ``sklearn_digits`` with tfds, and ``download_and_prepare``
builds it from the 1,797 8x8 images that scikit-learn ships.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

IMAGE_SIZE = 32
NUM_CLASSES = 10
NUM_TEST_EXAMPLES = 360  # 20% of 1,797, rounded up.
# scikit-learn's digits count ink in 4x4 blocks: pixel values run from 0 to 16.
MAX_PIXEL_VALUE = 16.0


def digits_images_and_labels() -> tuple[np.ndarray, np.ndarray]:
  """All digits as ``(1797, 32, 32, 3)`` uint8 RGB images and int64 labels.

  The 8x8 images are upsampled bilinearly so that they pass through the same convolution
  stack as CIFAR; the grey level is replicated because the models expect RGB.
  """
  from sklearn.datasets import load_digits  # Imported late: only preparation needs it.

  digits = load_digits()
  images = digits.images.astype(np.float32)[..., None] * (255.0 / MAX_PIXEL_VALUE)
  images = tf.image.resize(images, (IMAGE_SIZE, IMAGE_SIZE), method='bilinear').numpy()
  images = np.clip(np.round(images), 0, 255).astype(np.uint8)
  return np.repeat(images, 3, axis=-1), digits.target.astype(np.int64)


def split_indices(num_examples: int) -> dict[str, np.ndarray]:
  """The fixed train/test partition: a seed-0 permutation, its first 360 indices for test.

  A uniform permutation keeps every class at roughly its overall share in both splits.
  """
  permutation = np.random.default_rng(0).permutation(num_examples)
  return {
    'train': np.sort(permutation[NUM_TEST_EXAMPLES:]),
    'test': np.sort(permutation[:NUM_TEST_EXAMPLES]),
  }


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's handwritten digits at 32x32x3, split 1,437 train / 360 test."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      description='UCI optical handwritten digits (via scikit-learn), upsampled to 32x32 RGB.',
      features=tfds.features.FeaturesDict(
        {
          'image': tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
          'label': tfds.features.ClassLabel(num_classes=NUM_CLASSES),
        }
      ),
      supervised_keys=('image', 'label'),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Nothing to download: scikit-learn bundles the data.
    images, labels = digits_images_and_labels()
    return {
      split: self._generate_examples(images, labels, indices)
      for split, indices in split_indices(len(labels)).items()
    }

  def _generate_examples(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray):
    for index in indices:
      yield int(index), {'image': images[index], 'label': int(labels[index])}
