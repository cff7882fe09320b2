"""Shared test utilities: random non-trivial variables and error measures."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util


def random_variables(model, input_shape, seed=0):
  """Variables of ``model`` with random kernels and non-trivial BatchNorm state.

  Freshly initialised BatchNorm (scale 1, bias 0, mean 0, var 1) hides fusion
  errors, so every scale, bias, running mean and running variance is random.
  Kernels are drawn with variance 1/fan_in to keep activations in range
  through the deep networks, uniformly (several times faster to draw than
  normal values; B3 has 123 M). Built with numpy from `jax.eval_shape`: no
  compiled init, so even B3 is cheap.
  """
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(input_shape)))
  flat = traverse_util.flatten_dict(jax.tree.map(lambda s: s, dict(shapes)))
  out = {}
  for path, leaf in flat.items():
    shape, name = leaf.shape, path[-1]
    f32 = np.float32
    if name == 'kernel':
      fan_in = int(np.prod(shape[:-1]))
      value = rng.random(shape, f32)  # In place from here: no temporary copies.
      value -= f32(0.5)
      value *= f32(2 * np.sqrt(3.0 / fan_in))  # Uniform on +-sqrt(3 / fan_in).
    elif name == 'scale':
      value = rng.uniform(0.4, 1.2, shape).astype(f32)
    elif name in ('bias', 'mean'):
      value = rng.standard_normal(shape, f32) * f32(0.2)
    elif name == 'var':
      value = rng.uniform(0.5, 2.0, shape).astype(f32)
    else:
      raise AssertionError(f'unexpected leaf {path}')
    out[path] = jnp.asarray(value, jnp.float32)
  return traverse_util.unflatten_dict(out)


def bn_formula(y, params, stats):
  """Inference-mode BatchNorm written out: ``(y - mean) / sqrt(var + eps) * scale + bias``."""
  return (y - stats['mean']) / np.sqrt(stats['var'] + 1e-5) * params['scale'] + params['bias']


def lax_conv(x, kernel, pad, *, strides=1, groups=1):
  """NHWC x HWIO convolution with symmetric padding ``pad``, in true float32."""
  return jax.lax.conv_general_dilated(
    x,
    kernel,
    (strides, strides),
    ((pad, pad), (pad, pad)),
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    feature_group_count=groups,
    precision='highest',
  )


def relative_error(actual, expected):
  """``||actual - expected|| / ||expected||`` in float64."""
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def flat_leaves(tree) -> np.ndarray:
  """Every leaf of ``tree``, raveled and concatenated in leaf order."""
  return np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(tree)])


def calibrated_variables(model, images, seed=0):
  """Random variables whose BatchNorm statistics fit ``images``, then perturbed.

  Purely random statistics let a deep network's output collapse to a constant
  set by the biases, which would make an equivalence test blind to most
  errors. Here one train-mode pass measures each BatchNorm's batch statistics
  (Flax stores ``0.9 * old + 0.1 * batch``; from mean 0 and var 1 the batch
  values follow), then every mean is shifted and every variance scaled at
  random, so the statistics are realistic yet no BatchNorm is exact.
  """
  rng = np.random.default_rng(seed + 1)
  variables = random_variables(model, images.shape, seed)
  start = {
    path: jnp.zeros_like(v) if path[-1] == 'mean' else jnp.ones_like(v)
    for path, v in traverse_util.flatten_dict(variables['batch_stats']).items()
  }
  variables = {**variables, 'batch_stats': traverse_util.unflatten_dict(start)}
  _, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))(
    variables, images
  )
  flat = traverse_util.flatten_dict(updates['batch_stats'])
  stats = {}
  for path, value in flat.items():
    value = np.asarray(value, np.float64)
    if path[-1] == 'mean':
      batch_mean = value / 0.1
      batch_var = (np.asarray(flat[path[:-1] + ('var',)], np.float64) - 0.9) / 0.1
      shift = rng.normal(0, 0.3, value.shape) * np.sqrt(np.maximum(batch_var, 1e-6))
      stats[path] = batch_mean + shift
    else:
      stats[path] = np.maximum((value - 0.9) / 0.1, 1e-4) * rng.uniform(0.5, 2.0, value.shape)
  stats = {path: jnp.asarray(v, jnp.float32) for path, v in stats.items()}
  return {**variables, 'batch_stats': traverse_util.unflatten_dict(stats)}


def tiny_config(data_dir=None, **overrides):
  """The digits config shrunk to seconds: 5 one-block stages of 16-128 channels."""
  from configs import digits

  config = digits.get_config()
  config.model.num_blocks = (1, 1, 1, 1)
  config.model.width_multipliers = (0.25, 0.25)
  config.model.conv_impl = 'xla'  # Compiles fastest; the steps are tiny.
  config.dataset.data_dir = data_dir
  config.batch_size = 16
  config.eval_batch_size = 40
  config.num_train_steps = 6
  config.log_every_steps = 2
  config.checkpoint_every_steps = 2
  config.eval_every_epochs = 0.0  # At the end only.
  config.steps_per_call = 1  # One step per call; test_train checks several.
  config.progress_bar = False
  return apply_overrides(config, overrides)


def apply_overrides(config, overrides: dict):
  """Sets ``{'dataset.name': value, ...}`` (dotted paths) in ``config``; returns it."""
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split('.')
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config


def restore_checkpoint(directory, step=None):
  """``(state, metadata)`` of the checkpoint in ``directory`` (default: the latest step)."""
  from repvgg_jax import checkpointing

  ckpt = checkpointing.Checkpoints(directory, read_only=True)
  try:
    return ckpt.restore(step=step)
  finally:
    ckpt.close()


def checkpoint_params(workdir, step=None):
  """The params of a run's checkpoint (default: latest), as numpy arrays."""
  state, meta = restore_checkpoint(f'{workdir}/checkpoints', step)
  return jax.tree.map(np.asarray, state['params']), meta


