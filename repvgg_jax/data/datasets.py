"""Training and evaluation batches from tfds: per process, deterministic and resumable.

A training batch is a pure function of ``(seed, step)``: epoch ``e`` is shuffled with a seed
derived from ``(seed, e)``, every example is augmented with stateless randomness keyed by
``(seed, e, process, its index in the epoch)``, and a run resumed at ``step`` skips the
records of the batches before it without decoding them. Evaluation makes one padded pass in
which every process yields the same number of batches, so jitted multi-host steps stay in step.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from repvgg_jax.data import batching, folder, in_memory, input_pipeline
from repvgg_jax.data import digits as digits_dataset

# Built offline from scikit-learn on first use; importing the module registered it with tfds.
OFFLINE_DATASETS = (digits_dataset.SklearnDigits.name,)
IMAGENET_ARCHIVES = ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')

Batch = dict[str, np.ndarray]
FolderError = folder.FolderError


class DatasetNotFoundError(FileNotFoundError):
  """The dataset is not prepared and cannot be prepared without the user's help."""


def _tfds_is_mocked() -> bool:
  """Whether ``tfds.testing.mock_data`` is active.

  It fakes ``as_dataset`` and makes ``download_and_prepare`` a no-op, so an unprepared dataset
  is no error there. It leaves ``is_prepared`` alone, hence this check on what it patches.
  """
  prepare = tfds.core.DatasetBuilder.download_and_prepare
  return getattr(prepare, '__module__', '') == 'tensorflow_datasets.testing.mocking'


def _imagenet_manual_dir(builder: tfds.core.DatasetBuilder, manual_dir: str | None) -> str:
  """The folder that holds the ImageNet archives, or an error saying where to put them.

  tfds cannot download ImageNet (its licence needs a sign-up), so this fails at once, before
  any network access, when the archives are missing.
  """
  manual_dir = manual_dir or os.path.join(builder.data_dir_root, 'downloads', 'manual')
  manual_dir = os.path.expanduser(manual_dir)
  missing = [
    name for name in IMAGENET_ARCHIVES if not os.path.isfile(os.path.join(manual_dir, name))
  ]
  if missing:
    raise DatasetNotFoundError(
      f'ImageNet (imagenet2012) is not prepared in {builder.data_dir_root} and cannot be '
      f'downloaded automatically. Download {" and ".join(IMAGENET_ARCHIVES)} from '
      f'https://image-net.org/download-images (free sign-up) and put them in {manual_dir} '
      f'(missing now: {", ".join(missing)}), or point --config.dataset.manual_dir at the '
      'folder that holds them. The next run then converts them once into tfds records under '
      f'{builder.data_dir} (a few hours, about 150 GB); later runs read those records.'
    )
  return manual_dir


def get_builder(config) -> tfds.core.DatasetBuilder:
  """The tfds builder of ``config.name``, prepared, or a clear error when it cannot be.

  Args:
    config: the dataset config; reads ``name``, ``data_dir``, ``download`` and, for
      imagenet2012, ``manual_dir``.

  Returns:
    A builder whose ``as_dataset`` reads prepared records (or fakes them under
    ``tfds.testing.mock_data``).

  Raises:
    DatasetNotFoundError: the name is unknown, or the dataset is not prepared and either
      downloads are off or, for ImageNet, the manually downloaded archives are missing.
  """
  data_dir = os.path.expanduser(config.data_dir) if config.data_dir else None
  try:
    builder = tfds.builder(config.name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise DatasetNotFoundError(
      f'Unknown dataset {config.name!r}: use a tfds name such as imagenet2012, cifar10 or '
      f'mnist (`tfds.list_builders()` lists them all), or the embedded {OFFLINE_DATASETS[0]!r}.'
    ) from None
  except (ValueError, AssertionError) as error:  # A malformed name, or no such config or version.
    reason = str(error).splitlines()[0].split('": ')[-1] if str(error) else type(error).__name__
    reason = reason.split(' Here are ')[0].rstrip('.')  # tfds's close names: on other lines.
    raise DatasetNotFoundError(
      f'Cannot build dataset {config.name!r}: {reason}. Give a tfds name, or name/config or '
      'name:version as `tfds.builder` takes them (e.g. cifar10, or imagenet2012:5.1.0).'
    ) from None
  if builder.is_prepared() or _tfds_is_mocked():
    return builder
  download_config = _download_config(builder, config)  # Fails before anything is written.
  with _preparing(builder):  # Processes sharing the data dir prepare it once, in turn.
    builder = tfds.builder(config.name, data_dir=data_dir)
    if not builder.is_prepared():
      _prepare(builder, download_config)
  return builder


def _download_config(builder: tfds.core.DatasetBuilder, config):
  """How tfds prepares ``builder``'s dataset here (None: its defaults, downloading);
  a DatasetNotFoundError saying why where it cannot."""
  if builder.name in OFFLINE_DATASETS:
    return tfds.download.DownloadConfig(try_download_gcs=False)
  if builder.name == 'imagenet2012':
    manual_dir = _imagenet_manual_dir(builder, config.manual_dir)
    return tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False)
  if config.download:
    return None
  raise DatasetNotFoundError(
    f'Dataset {config.name!r} is not prepared in {builder.data_dir_root} and downloads are '
    'off. Let this run download and prepare it with --config.dataset.download=True, or '
    f'prepare it beforehand with `tfds build {config.name} --data_dir={builder.data_dir_root}`.'
  )


