"""Data-parallel training and evaluation: `train_and_evaluate(config, workdir)`.

The state is replicated and the batch sharded over a one-axis ``Mesh`` of all
devices (all hosts); one jitted step runs on global arrays, so BatchNorm sees
the global batch unless ``config.model.bn_group_size`` asks for fixed groups.
Checkpoints go to ``workdir/checkpoints`` and a run resumes from the latest
one; at the end the fused deploy model is saved to ``workdir/deploy``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import functools
import json
import os
import pathlib
import signal
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from repvgg_jax import jsonfiles, perf
from repvgg_jax.data import datasets as data
from repvgg_jax.data import in_memory, input_pipeline
from repvgg_jax.model import fusion, model_from_config, trees, variant_from_config
from repvgg_jax.perf import compile_options, xla_cpu
from repvgg_jax.train import (
  checkpointing,
  finetune,
  optim,
  qat,
  reporting,
  run_files,
  steps,
  workdir_lock,
)
from repvgg_jax.train.reporting import TrainingDivergedError


class ConfigError(ValueError):
  """A config that cannot work, or a workdir holding another model's checkpoints."""


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


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Every duration of a run in steps, and the one test of 'is it time?'."""

  total_steps: int
  steps_per_epoch: int
  log_every: int
  eval_every: int
  checkpoint_every: int
  steps_per_call: int = 1

  @classmethod
  def from_config(cls, config, steps_per_epoch: int) -> Schedule:
    total = config.num_train_steps if config.num_train_steps > 0 else None
    total = total or int(round(config.num_epochs * steps_per_epoch))
    eval_every = int(round(config.eval_every_epochs * steps_per_epoch)) or total
    return cls(
      total,
      steps_per_epoch,
      config.log_every_steps,
      eval_every,
      config.checkpoint_every_steps,
      config.steps_per_call,
    )

  def due(self, step: int, every: int) -> bool:
    """True every ``every`` steps and at the last step (``every`` <= 0: only at the end)."""
    return step == self.total_steps or (every > 0 and step % every == 0)

  def steps_in_call(self, step: int) -> int:
    """Steps the next call runs after ``step``: ``steps_per_call``, or 1 where a log,
    evaluation or checkpoint falls due before the last of them (they run between calls)."""
    count = self.steps_per_call
    if count == 1 or step + count > self.total_steps:
      return 1
    everies = (self.log_every, self.eval_every, self.checkpoint_every)
    inside = range(step + 1, step + count)
    return 1 if any(self.due(s, every) for s in inside for every in everies) else count


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


def qat_enabled(config) -> bool:
  """Whether ``config`` fine-tunes a fused model with fake int8 (`repvgg_jax.train.qat`)."""
  return 'qat' in config and bool(config.qat.enabled)


def check_config(config, *, resuming: bool = False) -> None:
  """Fails early, with the fix, on settings that cannot work; ``resuming``: the run
  goes on from a checkpoint (which holds the weights ``init_from`` would give)."""
  for field in ('batch_size', 'eval_batch_size', 'steps_per_call'):
    if config[field] < 1:
      raise ConfigError(f'{field} must be a positive number, got {config[field]}.')
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    raise ConfigError(
      f'num_epochs must be positive, got {config.num_epochs} (or give num_train_steps > 0).'
    )
  devices = jax.device_count()
  if config.batch_size % devices:
    raise ConfigError(
      f'batch_size {config.batch_size} is not divisible by the {devices} devices: '
      f'use a multiple of {devices} (--config.batch_size=...).'
    )
  if config.eval_batch_size % devices:
    raise ConfigError(
      f'eval_batch_size {config.eval_batch_size} is not divisible by the {devices} devices.'
    )
  group = config.model.bn_group_size
  if group > 0 and config.batch_size % group:
    raise ConfigError(
      f'batch_size {config.batch_size} does not split into BatchNorm groups of '
      f'model.bn_group_size={group}: use a multiple of it, or 0 for whole-batch statistics.'
    )
  if group > 0 and (config.batch_size // group) % devices:
    raise ConfigError(
      f'{config.batch_size // group} BatchNorm groups of {group} cannot be spread evenly '
      f'over {devices} devices: make batch_size / bn_group_size a multiple of {devices}.'
    )
  try:  # Its name, and where they are set num_blocks and width_multipliers.
    variant = variant_from_config(config)
  except ValueError as error:
    raise ConfigError(f'model: {error}') from None
  problem = qat.check_config(config, variant, resuming) if qat_enabled(config) else None
  problem = problem or finetune.check_config(config, resuming)
  if problem:
    raise ConfigError(problem)
  _check_optimizer(config.optimizer)
  layers = config.dataset.get('randaugment_layers', 0)
  if layers < 0 or (layers and config.dataset.randaugment_magnitude < 1):
    raise ConfigError(
      'dataset.randaugment_layers must be >= 0 (0: off) and randaugment_magnitude >= 1, got '
      f'{layers} and {config.dataset.get("randaugment_magnitude")}.'
    )
  if not 0 <= config.get('ema_decay', 0.0) < 1:
    raise ConfigError(f'ema_decay must be in [0, 1) (0: no average), got {config.ema_decay}.')
  if config.model.dtype not in ('float32', 'bfloat16'):
    raise ConfigError(f"model.dtype must be 'float32' or 'bfloat16', got {config.model.dtype!r}.")
  conv_impl = config.model.get('conv_impl', 'auto')
  if conv_impl not in perf.CONV_IMPLS:
    raise ConfigError(
      f'model.conv_impl must be one of {", ".join(perf.CONV_IMPLS)}, got {conv_impl!r}.'
    )
  if qat_enabled(config) and conv_impl not in ('auto', 'xla'):  # Else silently XLA's.
    raise ConfigError(
      f"QAT computes XLA's convolutions (Qwix quantizes those), not {conv_impl!r}: set "
      "model.conv_impl='xla'."
    )
  if config.keep_checkpoints < 1:
    raise ConfigError(
      f'keep_checkpoints must be at least 1 (the latest, which a resume needs), got '
      f'{config.keep_checkpoints}.'
    )
  if config.seed < 0:  # NumPy's seeds of the input pipeline are non-negative.
    raise ConfigError(f'seed must be a non-negative integer, got {config.seed}.')
  if config.dataset.get('shuffle_buffer', 1) < 1:
    raise ConfigError(
      f'dataset.shuffle_buffer must be at least 1 (1: no shuffling), got '
      f'{config.dataset.shuffle_buffer}.'
    )
  if config.dataset.image_size < 1 or config.dataset.get('pad_pixels', 0) < 0:
    raise ConfigError(
      'dataset.image_size must be at least 1 and dataset.pad_pixels at least 0, got '
      f'{config.dataset.image_size} and {config.dataset.get("pad_pixels")}.'
    )
  try:
    data.check_splits(config.dataset)
  except ValueError as error:
    raise ConfigError(str(error)) from None
  choices = (
    ('train_augment', input_pipeline.TRAIN_AUGMENTATIONS),
    ('crop_sampler', input_pipeline.CROP_SAMPLERS),
    ('eval_preprocess', input_pipeline.EVAL_PREPROCESSING),
  )
  for field, known in choices:  # Else the first evaluation would fail, an epoch in.
    if config.dataset[field] not in known:
      raise ConfigError(
        f'dataset.{field} is {config.dataset[field]!r}: choose one of {", ".join(known)}.'
      )


def _check_schedule(config, schedule: Schedule) -> None:
  """Refuses a run of no step; warns where the warm-up leaves no cosine decay."""
  if schedule.total_steps < 1:
    raise ConfigError(
      f'num_epochs={config.num_epochs} is {schedule.total_steps} steps of '
      f'{schedule.steps_per_epoch} per epoch: raise it, or set num_train_steps.'
    )
  warmup = int(config.optimizer.warmup_epochs * schedule.steps_per_epoch)
  if warmup >= schedule.total_steps and jax.process_index() == 0:
    print(
      f'warning: the warm-up ({warmup} steps, optimizer.warmup_epochs='
      f'{config.optimizer.warmup_epochs}) lasts the whole run ({schedule.total_steps} '
      'steps): the learning rate never reaches its peak nor decays.',
      file=sys.stderr,
    )


def dataset_classes(config) -> tuple[tuple[str, ...] | None, object]:
  """The dataset's class names (None where it names none) and ``config`` with
  ``dataset.num_classes`` set from them where it is None; refuses a classifier
  whose size is not the dataset's number of classes.

  Raises:
    DatasetNotFoundError: the dataset is missing (says where to put it).
    ConfigError: a bad image folder, or a number of classes that does not fit.
  """
  if config.dataset.in_memory and data.is_folder(config.dataset):  # Before any scan.
    raise ConfigError('dataset.in_memory reads tfds datasets only: set it False for a folder.')
  try:
    classes = data.class_names(config.dataset)
  except data.FolderError as error:
    raise ConfigError(str(error)) from None
  if config.dataset.num_classes is None:
    if classes is None:
      raise ConfigError(f'{config.dataset.name} names no classes: set dataset.num_classes.')
    config = copy.deepcopy(config)
    config.dataset.num_classes = len(classes)
  if classes and len(classes) != config.dataset.num_classes:
    raise ConfigError(
      f'dataset.num_classes is {config.dataset.num_classes} but {config.dataset.name} has '
      f'{len(classes)} classes: set --config.dataset.num_classes={len(classes)}.'
    )
  return classes, config


def check_steps_per_call(config, params, backend: str | None = None) -> None:
  """Refuses several steps per call where XLA's CPU convolution would run in the loop
  (`perf.xla_cpu.check_steps_per_call`)."""
  layers = fusion.block_layers(params, config.dataset.image_size)
  if qat_enabled(config):  # Its quantized convolutions are XLA's, whatever conv_impl says.
    impl, fix = 'xla', 'set steps_per_call=1 (QAT convolves with XLA)'
  else:
    impl, fix = config.model.conv_impl, "set steps_per_call=1, or model.conv_impl='im2col'"
  try:
    xla_cpu.check_steps_per_call(impl, layers, config.steps_per_call, fix, backend)
  except ValueError as error:
    raise ConfigError(str(error)) from None


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


def _state_tree(state: steps.TrainState) -> dict:
  tree = {
    'step': state.step,
    'params': state.params,
    'batch_stats': state.batch_stats,
    'opt_state': state.opt_state,
  }
  return tree if state.ema is None else {**tree, 'ema': state.ema}


# The settings that shape the optimizer's state: key -> (its config section, its value where
# a checkpoint or a config predates it).
_OPTIMIZER_SETTINGS = {
  'freeze_stages': (None, 0),
  'backbone_lr_multiplier': ('optimizer', 1.0),
  'bias_lr_multiplier': ('optimizer', 1.0),
}


def optimizer_meta(config) -> dict:
  """The settings that shape the optimizer's state, kept in every checkpoint's metadata."""
  return {
    key: (config[section] if section else config).get(key, default)
    for key, (section, default) in _OPTIMIZER_SETTINGS.items()
  }


# Settings that a resume may change, but then does not continue the run exactly:
# the data order follows them (and the steps of an epoch the batch size).
_ORDER_SETTINGS = ('batch_size', 'seed')


def _order_changes(config, meta: dict, total_steps: int) -> list[str]:
  """A warning for each of `_ORDER_SETTINGS` that ``config`` changes from the checkpoint's,
  and for another length of the run (``total_steps``)."""
  lines = [
    f'warning: resuming a run trained with {key}={meta[key]} with {key}={config[key]}: '
    'the data order'
    + (' and the schedule of epochs change' if key == 'batch_size' else ' changes')
    + f' (--config.{key}={meta[key]} resumes it exactly).'
    for key in _ORDER_SETTINGS
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


def _check_optimizer(optimizer) -> None:
  """Refuses optimizer settings that no run means (negative, NaN, or a momentum of 1
  or more: the run would train nonsense without a word). A rate of 0 keeps the
  weights, as a check of a fine-tuning set-up may want."""
  ranges = {  # field: (what it must be, test)
    'learning_rate': ('>= 0 (the peak rate per 256 images)', lambda x: x >= 0),
    'momentum': ('in [0, 1)', lambda x: 0 <= x < 1),
    'weight_decay': ('>= 0 (0: none)', lambda x: x >= 0),
    'warmup_epochs': ('>= 0 (0: none)', lambda x: x >= 0),
    'label_smoothing': ('in [0, 1) (0: none)', lambda x: 0 <= x < 1),
    'mixup_alpha': ('>= 0 (0: off)', lambda x: x >= 0),
    'cutmix_alpha': ('>= 0 (0: off)', lambda x: x >= 0),
  }
  for field, (wanted, holds) in ranges.items():
    value = optimizer.get(field)
    if value is not None and not holds(value):
      raise ConfigError(f'optimizer.{field} must be {wanted}, got {value}.')


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
    section, default = _OPTIMIZER_SETTINGS[key]
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


def _restore(
  ckpt: checkpointing.Checkpoints, state: steps.TrainState, config, report, classes, total_steps
):
  """``(state, metadata)`` of the newest readable checkpoint, loaded into ``state``'s
  structure; ``(state, {})`` where there is none.

  Unreadable steps are moved aside and reported (`Checkpoints.restore_newest_readable`);
  a checkpoint of another model or setting is refused (ConfigError) and kept.
  """
  abstract = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), _state_tree(state)
  )

  def read(step: int):
    # Every process reads as many times: orbax's reads wait for all of them.
    meta = ckpt.restore_meta(step)
    problem = _resume_problem(config, meta, ckpt.abstract_state(step), abstract, classes)
    if problem:
      raise checkpointing.CheckpointMismatch(f'The checkpoint in {ckpt.directory} {problem}.')
    if jax.process_index() == 0:
      for line in _order_changes(config, meta, total_steps):
        report(line)
    tree, _ = ckpt.restore(abstract, step=step)
    return tree, meta

  try:
    restored = ckpt.restore_newest_readable(read, report)
  except (checkpointing.CheckpointMismatch, checkpointing.CorruptCheckpointsError) as error:
    raise ConfigError(str(error)) from None
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


class _Preemption:
  """Turns SIGTERM and a first Ctrl-C (SIGINT) into a flag that the loop checks between
  calls of the step; a second Ctrl-C interrupts at once, as without it. A SIGINT that
  the process ignores (a background job's) stays ignored."""

  def __init__(self):
    self.received: str | None = None  # The name of the first signal, e.g. 'SIGTERM'.
    signals = [signal.SIGTERM]
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
      signals.append(signal.SIGINT)
    self._previous = {signum: signal.signal(signum, self._handle) for signum in signals}

  @property
  def requested(self) -> bool:
    return self.received is not None

  def _handle(self, signum, frame):
    del frame
    self.received = self.received or signal.Signals(signum).name
    if signum == signal.SIGINT:
      previous = self._previous[signal.SIGINT]
      signal.signal(signal.SIGINT, previous if callable(previous) else signal.default_int_handler)
      # To the file descriptor: the handler may run inside a write to sys.stderr (the
      # progress bar's), which a second write there would break.
      with contextlib.suppress(OSError):
        os.write(
          2,
          b'\nCtrl-C: the run saves a checkpoint at its next stop and exits (Ctrl-C again '
          b'stops at once, losing the steps since the last checkpoint).\n',
        )

  def agreed(self) -> bool:
    """Whether any process was asked to stop (all processes must stop together); a
    process that received no signal takes that of the lowest-numbered one that did."""
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils

    names = [signal.Signals.SIGTERM, signal.Signals.SIGINT]
    mine = 0 if self.received is None else 1 + names.index(signal.Signals[self.received])
    codes = np.asarray(multihost_utils.process_allgather(np.array(mine))).ravel()
    if self.received is None and codes.any():
      self.received = names[int(codes[np.flatnonzero(codes)[0]]) - 1].name
    return bool(codes.any())

  def restore(self):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)


