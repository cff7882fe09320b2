"""Image preprocessing with tf.data, as the reference's torchvision transforms.

Evaluation: resize the shorter side to ``image_size * 256 / 224`` (bilinear,
antialiased, like PIL), crop the centre ``image_size`` square, scale to [0, 1]
and normalize with the ImageNet mean and standard deviation.
"""

from __future__ import annotations

import tensorflow as tf

MEAN_RGB = (0.485, 0.456, 0.406)
STDDEV_RGB = (0.229, 0.224, 0.225)
# ImageNet evaluation crops 224 out of 256: the resize is image_size / 0.875.
CROP_FRACTION = 224 / 256


def normalize_image(image: tf.Tensor) -> tf.Tensor:
  """uint8 (or [0, 255] float) RGB to float32, normalized per channel."""
  image = tf.cast(image, tf.float32) / 255.0
  return (image - tf.constant(MEAN_RGB)) / tf.constant(STDDEV_RGB)


def resize_shorter_side(image: tf.Tensor, size: int) -> tf.Tensor:
  """Resizes so that the shorter side is ``size``, keeping the aspect ratio."""
  shape = tf.shape(image)
  height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  scale = tf.cast(size, tf.float32) / tf.minimum(height, width)
  new_height = tf.cast(tf.round(height * scale), tf.int32)
  new_width = tf.cast(tf.round(width * scale), tf.int32)
  return tf.image.resize(image, (new_height, new_width), method='bilinear', antialias=True)


def center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  """The central ``size`` x ``size`` square."""
  shape = tf.shape(image)
  top = (shape[0] - size) // 2
  left = (shape[1] - size) // 2
  return image[top : top + size, left : left + size]


def preprocess_for_eval(image: tf.Tensor, image_size: int = 224) -> tf.Tensor:
  """Resize (shorter side to image_size / 0.875), centre crop, normalize.

  Args:
    image: an ``(H, W, 3)`` uint8 RGB image of any size.
    image_size: side of the square output.

  Returns:
    An ``(image_size, image_size, 3)`` float32 image.
  """
  resize_size = int(round(image_size / CROP_FRACTION))
  image = resize_shorter_side(tf.cast(image, tf.float32), resize_size)
  image = center_crop(image, image_size)
  image = tf.ensure_shape(image, (image_size, image_size, 3))
  return normalize_image(image)