@contextlib.contextmanager
def _preparing(builder: tfds.core.DatasetBuilder):
  """Holds an exclusive lock on preparing ``builder``'s dataset in its data dir (a
  local, writable one: tfds prepares a remote one, ``gs://...``, unguarded). Two processes
  preparing at once (the local processes of a multi-process run, two runs started
  together) would collide renaming their records into place."""
  root, lock = str(builder.data_dir_root), None
  if '://' not in root:
    with contextlib.suppress(OSError):  # Preparing it there fails, if it does, on its own.
      os.makedirs(root, exist_ok=True)
      lock = open(os.path.join(root, f'.{builder.name}.prepare.lock'), 'w')  # noqa: SIM115
  if lock is None:
    yield
    return
  with lock:
    try:
      _lock_exclusively(lock, f'preparing {builder.name} in {root}')
    except OSError as error:  # A file system without locks (some NFS, Lustre mounts).
      logging.warning('Preparing %s unguarded: %s (%s).', builder.name, lock.name, error)
    yield  # Closing the file releases the lock.


def _lock_exclusively(file, what: str) -> None:
  """Takes an exclusive lock on ``file``, saying so when another process holds it."""
  try:
    fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    logging.warning('Waiting for another process %s.', what)
    fcntl.flock(file, fcntl.LOCK_EX)


def _prepare(builder: tfds.core.DatasetBuilder, download_config) -> None:
  """Downloads and prepares ``builder``'s dataset as `_download_config` says."""
  if download_config is not None and download_config.manual_dir:  # ImageNet's archives.
    logging.info(
      'Preparing %s from %s; this takes a few hours, once.',
      builder.name,
      download_config.manual_dir,
    )
  builder.download_and_prepare(download_config=download_config)


def _num_examples(builder: tfds.core.DatasetBuilder, split: str) -> int:
  """The size of ``split`` (tfds split syntax such as ``'train[:10%]'`` included)."""
  if builder.info.splits:
    return builder.info.splits[split].num_examples
  # No split metadata: tfds.testing.mock_data without metadata files. Its fake datasets
  # declare their cardinality.
  cardinality = int(builder.as_dataset(split=split).cardinality())
  if cardinality < 0:
    raise ValueError(f'The size of split {split!r} of {builder.name} is unknown.')
  return cardinality


def _rgb(image: tf.Tensor) -> tf.Tensor:
  """A dataset's image as RGB: greyscale ones (MNIST's, Fashion-MNIST's) repeated."""
  return tf.image.grayscale_to_rgb(image) if image.shape[-1] == 1 else image


def is_folder(config) -> bool:
  """Whether the dataset config reads an image folder (`repvgg_jax.data.folder`)."""
  return config.name == folder.NAME


def num_examples(config, split: str) -> int:
  """The number of examples in ``split`` of ``config.name``, over all processes.

  An image folder's splits are ``'train'`` and ``'val'``.
  """
  if is_folder(config):
    return len(folder.scan(config).split(split).paths)
  return _num_examples(get_builder(config), split)