def _global_batch(batch: dict, sharding: NamedSharding) -> dict:
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def evaluate(config, eval_fn, fuse_fn, state, sharding) -> dict[str, float]:
  """Top-1 and top-5 of the training-time and fused models over the eval split; with
  a moving average of the weights, of its two models too (``eval/ema_...``), in the
  same pass over the images."""
  weights = {'eval/': {'params': state.params, 'batch_stats': state.batch_stats}}
  if state.ema is not None:
    weights['eval/ema_'] = state.ema
  fused = {prefix: fuse_fn(variables) for prefix, variables in weights.items()}
  totals = dict.fromkeys(weights)
  for batch in data.eval_batches(config.dataset, global_batch_size=config.eval_batch_size):
    batch = _global_batch(batch, sharding)
    for prefix, variables in weights.items():
      counts = eval_fn(variables, fused[prefix], batch)
      totals[prefix] = (
        counts if totals[prefix] is None else jax.tree.map(jnp.add, totals[prefix], counts)
      )
  metrics = {}
  for prefix, total in jax.device_get(totals).items():
    count = max(int(total['count']), 1)
    names = ('top1', 'top5', 'loss', 'top1_fused', 'top5_fused')
    metrics |= {f'{prefix}{name}': float(total[name]) / count for name in names}
  return metrics


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


