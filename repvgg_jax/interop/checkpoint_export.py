"""``python -m repvgg_jax.convert export``: a checkpoint (deploy, training or int8) to the
artifacts of `repvgg_jax.interop.export`, each reloaded and checked against the model."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable

import jax
import numpy as np

from repvgg_jax import run_files
from repvgg_jax.data import MEAN_RGB, STDDEV_RGB
from repvgg_jax.interop import checkpoint_io, checkpoint_models, export, onnx_export, quantize
from repvgg_jax.interop.torch_layout import ConversionError
from repvgg_jax.model import get_variant


def export_checkpoint(
  path,
  output_dir,
  model: str | None = None,
  image_size: int | None = None,
  formats=None,
  platforms=None,
  conv_impl: str = 'xla',
  verify: bool = True,
) -> dict:
  """Exports a deploy checkpoint (a training one is fused first) or an int8 directory
  (`quantize.save_int8`'s; jax.export only); returns export.json's content.

  ``formats``: from `export.FORMATS`; by default all of them (jax for int8).
  """
  checkpoint_io.check_output_dir(output_dir)
  if (pathlib.Path(path) / quantize.META_FILE).is_file():
    return _export_int8(pathlib.Path(path), output_dir, image_size, formats, platforms, verify)
  formats = formats or export.FORMATS
  deploy_model, variables, training_model, training, saved = _export_models(
    pathlib.Path(path), model, conv_impl
  )
  image_size = image_size if image_size is not None else saved.get('image_size') or 224
  meta = {
    'model': deploy_model.variant.name,
    'num_classes': deploy_model.num_classes,
    'source': str(path),
    'fused_from_training_checkpoint': training is not None,
  }
  meta.update(_preprocess(deploy_model.in_channels))
  meta.update(_feeding(saved))

  def compare(staging: pathlib.Path, runnable) -> dict:
    differences = _verify_export(staging, deploy_model, variables, image_size, runnable)
    if training is not None:  # And the deploy model against the checkpoint's training-time one.
      images = checkpoint_models.random_images(
        image_size, batch=3, channels=deploy_model.in_channels
      )
      differences['fused_vs_training'] = checkpoint_models.max_relative_difference(
        checkpoint_models.outputs(deploy_model, variables, images),
        checkpoint_models.outputs(training_model, training, images),
      )
    return differences

  check = _verification(formats, platforms, compare) if verify else None
  output = export.write_export(
    output_dir, deploy_model, variables, image_size, meta, formats, platforms, check
  )
  return json.loads((output / export.META_FILE).read_text())


def _export_models(path: pathlib.Path, model: str | None, conv_impl: str):
  """``(deploy model, its variables, training-time model, its variables, saved
  metadata)`` of the checkpoint to export; the training-time pair is None for a
  deploy checkpoint. The models are those of the training run's config.json where
  the checkpoint lies in a run and ``model`` is not given (a scaled variant
  included), else ``model``, the one the checkpoint names or the one it has the
  shapes of. What the checkpoint does not record (one written before it recorded its
  image size), its run, if any, supplies."""
  run = run_files.training_run(path)
  if run is None or model is not None:
    *models, saved = _named_models(path, model, conv_impl)
    if run is not None and not _describes(run[1], models[0]):
      run = None  # A run around the checkpoint, but not the one that trained it.
  else:
    *models, saved = _run_models(path, run, conv_impl)
  return *models, {**saved, **run_files.feeding(saved, run)}


def _describes(config: dict, deploy_model) -> bool:
  """Whether a run's ``config`` trains the variant and classes of ``deploy_model``."""
  try:
    name = get_variant(config['model']['name']).name
  except (KeyError, TypeError, ValueError):
    return False
  classes = config['dataset'].get('num_classes')
  return name == deploy_model.variant.name and classes == deploy_model.num_classes


def _named_models(path: pathlib.Path, model: str | None, conv_impl: str):
  """`_export_models` of a variant of the paper: ``model`` or the checkpoint's."""
  name, variables, training, saved = checkpoint_io.deploy_variables(path, model)
  training_params = None if training is None else training['params']
  training_model, deploy_model = checkpoint_models.tree_models(
    name, variables['params'], training_params, conv_impl
  )
  return deploy_model, variables, training_model, training, saved


def _run_models(path: pathlib.Path, run: tuple[pathlib.Path, dict], conv_impl: str):
  """`_export_models` as the training ``run``'s config.json builds them."""
  variables, training, saved = checkpoint_io.fused_variables(path)
  training_model, deploy_model = checkpoint_models.config_models(run[1], conv_impl)
  training_model = None if training is None else training_model
  described = f'{run[0]}/{run_files.CONFIG_FILE}'
  name = run[1]['model']['name']
  if saved.get('model', name) != name:
    raise ConversionError(
      f'{path} holds a {saved["model"]}, but {described} describes a {name}: '
      'give the variant with --model.'
    )
  if not deploy_model.matches(variables['params']) or not (
    training is None or training_model.matches(training['params'])
  ):
    raise ConversionError(
      f'{path} does not hold the {deploy_model.variant.name} that {described} describes: '
      'give the variant with --model.'
    )
  return deploy_model, variables, training_model, training, saved


def _feeding(saved: dict) -> dict:
  """What predict needs to feed the model and name its outputs, where the run recorded it."""
  return {key: saved[key] for key in ('eval_preprocess', 'classes') if saved.get(key)}


def _preprocess(in_channels: int) -> dict:
  """export.json's ``preprocess``: what training fed an RGB model, (pixels / 255 - mean) / std."""
  if in_channels != 3:
    return {}
  return {'preprocess': {'scale': '1/255', 'mean': list(MEAN_RGB), 'std': list(STDDEV_RGB)}}


def _export_int8(path: pathlib.Path, output_dir, image_size, formats, platforms, verify) -> dict:
  """Exports an int8 directory as a `jax.export` artifact (Qwix's int8 ops kept as they are)."""
  formats = tuple(formats or ('jax',))
  if formats != ('jax',):
    raise ConversionError(
      f'An int8 model exports with --formats jax only, not {",".join(formats)}: export the '
      'float deploy checkpoint for TF or ONNX.'
    )
  qmodel, qvariables, qmeta = quantize.load_int8(path)
  image_size = image_size if image_size is not None else qmeta.get('image_size') or 224
  meta = {
    'model': qmeta['model'],
    'num_classes': qmeta['num_classes'],
    'source': str(path),
    'int8': {key: qmeta[key] for key in ('mode', 'fp32_top1', 'int8_top1') if key in qmeta},
    **_preprocess(qmeta['in_channels']),
  }
  meta.update(_feeding(qmeta))

  def compare(staging: pathlib.Path, runnable) -> dict:
    images = checkpoint_models.random_images(image_size, batch=3, channels=qmeta['in_channels'])
    return {  # Against the model as `quantize` evaluates it: jitted.
      fmt: checkpoint_models.max_relative_difference(
        _run_artifact(export.load_jax_export, staging, fmt, images),
        checkpoint_models.flat(jax.jit(qmodel.apply)(qvariables, images)),
      )
      for fmt in runnable  # jax alone.
    }

  check = _verification(formats, platforms, compare) if verify else None
  # Unfolded: the artifact computes exactly what `quantize` evaluated.
  output = export.write_export(
    output_dir,
    qmodel,
    qvariables,
    image_size,
    meta,
    formats,
    platforms,
    check,
    fold_variables=False,
  )
  return json.loads((output / export.META_FILE).read_text())


def _runnable_here(formats, platforms) -> tuple[tuple[str, ...], dict[str, str]]:
  """The formats whose artifacts this machine can run, and why each other is not verified
  here: ONNX always; jax.export where it was lowered for this backend; the SavedModel,
  which TensorFlow runs on its CPU here (`export.load_saved_model`), where lowered for cpu."""
  backend = jax.default_backend()
  lowered = tuple(platforms) if platforms else (jax.export.default_export_platform(),)
  runs = {'onnx': True, 'jax': export.runs_here(lowered), 'tf': 'cpu' in lowered}
  why = f'lowered for {",".join(lowered)}; this machine runs it on {{}}: load it where it runs'
  skipped = {f: why.format('cpu' if f == 'tf' else backend) for f in formats if not runs[f]}
  return tuple(f for f in formats if runs[f]), skipped


def _verification(formats, platforms, compare) -> Callable[[pathlib.Path], dict]:
  """The check `export.write_export` runs on its staging directory: the differences
  that ``compare(staging, formats)`` measures for the formats this machine runs, and
  why each other one is not verified here."""

  def check(staging: pathlib.Path) -> dict:
    runnable, skipped = _runnable_here(formats, platforms)
    checked = {'not_verified': skipped} if skipped else {}
    return {**checked, 'verify': compare(staging, runnable)}

  return check


def _verify_export(output, deploy_model, variables, image_size, formats) -> dict:
  """Reloads each artifact and compares it with the deploy model on a batch of 3."""
  images = checkpoint_models.random_images(image_size, batch=3, channels=deploy_model.in_channels)
  expected = checkpoint_models.outputs(deploy_model, variables, images)
  loaders = {
    'jax': export.load_jax_export,
    'tf': export.load_saved_model,
    'onnx': onnx_export.load_onnx,
  }
  return {
    fmt: checkpoint_models.max_relative_difference(
      _run_artifact(loaders[fmt], output, fmt, images), expected
    )
    for fmt in formats
  }


def _run_artifact(load, output, fmt: str, images) -> np.ndarray:
  """The outputs of the ``fmt`` artifact in ``output`` on ``images``; one line where the
  runtime cannot load or run it (an onnxruntime too old for the file, say)."""
  try:
    return checkpoint_models.flat(load(output)(images))
  except Exception as error:  # noqa: BLE001 (onnxruntime, TensorFlow and XLA raise many kinds)
    reason = ' '.join(str(error).split())[:300] or type(error).__name__
    raise ConversionError(
      f'The {fmt} artifact does not run here ({reason}); nothing was written. Update that '
      'runtime, or pass --no-verify to write it unchecked.'
    ) from error
