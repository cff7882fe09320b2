"""Data-parallel training and evaluation: `train_and_evaluate(config, workdir)`.

The state is replicated and the batch sharded over a one-axis ``Mesh`` of all
devices (all hosts); one jitted step runs on global arrays, so BatchNorm sees
the global batch unless ``config.model.bn_group_size`` asks for fixed groups.
Checkpoints go to ``workdir/checkpoints`` and a run resumes from the latest
one; at the end the fused deploy model is saved to ``workdir/deploy``.
"""

from __future__ import annotations

import errno
import functools
import json
import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from repvgg_jax import checkpointing, jsonfiles, perf, run_files
from repvgg_jax.data import datasets as data
from repvgg_jax.model import fusion, model_from_config
from repvgg_jax.perf import compile_options
from repvgg_jax.train import (
  config_checks,
  evaluation,
  finetune,
  optim,
  preemption,
  qat,
  reporting,
  resume,
  saving,
  steps,
  workdir_lock,
)
from repvgg_jax.train.config_checks import (
  ConfigError,
  check_config,
  check_steps_per_call,
  qat_enabled,
)
from repvgg_jax.train.durations import Schedule
from repvgg_jax.train.reporting import TrainingDivergedError


class FileSystemError(OSError):
  """A file the run reads or writes cannot be: a file where the workdir should be, a
  read-only or full disk, missing permissions (checkpoint saves: `CheckpointWriteError`)."""


# What stops a run with a message that says the fix: the commands print it in one line.
RUN_ERRORS = (
  data.DatasetNotFoundError,
  data.FolderError,
  ConfigError,
  TrainingDivergedError,
  workdir_lock.WorkdirBusyError,
  checkpointing.CheckpointWriteError,
  FileSystemError,
)


def build_model(config, *, deploy: bool = False, train: bool = False):
  """The configured RepVGG (`model_from_config`), training-time or deploy, to train or
  to evaluate. ``model.conv_impl`` picks its convolutions for one or the other; in
  inference, unless it is 'xla', the large-map blocks run in chunks where that pays
  (`perf.chunked`: on CPUs)."""
  if qat_enabled(config):  # The deploy model with fake int8; evaluated also without.
    deploy_model = model_from_config(config, deploy=True)
    size = config.dataset.image_size
    return deploy_model if deploy else qat.QuantizationAwareModel(deploy_model, size)
  conv = perf.conv_layer(config.model.conv_impl, train=train)
  model = model_from_config(config, deploy=deploy, conv=conv)
  plain = train or config.model.conv_impl == 'xla'
  return model if plain else perf.chunked(model, 'auto')


def create_state(config, model, tx, mesh, sample_shape) -> steps.TrainState:
  """A freshly initialised, replicated train state (jitted init: no host copy).

  Initialised through `nn.Conv` whatever ``model.conv`` is: the parameters are
  the same (same names, shapes and initialisers), and im2col takes several
  times longer to compile.
  """
  init_model = model.clone(conv=nn.Conv)

  keep_ema = config.get('ema_decay', 0.0) > 0

  def init(rng):
    variables = init_model.init(rng, jnp.zeros(sample_shape, jnp.float32))
    return steps.TrainState.create(
      apply_fn=model.apply,
      params=variables['params'],
      tx=tx,
      batch_stats=variables['batch_stats'],
      ema=dict(variables) if keep_ema else None,
    )

  replicated = NamedSharding(mesh, P())
  init_fn = compile_options.jit(init, out_shardings=replicated, light_codegen=True)
  return init_fn(jax.random.key(config.seed))


def _compile_steps(config, model, eval_model, deploy_model, mesh):
  """The jitted training steps, eval step and fusion, with the batches' shardings.

  Training has a program for one step and, with ``steps_per_call`` > 1, one for
  that many (`steps.train_steps`), each compiled when first called:
  ``{steps: (program, sharding of its batch)}``.
  """
  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  opt = config.optimizer
  options = dict(
    model=model,
    num_classes=config.dataset.num_classes,
    bn_group_size=config.model.bn_group_size,
    mixup_alpha=config.optimizer.mixup_alpha,
    cutmix_alpha=config.optimizer.get('cutmix_alpha', 0.0),
    label_smoothing=config.optimizer.label_smoothing,
    ema_decay=config.get('ema_decay', 0.0),
    custom_l2=0.5 * opt.weight_decay if opt.get('custom_l2', False) else 0.0,
  )
  train_fns = {1: steps.jit_training(mesh, **options)}
  if config.steps_per_call > 1:
    train_fns[config.steps_per_call] = steps.jit_training(mesh, stacked=True, **options)
  eval_fn = compile_options.jit(
    functools.partial(steps.eval_step, model=eval_model, deploy_model=deploy_model),
    in_shardings=(replicated, replicated, sharded),
    out_shardings=replicated,
  )
  # QAT trains the deploy model itself: its "fused" variables are its parameters.
  fuse = (lambda v: {'params': v['params']}) if qat_enabled(config) else fusion.fuse_params
  fuse_fn = compile_options.jit(fuse, out_shardings=replicated)
  return train_fns, eval_fn, fuse_fn, sharded


