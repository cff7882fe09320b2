"""What a run saves: its checkpoints (refused where the weights are not finite) and,
at the end, the fused deploy model next to them."""

from __future__ import annotations

import contextlib
import pathlib

import jax
import numpy as np

from repvgg_jax import checkpointing
from repvgg_jax.train import resume
from repvgg_jax.train.reporting import TrainingDivergedError


def save_checkpoint(ckpt: checkpointing.Checkpoints, state, step: int, meta: dict, run) -> None:
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
  ckpt.save(step, resume.state_tree(state), {**meta, 'step': step, **rate})
  run.throughput.lap(0)  # Checkpointing time is not training time.


def _finite(tree) -> bool:
  """Whether every element of a replicated ``tree`` is finite, checked in this process's copy.

  On the host, not jitted: compiling a program that reduces each leaf took longer on
  a first run than NumPy's check (docs/performance.md, "Where the goals stand").
  """
  return all(np.isfinite(np.asarray(x.addressable_data(0))).all() for x in jax.tree.leaves(tree))


def save_deploy(config, workdir: pathlib.Path, fuse_fn, state, step: int, meta: dict) -> None:
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
      close_quietly(ckpt)
      raise checkpointing.CheckpointWriteError(
        f'Saving the fused model of step {step} to {workdir / name} failed: '
        f'{checkpointing.root_cause(error.__cause__ or error)}. The training checkpoint of '
        f'step {step} is kept; fix the cause and run the same command to write the fused model.'
      ) from error
    ckpt.close()


def close_quietly(ckpt: checkpointing.Checkpoints) -> None:
  """Finishes and closes the checkpoints; a failure was reported already, or is being."""
  with contextlib.suppress(Exception):
    ckpt.wait()
  with contextlib.suppress(Exception):
    ckpt.close()
