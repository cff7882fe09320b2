"""The rows of an ablation config, validated: their names, branch sets or block
kinds, the training settings each changes, the seeds, the reference row, and the
training config of every (row, seed); and which config fields change a run's result
(a run saved with other values in them is refused by `repvgg_jax.ablate.runner`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from repvgg_jax.ablate import report as ablation_report
from repvgg_jax.data import folder
from repvgg_jax.model import normalize_branches, variants
from repvgg_jax.train import trainer

# Row names become directory names.
_ROW_NAME = re.compile(r'[A-Za-z0-9][A-Za-z0-9_+-]*')  # No '.': ConfigDict keys.
# Config fields that change neither what a row trains nor what it measures (but an
# image folder's data_dir, and the crop sampler of an inception crop: `config_changes`).
_IRRELEVANT_FIELDS = frozenset(
  {
    'progress_bar',
    'log_every_steps',
    'checkpoint_every_steps',
    'steps_per_call',
    'keep_checkpoints',
    'dataset.data_dir',
    'dataset.manual_dir',
    'dataset.download',
  }
)


class AblationError(trainer.ConfigError):
  """An ablation config that cannot run, or a workdir of another ablation."""


def branch_sets(config) -> dict[str, tuple]:
  """The rows of ``config.ablation.branch_sets`` in order, validated.

  ``config.ablation.only`` (comma-separated row names) keeps some of them.

  Raises:
    AblationError: no ablation section, no rows, a bad row name, a branch set
      that is empty or names an unknown branch kind (the error lists the known
      ones), or ``only`` naming an unknown row.
  """
  if 'ablation' not in config or 'branch_sets' not in config.ablation:
    raise AblationError(
      'The config has no ablation.branch_sets: use an ablation config such as '
      'configs/ablation_digits.py, which maps row names to branch sets.'
    )
  sets = config.ablation.branch_sets
  rows = dict(sets.items() if hasattr(sets, 'items') else sets or ())
  if not rows:
    raise AblationError('ablation.branch_sets is empty: give at least one row name -> branch set.')
  for name, row in rows.items():
    if not _ROW_NAME.fullmatch(name):
      raise AblationError(
        f'Row name {name!r} cannot name a directory: use letters, digits and _ + - only.'
      )
    branches, _ = split_row(name, row)
    if not branches:
      raise AblationError(f'ablation.branch_sets.{name} is empty: name at least one branch kind.')
    if isinstance(branches, str) and branches not in variants.BLOCK_KINDS:
      raise AblationError(
        f'ablation.branch_sets.{name} is {branches!r}: give a set of branch kinds or a block '
        f'kind ({", ".join(variants.BLOCK_KINDS)}).'
      )
    try:
      if not isinstance(branches, str):
        normalize_branches(branches)
    except ValueError as error:
      raise AblationError(f'ablation.branch_sets.{name}: {error}') from None
  only = [name.strip() for name in config.ablation.get('only', '').split(',') if name.strip()]
  unknown = [name for name in only if name not in rows]
  if unknown:
    raise AblationError(f'ablation.only names unknown rows {unknown}; the rows are {list(rows)}.')
  return {name: branches for name, branches in rows.items() if not only or name in only}


def seeds(config) -> list[int]:
  """The seeds every row trains with: ``config.seed`` and the ``ablation.seeds - 1`` after it."""
  count = config.ablation.get('seeds', 1)
  if not isinstance(count, int) or count < 1:
    raise AblationError(f'ablation.seeds must be a positive number of seeds, got {count!r}.')
  return [config.seed + index for index in range(count)]


def reference_row(config, rows: dict) -> str | None:
  """The row the others are compared with (``ablation.reference``), if it is run."""
  name = config.ablation.get('reference', '')
  all_rows = dict(config.ablation.branch_sets.items())
  if name and name not in all_rows:
    raise AblationError(
      f'ablation.reference names the unknown row {name!r}; the rows are {list(all_rows)}.'
    )
  return name if name in rows else None


def split_row(name: str, row) -> tuple:
  """``(branches, settings)`` of a row: a branch set or block kind alone, or a mapping
  of ``branches`` and config settings that the row changes (``optimizer: {...}``)."""
  if not hasattr(row, 'items'):
    return _block_kind_alone(row), {}
  settings = dict(row.items())
  if 'branches' not in settings:
    raise AblationError(
      f'ablation.branch_sets.{name} is a mapping without branches: give '
      "{'branches': (...), 'optimizer': {...}}, the branch set and the settings it changes."
    )
  return _block_kind_alone(settings.pop('branches')), settings


def _block_kind_alone(branches):
  """A block kind named alone in a sequence, as a block kind: the command line makes
  ``--config.ablation.branch_sets.ROW=qarepvgg`` a one-name tuple, as the tuple it sets."""
  if (
    not isinstance(branches, str)
    and isinstance(branches, Sequence)
    and len(branches) == 1
    and branches[0] in variants.BLOCK_KINDS
  ):
    return branches[0]
  return branches


def _apply_settings(config, settings, where: str) -> None:
  """Sets ``settings`` (nested mappings) in ``config``; every field must exist there."""
  for key, value in settings.items():
    if key not in config:
      raise AblationError(f'{where}.{key}: the training config has no such field.')
    if hasattr(value, 'items') and hasattr(config[key], 'items'):
      _apply_settings(config[key], value, f'{where}.{key}')
      continue
    try:
      config[key] = value
    except (TypeError, ValueError) as error:  # ConfigDict's type check: one line.
      raise AblationError(f'{where}.{key}: {str(error).splitlines()[0]}') from None


def row_config(config, row, seed: int | None = None, *, name: str = '<row>'):
  """The training config of one row: ``config`` with its branches (or, for a
  block kind, that kind's variant of the same shape) and the settings it changes,
  ``seed`` (default: the config's) and no ablation part."""
  branches, settings = split_row(name, row)
  row = config.copy_and_resolve_references()
  with row.unlocked():
    del row['ablation']
    if seed is not None:
      row.seed = seed
    if isinstance(branches, str):
      row.model.name = variants.with_block(row.model.name, branches)
      row.model.branches = None
    else:
      row.model.branches = tuple(branches)
  _apply_settings(row, settings, f'ablation.branch_sets.{name}')
  return row


def row_label(config, settings=None) -> str:
  """The row's blocks: its branch kinds, after the block kind where it is not RepVGG's;
  then the settings the row changes (``optimizer.custom_l2=True``)."""
  variant = variants.get_variant(config.model.name)
  branches = config.model.branches or variant.block_kind.branches
  label = ablation_report.branches_label(as_json(branches))
  label = label if variant.block == 'repvgg' else f'{variant.block_kind.prefix}: {label}'
  return ' '.join([label, *(f'{key}={value}' for key, value in _flatten(settings or {}).items())])


def int8_batches(config) -> int:
  """Calibration batches of every run's int8 top-1 (``ablation.int8_calibration_batches``);
  0: no int8 column."""
  count = config.ablation.get('int8_calibration_batches', 0)
  if not isinstance(count, int) or isinstance(count, bool) or count < 0:
    raise AblationError(
      f'ablation.int8_calibration_batches must be a number of batches (0: no int8 top-1), '
      f'got {count!r}.'
    )
  return count


def bench_settings(config) -> dict[str, int]:
  """The benchmark set-up (image size 0 means the dataset's)."""
  ablation = config.ablation
  fields = ('bench_batch_size', 'bench_image_size', 'bench_runs', 'bench_warmup')
  missing = [field for field in fields if field not in ablation]
  if missing:
    raise AblationError(
      f'The ablation config lacks {", ".join(f"ablation.{m}" for m in missing)}: add them '
      '(configs/ablation_digits.py has them all).'
    )
  settings = {
    'batch': ablation.bench_batch_size,
    'size': ablation.bench_image_size or config.dataset.image_size,
    'runs': ablation.bench_runs,
    'warmup': ablation.bench_warmup,
  }
  if min(settings['batch'], settings['size'], settings['runs']) < 1 or settings['warmup'] < 0:
    raise AblationError(f'The benchmark settings must be positive, got {settings}.')
  return settings


def as_json(value):
  return json.loads(json.dumps(value))


def _flatten(tree, prefix: str = '') -> dict:
  """``{'a.b': value}`` of nested mappings (dicts or ConfigDicts)."""
  flat = {}
  for key, value in tree.items():
    if hasattr(value, 'items'):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


# Fields added to the config after rows may have been saved: a saved config
# without one ran as with this value.
_ADDED_FIELDS = {
  'qat.enabled': False,
  'qat.init_from': None,
  'init_from': None,
  'freeze_stages': 0,
  'optimizer.backbone_lr_multiplier': 1.0,
  'optimizer.bias_lr_multiplier': 1.0,
  'optimizer.warmup_prefix': True,
  'dataset.val_fraction': 0.0,
  'dataset.skip_bad_images': False,
  'dataset.randaugment_layers': 0,
  'dataset.randaugment_magnitude': 15,
  'optimizer.cutmix_alpha': 0.0,
  'ema_decay': 0.0,
  'optimizer.custom_l2': False,
  'dataset.crop_sampler': 'tf',  # The inception crop's window before torchvision's.
}


def config_changes(saved: dict, current: dict) -> list[str]:
  """``'field: saved -> current'`` for every field that changes a row's result."""
  saved, current = {**_ADDED_FIELDS, **_flatten(saved)}, _flatten(current)
  irrelevant = _IRRELEVANT_FIELDS
  if folder.NAME in (saved.get('dataset.name'), current.get('dataset.name')):
    irrelevant -= {'dataset.data_dir'}  # An image folder's directory is its data.
  if 'inception_crop' not in (
    saved.get('dataset.train_augment'),
    current.get('dataset.train_augment'),
  ):
    irrelevant |= {'dataset.crop_sampler'}  # It draws the inception crop's window only.
  keys = sorted((saved.keys() | current.keys()) - irrelevant)
  return [
    f'{key}: {saved.get(key, "(absent)")} -> {current.get(key, "(absent)")}'
    for key in keys
    if saved.get(key) != current.get(key)
  ]