def _fine_tune_from(config, state: steps.TrainState, replicated: NamedSharding, classes):
  """``state`` with the weights to start from: ``config.qat.init_from`` (a fused
  model) for QAT, else ``config.init_from`` (`repvgg_jax.train.finetune`), for a
  dataset of ``classes``."""
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  try:
    if qat_enabled(config):
      variables['params'] = qat.initial_params(config, state.params)
    else:
      variables, line = finetune.initial_variables(config, jax.device_get(variables), classes)
      print(line, file=sys.stderr)
  except ValueError as error:
    raise ConfigError(str(error)) from None
  variables = jax.device_put(variables, replicated)
  # The average starts where training does, in buffers of its own (the state is donated).
  ema = None if state.ema is None else jax.tree.map(jnp.copy, variables)
  return state.replace(params=variables['params'], batch_stats=variables['batch_stats'], ema=ema)


def train_and_evaluate(config, workdir: str | pathlib.Path) -> dict:
  """Trains ``config`` in ``workdir``, resuming from its latest checkpoint.

  Returns:
    The summary written to ``workdir/summary.json``; or, where a SIGTERM or a
    Ctrl-C stopped the run after a checkpoint, the summary so far with
    ``'preempted'``: the signal's name (``'SIGTERM'``, ``'SIGINT'``), and no file. Its
    ``eval_*`` figures are those of this process's last finished evaluation, of step
    ``eval_step`` (None where it finished none).

  Raises:
    data.DatasetNotFoundError: the dataset is not available (says where to put it).
    TrainingDivergedError: the loss became NaN or infinite.
    CheckpointWriteError: a checkpoint could not be written (the run stops at once).
    ConfigError: a config that cannot work, or a checkpoint of another model.
    WorkdirBusyError: another run is using ``workdir``.
    FileSystemError: a file of the run cannot be made, read or written.
  """
  workdir = pathlib.Path(workdir).absolute()
  try:
    made = not workdir.exists()
    if made:  # A new run is checked before its workdir is made: a refusal leaves none.
      checked = config_checks.validated(config, resuming=False)
    folders_made = workdir_lock.make_workdir(workdir)  # A file standing there: FileExistsError.
    with workdir_lock.locked_for_all_processes(workdir):
      try:
        if not made:  # Under the lock: a busy workdir is said to be before a dataset scan.
          resuming = bool(checkpointing.saved_steps(workdir / 'checkpoints'))
          checked = config_checks.validated(config, resuming)
        return _train_and_evaluate(*checked, workdir)
      except (ConfigError, OSError):  # Refused before training (init_from does not fit ...).
        if made and jax.process_index() == 0:
          workdir_lock.remove_if_unused(workdir, folders_made)
        raise
  except (checkpointing.CheckpointWriteError, data.DatasetNotFoundError):
    raise  # Their messages name the fix already.
  except OSError as error:
    if not getattr(error, 'filename', None) or '://' in str(error.filename):
      raise  # Not a file's (the network's, a URL's): its own message.
    raise FileSystemError(_file_problem(error, workdir)) from error


def _file_problem(error: OSError, workdir: pathlib.Path) -> str:
  """One line: which file, what went wrong, and the fix for that; for a file outside
  the workdir (a dataset's, ``init_from``'s), the fix of the setting that names it."""
  fixes = {
    errno.ENOSPC: 'free space on its disk',
    errno.EDQUOT: 'free space within your quota',
    errno.EACCES: 'make it writable',
    errno.EPERM: 'make it writable',
    errno.EROFS: 'give a path on a writable disk',
    errno.EEXIST: 'move the file that stands there',
    errno.ENOTDIR: 'move the file that stands in its path',
  }
  fix = fixes.get(error.errno, 'check its disk')
  if pathlib.Path(error.filename).absolute().is_relative_to(workdir):
    return f'{checkpointing.root_cause(error)}: {error.filename}: {fix}, or use another --workdir.'
  if error.errno in (errno.EACCES, errno.EPERM):
    fix = 'check its permissions'  # Read, or written (a dataset's files).
  setting = 'the setting that names it (dataset.data_dir, init_from, ...)'
  return f'{checkpointing.root_cause(error)}: {error.filename}: {fix}, or change {setting}.'


