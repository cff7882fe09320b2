"""The files a training run keeps in its workdir beside the checkpoints, and
finding the run that a checkpoint belongs to.

``config.json`` is the run's whole config, resolved (the number of classes of
an image folder included); ``classes.json`` the dataset's class names in label
order. Conversion, quantization, prediction and ablations read them back.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping

CONFIG_FILE = 'config.json'
CLASSES_FILE = 'classes.json'


def read_config(workdir: str | pathlib.Path) -> dict | None:
  """The training config in ``workdir``'s config.json, or None where there is none
  (a config is JSON with a ``model`` and a ``dataset``)."""
  file = pathlib.Path(workdir) / CONFIG_FILE
  if not file.is_file():
    return None
  try:
    config = json.loads(file.read_text())
  except (UnicodeDecodeError, json.JSONDecodeError):  # Not a config, whatever its name.
    return None
  return config if isinstance(config, dict) and {'model', 'dataset'} <= config.keys() else None


def training_run(path: str | pathlib.Path) -> tuple[pathlib.Path, dict] | None:
  """``(workdir, config)`` of the training run that ``path`` is or lies in: a workdir,
  its ``checkpoints/`` or ``deploy/``, or one step of them (up to two folders up).
  None where none of them holds a config.json."""
  path = pathlib.Path(path).absolute()
  for directory in (path, *list(path.parents)[:2]):
    config = read_config(directory)
    if config is not None:
      return directory, config
  return None


class RunFileError(ValueError):
  """A file of the run that cannot be read as what it should be; names it and the fix."""


def read_classes(workdir: str | pathlib.Path) -> list[str] | None:
  """The class names in ``workdir``'s classes.json, or None where there is none.

  Raises:
    RunFileError: the file is not a JSON list of names (nor ``null``, for a dataset
      without names).
  """
  file = pathlib.Path(workdir) / CLASSES_FILE
  if not file.is_file():
    return None
  try:
    classes = json.loads(file.read_text())
  except (UnicodeDecodeError, json.JSONDecodeError) as error:
    problem = f'not JSON: {error}'
  else:
    if classes is None or (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
      return classes
    if isinstance(classes, list):
      problem = 'names that are not all strings'
    else:
      problem = f'a JSON {type(classes).__name__}'
  raise RunFileError(
    f'{file} is not a list of class names ({problem}): restore it, or delete it to name '
    'the classes by index.'
  )


def feeding(saved: Mapping, run: tuple[pathlib.Path, dict] | None) -> dict:
  """``image_size``, ``eval_preprocess`` and ``classes``: what a checkpoint's model
  is fed and how its outputs are named. From the checkpoint's metadata ``saved``,
  else from its training ``run`` (`training_run`), else None."""
  settings = {key: saved.get(key) for key in ('image_size', 'eval_preprocess', 'classes')}
  if run is not None:
    workdir, config = run
    from_run = {key: config['dataset'].get(key) for key in ('image_size', 'eval_preprocess')}
    if not settings['classes']:  # Read only where needed: the checkpoint's own names win.
      from_run['classes'] = read_classes(workdir)
    settings = {key: value or from_run.get(key) for key, value in settings.items()}
  return settings
