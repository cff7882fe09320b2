"""Training and evaluation batches of an image folder (`repvgg_jax.data.folder`).

Batches go through the ImageNet pipeline (`repvgg_jax.data.input_pipeline`)
and, like the tfds ones, are a pure function of ``(seed, step)``: every epoch
is one permutation of the whole split, global batch ``b`` is its ``b``-th
slice, process ``p`` reads its own part of it, and every example's
augmentation is keyed by its position in the epoch. A run's batches are hence
the same on any number of processes, and a resumed run skips files unread.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import numpy as np
import tensorflow as tf

from repvgg_jax.data import batching, input_pipeline
from repvgg_jax.data.folder import FolderDataset, FolderError, Split, decode, decode_failure


def _checked(batches: Iterator, paths_of_batch) -> Iterator:
  """``batches``, with a decoding failure reported as the file that caused it."""
  for index in itertools.count():
    try:
      batch = next(batches)
    except StopIteration:
      return
    except tf.errors.OpError as error:
      for path in paths_of_batch(index):
        try:
          decode(tf.constant(path))
        except tf.errors.OpError:
          raise FolderError(
            f'{path} cannot be decoded ({decode_failure(error)}): replace or remove it.'
          ) from None
      raise
    yield batch


def _epoch_positions(num_examples: int, steps: int, global_batch: int, seed: int, epoch: int):
  """``(examples, positions)``, both ``(steps, global_batch)``: the example at each place of
  each global batch of an epoch (a permutation), and that place's index in the epoch."""
  order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  positions = np.arange(steps * global_batch)
  return order[positions].reshape(steps, global_batch), positions.reshape(steps, global_batch)


def train_batches(
  dataset: FolderDataset,
  config,
  *,
  global_batch_size: int,
  seed: int,
  start_step: int,
  steps: int,
  process_index: int,
  process_count: int,
) -> Iterator[dict[str, np.ndarray]]:
  """This process's part of every training batch from ``start_step`` on, forever (see
  the module docstring); the arguments are those of `datasets.train_batches`."""
  for epoch, first_batch in batching.epochs_from(start_step, steps):
    yield from _epoch_batches(
      dataset.split('train'),
      config,
      seed=seed,
      epoch=epoch,
      first_batch=first_batch,
      steps=steps,
      global_batch_size=global_batch_size,
      process_index=process_index,
      process_count=process_count,
    )


def _epoch_batches(
  split: Split,
  config,
  *,
  seed: int,
  epoch: int,
  first_batch: int,
  steps: int,
  global_batch_size: int,
  process_index: int,
  process_count: int,
) -> Iterator[dict[str, np.ndarray]]:
  """Batches ``first_batch`` to ``steps - 1`` of one epoch, this process's columns of each."""
  local = global_batch_size // process_count
  columns = slice(process_index * local, (process_index + 1) * local)
  examples, positions = _epoch_positions(len(split.paths), steps, global_batch_size, seed, epoch)
  examples, positions = examples[first_batch:, columns], positions[first_batch:, columns]
  epoch_key = batching.derived_seed(seed, epoch, 1, words=2).astype(np.int64)

  def preprocess(path, label, position):
    example_seed = tf.random.experimental.stateless_fold_in(tf.constant(epoch_key), position)
    image = input_pipeline.preprocess_for_train(decode(path), example_seed, config)
    return {'image': image, 'label': label}

  flat = examples.reshape(-1)
  data = tf.data.Dataset.from_tensor_slices(
    (split.paths[flat], split.labels[flat], positions.reshape(-1).astype(np.int64))
  )
  data = data.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  data = data.batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  batch_paths = lambda index: split.paths[examples[index]]
  data = data.with_options(batching.deterministic_options())
  yield from _checked(data.as_numpy_iterator(), batch_paths)


def eval_batches(
  dataset: FolderDataset, config, *, global_batch_size: int, process_index: int, process_count: int
) -> Iterator[dict[str, np.ndarray]]:
  """One pass over this process's contiguous share of ``val/``, padded with masked-out
  zeros to the same number of batches in every process (as `datasets.eval_batches`)."""
  split = dataset.split('val')
  local = global_batch_size // process_count
  share = math.ceil(len(split.paths) / process_count)
  num_batches = batching.eval_batch_count(len(split.paths), process_count, local)
  paths = split.paths[process_index * share : (process_index + 1) * share]
  labels = split.labels[process_index * share : (process_index + 1) * share]
  size, method = config.image_size, config.eval_preprocess

  def preprocess(path, label):
    image = input_pipeline.preprocess_for_eval(decode(path), size, method=method)
    return {'image': image, 'label': label, 'mask': True}

  data = tf.data.Dataset.from_tensor_slices((paths, labels))
  data = data.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  data = batching.padded_batches(data, size, local, num_batches)
  data = data.with_options(batching.deterministic_options())
  batch_paths = lambda i: paths[i * local : (i + 1) * local]
  return _checked(data.as_numpy_iterator(), batch_paths)
