"""RandAugment as the official RepVGG trainer's ``raug15`` preset, in TensorFlow.

Each training image, after the random crop and flip, goes through ``layers``
operations (2), each drawn uniformly from the 16 below and always applied, at a
level drawn uniformly from ``0 ... magnitude - 1`` (15 in ``raug15``; levels
above 10, the operations' nominal maximum, are allowed there and here). The
levels map to arguments as in the reference (``train/randaug.py`` of
github.com/DingXiaoH/RepVGG, after timm's ``auto_augment.py``):

| operation | argument at level L |
|---|---|
| AutoContrast, Equalize, Invert | none |
| Rotate | +-30 L / 10 degrees (sign random) |
| Posterize | keep int(4 L / 10) most significant bits |
| Solarize | invert pixels >= int(256 L / 10) |
| SolarizeAdd | add int(110 L / 10) to pixels < 128 |
| Color, Contrast, Brightness, Sharpness | blend factor 1.8 L / 10 + 0.1 |
| ShearX, ShearY | +-0.3 L / 10 (sign random) |
| TranslateXRel, TranslateYRel | +-0.45 L / 10 of the side (sign random) |
| Cutout | a square of side max(2, 40 L / 10) pixels, ImageNet's mean colour |

Geometric operations fill with grey (128) and interpolate bilinearly (the
reference picks bilinear or bicubic at random). All randomness is stateless and
comes from the example's seed, so an augmented batch is a function of (seed,
step) as without it.
"""

from __future__ import annotations

import math

import tensorflow as tf

OPERATIONS = (
  'AutoContrast',
  'Equalize',
  'Invert',
  'Rotate',
  'Posterize',
  'Solarize',
  'SolarizeAdd',
  'Color',
  'Contrast',
  'Brightness',
  'Sharpness',
  'ShearX',
  'ShearY',
  'TranslateXRel',
  'TranslateYRel',
  'Cutout',
)
MAX_LEVEL = 10.0
FILL = 128.0
CUTOUT_FILL = (125.0, 122.0, 113.0)  # ImageNet's mean colour in [0, 255].


def _grey(image: tf.Tensor) -> tf.Tensor:
  """ITU-R 601-2 luma of a float RGB image, ``(H, W, 1)``, rounded to integers as
  PIL's ``convert('L')``."""
  luma = tf.reduce_sum(image * tf.constant([0.299, 0.587, 0.114]), axis=-1, keepdims=True)
  return tf.floor(luma + 0.5)


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """PIL's ``ImageEnhance``: ``degenerate + factor * (image - degenerate)``, clipped
  and truncated to integers as PIL's ``Image.blend``."""
  return tf.floor(tf.clip_by_value(degenerate + factor * (image - degenerate), 0.0, 255.0))


def _affine(image: tf.Tensor, matrix) -> tf.Tensor:
  """``image`` sampled at ``matrix`` (a, b, c, d, e, f) applied to each output pixel's
  ``(x, y)``: the input point ``(a x + b y + c, d x + e y + f)``, as PIL's AFFINE.

  PIL's coordinates put pixel ``i``'s centre at ``i + 0.5``; TensorFlow's, which
  sample at pixel indices, at ``i``. The matrix is moved from the one to the other.
  """
  a, b, c, d, e, f = (tf.cast(value, tf.float32) for value in matrix)
  c, f = c + 0.5 * (a + b - 1.0), f + 0.5 * (d + e - 1.0)
  transform = tf.stack([a, b, c, d, e, f, 0.0, 0.0])[None]
  shape = tf.shape(image)[:2]
  out = tf.raw_ops.ImageProjectiveTransformV3(
    images=image[None],
    transforms=transform,
    output_shape=shape,
    fill_value=FILL,
    interpolation='BILINEAR',
    fill_mode='CONSTANT',
  )
  return out[0]


def auto_contrast(image: tf.Tensor) -> tf.Tensor:
  """Each channel stretched from its own minimum and maximum to 0 and 255."""
  low = tf.reduce_min(image, axis=(0, 1), keepdims=True)
  high = tf.reduce_max(image, axis=(0, 1), keepdims=True)
  scale = tf.where(high > low, 255.0 / tf.maximum(high - low, 1e-6), 1.0)
  # Truncated, as PIL's lookup table; a hair added against float32 falling short of an integer.
  return tf.where(high > low, tf.floor((image - low) * scale + 1e-4), image)


