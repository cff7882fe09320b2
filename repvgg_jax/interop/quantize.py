"""int8 post-training quantization of a fused (deploy) RepVGG with Qwix.

Every convolution and the classifier get int8 weights with one scale per
output channel and int8 activations: with ``mode='static'`` one scale per
layer input, calibrated on training batches (Qwix averages each batch's
per-image absolute maximum); with ``mode='dynamic'`` one computed per image as
it runs. Qwix intercepts `jax.lax.conv_general_dilated` and `dot_general`, so
the deploy model is quantized as it is, with `nn.Conv`:

  qmodel, qvariables = quantize(deploy_model, deploy_variables, batches)
  logits = qmodel.apply(qvariables, images)

Only a fused model is quantized: the training-time model's BatchNorms are what
makes RepVGG lose accuracy in int8 (QARepVGG, Chu et al., AAAI 2024, trains
with the block that avoids it), and its branches would each be quantized apart.

`save_int8` writes the int8 weights and scales (``int8.msgpack``) beside a
``quantize.json`` that says how to rebuild the model; `load_int8` reads them
back without the float weights. A checkpoint quantized and evaluated on its
dataset: `repvgg_jax.interop.quantize_checkpoint`.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import qwix

from repvgg_jax.interop import export
from repvgg_jax.model import create_model, trees, variants

MODES = ('static', 'dynamic')
WEIGHTS_FILE = 'int8.msgpack'
META_FILE = 'quantize.json'


class QuantizationError(ValueError):
  """The model, variables or calibration data cannot be quantized as asked."""


def rules(mode: str) -> list[qwix.QtRule]:
  """Qwix's rules for ``mode``: every layer, int8 weights and activations."""
  if mode not in MODES:
    raise QuantizationError(f'Unknown quantization mode {mode!r}: use one of {", ".join(MODES)}.')
  static = {'act_static_scale': True, 'act_calibration_method': 'absmax'}
  return [
    qwix.QtRule(
      module_path='.*',
      weight_qtype=jnp.int8,
      act_qtype=jnp.int8,
      **(static if mode == 'static' else {}),
    )
  ]


def int8_model(deploy_model: nn.Module, mode: str = 'static') -> nn.Module:
  """The deploy model with int8 convolutions and classifier (Qwix's PTQ provider)."""
  return qwix.quantize_model(deploy_model, qwix.PtqProvider(rules(mode)))


def check_fused(variables: Mapping[str, Any]) -> None:
  """Raises QuantizationError unless ``variables`` are a fused model's."""
  params = variables.get('params', {}) if isinstance(variables, Mapping) else {}
  training, fused = trees.find_blocks(params)
  if training or 'batch_stats' in variables:
    raise QuantizationError(
      'These are training-time variables (multi-branch blocks with BatchNorm): fuse them first '
      'with repvgg_jax.fuse_params (or `python -m repvgg_jax.convert fuse`), then quantize.'
    )
  if not fused:
    raise QuantizationError(f'No fused RepVGG block in the variables: {sorted(params)}.')


def _check_batch(images, in_channels: int, image_size: int | None, index: int) -> None:
  shape = tuple(np.shape(images))
  if len(shape) != 4 or shape[-1] != in_channels:
    raise QuantizationError(
      f'Calibration batch {index} has shape {shape}; the model takes NHWC images with '
      f'{in_channels} channels.'
    )
  if image_size is not None and shape[1:3] != (image_size, image_size):
    raise QuantizationError(
      f'Calibration batch {index} has {shape[1]}x{shape[2]} images; the model was trained '
      f'at {image_size}x{image_size}: calibrate on images prepared as for training.'
    )


def calibrate(
  deploy_model: nn.Module,
  variables,
  batches: Iterable,
  mode: str = 'static',
  *,
  image_size: int | None = None,
):
  """Qwix's activation statistics (``quant_stats``) of the deploy model over ``batches``.

  Returns None for ``mode='dynamic'``, which needs none. Each batch is NHWC
  float images preprocessed as for training; ``image_size`` (the training
  size), when given, is required of every batch.
  """
  check_fused(variables)
  static_rules = rules(mode)  # An unknown mode fails here.
  if mode == 'dynamic':
    return None
  qat = qwix.quantize_model(deploy_model, qwix.QtProvider(static_rules))

  # Op by op: traced by jit without a gradient, Qwix's calibrating convolution
  # (a custom VJP) leaks a tracer (qwix 0.1.8). A few batches, so it costs little.
  def update(stats, images):
    _, updated = qat.apply(
      {'params': variables['params'], 'quant_stats': stats}, images, mutable=['quant_stats']
    )
    return updated['quant_stats']

  stats, count = None, 0
  for count, images in enumerate(batches, 1):
    _check_batch(images, deploy_model.in_channels, image_size, count)
    images = jnp.asarray(images, jnp.float32)
    if stats is None:
      stats = qat.init(jax.random.key(0), images[:1])['quant_stats']
    stats = update(stats, images)
  if stats is None:
    raise QuantizationError('No calibration batch: static ranges need at least one.')
  return stats


