"""What a training run tells a person: a progress bar, JSON-lines metrics, TensorBoard."""

from __future__ import annotations

import math
import os
import pathlib
import sys
import time

import jax
import numpy as np
import tensorflow as tf
import tqdm
from tensorflow.core.util import event_pb2

from repvgg_jax import jsonfiles


class MetricsWriter:
  """Appends ``{'step': ..., name: value}`` lines to ``metrics.jsonl`` and TensorBoard.

  Only the first process writes; the others accept and drop the calls.
  """

  def __init__(self, workdir: pathlib.Path, enabled: bool = True, start_step: int = 0):
    self.enabled = enabled
    self._jsonl = workdir / 'metrics.jsonl'
    self.kept: list[dict] = []  # The records of the steps up to ``start_step``.
    if enabled:
      # A run resumed from a checkpoint logs the steps after it again: forget their
      # earlier entries, so that each step is logged once.
      if self._jsonl.exists():
        records = jsonfiles.read_jsonl(self._jsonl)  # A torn last line dropped.
        self.kept = [r for r in records if r.get('step', 0) <= start_step]
        jsonfiles.write_jsonl(self._jsonl, self.kept)
      for events in sorted((workdir / 'tensorboard').glob('events.out.tfevents.*')):
        _forget_events_after(events, start_step)
      self._tensorboard = tf.summary.create_file_writer(str(workdir / 'tensorboard'))

  def write(self, step: int, metrics: dict[str, float]) -> None:
    """Logs ``metrics`` at ``step``, unless the run logged them there before its
    restart (a finished run run again evaluates its last step again, identically)."""
    if not self.enabled or self.logged(step, metrics):
      return
    record = {'step': int(step), **{k: float(v) for k, v in metrics.items()}}
    jsonfiles.append_jsonl(self._jsonl, record)
    with self._tensorboard.as_default(step=int(step)):
      for name, value in metrics.items():
        tf.summary.scalar(name, float(value))
    self._tensorboard.flush()

  def logged(self, step: int, names) -> bool:
    """Whether the run logged all of ``names`` in one record at ``step`` before its
    restart (first process). Only steps up to the restored one are looked for."""
    if not self.kept or step > self.kept[-1].get('step', 0):
      return False
    return any(r.get('step') == step and set(names) <= r.keys() for r in self.kept)

  def close(self) -> None:
    if self.enabled:
      self._tensorboard.close()


def _forget_events_after(path: pathlib.Path, step: int) -> None:
  """Rewrites a TensorBoard event file without its events of steps after ``step``,
  atomically; a record cut short by a crash is dropped with what follows it."""
  kept, changed = [], False
  try:
    for record in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
      if event_pb2.Event.FromString(record).step > step:
        changed = True
      else:
        kept.append(record)
  except tf.errors.DataLossError:
    changed = True
  if not changed:
    return
  tmp = path.with_name('rewriting.tmp')  # Not a name TensorBoard reads ('tfevents').
  with tf.io.TFRecordWriter(str(tmp)) as writer:
    for record in kept:
      writer.write(record)
  os.replace(tmp, path)


class ProgressBar:
  """A bar with step, loss, learning rate, images/s and ETA (on the first process)."""

  def __init__(self, total: int, initial: int, enabled: bool = True):
    self._bar = tqdm.tqdm(
      total=total,
      initial=initial,
      unit='step',
      disable=not enabled,
      dynamic_ncols=True,
      mininterval=1.0 if sys.stderr.isatty() else 30.0,
      file=sys.stderr,
    )

  def update(self, step: int, metrics: dict[str, float] | None = None) -> None:
    self._bar.update(step - self._bar.n)
    if metrics:
      shown = {
        'loss': f'{metrics["train/loss"]:.4f}',
        'lr': f'{metrics["train/learning_rate"]:.4g}',
        'img/s': f'{metrics["train/images_per_sec"]:,.0f}',
      }
      self._bar.set_postfix(shown, refresh=False)

  def write(self, message: str) -> None:
    """A line above the bar (or on stderr when the bar is off)."""
    self._bar.write(message, file=sys.stderr)

  def close(self) -> None:
    self._bar.close()


class Throughput:
  """Images per second between calls to `lap`."""

  def __init__(self):
    self._time = time.perf_counter()

  def lap(self, images: int) -> float:
    now = time.perf_counter()
    rate = images / max(now - self._time, 1e-9)
    self._time = now
    return rate


def top5_informative(num_classes: int) -> bool:
  """Whether top-5 is worth printing: with 5 classes or fewer every label is in the top 5
  (it is still logged)."""
  return num_classes > 5


def closing_line(summary: dict, workdir) -> str:
  """train.py's last line: the final evaluation and the training rate of a finished run."""
  rate = summary['train_images_per_sec']  # None when no step was timed (a short run).
  return (
    f'Done after {summary["steps"]} steps: eval top-1 {summary["eval_top1"]:.2%}, '
    f'fused {summary["eval_top1_fused"]:.2%}'
    + (f', top-5 {summary["eval_top5"]:.2%}' if top5_informative(summary['num_classes']) else '')
    + (f'; {rate:,.0f} images/s' if rate else '')
    + f'. Summary: {workdir}/summary.json'
  )


