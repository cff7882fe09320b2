"""Image preprocessing with tf.data, as the reference's torchvision transforms.

Evaluation: resize the shorter side to ``image_size * 256 / 224`` (bilinear,
antialiased, like PIL), crop the centre ``image_size`` square, scale to [0, 1]
and normalize with the ImageNet mean and standard deviation. Small datasets
(CIFAR, digits) are instead resized straight to the square (a no-op at 32x32).

Training: a random crop (ImageNet's random-resized "inception" crop, or CIFAR's
pad-and-crop), an optional horizontal flip, then the same normalization. All
randomness is stateless and keyed by a per-example seed, so a batch is a pure
function of its seeds and a resumed run sees the same pixels.
"""

from __future__ import annotations

import math

import tensorflow as tf

from repvgg_jax.data import MEAN_RGB, STDDEV_RGB, randaugment

# ImageNet evaluation crops 224 out of 256: the resize is image_size / 0.875.
CROP_FRACTION = 224 / 256
EVAL_PREPROCESSING = ('resize_crop', 'resize')
TRAIN_AUGMENTATIONS = ('inception_crop', 'pad_crop', 'none')
# torchvision's RandomResizedCrop defaults: crop area as a fraction of the image; width / height.
INCEPTION_AREA_RANGE = (0.08, 1.0)
INCEPTION_ASPECT_RATIO_RANGE = (3 / 4, 4 / 3)
# How the inception crop draws its window: as torchvision does, or with TF's
# bounding-box sampler (smaller windows; runs made before commit aaba54e used it).
CROP_SAMPLERS = ('torchvision', 'tf')


def normalize_image(image: tf.Tensor) -> tf.Tensor:
  """uint8 (or [0, 255] float) RGB to float32, normalized per channel."""
  image = tf.cast(image, tf.float32) / 255.0
  return (image - tf.constant(MEAN_RGB)) / tf.constant(STDDEV_RGB)


