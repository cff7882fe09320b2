"""A checkpoint in, an int8 directory out, with the accuracy on both sides: the
fused model of a training workdir or deploy checkpoint quantized (`quantize`),
evaluated in float32 and int8 on its config's eval split, and saved with
`save_int8` (``python -m repvgg_jax.convert quantize``)."""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from repvgg_jax import run_files
from repvgg_jax.interop import checkpoint_io
from repvgg_jax.interop.quantize import QuantizationError, quantize, rules, save_int8
from repvgg_jax.model import model_from_config


def training_config(source: pathlib.Path, config_file=None):
  """``(config, workdir)`` of a checkpoint: ``config_file`` (a config .py) or else the
  ``config.json`` of the training workdir that ``source`` is or lies in (up to two
  levels up), and that workdir (None outside one)."""
  if not source.exists():
    raise QuantizationError(f'No checkpoint at {source}.')
  run = run_files.training_run(source)
  workdir = None if run is None else run[0]
  if config_file is not None:
    return _load_config(pathlib.Path(config_file)), workdir
  if run is not None:
    return ml_collections.ConfigDict(run[1]), workdir
  raise QuantizationError(
    f'{source} lies in no training workdir (no config.json): give the training config that '
    'names its dataset with --config, e.g. --config configs/digits.py.'
  )


def _load_config(path: pathlib.Path):
  """``get_config()`` of the config file at ``path``; a broken one fails in one line."""
  spec = importlib.util.spec_from_file_location('quantize_config', path)
  if spec is None or not path.is_file():
    raise QuantizationError(f'No config file {path}.')
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    return module.get_config()
  except Exception as error:  # Whatever the file does wrong, said in one line.
    raise QuantizationError(
      f'The config file {path} does not load: {type(error).__name__}: {error}.'
    ) from None


def evaluate(config, forward: Mapping[str, Any]) -> dict[str, Any]:
  """Top-1 of each of ``forward``'s functions over the eval split, and the relative
  logit error of ``'int8'`` to ``'fp32'``: ``||int8 - fp32|| / ||fp32||`` over all logits."""
  from repvgg_jax.data import datasets  # TensorFlow: loaded where data is read.

  correct = dict.fromkeys(forward, 0)
  squared = {'difference': 0.0, 'fp32': 0.0}
  count = 0
  for batch in datasets.eval_batches(config.dataset, global_batch_size=config.eval_batch_size):
    mask, labels = np.asarray(batch['mask']), np.asarray(batch['label'])
    logits = {name: np.asarray(f(batch['image']), np.float64)[mask] for name, f in forward.items()}
    for name, values in logits.items():
      correct[name] += int((values.argmax(-1) == labels[mask]).sum())
    squared['difference'] += float(((logits['int8'] - logits['fp32']) ** 2).sum())
    squared['fp32'] += float((logits['fp32'] ** 2).sum())
    count += int(mask.sum())
  return {
    **{f'{name}_top1': correct[name] / count for name in forward},
    'logit_relative_error': float(np.sqrt(squared['difference'] / squared['fp32'])),
    'eval_examples': count,
  }


def quantize_and_evaluate(
  config, variables, mode: str = 'static', *, calibration_batches: int = 8, ranges=None
) -> tuple[dict, dict[str, Any]]:
  """Quantizes the fused ``variables`` of ``config``'s model and evaluates it in fp32
  and int8 over the eval split.

  Args:
    config: the training config (model, dataset, batch size, seed).
    variables: the fused variables, ``{'params': ...}``.
    mode: ``'static'`` or ``'dynamic'`` activation ranges.
    calibration_batches: static ranges are calibrated on the first this many
      training batches of ``config.seed``, prepared as training prepares them.
    ranges: static ranges to use instead (those quantization-aware training learned).

  Returns:
    ``(int8 variables, results)``: results as `evaluate`'s (``fp32_top1``,
    ``int8_top1``, ``logit_relative_error``, ``eval_examples``).
  """
  deploy_model = model_from_config(config, deploy=True, dtype='float32')
  calibration = ()
  if ranges is None and mode == 'static':
    from repvgg_jax.data import datasets  # TensorFlow: loaded where data is read.

    batches = datasets.train_batches(
      config.dataset, global_batch_size=config.batch_size, seed=config.seed
    )
    calibration = (next(batches)['image'] for _ in range(calibration_batches))
  qmodel, qvariables = quantize(
    deploy_model,
    variables,
    calibration,
    mode,
    image_size=config.dataset.image_size,
    ranges=ranges,
  )
  fp32, int8 = jax.jit(deploy_model.apply), jax.jit(qmodel.apply)
  results = evaluate(
    config,
    {'fp32': lambda x: fp32(variables, x), 'int8': lambda x: int8(qvariables, x)},
  )
  return qvariables, results