def _train_and_evaluate(config, classes, schedule: Schedule, workdir: pathlib.Path) -> dict:
  steps_per_epoch = schedule.steps_per_epoch
  mesh = Mesh(np.array(jax.devices()), ('data',))
  model = build_model(config, train=True)
  tx = optim.make_optimizer(config, steps_per_epoch, schedule.total_steps)
  size = config.dataset.image_size
  state = create_state(config, model, tx, mesh, (1, size, size, 3))
  check_steps_per_call(config, state.params)
  ckpt = checkpointing.Checkpoints(workdir / 'checkpoints', keep=config.keep_checkpoints)
  report = lambda line: print(line, file=sys.stderr)
  state, restored_meta = resume.restore(ckpt, state, config, report, classes, schedule.total_steps)
  start_step = int(jax.device_get(state.step))
  meta = _checkpoint_meta(config, classes, schedule)
  if start_step == 0:  # Not resumed (a step folder may have held no readable step).
    try:
      check_config(config)  # With what a resume skips: a source to start from.
      if qat_enabled(config) or config.get('init_from'):
        state = _fine_tune_from(config, state, NamedSharding(mesh, P()), classes)
    except ConfigError:
      saving.close_quietly(ckpt)
      raise
  else:
    config = resume.with_saved_sources(config, workdir)
  if jax.process_index() == 0:
    jsonfiles.write_json(workdir / run_files.CONFIG_FILE, config.to_dict())
    jsonfiles.write_json(workdir / run_files.CLASSES_FILE, meta['classes'])
  eval_models = build_model(config), build_model(config, deploy=True)
  train_fns, eval_fn, fuse_fn, sharded = _compile_steps(config, model, *eval_models, mesh)
  # Jitted, the logged rate is one small program rather than one per operation of the schedule.
  lr_fn = compile_options.jit(
    optim.learning_rate_schedule(config, steps_per_epoch, schedule.total_steps)
  )
  run = reporting.RunLog(config, workdir, schedule, start_step, lr_fn)
  stop_request = preemption.Preemption()
  try:
    compiled = (train_fns, eval_fn, fuse_fn, sharded)
    state, step, preempted = _loop(
      config, schedule, run, ckpt, state, start_step, stop_request, compiled, meta
    )
    ckpt.wait()  # Raises CheckpointWriteError if the last saves failed.
  finally:
    stop_request.restore()
    run.close()
    saving.close_quietly(ckpt)
  summary = run.summary(step)
  if step == start_step:  # Nothing trained (a finished run run again): its rate stands.
    summary['train_images_per_sec'] = _logged_rate(workdir, step, restored_meta)
  if preempted:
    return {**summary, 'preempted': stop_request.received}
  saving.save_deploy(config, workdir, fuse_fn, state, step, meta)
  if jax.process_index() == 0:
    jsonfiles.write_json(workdir / 'summary.json', summary)
  return summary


def _checkpoint_meta(config, classes, schedule: Schedule) -> dict:
  """What every checkpoint of the run records beside its state: the model and its
  classes, the settings a resume must find unchanged, and what the model is fed."""
  return {
    'model': config.model.name,
    'classes': list(classes) if classes else None,
    **resume.optimizer_meta(config),
    **{key: config[key] for key in resume.ORDER_SETTINGS},
    'total_steps': schedule.total_steps,
    # What the model is fed: predict and export read it from a checkpoint moved out of its run.
    'image_size': config.dataset.image_size,
    'eval_preprocess': config.dataset.eval_preprocess,
  }