class TrainingDivergedError(FloatingPointError):
  """The loss became NaN or infinite."""


class RunLog:
  """The mutable parts of one training run, and what it reports."""

  def __init__(self, config, workdir: pathlib.Path, schedule, start_step: int, lr_fn):
    self.config, self.workdir, self.schedule, self.lr_fn = config, workdir, schedule, lr_fn
    chief = jax.process_index() == 0
    self.writer = MetricsWriter(workdir, enabled=chief, start_step=start_step)
    self.bar = ProgressBar(schedule.total_steps, start_step, chief and config.progress_bar)
    self.pending = []  # Device metrics of the steps since the last log.
    self.throughput = Throughput()
    self.train_seconds, self.train_images, self.first_interval = 0.0, 0, True
    self.eval_metrics: dict[str, float] = {}
    self.eval_step: int | None = None  # The step of eval_metrics.

  def log_train(self, step: int, last_good: int | None) -> None:
    """Fetches the pending metrics, stops on a non-finite loss, writes the means."""
    fetched = jax.device_get(self.pending)  # Per call: one step's metrics, or several stacked.
    losses = np.concatenate([np.ravel(m['loss']) for m in fetched])
    top1 = np.concatenate([np.ravel(m['top1']) for m in fetched])
    images = losses.size * self.config.batch_size
    rate = self.throughput.lap(images)
    if not self.first_interval:  # The first interval includes compilation.
      self.train_seconds += images / rate
      self.train_images += images
    self.first_interval = False
    self.pending = []
    metrics = {
      'train/loss': float(np.mean(losses)),
      'train/top1': float(np.mean(top1)),
      'train/learning_rate': float(self.lr_fn(step - 1)),
      'train/images_per_sec': rate,
    }
    if not math.isfinite(metrics['train/loss']):
      where = (
        f'the last good checkpoint (step {last_good}) is kept in {self.workdir / "checkpoints"}'
        if last_good is not None
        else 'no checkpoint was saved yet'
      )
      again = 'run again to resume from it' if last_good is not None else 'run again'
      raise TrainingDivergedError(
        f'The training loss is {metrics["train/loss"]} at step {step}: {where}. Lower '
        f'optimizer.learning_rate (or check the data) and {again}.'
      )
    self.writer.write(step, metrics)
    self.bar.update(step, metrics)

  def log_eval(self, step: int, metrics: dict[str, float]) -> None:
    if not math.isfinite(metrics['eval/loss']):  # Finite weights whose activations overflow.
      raise TrainingDivergedError(
        f"The evaluation loss is {metrics['eval/loss']} at step {step}: the model's outputs "
        'are not finite. Lower optimizer.learning_rate and train again in a new --workdir.'
      )
    self.eval_metrics = m = metrics
    self.eval_step = step
    self.writer.write(step, m)
    self.bar.write(
      f'step {step}: eval top-1 {m["eval/top1"]:.2%} (fused {m["eval/top1_fused"]:.2%}), '
      + (
        f'top-5 {m["eval/top5"]:.2%}, ' if top5_informative(self.config.dataset.num_classes) else ''
      )
      + f'loss {m["eval/loss"]:.4f}'
      + (
        f'; EMA top-1 {m["eval/ema_top1"]:.2%} (fused {m["eval/ema_top1_fused"]:.2%})'
        if 'eval/ema_top1' in m
        else ''
      )
    )
    self.throughput.lap(0)  # Evaluation time is not training time.

  def images_per_sec(self) -> float | None:
    """The training rate of this process's run so far, its first interval (which
    compiles) left out; None before a second interval."""
    return self.train_images / self.train_seconds if self.train_seconds else None

  def summary(self, step: int) -> dict:
    m = self.eval_metrics
    return {
      'model': self.config.model.name,
      'dataset': self.config.dataset.name,
      'steps': step,
      'epochs': step / self.schedule.steps_per_epoch,
      'num_classes': self.config.dataset.num_classes,
      'eval_step': self.eval_step,  # A stopped run's last evaluation can predate 'steps'.
      'eval_top1': m.get('eval/top1'),
      'eval_top5': m.get('eval/top5'),
      'eval_loss': m.get('eval/loss'),
      'eval_top1_fused': m.get('eval/top1_fused'),
      'eval_top5_fused': m.get('eval/top5_fused'),
      **{
        f'eval_ema_{name}': m[f'eval/ema_{name}']
        for name in ('top1', 'top5', 'top1_fused')
        if f'eval/ema_{name}' in m
      },
      'train_images_per_sec': self.images_per_sec(),
      'num_devices': jax.device_count(),
      'num_processes': jax.process_count(),
    }

  def close(self) -> None:
    self.bar.close()
    self.writer.close()
