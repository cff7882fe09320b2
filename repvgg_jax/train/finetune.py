"""Fine-tuning: a run that starts from trained weights instead of random ones.

``config.init_from`` names the weights: a workdir or orbax checkpoint of this
package, a PyTorch ``.pth``/``.pt``, ``.safetensors`` or ``.npz`` file (the
reference's or timm's keys), or an ``hf-hub:`` reference; whatever
``python -m repvgg_jax.convert import`` reads (`repvgg_jax.interop.pretrained`).
Every backbone tensor must match in name and shape; the classifier is kept
only when it classifies the dataset's classes: the same number of them, and the
same names in the same order where the source recorded its names (a checkpoint
of this package: its metadata, or its workdir's ``classes.json``). Else it is
re-initialised.
``config.freeze_stages`` and ``optimizer.backbone_lr_multiplier`` are applied by
the model and the optimizer; a resumed run restores its own checkpoint instead.
"""

from __future__ import annotations

import pathlib
import warnings
from collections.abc import Sequence

from repvgg_jax import run_files
from repvgg_jax.interop import checkpoint_io, pretrained
from repvgg_jax.interop.torch_layout import ConversionError
from repvgg_jax.model import network, shapes, variants


def check_config(config, resuming: bool = False) -> str | None:
  """What makes the fine-tuning settings of ``config`` unusable, as one line, or None
  (``resuming``: from a checkpoint, which holds what ``init_from`` would give)."""
  frozen = config.get('freeze_stages', 0)
  if not 0 <= frozen <= network.NUM_STAGES:
    return f'freeze_stages must be from 0 to {network.NUM_STAGES} (stages), got {frozen}.'
  if frozen and not config.get('init_from') and not resuming:
    return (
      f'freeze_stages={frozen} would keep randomly initialised stages fixed: give the weights '
      'to start from with --config.init_from=..., or set freeze_stages=0.'
    )
  for field in ('backbone_lr_multiplier', 'bias_lr_multiplier'):
    multiplier = config.optimizer.get(field, 1.0)
    if multiplier < 0:
      return f'optimizer.{field} must be >= 0, got {multiplier}.'
  if config.get('init_from') and 'qat' in config and config.qat.enabled:
    return 'QAT starts from qat.init_from (a fused model); leave init_from unset with qat.enabled.'
  return None


def initial_variables(
  config, variables: dict, classes: Sequence[str] | None = None
) -> tuple[dict, str]:
  """``variables`` (the model's, freshly initialised) with the weights of
  ``config.init_from``, and one line saying what was loaded.

  ``classes`` are the dataset's class names, where it names them: a source run
  that recorded other names (or the same in another order) gets no say in the
  classifier, whose outputs would mean other classes.

  Raises:
    ValueError: nothing readable at ``init_from``, or weights of another
      architecture (what is missing, unexpected or of another shape).
  """
  source = config.init_from
  try:
    weights = pretrained.read_weights(source)
    if shapes.has_fused_blocks(weights['params']):
      raise ConversionError(
        f'{source} holds fused (deploy) weights, and fine-tuning trains the training-time '
        "branches: give a run's workdir or checkpoints/ (not deploy/), or unfused weights."
      )
    _check_variant(config, weights['params'], source)
    classifier = weights['params'].get(pretrained.CLASSIFIER)
    count = None if classifier is None else classifier['kernel'].shape[-1]
    renamed = _renamed_classes(source, classes) if count == len(classes or ()) else None
    if renamed:  # The model's own initialisation in its place.
      own = variables['params'][pretrained.CLASSIFIER]
      weights = {**weights, 'params': {**weights['params'], pretrained.CLASSIFIER: own}}
    with warnings.catch_warnings():  # Said in the returned line instead.
      warnings.filterwarnings('ignore', message='The weights have .* classes')
      loaded = pretrained.load_weights(variables, weights, source=source)
  except (FileNotFoundError, ConversionError) as error:
    raise ValueError(f'init_from: {error}') from None
  line = f'Initialised {config.model.name} from {source}'
  if renamed:
    return loaded, f'{line}; the classifier starts from random weights: {renamed}.'
  if count == config.dataset.num_classes:
    return loaded, f'{line}, its classifier included.'
  had = f'has {count} classes' if count else 'has no classifier'
  return loaded, (
    f'{line}; the classifier starts from random weights: the source {had}, the config '
    f'{config.dataset.num_classes}.'
  )


def _renamed_classes(source, classes: Sequence[str]) -> str | None:
  """How the class names that the run at ``source`` recorded differ from ``classes``
  (the first position where they do), or None: the same, or not recorded."""
  recorded = _recorded_classes(source)
  if recorded is None or list(recorded) == list(classes):
    return None
  differ = [i for i, (a, b) in enumerate(zip(recorded, classes, strict=False)) if a != b]
  if not differ:  # A record that does not fit its own classifier.
    return f'the source recorded {len(recorded)} class names, the dataset has {len(classes)}'
  at = differ[0]
  return (
    f'the source was trained on other classes (output {at} is {recorded[at]!r} there, '
    f'{classes[at]!r} here)'
  )


def _recorded_classes(source) -> list[str] | None:
  """The class names of a checkpoint of this package at ``source`` (a workdir, its
  checkpoints or one step): its metadata's, else its run's ``classes.json``."""
  path = pathlib.Path(source)
  if not path.is_dir():
    return None  # A weight file or a hub reference: no names.
  ckpt, step, _ = checkpoint_io.training_checkpoint(path)
  try:
    step = ckpt.latest_step() if step is None else step
    saved = {} if step is None else ckpt.restore_meta(step)
  finally:
    ckpt.close()
  try:
    return run_files.feeding(saved, run_files.training_run(path))['classes']
  except run_files.RunFileError as error:  # A classes.json that is not a list of names.
    raise ConversionError(str(error)) from None


def _check_variant(config, params, source) -> None:
  """Refuses, naming both, weights of another of the 26 variants than the config's."""
  if config.model.get('num_blocks') or config.model.get('width_multipliers'):
    return  # A scaled variant has no name to compare; the shapes decide.
  found, wanted = shapes.identify_variant(params), variants.get_variant(config.model.name).name
  if found and found != wanted:
    raise ValueError(
      f'init_from: {source} holds {found}, but the config trains {wanted}: set '
      f'--config.model.name={found}, or start from {wanted} weights.'
    )
