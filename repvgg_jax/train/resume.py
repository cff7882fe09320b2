"""Resuming a run from its workdir: what a checkpoint keeps besides the state, and
the refusal, with the fix, of a checkpoint that the config cannot continue."""

from __future__ import annotations

import copy
import pathlib

import jax

from repvgg_jax import checkpointing, run_files
from repvgg_jax.model import trees
from repvgg_jax.train import config_checks, steps


def state_tree(state: steps.TrainState) -> dict:
  tree = {
    'step': state.step,
    'params': state.params,
    'batch_stats': state.batch_stats,
    'opt_state': state.opt_state,
  }
  return tree if state.ema is None else {**tree, 'ema': state.ema}


# The settings that shape the optimizer's state: key -> (its config section, its value where
# a checkpoint or a config predates it).
OPTIMIZER_SETTINGS = {
  'freeze_stages': (None, 0),
  'backbone_lr_multiplier': ('optimizer', 1.0),
  'bias_lr_multiplier': ('optimizer', 1.0),
}


def optimizer_meta(config) -> dict:
  """The settings that shape the optimizer's state, kept in every checkpoint's metadata."""
  return {
    key: (config[section] if section else config).get(key, default)
    for key, (section, default) in OPTIMIZER_SETTINGS.items()
  }


# Settings that a resume may change, but then does not continue the run exactly:
# the data order follows them (and the steps of an epoch the batch size).
ORDER_SETTINGS = ('batch_size', 'seed')


def order_changes(config, meta: dict, total_steps: int) -> list[str]:
  """A warning for each of `ORDER_SETTINGS` that ``config`` changes from the checkpoint's,
  and for another length of the run (``total_steps``)."""
  lines = [
    f'warning: resuming a run trained with {key}={meta[key]} with {key}={config[key]}: '
    'the data order'
    + (' and the schedule of epochs change' if key == 'batch_size' else ' changes')
    + f' (--config.{key}={meta[key]} resumes it exactly).'
    for key in ORDER_SETTINGS
    if key in meta and meta[key] != config[key]
  ]
  planned = meta.get('total_steps', total_steps)  # Not recorded before 2026-12-06.
  if planned != total_steps:
    step = meta.get('step')
    past = (
      f'; the run is at step {step} already, so nothing more is trained'
      if step and step >= total_steps
      else ''
    )
    lines.append(
      f'warning: resuming a run of {planned} steps as one of {total_steps}: the learning-rate '
      f'schedule changes from here on{past} (num_train_steps or num_epochs as before resumes '
      'it exactly).'
    )
  return lines


def _resume_problem(config, meta: dict, saved, abstract, classes) -> str | None:
  """Why a checkpoint (its metadata and saved shapes) cannot resume ``config``, and
  the fix, or None."""
  other_run = 'use another --workdir, or the config it was trained with'

  saved_model = meta.get('model')
  if saved_model and saved_model != config.model.name:
    return f'is of {saved_model}, but the config trains {config.model.name}: {other_run}'
  if ('ema' in saved) != ('ema' in abstract):
    had = 'keeps a' if 'ema' in saved else 'has no'
    return (
      f'{had} moving average of the weights but the config has '
      f'ema_decay={config.get("ema_decay", 0.0)}: {other_run}'
    )
  for key, value in optimizer_meta(config).items():
    section, default = OPTIMIZER_SETTINGS[key]
    was = meta.get(key, default)
    if was != value:  # Another optimizer state: start a new workdir from this one instead.
      field = f'{section}.{key}' if section else key
      return (
        f'was trained with {key}={was}, the config has {value}: resume it with '
        f'--config.{field}={was}, or for a new stage of fine-tuning give a new --workdir '
        'with --config.init_from=this workdir'
      )
  if classes and meta.get('classes') and list(meta['classes']) != list(classes):
    return f'was trained on other class names than the dataset has now: {other_run}'
  for part in ('params', 'batch_stats'):
    if not trees.same_shapes(saved[part], abstract[part]):
      return (
        f'does not fit the configured model ({config.model.name}, '
        f'{config.dataset.num_classes} classes, branches '
        f'{config.model.branches or "of its block kind"}): its {part} differ in shape: ' + other_run
      )
  return None


def restore(
  ckpt: checkpointing.Checkpoints, state: steps.TrainState, config, report, classes, total_steps
):
  """``(state, metadata)`` of the newest readable checkpoint, loaded into ``state``'s
  structure; ``(state, {})`` where there is none.

  Unreadable steps are moved aside and reported (`Checkpoints.restore_newest_readable`);
  a checkpoint of another model or setting is refused (ConfigError) and kept.
  """
  abstract = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state_tree(state)
  )

  def read(step: int):
    # Every process reads as many times: orbax's reads wait for all of them.
    meta = ckpt.restore_meta(step)
    problem = _resume_problem(config, meta, ckpt.abstract_state(step), abstract, classes)
    if problem:
      raise checkpointing.CheckpointMismatch(f'The checkpoint in {ckpt.directory} {problem}.')
    if jax.process_index() == 0:
      for line in order_changes(config, meta, total_steps):
        report(line)
    tree, _ = ckpt.restore(abstract, step=step)
    return tree, meta

  try:
    restored = ckpt.restore_newest_readable(read, report)
  except (checkpointing.CheckpointMismatch, checkpointing.CorruptCheckpointsError) as error:
    raise config_checks.ConfigError(str(error)) from None
  if restored is None:
    return state, {}
  tree, meta = restored
  restored_state = state.replace(
    step=tree['step'],
    params=tree['params'],
    batch_stats=tree['batch_stats'],
    opt_state=tree['opt_state'],
    ema=tree.get('ema'),
  )
  return restored_state, meta


def with_saved_sources(config, workdir: pathlib.Path):
  """``config`` with the ``init_from`` and ``qat.init_from`` of the run's config.json
  where it gives none: a resume needs no source, but the run's record keeps it."""
  saved = run_files.read_config(workdir) or {}
  saved_qat = saved.get('qat') if isinstance(saved.get('qat'), dict) else {}
  config = copy.deepcopy(config)
  if 'init_from' in config and not config.init_from and saved.get('init_from'):
    config.init_from = saved['init_from']
  if 'qat' in config and not config.qat.init_from and saved_qat.get('init_from'):
    config.qat.init_from = saved_qat['init_from']
  return config
