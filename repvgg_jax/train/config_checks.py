"""The checks a run passes before it trains: settings that cannot work, the dataset's
classes, the schedule. Each refusal is a `ConfigError` of one line that says the fix."""

from __future__ import annotations

import copy
import sys

import jax

from repvgg_jax import perf
from repvgg_jax.data import datasets as data
from repvgg_jax.data import in_memory, input_pipeline
from repvgg_jax.model import shapes, variant_from_config
from repvgg_jax.perf import xla_cpu
from repvgg_jax.train import finetune, qat
from repvgg_jax.train.durations import Schedule


class ConfigError(ValueError):
  """A config that cannot work, or a workdir holding another model's checkpoints."""


def qat_enabled(config) -> bool:
  """Whether ``config`` fine-tunes a fused model with fake int8 (`repvgg_jax.train.qat`)."""
  return 'qat' in config and bool(config.qat.enabled)


def check_config(config, *, resuming: bool = False) -> None:
  """Fails early, with the fix, on settings that cannot work; ``resuming``: the run
  goes on from a checkpoint (which holds the weights ``init_from`` would give)."""
  _check_run(config)
  _check_model(config, resuming)
  _check_optimizer(config.optimizer)
  _check_dataset(config.dataset)


def _check_run(config) -> None:
  """Batches over the devices (and BatchNorm groups), length, checkpoints, seed, average."""
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
  if config.keep_checkpoints < 1:
    raise ConfigError(
      f'keep_checkpoints must be at least 1 (the latest, which a resume needs), got '
      f'{config.keep_checkpoints}.'
    )
  if config.seed < 0:  # NumPy's seeds of the input pipeline are non-negative.
    raise ConfigError(f'seed must be a non-negative integer, got {config.seed}.')
  if not 0 <= config.get('ema_decay', 0.0) < 1:
    raise ConfigError(f'ema_decay must be in [0, 1) (0: no average), got {config.ema_decay}.')


def _check_model(config, resuming: bool) -> None:
  """The variant, the weights to start from (fine-tuning, QAT), precision, convolutions."""
  try:  # Its name, and where they are set num_blocks and width_multipliers.
    variant = variant_from_config(config)
  except ValueError as error:
    raise ConfigError(f'model: {error}') from None
  problem = qat.check_config(config, variant, resuming) if qat_enabled(config) else None
  problem = problem or finetune.check_config(config, resuming)
  if problem:
    raise ConfigError(problem)
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


def _check_dataset(dataset) -> None:
  """Splits, sizes, shuffling, and the names of the augmentation and preprocessing."""
  layers = dataset.get('randaugment_layers', 0)
  if layers < 0 or (layers and dataset.randaugment_magnitude < 1):
    raise ConfigError(
      'dataset.randaugment_layers must be >= 0 (0: off) and randaugment_magnitude >= 1, got '
      f'{layers} and {dataset.get("randaugment_magnitude")}.'
    )
  if dataset.get('shuffle_buffer', 1) < 1:
    raise ConfigError(
      f'dataset.shuffle_buffer must be at least 1 (1: no shuffling), got {dataset.shuffle_buffer}.'
    )
  if dataset.image_size < 1 or dataset.get('pad_pixels', 0) < 0:
    raise ConfigError(
      'dataset.image_size must be at least 1 and dataset.pad_pixels at least 0, got '
      f'{dataset.image_size} and {dataset.get("pad_pixels")}.'
    )
  try:
    data.check_splits(dataset)
  except ValueError as error:
    raise ConfigError(str(error)) from None
  choices = (
    ('train_augment', input_pipeline.TRAIN_AUGMENTATIONS),
    ('crop_sampler', input_pipeline.CROP_SAMPLERS),
    ('eval_preprocess', input_pipeline.EVAL_PREPROCESSING),
  )
  for field, known in choices:  # Else the first evaluation would fail, an epoch in.
    if dataset[field] not in known:
      raise ConfigError(f'dataset.{field} is {dataset[field]!r}: choose one of {", ".join(known)}.')


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
  layers = shapes.block_layers(params, config.dataset.image_size)
  if qat_enabled(config):  # Its quantized convolutions are XLA's, whatever conv_impl says.
    impl, fix = 'xla', 'set steps_per_call=1 (QAT convolves with XLA)'
  else:
    impl, fix = config.model.conv_impl, "set steps_per_call=1, or model.conv_impl='im2col'"
  try:
    xla_cpu.check_steps_per_call(impl, layers, config.steps_per_call, fix, backend)
  except ValueError as error:
    raise ConfigError(str(error)) from None


def validated(config, resuming: bool) -> tuple[object, tuple[str, ...] | None, Schedule]:
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
