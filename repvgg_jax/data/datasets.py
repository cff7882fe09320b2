"""Training and evaluation batches from tfds: per process, deterministic and resumable.

A training batch is a pure function of ``(seed, step)``: epoch ``e`` is shuffled with a seed
derived from ``(seed, e)``, every example is augmented with stateless randomness keyed by
``(seed, e, process, its index in the epoch)``, and a run resumed at ``step`` skips the
records of the batches before it without decoding them. Evaluation makes one padded pass in
which every process yields the same number of batches, so jitted multi-host steps stay in step.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from repvgg_jax.data import (
  batching,
  folder,
  folder_batches,
  in_memory,
  input_pipeline,
  tfds_builder,
)
from repvgg_jax.data.tfds_builder import get_builder

Batch = dict[str, np.ndarray]
# What a dataset that cannot be read raises: the message says how to get or mend it.
DatasetNotFoundError = tfds_builder.DatasetNotFoundError
FolderError = folder.FolderError


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
    return folder_batches.train_batches(
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
    return folder_batches.eval_batches(
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