def _finite(tree) -> bool:
  """Whether every element of a replicated ``tree`` is finite, checked in this process's copy.

  On the host, not jitted: a program reducing each leaf took 0.65 s to compile
  on a first run (the digits config on 2 cores), NumPy takes milliseconds.
  """
  return all(np.isfinite(np.asarray(x.addressable_data(0))).all() for x in jax.tree.leaves(tree))


def train_and_evaluate(config, workdir: str | pathlib.Path) -> dict:
  """Trains ``config`` in ``workdir``, resuming from its latest checkpoint.

  Returns:
    The summary written to ``workdir/summary.json``; or, where a SIGTERM or a
    Ctrl-C stopped the run after a checkpoint, the summary so far with
    ``'preempted'``: the signal's name (``'SIGTERM'``, ``'SIGINT'``), and no file.

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
      checked = _validated(config, resuming=False)
    workdir.mkdir(parents=True, exist_ok=True)  # A file standing there: FileExistsError.
    with _locked_for_all_processes(workdir):
      try:
        if not made:  # Under the lock: a busy workdir is said to be before a dataset scan.
          resuming = bool(checkpointing.saved_steps(workdir / 'checkpoints'))
          checked = _validated(config, resuming)
        return _train_and_evaluate(*checked, workdir)
      except (ConfigError, OSError):  # Refused before training (init_from does not fit ...).
        if made and jax.process_index() == 0:
          _remove_if_unused(workdir)
        raise
  except (checkpointing.CheckpointWriteError, data.DatasetNotFoundError):
    raise  # Their messages name the fix already.
  except OSError as error:
    if not getattr(error, 'filename', None) or '://' in str(error.filename):
      raise  # Not a file's (the network's, a URL's): its own message.
    raise FileSystemError(_file_problem(error, workdir)) from error


def _with_saved_sources(config, workdir: pathlib.Path):
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


def _remove_if_unused(workdir: pathlib.Path) -> None:
  """Removes a workdir this run made, under its lock, where it holds only the lock
  file and an empty checkpoint directory: a run refused before its first step
  leaves nothing behind. Each removal fails, harmlessly, on anything else there."""
  checkpoints = workdir / 'checkpoints'
  try:
    if not {path.name for path in workdir.iterdir()} <= {workdir_lock.LOCK_FILE, checkpoints.name}:
      return
    if checkpoints.is_dir():
      checkpoints.rmdir()
    (workdir / workdir_lock.LOCK_FILE).unlink()
    workdir.rmdir()
  except OSError:
    pass  # Something was written meanwhile: it stays.


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


@contextlib.contextmanager
def _locked_for_all_processes(workdir: pathlib.Path):
  """Holds ``workdir``'s lock in the first process for all of them. Every process
  learns whether it got it before any work: a busy workdir stops them all at once
  (the others would otherwise wait on the first in a collective until it timed out).

  Raises:
    WorkdirBusyError: in every process, where another run holds the lock.
  """
  if jax.process_count() == 1:
    with workdir_lock.workdir_lock(workdir):
      yield
    return
  from jax.experimental import multihost_utils

  with contextlib.ExitStack() as stack:
    failed = None
    if jax.process_index() == 0:
      try:
        stack.enter_context(workdir_lock.workdir_lock(workdir))
      except Exception as error:  # noqa: BLE001 (busy, or no lock to take: the others must know)
        failed = error
    if not multihost_utils.broadcast_one_to_all(np.array(failed is None)):
      raise failed or workdir_lock.WorkdirBusyError(
        f'The first process could not take the lock of {workdir} (its error says why): wait '
        'for the run that holds it, or use another --workdir.'
      )
    yield


def _validated(config, resuming: bool) -> tuple[object, tuple[str, ...] | None, Schedule]:
  """Every check that needs no model and no workdir: ``config`` with the dataset's
  number of classes filled in, the class names, and the run's schedule.

  Raises:
    ConfigError: a setting that cannot work (with the fix).
    DatasetNotFoundError: the dataset is missing (says where to put it).
  """
  check_config(config, resuming=resuming)
  classes, config = dataset_classes(config)  # Fails at once when the dataset is missing.
  if config.dataset.in_memory:
    try:
      in_memory.check_supported(data.get_builder(config.dataset), config.dataset)
    except ValueError as error:
      raise ConfigError(str(error)) from None
  try:
    steps_per_epoch = data.steps_per_epoch(config.dataset, config.batch_size)
  except ValueError as error:  # A batch larger than the training split, an unknown split.
    raise ConfigError(str(error)) from None
  if not data.is_folder(config.dataset):  # Else the first evaluation fails, an epoch in.
    try:
      data.num_examples(config.dataset, config.dataset.eval_split)
    except ValueError as error:
      raise ConfigError(f'dataset.eval_split: {error}') from None
  schedule = Schedule.from_config(config, steps_per_epoch)
  _check_schedule(config, schedule)
  return config, classes, schedule


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
  state, restored_meta = _restore(ckpt, state, config, report, classes, schedule.total_steps)
  start_step = int(jax.device_get(state.step))
  meta = {
    'model': config.model.name,
    'classes': list(classes) if classes else None,
    **optimizer_meta(config),
    **{key: config[key] for key in _ORDER_SETTINGS},
    'total_steps': schedule.total_steps,
    # What the model is fed: predict and export read it from a checkpoint moved out of its run.
    'image_size': config.dataset.image_size,
    'eval_preprocess': config.dataset.eval_preprocess,
  }
  if start_step == 0:  # Not resumed (a step folder may have held no readable step).
    try:
      check_config(config)  # With what a resume skips: a source to start from.
      if qat_enabled(config) or config.get('init_from'):
        state = _fine_tune_from(config, state, NamedSharding(mesh, P()), classes)
    except ConfigError:
      _close_quietly(ckpt)
      raise
  else:
    config = _with_saved_sources(config, workdir)
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
  preemption = _Preemption()
  try:
    state, step, preempted = _loop(
      config,
      schedule,
      run,
      ckpt,
      state,
      start_step,
      preemption,
      (train_fns, eval_fn, fuse_fn, sharded),
      meta,
    )
    ckpt.wait()  # Raises CheckpointWriteError if the last saves failed.
  finally:
    preemption.restore()
    run.close()
    _close_quietly(ckpt)
  summary = run.summary(step)
  if step == start_step:  # Nothing trained (a finished run run again): its rate stands.
    summary['train_images_per_sec'] = _logged_rate(workdir, step, restored_meta)
  if preempted:
    return {**summary, 'preempted': preemption.received}
  _save_deploy(config, workdir, fuse_fn, state, step, meta)
  if jax.process_index() == 0:
    jsonfiles.write_json(workdir / 'summary.json', summary)
  return summary


def _loop(config, schedule, run, ckpt, state, step, preemption, compiled, meta):
  """Steps until the end, a SIGTERM or a Ctrl-C; evaluates and checkpoints when due
  (with ``meta``)."""
  train_fns, eval_fn, fuse_fn, sharded = compiled
  batches = data.train_batches(
    config.dataset, global_batch_size=config.batch_size, seed=config.seed, start_step=step
  )
  mixup_rng = jax.random.key(config.seed + 1)
  if _evaluation_missed(run, schedule, step):
    run.log_eval(step, evaluate(config, eval_fn, fuse_fn, state, sharded))
  while step < schedule.total_steps:
    count = schedule.steps_in_call(step)
    train_fn, batch_sharding = train_fns[count]
    batch = _global_batch(_next_batches(batches, count), batch_sharding)
    state, metrics = train_fn(state, batch, mixup_rng)
    step += count
    run.pending.append(metrics)
    save = schedule.due(step, schedule.checkpoint_every)
    evaluate_now = schedule.due(step, schedule.eval_every)
    if save or evaluate_now or schedule.due(step, schedule.log_every):
      ckpt.check()  # A failed background save stops the run here, not at the next save.
      run.log_train(step, ckpt.latest_step())
    if save:
      _save(ckpt, state, step, meta, run)
      if evaluate_now:  # Written before the evaluation: one that fails costs no training.
        ckpt.wait()
    if evaluate_now:
      run.log_eval(step, evaluate(config, eval_fn, fuse_fn, state, sharded))
    # All processes must stop together: they agree at log steps when there are several.
    check_stop = jax.process_count() == 1 or schedule.due(step, schedule.log_every)
    stop = check_stop and preemption.agreed()
    if stop and run.pending:  # The steps since the last log are logged, not lost.
      run.log_train(step, ckpt.latest_step())
    if stop and not save:
      _save(ckpt, state, step, meta, run)
    if stop:
      stopped_by = preemption.received
      saved = f'saved the checkpoint of step {step} in {ckpt.directory}'
      run.bar.write(f'{stopped_by}: {saved}; stopping.')
      return state, step, True
  if not run.eval_metrics:  # Restarted after the last step: evaluate for the summary.
    run.log_eval(step, evaluate(config, eval_fn, fuse_fn, state, sharded))
  return state, step, False


def _evaluation_missed(run, schedule, step: int) -> bool:
  """Whether the run resumes at a step due an evaluation that its earlier run did not
  log (it failed, or the run was killed, after the checkpoint it follows was written)."""
  if not 0 < step < schedule.total_steps or not schedule.due(step, schedule.eval_every):
    return False  # The last step is evaluated after the loop in any case.
  missed = not run.writer.logged(step, ['eval/top1'])
  if jax.process_count() > 1:  # Only the first process reads the metrics: it decides.
    from jax.experimental import multihost_utils

    missed = bool(multihost_utils.broadcast_one_to_all(np.array(missed)))
  return missed


def _save(ckpt: checkpointing.Checkpoints, state, step: int, meta: dict, run) -> None:
  """Checkpoints ``state`` at ``step`` in the background; refuses non-finite parameters
  or BatchNorm statistics (activations that overflowed leave the parameters finite)."""
  for part in ('params', 'batch_stats'):
    if not _finite(getattr(state, part)):
      raise TrainingDivergedError(
        f'The {part} are not finite after step {step}: not checkpointed; the last good '
        f'checkpoint (step {ckpt.latest_step()}) is kept. Lower optimizer.learning_rate.'
      )
  # With the rate so far, which a rerun reports if the final evaluation fails.
  rate = {'train_images_per_sec': run.images_per_sec()}
  ckpt.save(step, _state_tree(state), {**meta, 'step': step, **rate})
  run.throughput.lap(0)  # Checkpointing time is not training time.


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


def _close_quietly(ckpt: checkpointing.Checkpoints) -> None:
  """Finishes and closes the checkpoints; a failure was reported already, or is being."""
  with contextlib.suppress(Exception):
    ckpt.wait()
  with contextlib.suppress(Exception):
    ckpt.close()


def _next_batches(batches, count: int) -> dict:
  """The next batch, or the next ``count`` stacked on a leading axis."""
  if count == 1:
    return next(batches)
  parts = [next(batches) for _ in range(count)]
  return {key: np.stack([part[key] for part in parts]) for key in parts[0]}


def _save_deploy(config, workdir: pathlib.Path, fuse_fn, state, step: int, meta: dict) -> None:
  """Saves the fused deploy variables next to the training checkpoints (once per step):
  ``deploy/``, and ``deploy_ema/`` from the moving average when the run keeps one."""
  models = {'deploy': {'params': state.params, 'batch_stats': state.batch_stats}}
  if state.ema is not None:
    models['deploy_ema'] = state.ema
  meta = {
    **meta,
    'deploy': True,
    'num_classes': config.dataset.num_classes,
    'step': step,
  }
  for name, variables in models.items():
    ckpt = checkpointing.Checkpoints(workdir / name, keep=1)
    try:
      if ckpt.latest_step() != step:
        ckpt.save(step, fuse_fn(variables), {**meta, 'ema': name == 'deploy_ema'})
        ckpt.wait()
    except checkpointing.CheckpointWriteError as error:  # It names no training checkpoint.
      _close_quietly(ckpt)
      raise checkpointing.CheckpointWriteError(
        f'Saving the fused model of step {step} to {workdir / name} failed: '
        f'{checkpointing.root_cause(error.__cause__ or error)}. The training checkpoint of '
        f'step {step} is kept; fix the cause and run the same command to write the fused model.'
      ) from error
    ckpt.close()
