"""Evaluation of a train state over the eval split: top-1, top-5 and loss of the
training-time and the fused model, and of a moving average's two models where the
run keeps one, in one pass over the images."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from repvgg_jax.data import datasets as data


def global_batch(batch: dict, sharding: NamedSharding) -> dict:
  """The global array of each field of this process's part of a batch."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def evaluate(
  config, eval_fn, fuse_fn, state, sharding, stop_request=None
) -> dict[str, float] | None:
  """Top-1 and top-5 of the training-time and fused models over the eval split; with
  a moving average of the weights, of its two models too (``eval/ema_...``), in the
  same pass over the images.

  With a ``stop_request`` (a `preemption.Preemption`; one process only, as the others
  would wait for it) a SIGTERM or Ctrl-C abandons the evaluation between batches and
  None is returned: a long evaluation must not outlast a scheduler's grace period.
  """
  weights = {'eval/': {'params': state.params, 'batch_stats': state.batch_stats}}
  if state.ema is not None:
    weights['eval/ema_'] = state.ema
  stopped = lambda: stop_request is not None and stop_request.requested
  if stopped():
    return None
  fused = {prefix: fuse_fn(variables) for prefix, variables in weights.items()}
  totals = dict.fromkeys(weights)
  for batch in data.eval_batches(config.dataset, global_batch_size=config.eval_batch_size):
    if stopped():
      return None
    batch = global_batch(batch, sharding)
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