def quantize(
  deploy_model: nn.Module,
  variables,
  batches: Iterable = (),
  mode: str = 'static',
  *,
  image_size: int | None = None,
  ranges=None,
):
  """int8 weights (per output channel) and activation scales of a fused model.

  Args:
    deploy_model: the deploy RepVGG (``deploy=True``, `nn.Conv`).
    variables: its fused variables, ``{'params': ...}`` (`fuse_params`'s output).
    batches: calibration images, NHWC float batches preprocessed as for
      training (static mode; unused for dynamic).
    mode: ``'static'`` (calibrated activation ranges) or ``'dynamic'``.
    image_size: the training image size, checked against every batch.
    ranges: static activation ranges to use instead of calibrating: the
      ``quant_stats`` that quantization-aware training learned
      (`repvgg_jax.train.qat`; its checkpoints' ``batch_stats``).

  Returns:
    ``(int8 model, int8 variables)``; run as ``model.apply(variables, images)``.

  Raises:
    QuantizationError: training-time variables, an unknown mode, calibration
      batches of another shape or channel count, or none in static mode.
  """
  if ranges is None or mode != 'static':
    stats = calibrate(deploy_model, variables, batches, mode, image_size=image_size)
  else:
    check_fused(variables)
    stats = ranges
  qmodel = int8_model(deploy_model, mode)
  abstract = _abstract_params(qmodel, deploy_model.in_channels, image_size or 32)
  stats = {} if stats is None else stats  # Dynamic ranges: no statistics.
  return qmodel, {'params': qwix.quantize_params(variables['params'], abstract, stats)}


def _abstract_params(qmodel: nn.Module, in_channels: int, image_size: int):
  images = jax.ShapeDtypeStruct((1, image_size, image_size, in_channels), jnp.float32)
  return jax.eval_shape(qmodel.init, jax.random.key(0), images)['params']


def save_int8(output_dir, qvariables, meta: Mapping[str, Any]) -> pathlib.Path:
  """Writes ``int8.msgpack`` and ``quantize.json`` (``meta``, which holds at
  least what `load_int8` needs: ``model``, ``num_classes``, ``in_channels``,
  ``mode``) into ``output_dir``, new or empty, all at once: both are written and
  synced in a temporary sibling that is then renamed onto it
  (`export.staged_directory`).

  Raises:
    QuantizationError: ``output_dir`` could not be written (the reason in one line).
  """
  output = pathlib.Path(output_dir).absolute()
  for key in ('model', 'num_classes', 'in_channels', 'mode'):
    if key not in meta:
      raise ValueError(f'quantize.json needs {key!r}.')
  files = {
    WEIGHTS_FILE: flax.serialization.to_bytes(qvariables['params']),
    META_FILE: (json.dumps(dict(meta), indent=2) + '\n').encode(),
  }
  try:
    with export.staged_directory(output) as staging:
      for name, data in files.items():
        with open(staging / name, 'wb') as f:
          f.write(data)
          f.flush()
          os.fsync(f.fileno())
  except OSError as error:
    raise QuantizationError(f'Could not write the int8 model to {output}: {error}') from None
  return output


def load_int8(path):
  """``(int8 model, int8 variables, quantize.json)`` from a directory `save_int8` wrote."""
  path = pathlib.Path(path)
  meta_path = path / META_FILE
  if not meta_path.is_file() or not (path / WEIGHTS_FILE).is_file():
    raise FileNotFoundError(f'No int8 model in {path}: it needs {META_FILE} and {WEIGHTS_FILE}.')
  meta = json.loads(meta_path.read_text())
  variant = meta.get('variant')  # A scaled variant (num_blocks, widths) is rebuilt from it.
  if variant is not None:
    variant = variants.Variant(
      **{k: tuple(v) if isinstance(v, list) else v for k, v in variant.items()}
    )
  deploy_model = create_model(
    variant or meta['model'],
    num_classes=meta['num_classes'],
    in_channels=meta['in_channels'],
    deploy=True,
  )
  qmodel = int8_model(deploy_model, meta['mode'])
  abstract = _abstract_params(qmodel, meta['in_channels'], meta.get('image_size') or 32)
  params = flax.serialization.from_bytes(abstract, (path / WEIGHTS_FILE).read_bytes())
  return qmodel, {'params': params}, meta