def intercepted_train_batches(change):
  """`data.train_batches`, each batch passed through ``change(step, batch)``.

  Steps count from 1, as the trainer's do. Install it in place of
  ``data.train_batches`` (which the trainer looks up at each run).
  """
  from repvgg_jax.data import datasets as data

  batches = data.train_batches

  def intercepted(*args, start_step=0, **kwargs):
    for step, batch in enumerate(batches(*args, start_step=start_step, **kwargs), start_step + 1):
      yield change(step, batch)

  return intercepted


def run_in_repo(*args: str, timeout: int = 300, unset: tuple[str, ...] = ()):
  """``python ARGS`` in the repository root on the CPU, its output captured (the
  root on the module path, as after ``pip install -e .``), without the environment
  variables ``unset``."""
  import os
  import pathlib
  import subprocess
  import sys

  root = pathlib.Path(__file__).resolve().parents[1]
  path = [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]
  return subprocess.run(
    [sys.executable, *args],
    cwd=root,
    env={
      **{key: value for key, value in os.environ.items() if key not in unset},
      'JAX_PLATFORMS': 'cpu',
      'PYTHONPATH': os.pathsep.join([str(root), *path]),
    },
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def write_digits_folder(root, *, limit=None, seed=0):
  """The embedded digits as PNG files in ``root/train/<digit>/`` and ``root/val/<digit>/``
  (the tfds test split), as a user's folder would hold them: 32 to 48 px on each side,
  a third greyscale and a sixth RGBA. ``limit`` keeps that many images per split."""
  import pathlib

  import tensorflow as tf

  from repvgg_jax.data import digits

  images, labels = digits.digits_images_and_labels()
  rng = np.random.default_rng(seed)
  for split, indices in digits.split_indices(len(labels)).items():
    for index in indices[:limit]:
      height, width = rng.integers(32, 49, size=2)
      image = tf.image.resize(images[index], (height, width), antialias=True)
      image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
      kind = rng.integers(6)
      if kind < 2:
        image = image[..., :1]  # Greyscale.
      elif kind == 2:
        image = tf.concat([image, tf.fill((height, width, 1), tf.constant(255, tf.uint8))], -1)
      folder = pathlib.Path(root) / ('val' if split == 'test' else 'train') / str(labels[index])
      write_image(folder / f'{index:04d}.png', image.numpy())
  return pathlib.Path(root)


CLASSES = ('cat', 'dog', 'fox')  # Of make_folder's images.


def write_image(path, pixels: np.ndarray):
  """``pixels`` (H, W, C uint8) as a PNG, or a JPEG for a .jpg name."""
  import tensorflow as tf

  path.parent.mkdir(parents=True, exist_ok=True)
  encode = tf.io.encode_jpeg if path.suffix == '.jpg' else tf.io.encode_png
  path.write_bytes(encode(tf.constant(pixels)).numpy())
  return path


def make_folder(root, per_class=(7, 3), classes=CLASSES, seed=0, splits=('train', 'val')):
  """Random images, 20-40 px, PNG (RGB, grey or RGBA) and JPEG, under ``root/<split>/<class>/``
  (or ``root/<class>/`` for ``splits=('',)``)."""
  import pathlib

  rng = np.random.default_rng(seed)
  for split, count in zip(splits, per_class, strict=False):
    for cls in classes:
      for i in range(count):
        height, width = rng.integers(20, 41, size=2)
        channels = (3, 1, 4, 3)[i % 4]
        pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
        suffix = '.jpg' if i % 4 == 3 else '.png'
        write_image(pathlib.Path(root, split, cls, f'{i:02d}{suffix}'), pixels)
  return pathlib.Path(root)