def class_names(config) -> tuple[str, ...] | None:
  """The dataset's class names in label order, or None where tfds names none.

  Prepares the dataset (or scans the folder anew) first, so a missing one fails here.
  """
  if is_folder(config):
    return folder.scan(config, fresh=True).classes
  features = get_builder(config).info.features
  label = features['label'] if features is not None and 'label' in features else None
  names = getattr(label, 'names', None)
  return tuple(names) if names else None


def check_splits(config, process_count: int | None = None) -> None:
  """Refuses splits joined with ``+`` over several processes: tfds divides each part
  among the processes on its own, so that the shares are not the equal ones that the
  batch counts here rest on (training would read short epochs, evaluation drop images).

  Raises:
    ValueError: naming the split and what to give instead.
  """
  count = jax.process_count() if process_count is None else process_count
  if is_folder(config) or count == 1:
    return
  for field in ('train_split', 'eval_split'):
    if '+' in config[field]:
      raise ValueError(
        f'dataset.{field} {config[field]!r} joins splits with +, which {count} processes '
        "cannot share evenly: give one split or one slice (e.g. 'train[:90%]')."
      )


def steps_per_epoch(config, global_batch_size: int) -> int:
  """Full global batches per pass over the training split; the remainder is dropped.

  Computed from the global example count so that every process agrees. Each process's share
  (``tfds.split_for_jax_process`` with ``drop_remainder=True``) holds at least this many
  local batches, and each epoch reads exactly this many from a fresh shuffle of it.
  """
  split = folder.SPLITS[0] if is_folder(config) else config.train_split
  total = num_examples(config, split)
  if total < global_batch_size:
    where = 'train/' if is_folder(config) else repr(split)
    raise ValueError(
      f'The global batch of {global_batch_size} is larger than the {total} examples of '
      f'{where}: lower batch_size (--config.batch_size=...).'
    )
  return total // global_batch_size


def _process_and_local_batch(
  global_batch_size: int, process_index: int | None, process_count: int | None
) -> tuple[int, int, int]:
  """``(process_index, process_count, local_batch_size)``, defaulting to JAX's processes."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(
      f'The global batch size {global_batch_size} must be a positive multiple of the '
      f'{process_count} processes, each of which loads an equal part of it.'
    )
  return process_index, process_count, global_batch_size // process_count


def _deterministic_read_config(shuffle_seed: int | None = None) -> tfds.ReadConfig:
  return tfds.ReadConfig(options=batching.deterministic_options(), shuffle_seed=shuffle_seed)


def _epoch_batches(
  builder: tfds.core.DatasetBuilder,
  config,
  split,
  *,
  seed: int,
  epoch: int,
  first_batch: int,
  steps: int,
  local_batch: int,
  process_index: int,
) -> Iterator[Batch]:
  """Batches ``first_batch`` to ``steps - 1`` of one epoch of this process's share."""
  shuffle_seed = int(batching.derived_seed(seed, epoch)[0])
  read_config = _deterministic_read_config(shuffle_seed)
  dataset = builder.as_dataset(
    split=split,
    shuffle_files=True,
    decoders={'image': tfds.decode.SkipDecoding()},  # Decode after skipping: cheap resumes.
    read_config=read_config,
  )
  dataset = dataset.shuffle(
    config.shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False
  )
  dataset = dataset.take(steps * local_batch).enumerate().skip(first_batch * local_batch)
  epoch_key = tf.constant(
    batching.derived_seed(seed, epoch, process_index, words=2).astype(np.int64)
  )
  decode_image = builder.info.features['image'].decode_example

  def preprocess(index, example):
    example_seed = tf.random.experimental.stateless_fold_in(epoch_key, index)
    image = input_pipeline.preprocess_for_train(
      _rgb(decode_image(example['image'])), example_seed, config
    )
    return {'image': image, 'label': tf.cast(example['label'], tf.int32)}

  dataset = dataset.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  dataset = dataset.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  yield from tfds.as_numpy(dataset.with_options(read_config.options))