def _equalize_channel(channel: tf.Tensor) -> tf.Tensor:
  """PIL's histogram equalization of one uint8-valued channel ``(H, W)``."""
  values = tf.cast(channel, tf.int32)
  histogram = tf.math.bincount(tf.reshape(values, [-1]), minlength=256, maxlength=256)
  last = tf.gather(histogram, tf.reduce_max(tf.where(histogram > 0)))
  step = (tf.reduce_sum(histogram) - last) // 255
  lut = (tf.cumsum(histogram, exclusive=True) + step // 2) // tf.maximum(step, 1)
  lut = tf.clip_by_value(lut, 0, 255)
  equalized = tf.cast(tf.gather(lut, values), tf.float32)
  return tf.where(step > 0, equalized, channel)


def equalize(image: tf.Tensor) -> tf.Tensor:
  return tf.stack([_equalize_channel(image[..., c]) for c in range(3)], axis=-1)


def rotate(image: tf.Tensor, degrees: tf.Tensor) -> tf.Tensor:
  """Counter-clockwise by ``degrees`` about the centre, as PIL's ``rotate`` (PIL's
  coordinates: the centre is at half the width and height)."""
  angle = -degrees * math.pi / 180.0
  cos, sin = tf.cos(angle), tf.sin(angle)
  height, width = tf.unstack(tf.cast(tf.shape(image)[:2], tf.float32))
  cx, cy = width / 2.0, height / 2.0
  # The output pixel's offset from the centre, rotated, plus the centre.
  return _affine(image, [cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy])


def posterize(image: tf.Tensor, bits: tf.Tensor) -> tf.Tensor:
  shift = tf.cast(8 - bits, tf.int32)
  values = tf.bitwise.left_shift(tf.bitwise.right_shift(tf.cast(image, tf.int32), shift), shift)
  return tf.where(bits >= 8, image, tf.cast(values, tf.float32))


def solarize(image: tf.Tensor, threshold: tf.Tensor) -> tf.Tensor:
  return tf.where(image < threshold, image, 255.0 - image)


def solarize_add(image: tf.Tensor, addition: tf.Tensor) -> tf.Tensor:
  return tf.where(image < 128.0, tf.minimum(image + addition, 255.0), image)


def color(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  return _blend(tf.broadcast_to(_grey(image), tf.shape(image)), image, factor)


def contrast(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  mean = tf.floor(tf.reduce_mean(_grey(image)) + 0.5)  # An integer grey, as PIL's.
  return _blend(tf.fill(tf.shape(image), mean), image, factor)


def brightness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  return _blend(tf.zeros_like(image), image, factor)


def sharpness(image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """Blends with PIL's SMOOTH filter (13 on the centre's weight 5), borders kept."""
  kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], 'VALID')[0]
  smooth = tf.round(smooth)
  inner = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  rows, cols = tf.range(height)[:, None], tf.range(width)[None, :]
  interior = (rows > 0) & (rows < height - 1) & (cols > 0) & (cols < width - 1)
  degenerate = tf.where(interior[..., None], inner, image)
  return _blend(degenerate, image, factor)


def cutout(image: tf.Tensor, size: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """A ``size`` square (clipped at the borders) at a random centre, in ImageNet's mean."""
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  centre = tf.random.stateless_uniform([2], seed, maxval=2**31 - 1, dtype=tf.int32)
  cy, cx = centre[0] % height, centre[1] % width
  half = tf.cast(size, tf.int32) // 2
  rows, cols = tf.range(height)[:, None], tf.range(width)[None, :]
  box = (rows >= cy - half) & (rows < cy + half) & (cols >= cx - half) & (cols < cx + half)
  return tf.where(box[..., None], tf.constant(CUTOUT_FILL), image)


def _operation(image, index, level, sign, seed):
  """Operation ``index`` of `OPERATIONS` at ``level`` (``sign`` +-1 for the signed ones)."""
  ratio = level / MAX_LEVEL
  enhance = ratio * 1.8 + 0.1
  height, width = tf.unstack(tf.cast(tf.shape(image)[:2], tf.float32))
  branches = [
    lambda: auto_contrast(image),
    lambda: equalize(image),
    lambda: 255.0 - image,
    lambda: rotate(image, sign * ratio * 30.0),
    lambda: posterize(image, tf.floor(ratio * 4.0)),
    lambda: solarize(image, tf.floor(ratio * 256.0)),
    lambda: solarize_add(image, tf.floor(ratio * 110.0)),
    lambda: color(image, enhance),
    lambda: contrast(image, enhance),
    lambda: brightness(image, enhance),
    lambda: sharpness(image, enhance),
    lambda: _affine(image, [1.0, sign * ratio * 0.3, 0.0, 0.0, 1.0, 0.0]),
    lambda: _affine(image, [1.0, 0.0, 0.0, sign * ratio * 0.3, 1.0, 0.0]),
    lambda: _affine(image, [1.0, 0.0, sign * ratio * 0.45 * width, 0.0, 1.0, 0.0]),
    lambda: _affine(image, [1.0, 0.0, 0.0, 0.0, 1.0, sign * ratio * 0.45 * height]),
    lambda: cutout(image, tf.maximum(2.0, ratio * 40.0), seed),
  ]
  return tf.switch_case(index, branches)


def rand_augment(image: tf.Tensor, seed: tf.Tensor, layers: int, magnitude: int) -> tf.Tensor:
  """``layers`` random operations on a float ``(H, W, 3)`` image in [0, 255].

  Args:
    image: pixels in [0, 255] (they are rounded to integers first, as PIL's are).
    seed: shape ``(2,)`` integer seed; the result is a pure function of it.
    layers: operations per image.
    magnitude: levels are drawn from ``0 ... magnitude - 1``.

  Returns:
    The augmented float32 image, same shape, values in [0, 255].
  """
  image = tf.clip_by_value(tf.round(tf.cast(image, tf.float32)), 0.0, 255.0)
  for layer_seed in tf.unstack(tf.random.experimental.stateless_split(seed, num=layers)):
    choice_seed, level_seed, sign_seed, op_seed = tf.unstack(
      tf.random.experimental.stateless_split(layer_seed, num=4)
    )
    index = tf.random.stateless_uniform([], choice_seed, maxval=len(OPERATIONS), dtype=tf.int32)
    level = tf.cast(
      tf.random.stateless_uniform([], level_seed, maxval=magnitude, dtype=tf.int32), tf.float32
    )
    sign = tf.where(tf.random.stateless_uniform([], sign_seed) > 0.5, -1.0, 1.0)
    image = tf.round(_operation(image, index, level, sign, op_seed))
    image = tf.ensure_shape(image, (None, None, 3))
  return image