def _loop(config, schedule, run, ckpt, state, step, stop_request, compiled, meta):
  """Steps until the end, a SIGTERM or a Ctrl-C; evaluates and checkpoints when due
  (with ``meta``)."""
  train_fns, eval_fn, fuse_fn, sharded = compiled
  batches = data.train_batches(
    config.dataset, global_batch_size=config.batch_size, seed=config.seed, start_step=step
  )
  mixup_rng = jax.random.key(config.seed + 1)
  # With one process a SIGTERM or Ctrl-C cuts an evaluation short; the resumed run redoes it.
  interruptible = stop_request if jax.process_count() == 1 else None

  def evaluated() -> bool:
    """Evaluates and logs the state at ``step``; False where a signal cut it short."""
    metrics = evaluation.evaluate(config, eval_fn, fuse_fn, state, sharded, interruptible)
    if metrics is not None:
      run.log_eval(step, metrics)
    return metrics is not None

  if _evaluation_missed(run, schedule, step) and not evaluated():
    return _stopped(run, stop_request, ckpt, state, step, evaluation_left=True, saved=False)
  while step < schedule.total_steps:
    count = schedule.steps_in_call(step)
    train_fn, batch_sharding = train_fns[count]
    batch = evaluation.global_batch(_next_batches(batches, count), batch_sharding)
    state, metrics = train_fn(state, batch, mixup_rng)
    step += count
    run.pending.append(metrics)
    save = schedule.due(step, schedule.checkpoint_every)
    evaluate_now = schedule.due(step, schedule.eval_every)
    if save or evaluate_now or schedule.due(step, schedule.log_every):
      ckpt.check()  # A failed background save stops the run here, not at the next save.
      run.log_train(step, ckpt.latest_step())
    if save:
      saving.save_checkpoint(ckpt, state, step, meta, run)
      if evaluate_now:  # Written before the evaluation: one that fails costs no training.
        ckpt.wait()
    evaluation_left = evaluate_now and not evaluated()
    # All processes must stop together: they agree at log steps when there are several.
    check_stop = jax.process_count() == 1 or schedule.due(step, schedule.log_every)
    stop = evaluation_left or (check_stop and stop_request.agreed())
    if stop and run.pending:  # The steps since the last log are logged, not lost.
      run.log_train(step, ckpt.latest_step())
    if stop and not save:
      saving.save_checkpoint(ckpt, state, step, meta, run)
    if stop:
      return _stopped(run, stop_request, ckpt, state, step, evaluation_left)
  # Restarted after the last step: evaluate for the summary.
  if not run.eval_metrics and not evaluated():
    return _stopped(run, stop_request, ckpt, state, step, evaluation_left=True, saved=False)
  return state, step, False


def _stopped(run, stop_request, ckpt, state, step: int, evaluation_left: bool, saved=True):
  """Says why the run stops at ``step``, whose checkpoint this run ``saved`` or resumed
  from; ``_loop``'s return."""
  checkpoint = f'the checkpoint of step {step}'
  where = f'saved {checkpoint} in' if saved else f'{checkpoint} is in'
  left = f'; the resumed run evaluates step {step}' if evaluation_left else ''
  run.bar.write(f'{stop_request.received}: {where} {ckpt.directory}{left}; stopping.')
  return state, step, True


def _evaluation_missed(run, schedule, step: int) -> bool:
  """Whether the run resumes at a step due an evaluation that its earlier run did not
  log (it failed, a signal cut it short, or the run was killed, after the checkpoint
  it follows was written)."""
  if not 0 < step < schedule.total_steps or not schedule.due(step, schedule.eval_every):
    return False  # The last step is evaluated after the loop in any case.
  missed = not run.writer.logged(step, ['eval/top1'])
  if jax.process_count() > 1:  # Only the first process reads the metrics: it decides.
    from jax.experimental import multihost_utils

    missed = bool(multihost_utils.broadcast_one_to_all(np.array(missed)))
  return missed


def _logged_rate(workdir: pathlib.Path, step: int, checkpoint_meta: dict) -> float | None:
  """The training rate of a finished run of ``step`` steps: the one its summary.json
  gives, or where it wrote none (its final evaluation failed), the one its last
  checkpoint (``checkpoint_meta``) was saved with."""
  try:
    summary = json.loads((workdir / 'summary.json').read_text())
  except (OSError, ValueError):
    summary = {}
  if summary.get('steps') == step:
    return summary.get('train_images_per_sec')
  return checkpoint_meta.get('train_images_per_sec')


def _next_batches(batches, count: int) -> dict:
  """The next batch, or the next ``count`` stacked on a leading axis."""
  if count == 1:
    return next(batches)
  parts = [next(batches) for _ in range(count)]
  return {key: np.stack([part[key] for part in parts]) for key in parts[0]}
