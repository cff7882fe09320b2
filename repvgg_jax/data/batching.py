"""What the tfds, image-folder and in-memory readers share: epochs, seeds, eval padding.

Every reader makes a batch a pure function of ``(seed, step)``: a run resumed at
``step`` starts inside the epoch that holds it (`epochs_from`), shuffles and
augments with seeds derived from the run's (`derived_seed`), and keeps
tf.data's parallel maps in order (`deterministic_options`). Evaluation pads
every process's share to the same number of batches (`padded_batches`), so a
jitted step that spans processes is entered equally often everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import tensorflow as tf


def epochs_from(start_step: int, steps_per_epoch: int) -> Iterator[tuple[int, int]]:
  """``(epoch, first_batch)`` for every epoch from the one that holds ``start_step`` on,
  forever: that epoch starts at ``start_step``'s batch, every later one at 0."""
  epoch, first_batch = divmod(start_step, steps_per_epoch)
  while True:
    yield epoch, first_batch
    epoch, first_batch = epoch + 1, 0


def derived_seed(*entropy: int, words: int = 1) -> np.ndarray:
  """Well-mixed uint32 words from integers, so that nearby seeds give unrelated streams."""
  return np.random.SeedSequence(list(entropy)).generate_state(words)


def deterministic_options() -> tf.data.Options:
  """tf.data options under which parallel map and interleave keep the input order."""
  options = tf.data.Options()
  options.deterministic = True
  return options


def eval_batch_count(num_examples: int, process_count: int, local_batch: int) -> int:
  """Batches every process yields in one evaluation pass: those of the largest share."""
  return math.ceil(math.ceil(num_examples / process_count) / local_batch)


def padded_batches(
  examples: tf.data.Dataset, image_size: int, local_batch: int, num_batches: int
) -> tf.data.Dataset:
  """``num_batches`` batches of ``examples`` (``image``, ``label``, ``mask`` True), the
  missing ones zeros with ``mask`` False. Extra examples are cut off: a share is capped
  at its expected size even where a split ignores the process slicing."""
  padding = tf.data.Dataset.from_tensors(
    {
      'image': tf.zeros((image_size, image_size, 3)),
      'label': tf.constant(0, tf.int32),
      'mask': False,
    }
  ).repeat()
  examples = examples.concatenate(padding).take(num_batches * local_batch)
  return examples.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