def resize_shorter_side(image: tf.Tensor, size: int) -> tf.Tensor:
  """Resizes so that the shorter side is ``size``, keeping the aspect ratio; the longer
  side is ``int(size * long / short)``, as torchvision's ``Resize(size)``."""
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  short = tf.minimum(height, width)
  new_height = tf.where(height == short, size, size * height // short)
  new_width = tf.where(height == short, size * width // short, size)
  return tf.image.resize(image, (new_height, new_width), method='bilinear', antialias=True)


def center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  """The central ``size`` x ``size`` square, its offsets ``round(margin / 2)`` (ties to
  even) as torchvision's ``CenterCrop``."""
  shape = tf.shape(image)
  halve = lambda margin: margin // 2 + margin % 2 * (margin // 2 % 2)  # Python's round.
  top, left = halve(shape[0] - size), halve(shape[1] - size)
  return image[top : top + size, left : left + size]


def resize_square(image: tf.Tensor, size: int) -> tf.Tensor:
  """Resizes to ``size`` x ``size`` as float32, ignoring the aspect ratio.

  Antialiased bilinear like PIL; at the image's own size it returns the pixels unchanged.
  """
  image = tf.cast(image, tf.float32)
  return tf.image.resize(image, (size, size), method='bilinear', antialias=True)


def preprocess_for_eval(
  image: tf.Tensor, image_size: int = 224, method: str = 'resize_crop'
) -> tf.Tensor:
  """Resize (shorter side to image_size / 0.875), centre crop, normalize.

  The centre crop keeps ImageNet's object-centred framing at the model's input size; stored
  at that size already, small datasets take ``method='resize'``, which leaves them whole.

  Args:
    image: an ``(H, W, 3)`` uint8 RGB image of any size.
    image_size: side of the square output.
    method: ``'resize_crop'`` for ImageNet's resize then centre crop; ``'resize'`` to resize
      the whole image to the square, for datasets stored at the model's input size.

  Returns:
    An ``(image_size, image_size, 3)`` float32 image.
  """
  if method == 'resize_crop':
    resize_size = int(image_size / CROP_FRACTION)  # As the reference's int(256 / 224 * size).
    image = resize_shorter_side(tf.cast(image, tf.float32), resize_size)
    image = center_crop(image, image_size)
  elif method == 'resize':
    image = resize_square(image, image_size)
  else:
    raise ValueError(f'Unknown eval preprocessing {method!r}; known: {EVAL_PREPROCESSING}.')
  image = tf.ensure_shape(image, (image_size, image_size, 3))
  return normalize_image(image)


def inception_window(
  shape: tf.Tensor, seed: tf.Tensor, sampler: str = 'torchvision'
) -> tuple[tf.Tensor, tf.Tensor]:
  """``(begin, size)`` for `tf.slice` of a random window of an image (``shape``: its
  ``(H, W, C)``; ``seed``: shape ``(2,)``), drawn as torchvision's
  ``RandomResizedCrop.get_params`` draws it.

  Up to 10 attempts, each an area of 8% to 100% of the image (uniform) and a
  width/height ratio of 3/4 to 4/3 (log-uniform), rounded to whole pixels; the
  first that fits is placed uniformly at random. Where none fits (very elongated
  images), the centre of the image, cut to the nearest ratio in the range.

  With ``sampler='tf'``, TF's ``stateless_sample_distorted_bounding_box`` draws
  it in the same ranges (its windows are smaller: a mean of 36% of a 375x500
  image against torchvision's 43%), with the whole image as the fallback.
  """
  if sampler == 'tf':
    return _tf_window(shape, seed)
  if sampler != 'torchvision':
    raise ValueError(f'Unknown crop_sampler {sampler!r}; known: {CROP_SAMPLERS}.')
  height, width = shape[0], shape[1]
  area_seed, ratio_seed, top_seed, left_seed = tf.unstack(
    tf.random.experimental.stateless_split(seed, num=4)
  )
  attempts, (low, high) = 10, INCEPTION_ASPECT_RATIO_RANGE
  area = tf.cast(height * width, tf.float32) * tf.random.stateless_uniform(
    [attempts], area_seed, *INCEPTION_AREA_RANGE
  )
  log_ratio = tf.random.stateless_uniform([attempts], ratio_seed, math.log(low), math.log(high))
  ratio = tf.exp(log_ratio)
  widths = tf.cast(tf.round(tf.sqrt(area * ratio)), tf.int32)
  heights = tf.cast(tf.round(tf.sqrt(area / ratio)), tf.int32)
  fits = (widths > 0) & (widths <= width) & (heights > 0) & (heights <= height)
  # The first attempt that fits (tf.argmax does not promise the first of ties).
  first = tf.reduce_min(tf.where(fits, tf.range(attempts), attempts - 1))
  # The fallback: the whole image, or its centre at the nearest ratio in the range.
  image_ratio = tf.cast(width, tf.float32) / tf.cast(height, tf.float32)
  rounded = lambda x: tf.cast(tf.round(x), tf.int32)
  whole_h = tf.where(image_ratio < low, rounded(tf.cast(width, tf.float32) / low), height)
  whole_w = tf.where(image_ratio > high, rounded(tf.cast(height, tf.float32) * high), width)
  found = tf.reduce_any(fits)
  crop_h = tf.where(found, heights[first], whole_h)
  crop_w = tf.where(found, widths[first], whole_w)
  random_top = tf.random.stateless_uniform([], top_seed, 0, height - crop_h + 1, tf.int32)
  random_left = tf.random.stateless_uniform([], left_seed, 0, width - crop_w + 1, tf.int32)
  top = tf.where(found, random_top, (height - crop_h) // 2)
  left = tf.where(found, random_left, (width - crop_w) // 2)
  return tf.stack([top, left, 0]), tf.stack([crop_h, crop_w, -1])


def _tf_window(shape: tf.Tensor, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """`inception_window` drawn by TF's bounding-box sampler."""
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
    shape,
    bounding_boxes=tf.zeros((1, 0, 4)),
    seed=seed,
    min_object_covered=0.0,  # The area range alone bounds the window.
    aspect_ratio_range=INCEPTION_ASPECT_RATIO_RANGE,
    area_range=INCEPTION_AREA_RANGE,
    max_attempts=10,
    use_image_if_no_bounding_boxes=True,
  )
  return begin, size


def inception_crop(
  image: tf.Tensor, seed: tf.Tensor, image_size: int, sampler: str = 'torchvision'
) -> tf.Tensor:
  """A random `inception_window` of ``image``, resized to the square.

  Args:
    image: an ``(H, W, 3)`` image.
    seed: shape ``(2,)`` integer seed of the stateless sampler.
    image_size: side of the square output.
    sampler: how the window is drawn, one of `CROP_SAMPLERS`.

  Returns:
    An ``(image_size, image_size, 3)`` float32 image with values in [0, 255].
  """
  begin, size = inception_window(tf.shape(image), seed, sampler)
  return resize_square(tf.slice(image, begin, size), image_size)


def pad_and_random_crop(image: tf.Tensor, seed: tf.Tensor, pad_pixels: int) -> tf.Tensor:
  """Zero-pads each side by ``pad_pixels`` and crops a random window of the original size.

  Zeros, not reflection, as torchvision's ``RandomCrop(32, padding=4)`` in the CIFAR recipes.
  """
  padding = [[pad_pixels, pad_pixels], [pad_pixels, pad_pixels], [0, 0]]
  return tf.image.stateless_random_crop(tf.pad(image, padding), tf.shape(image), seed=seed)


def preprocess_for_train(image: tf.Tensor, seed: tf.Tensor, config) -> tf.Tensor:
  """Random crop and flip as ``config`` asks, RandAugment if it asks, then normalize.

  Args:
    image: an ``(H, W, 3)`` uint8 RGB image.
    seed: shape ``(2,)`` integer seed; the output is a pure function of it and ``image``.
    config: the dataset config; reads ``train_augment``, ``image_size``, ``crop_sampler``
      (for ``'inception_crop'``), ``pad_pixels`` (for ``'pad_crop'``), ``flip`` and
      ``randaugment_layers`` and ``randaugment_magnitude`` (`repvgg_jax.data.randaugment`;
      0 layers: none).

  Returns:
    An ``(image_size, image_size, 3)`` float32 image.
  """
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
  size = config.image_size
  if config.train_augment == 'inception_crop':
    image = inception_crop(image, crop_seed, size, config.crop_sampler)
  elif config.train_augment == 'pad_crop':
    image = pad_and_random_crop(resize_square(image, size), crop_seed, config.pad_pixels)
  elif config.train_augment == 'none':
    image = resize_square(image, size)
  else:
    raise ValueError(
      f'Unknown train_augment {config.train_augment!r}; known: {TRAIN_AUGMENTATIONS}.'
    )
  if config.flip:
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  layers = config.get('randaugment_layers', 0)
  if layers:  # Its own stream: the crops and flips stay those of a run without it.
    augment_seed = tf.random.experimental.stateless_fold_in(seed, 2)
    image = randaugment.rand_augment(image, augment_seed, layers, config.randaugment_magnitude)
  image = tf.ensure_shape(image, (size, size, 3))
  return normalize_image(image)