def _check_architecture(deploy_model, variables, saved, config, source) -> None:
  """The checkpoint must hold the deploy form of its config's model."""
  if not deploy_model.matches(variables['params']):
    found = checkpoint_io.variant_held(variables['params'], saved) or 'another architecture'
    raise QuantizationError(
      f'{source} holds {found}, not the {config.model.name} ({config.dataset.num_classes} '
      'classes) of its config: give the config it was trained with (--config).'
    )


def learned_ranges(workdir, step):
  """The activation ranges that the quantization-aware run in ``workdir`` (its
  config.json says ``qat.enabled``) learned by ``step``: the ``batch_stats`` of its
  training checkpoint of that step. None for other runs, or where that step is gone."""
  run_config = None if workdir is None else run_files.read_config(workdir)
  if step is None or not (run_config or {}).get('qat', {}).get('enabled'):
    return None
  try:
    state, _ = checkpoint_io.restore(workdir / 'checkpoints' / str(step))
  except (FileNotFoundError, ValueError):
    return None
  return state.get('batch_stats')


def _how(mode: str, calibrated: int, learned: bool, step) -> dict:
  """quantize.json's account of how the model was quantized."""
  if mode == 'dynamic':
    ranges = 'dynamic, per image'
  elif learned:
    ranges = f'static, learned by quantization-aware training (step {step})'
  else:
    ranges = f'static, calibrated on {calibrated} training batches'
  return {
    'mode': mode,
    'calibration_batches': calibrated,
    'weights': 'int8, one scale per output channel',
    'activations': f'int8; ranges {ranges}',
  }


def quantize_checkpoint(
  source,
  output_dir,
  *,
  calibration_batches: int = 8,
  mode: str = 'static',
  config_file=None,
  recalibrate: bool = False,
) -> dict:
  """Quantizes a workdir's (or a deploy checkpoint's) fused model to int8 and
  evaluates both on the eval split of its config's dataset.

  Static ranges are calibrated on ``calibration_batches`` training batches;
  those of a quantization-aware run are the ones it learned, unless
  ``recalibrate``. Writes ``int8.msgpack`` and ``quantize.json`` (``model``,
  ``fp32_top1``, ``int8_top1``, ``calibration_batches``,
  ``logit_relative_error`` ...) to ``output_dir``, which must be new or empty;
  returns quantize.json's content. A training checkpoint is fused first.
  """
  rules(mode)  # An unknown mode fails before anything is read.
  if mode == 'static' and calibration_batches < 1:
    raise QuantizationError('--calibration-batches must be at least 1 for static ranges.')
  checkpoint_io.check_output_dir(output_dir)
  source = pathlib.Path(source)
  config, workdir = training_config(source, config_file)
  variables, _, saved = checkpoint_io.fused_variables(source)
  deploy_model = model_from_config(config, deploy=True, dtype='float32')
  _check_architecture(deploy_model, variables, saved, config, source)
  image_size = config.dataset.image_size
  ranges = None if recalibrate else learned_ranges(workdir, saved.get('step'))
  qvariables, results = quantize_and_evaluate(
    config, variables, mode, calibration_batches=calibration_batches, ranges=ranges
  )
  calibrated = calibration_batches if mode == 'static' and ranges is None else 0
  meta = {
    'model': config.model.name,
    'variant': {**dataclasses.asdict(deploy_model.variant), 'name': deploy_model.variant.name},
    'num_classes': deploy_model.num_classes,
    'in_channels': deploy_model.in_channels,
    'image_size': image_size,
    # What predict feeds an export of it, and how it names the outputs.
    'eval_preprocess': config.dataset.eval_preprocess,
    'classes': saved.get('classes') or (workdir and run_files.read_classes(workdir)) or None,
    **_how(mode, calibrated, ranges is not None, saved.get('step')),
    'calibration_batch_size': config.batch_size,
    **results,
    'top1_drop': results['fp32_top1'] - results['int8_top1'],
    'dataset': config.dataset.name,
    'eval_split': config.dataset.eval_split,
    'source': str(source),
    'step': saved.get('step'),
  }
  save_int8(output_dir, qvariables, meta)
  return meta