def train_batches(
  config,
  *,
  global_batch_size: int,
  seed: int,
  start_step: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
) -> Iterator[Batch]:
  """This process's part of every global training batch from ``start_step`` on, forever.

  Args:
    config: the dataset config; reads the fields of ``get_builder`` and of
      ``input_pipeline.preprocess_for_train``, ``train_split``, ``shuffle_buffer`` and
      ``in_memory`` (True: the split decoded once and augmented with NumPy, see
      ``repvgg_jax.data.in_memory``).
    global_batch_size: examples per step over all processes.
    seed: a non-negative integer; with the step it determines the batch bit for bit.
    start_step: the first step to yield, e.g. the step of a restored checkpoint.
    process_index: this process; defaults to ``jax.process_index()``.
    process_count: the number of processes; defaults to ``jax.process_count()``.

  Returns:
    An iterator of ``{'image': float32 (B, S, S, 3), 'label': int32 (B,)}`` with
    ``B = global_batch_size // process_count`` and ``S = config.image_size``.
  """
  process_index, process_count, local_batch = _process_and_local_batch(
    global_batch_size, process_index, process_count
  )
  if config.train_augment not in input_pipeline.TRAIN_AUGMENTATIONS:  # Fail before any I/O.
    raise ValueError(
      f'Unknown train_augment {config.train_augment!r}; '
      f'known: {input_pipeline.TRAIN_AUGMENTATIONS}.'
    )
  steps = steps_per_epoch(config, global_batch_size)
  if is_folder(config):
    return folder.train_batches(
      folder.scan(config),
      config,
      global_batch_size=global_batch_size,
      seed=seed,
      start_step=start_step,
      steps=steps,
      process_index=process_index,
      process_count=process_count,
    )
  builder = get_builder(config)
  split = tfds.split_for_jax_process(
    config.train_split,
    process_index=process_index,
    process_count=process_count,
    drop_remainder=True,
  )
  if config.get('in_memory', False):
    in_memory.check_supported(builder, config)
    images, labels = in_memory.load_split(
      builder.as_dataset(split=split, shuffle_files=False, read_config=_deterministic_read_config())
    )
    return in_memory.train_batches(
      images,
      labels,
      config,
      seed=seed,
      start_step=start_step,
      steps_per_epoch=steps,
      local_batch=local_batch,
      process_index=process_index,
    )

  def batches() -> Iterator[Batch]:
    for epoch, first_batch in batching.epochs_from(start_step, steps):
      yield from _epoch_batches(
        builder,
        config,
        split,
        seed=seed,
        epoch=epoch,
        first_batch=first_batch,
        steps=steps,
        local_batch=local_batch,
        process_index=process_index,
      )

  return batches()


def eval_batches(
  config,
  *,
  global_batch_size: int,
  process_index: int | None = None,
  process_count: int | None = None,
) -> Iterator[Batch]:
  """One pass over this process's share of the eval split, padded to equal batch counts.

  Every process yields ``ceil(ceil(num_eval_examples / process_count) / local_batch)``
  batches, the missing examples being zeros with ``mask`` False, so that a jitted eval step
  that spans processes is entered equally often everywhere.

  Args:
    config: the dataset config; reads the fields of ``get_builder``, ``eval_split``,
      ``eval_preprocess`` and ``image_size``.
    global_batch_size: examples per eval step over all processes.
    process_index: this process; defaults to ``jax.process_index()``.
    process_count: the number of processes; defaults to ``jax.process_count()``.

  Returns:
    An iterator of ``{'image': float32 (B, S, S, 3), 'label': int32 (B,), 'mask': bool (B,)}``.
  """
  process_index, process_count, local_batch = _process_and_local_batch(
    global_batch_size, process_index, process_count
  )
  if is_folder(config):
    return folder.eval_batches(
      folder.scan(config),
      config,
      global_batch_size=global_batch_size,
      process_index=process_index,
      process_count=process_count,
    )
  builder = get_builder(config)
  total = _num_examples(builder, config.eval_split)
  num_batches = batching.eval_batch_count(total, process_count, local_batch)
  split = tfds.split_for_jax_process(
    config.eval_split,
    process_index=process_index,
    process_count=process_count,
    drop_remainder=False,
  )
  read_config = _deterministic_read_config()
  dataset = builder.as_dataset(split=split, shuffle_files=False, read_config=read_config)
  size, method = config.image_size, config.eval_preprocess

  def preprocess(example):
    image = input_pipeline.preprocess_for_eval(_rgb(example['image']), size, method=method)
    return {'image': image, 'label': tf.cast(example['label'], tf.int32), 'mask': True}

  dataset = dataset.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  # Capped at the share's expected size, also under tfds.testing.mock_data, whose fake
  # splits ignore the process slicing.
  dataset = batching.padded_batches(dataset, size, local_batch, num_batches)
  return iter(tfds.as_numpy(dataset.with_options(read_config.options)))
