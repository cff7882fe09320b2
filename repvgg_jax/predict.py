"""`python -m repvgg_jax.predict SOURCE IMAGE...`: the top classes of images.

  python -m repvgg_jax.predict workdirs/pets cat.jpg dog.png
  python -m repvgg_jax.predict workdirs/pets cat.jpg --top 3 --json

SOURCE is a training workdir, a deploy or training checkpoint (a training one is
fused here), or a directory that ``python -m repvgg_jax.convert export`` wrote
(its ``model.jax_export``). The images (JPEG or PNG, any size and mode) go
through the run's evaluation preprocessing at its image size; the fused
model's softmax gives each image's top classes, named as the training
dataset named them (class folders, tfds labels) where the source records
them, else by index.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from collections.abc import Callable, Sequence

import numpy as np

DEFAULT_IMAGE_SIZE = 224
DEFAULT_EVAL_PREPROCESS = 'resize_crop'


class PredictError(ValueError):
  """A source or image that cannot be used; the message says which and why."""


@dataclasses.dataclass(frozen=True)
class Predictor:
  """A fused classifier and what its inputs need: ``logits = apply(images)`` on a
  float32 NHWC batch preprocessed as in `preprocess`."""

  apply: Callable[[np.ndarray], np.ndarray]
  model: str
  image_size: int
  eval_preprocess: str
  classes: tuple[str, ...]


def _deploy_model(path: pathlib.Path, params, run: tuple[pathlib.Path, dict] | None):
  """The deploy model of ``params``: as its training run's config built it, else the
  variant whose shapes the tree has."""
  import ml_collections

  from repvgg_jax.model import create_model, model_from_config, shapes

  if run is not None:
    return model_from_config(ml_collections.ConfigDict(run[1]), deploy=True, dtype='float32')
  name = shapes.identify_variant(params)
  if name is None:
    raise PredictError(f'{path} holds no known variant and has no config.json beside it.')
  num_classes = int(params['linear']['kernel'].shape[1])
  in_channels = int(params['stage0_block0']['reparam']['kernel'].shape[2])
  return create_model(name, deploy=True, num_classes=num_classes, in_channels=in_channels)


def _from_checkpoint(
  path: pathlib.Path, run: tuple[pathlib.Path, dict] | None
) -> tuple[Callable, str, dict, int]:
  from repvgg_jax.interop import checkpoint_io
  from repvgg_jax.interop.torch_layout import ConversionError
  from repvgg_jax.model import fusion
  from repvgg_jax.perf import compile_options

  if (path / 'quantize.json').is_file():  # What `convert quantize` writes (quantize.META_FILE).
    raise PredictError(
      f'{path} holds an int8 model: export it (python -m repvgg_jax.convert export {path} DIR) '
      'and predict with DIR.'
    )
  try:
    variables, _, saved = checkpoint_io.fused_variables(path)  # A training one is fused here.
  except (FileNotFoundError, ConversionError) as error:
    raise PredictError(str(error)) from None
  except fusion.FusionError as error:
    raise PredictError(f'{path}: {error}') from None
  except Exception as error:  # noqa: BLE001 - orbax's many ways of failing on a damaged one.
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ''
    raise PredictError(
      f'{path}: the checkpoint cannot be read ({type(error).__name__}: {first_line[:200]}).'
    ) from None
  if 'linear' not in variables['params']:
    raise PredictError(f'{path} holds a backbone without a classifier: nothing to predict.')
  model = _deploy_model(path, variables['params'], run)
  if not model.matches(variables['params']):
    raise PredictError(f'{path} does not hold the {model.variant.name} its config.json describes.')
  apply = compile_options.jit(lambda images: model.apply(variables, images), inference=True)
  return apply, model.variant.name, saved, model.num_classes


def _from_export(path: pathlib.Path) -> tuple[Callable, str, dict, int]:
  import jax

  from repvgg_jax.interop import export

  try:
    meta = json.loads((path / export.META_FILE).read_text())
  except (UnicodeDecodeError, json.JSONDecodeError) as error:
    raise PredictError(f'{path / export.META_FILE} is not JSON ({error}): export again.') from None
  if not isinstance(meta, dict):
    raise PredictError(f"{path / export.META_FILE} is not an export's record: export again.")
  if not (path / export.JAX_FILE).is_file():
    raise PredictError(
      f'{path} has no {export.JAX_FILE}: export with --formats jax (others run outside jax).'
    )
  if not meta.get('num_classes'):
    raise PredictError(f'{path} holds a backbone without a classifier: nothing to predict.')
  platforms = meta.get('platforms') or []
  if platforms and not export.runs_here(platforms):
    here = jax.export.default_export_platform()
    raise PredictError(
      f'{path} was exported for {",".join(platforms)}, and this machine runs {here}: '
      f'predict where it runs, or export again with --platforms {here}.'
    )
  try:
    exported = export.read_jax_export(path)
    ((_, height, _, _),) = (aval.shape for aval in exported.in_avals)
  except Exception as error:  # noqa: BLE001 - a damaged file fails in many ways.
    reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else ''
    raise PredictError(
      f'{path / export.JAX_FILE} cannot be read ({type(error).__name__}: {reason}): export again.'
    ) from None
  # The artifact takes one size: the one it was traced with, whatever the record beside it says.
  meta = {**meta, 'image_size': height}
  return exported.call, meta.get('model', '?'), meta, int(meta['num_classes'])


def load(
  source: str | pathlib.Path, image_size: int | None = None, eval_preprocess: str | None = None
) -> Predictor:
  """The fused classifier of ``source`` (see the module docstring).

  Args:
    source: a workdir, a deploy or training checkpoint, or an export directory.
    image_size, eval_preprocess: how to feed it, where ``source`` and its run do not
      record it (a checkpoint moved out of its workdir before it recorded them); for
      what they record, the same or None. Reference weights imported by ``convert
      import`` take ImageNet's: 224 and 'resize_crop'.

  Raises:
    PredictError: nothing usable at ``source``, or a feeding that contradicts it.
  """
  from repvgg_jax import run_files
  from repvgg_jax.data import input_pipeline
  from repvgg_jax.interop import export

  if image_size is not None and image_size < 1:
    raise PredictError(f'The image size must be positive, got {image_size}.')
  if eval_preprocess is not None and eval_preprocess not in input_pipeline.EVAL_PREPROCESSING:
    raise PredictError(
      f'Unknown eval preprocessing {eval_preprocess!r}: use one of '
      f'{", ".join(input_pipeline.EVAL_PREPROCESSING)}.'
    )
  path = pathlib.Path(source)
  if not path.exists():
    raise PredictError(f'No checkpoint, workdir or export at {path}.')
  try:
    run = run_files.training_run(path)
    if (path / export.META_FILE).is_file():
      apply, model, saved, num_classes = _from_export(path)
    else:
      apply, model, saved, num_classes = _from_checkpoint(path, run)
    settings = run_files.feeding(saved, run)
  except run_files.RunFileError as error:
    raise PredictError(str(error)) from None
  size = _feeding('image_size', settings['image_size'], image_size, path)
  method = _feeding('eval_preprocess', settings['eval_preprocess'], eval_preprocess, path)
  if size is None or method is None:
    if _from_training(saved):
      raise PredictError(
        f'{path} records no image size or eval preprocessing, and no config.json of its run '
        'is beside it: pass --image-size and --eval-preprocess as it was trained, or predict '
        'from its workdir.'
      )
    size, method = size or DEFAULT_IMAGE_SIZE, method or DEFAULT_EVAL_PREPROCESS
  classes = settings['classes'] or [str(index) for index in range(num_classes)]
  if len(classes) != num_classes:
    raise PredictError(
      f'{path} names {len(classes)} classes but its classifier has {num_classes} outputs.'
    )
  return Predictor(
    apply=lambda images: np.asarray(apply(images), np.float32),
    model=model,
    image_size=int(size),
    eval_preprocess=method,
    classes=tuple(classes),
  )


def _feeding(key: str, recorded, given, path: pathlib.Path):
  """What ``source`` records for ``key``, else what the caller gave; refuses a contradiction."""
  if recorded is not None and given is not None and given != recorded:
    flag = '--' + key.replace('_', '-')
    raise PredictError(f'{path} records {key} {recorded!r}, not {given!r}: leave {flag} out.')
  return recorded if recorded is not None else given


def _from_training(saved: dict) -> bool:
  """Whether ``saved`` is the metadata of a ``train.py`` checkpoint: not of weights that
  ``convert`` wrote, which record their ``source``."""
  return 'source' not in saved


def preprocess(paths: Sequence[str | pathlib.Path], image_size: int, method: str) -> np.ndarray:
  """The images at ``paths`` decoded (RGB), resized and normalized as in evaluation:
  float32 ``(len(paths), image_size, image_size, 3)``.

  Raises:
    PredictError: a file that is missing or not a whole JPEG or PNG, named.
  """
  import tensorflow as tf

  from repvgg_jax.data import folder, input_pipeline

  images = []
  for path in paths:
    path = pathlib.Path(path)
    if path.is_dir():
      raise PredictError(f'{path} is a directory: give its images, e.g. {path}/*.jpg.')
    problem = 'does not exist' if not path.is_file() else folder.check_file(path)
    if problem:
      raise PredictError(f'{path} {problem}.')
    try:
      image = folder.decode(tf.constant(str(path)))
    except tf.errors.OpError as error:
      raise PredictError(
        f'{path} cannot be decoded ({folder.decode_failure(error)}): replace it.'
      ) from None
    images.append(input_pipeline.preprocess_for_eval(image, image_size, method=method).numpy())
  return np.stack(images)


def top_classes(logits: np.ndarray, classes: Sequence[str], k: int) -> list[list[dict]]:
  """Per image, the ``k`` most probable classes: ``[{'class', 'index', 'probability'}]``."""
  shifted = logits - logits.max(axis=-1, keepdims=True)
  probabilities = np.exp(shifted) / np.exp(shifted).sum(axis=-1, keepdims=True)
  order = np.argsort(-probabilities, axis=-1, kind='stable')[:, :k]
  return [
    [{'class': classes[i], 'index': int(i), 'probability': float(p[i])} for i in row]
    for p, row in zip(probabilities, order, strict=True)
  ]


def predict(
  source: str | pathlib.Path,
  images: Sequence[str | pathlib.Path],
  top: int = 5,
  batch: int = 32,
  **feeding,
) -> list[dict]:
  """``[{'image': path, 'top': top_classes}]`` of each image, in order; ``feeding``
  (``image_size``, ``eval_preprocess``) as `load` takes it."""
  predictor = load(source, **feeding)
  results = []
  for start in range(0, len(images), batch):
    paths = images[start : start + batch]
    pixels = preprocess(paths, predictor.image_size, predictor.eval_preprocess)
    ranked = top_classes(predictor.apply(pixels), predictor.classes, top)
    results += [{'image': str(p), 'top': r} for p, r in zip(paths, ranked, strict=True)]
  return results


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog='python -m repvgg_jax.predict',
    description='Top classes of images by a trained RepVGG (fused).',
  )
  parser.add_argument('source', help='workdir, deploy or training checkpoint, or export directory')
  parser.add_argument('images', nargs='+', help='JPEG or PNG files')
  parser.add_argument('--top', type=int, default=5, help='classes per image (default 5)')
  parser.add_argument('--batch-size', type=int, default=32, help='images per forward pass')
  parser.add_argument('--json', action='store_true', help='one JSON document on stdout')
  parser.add_argument(
    '--image-size',
    type=int,
    help="the run's image size, for a checkpoint that records none (one moved out of its "
    'workdir before it recorded it)',
  )
  parser.add_argument(
    '--eval-preprocess',
    help="the run's dataset.eval_preprocess, for a checkpoint that records none",
  )
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  from absl import logging

  from repvgg_jax.startup import quiet_startup

  # Before TensorFlow and JAX load. Errors off too: decoding a damaged image logs one, and
  # every failure here reaches the user as an exception's line.
  quiet_startup(log_level='3')
  logging.set_verbosity(logging.ERROR)  # Orbax's notes on opening a checkpoint read-only.
  args = _parser().parse_args(argv)
  if args.top < 1 or args.batch_size < 1:
    print('error: --top and --batch-size must be positive.', file=sys.stderr)
    return 2
  try:
    feeding = {'image_size': args.image_size, 'eval_preprocess': args.eval_preprocess}
    results = predict(args.source, args.images, args.top, args.batch_size, **feeding)
  except PredictError as error:
    print(f'error: {error}', file=sys.stderr)
    return 1
  if args.json:
    print(json.dumps(results, indent=2))
    return 0
  for result in results:
    ranked = '  '.join(f'{c["class"]} {c["probability"]:.1%}' for c in result['top'])
    print(f'{result["image"]}: {ranked}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
