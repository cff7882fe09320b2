"""Reading the checkpoints that conversion, export and quantization start from,
and refusing an output directory that cannot take their result."""

from __future__ import annotations

import json
import os
import pathlib
import sys

from repvgg_jax import checkpointing
from repvgg_jax.interop.torch_layout import ConversionError
from repvgg_jax.model import fusion, shapes, trees, variants


def training_checkpoint(
  path: pathlib.Path,
) -> tuple[checkpointing.Checkpoints, int | None, pathlib.Path]:
  """(manager, step, workdir) for a workdir, its checkpoints dir, or one step dir."""
  if (path / 'checkpoints').is_dir():
    return checkpointing.Checkpoints(path / 'checkpoints', read_only=True), None, path
  if path.name.isdigit():
    return (
      checkpointing.Checkpoints(path.parent, read_only=True),
      int(path.name),
      path.parent.parent,
    )
  return checkpointing.Checkpoints(path, read_only=True), None, path.parent


def no_checkpoint(path: pathlib.Path, kind: str = 'orbax') -> ConversionError:
  """The error for ``path`` holding no ``kind`` checkpoint; one step of a checkpoint
  under a folder not named by its step (orbax finds steps by their numbers) is told so."""
  if (path / '_CHECKPOINT_METADATA').is_file() and not path.name.isdigit():
    try:
      step = json.loads((path / checkpointing.META / 'metadata').read_text())['step']
    except (OSError, ValueError, KeyError, TypeError):
      step = None
    number = f'{step}, its step' if isinstance(step, int) else 'its step number'
    return ConversionError(
      f'{path} is one step of a checkpoint, but its folder is not named by its step: '
      f'rename it to {number} (orbax finds steps by their numbers).'
    )
  return ConversionError(f'No {kind} checkpoint in {path}.')


def _export_source(path: pathlib.Path) -> tuple[checkpointing.Checkpoints, int | None]:
  """The checkpoint to export: a workdir's deploy (else training) checkpoints, or the path;
  a workdir's deploy checkpoint older than its training one is said to be."""
  if (path / 'deploy').is_dir():
    fused, trained = (checkpointing.saved_steps(path / sub) for sub in ('deploy', 'checkpoints'))
    if fused and trained and trained[-1] > fused[-1]:
      print(
        f'warning: {path / "deploy"} holds the fused model of step {fused[-1]}, but training '
        f'went on to step {trained[-1]}: run its training command again to finish the run '
        f'(and fuse it), or give {path / "checkpoints"} for the newest weights.',
        file=sys.stderr,
      )
  for sub in ('deploy', 'checkpoints'):
    if (path / sub).is_dir():
      return checkpointing.Checkpoints(path / sub, read_only=True), None
  if path.name.isdigit():
    return checkpointing.Checkpoints(path.parent, read_only=True), int(path.name)
  return checkpointing.Checkpoints(path, read_only=True), None


def restore(path: pathlib.Path) -> tuple[dict, dict]:
  """``(state, metadata)`` of the checkpoint at ``path``: a workdir's deploy (else
  training) checkpoint, a checkpoint directory, or one step."""
  if not path.exists():
    raise FileNotFoundError(f'No checkpoint at {path}.')
  ckpt, step = _export_source(path)
  try:
    if ckpt.latest_step() is None:
      raise no_checkpoint(path)
    return ckpt.restore(step=step)
  finally:
    ckpt.close()


def fused_variables(path) -> tuple[dict, dict | None, dict]:
  """``(deploy variables, training variables or None, saved metadata)`` of the
  checkpoint at ``path``: a training checkpoint is fused here, a deploy one is read
  as it is."""
  state, saved = restore(pathlib.Path(path))
  training = _training_variables(state)
  if training is not None:
    return fusion.fuse_params(training), training, saved
  return {'params': state['params']}, None, saved


def variant_held(params, saved: dict) -> str | None:
  """The variant whose weights ``params`` are: the one the checkpoint's metadata names
  where its shapes are that variant's (a custom width is not), else the one its shapes
  tell (a fused QARepVGG's are RepVGG's), or None."""
  name = saved.get('model')
  if isinstance(name, str) and name in variants.VARIANTS and shapes.has_shapes_of(params, name):
    return name
  return shapes.identify_variant(params)


def _training_variables(state: dict) -> dict | None:
  """The multi-branch variables of a checkpoint's ``state``, or None where its params
  are fused already: a deploy checkpoint, or a quantization-aware run's training one
  (its ``batch_stats`` are the activation ranges it learns, not BatchNorm's)."""
  unfused, fused = trees.find_blocks(state['params'])
  if 'batch_stats' not in state or (fused and not unfused):
    return None
  return {k: state[k] for k in ('params', 'batch_stats')}


def deploy_variables(path: pathlib.Path, model: str | None):
  """``(variant, deploy variables, training variables or None, saved metadata)`` of
  the checkpoint at ``path``; a training checkpoint is fused here."""
  state, saved = restore(path)
  name = model or saved.get('model') or shapes.identify_variant(state['params'])
  if name is None:
    raise ConversionError(f'{path} does not say which variant it holds: give it with --model.')
  training = _training_variables(state)
  if training is not None:
    return name, fusion.fuse_params(training, model=name), training, saved
  if not shapes.has_shapes_of(state['params'], name):
    looks_like = shapes.identify_variant(state['params'])
    raise ConversionError(f'{path} holds {looks_like or "no known variant"}, not {name}.')
  return name, {'params': state['params']}, None, saved


def check_output_dir(output_dir) -> None:
  """Fails before any work where ``output_dir`` cannot receive the result, which is
  written into a sibling renamed onto it: not empty, a file, below a file, or in a
  folder that cannot be written.

  Raises:
    ConversionError: saying which, and to choose a new output directory.
  """
  output = pathlib.Path(output_dir).absolute()
  if output.is_dir() and any(output.iterdir()):
    raise ConversionError(f'{output} is not empty: choose a new output directory.')
  for parent in (output, *output.parents):
    if parent.exists() and not parent.is_dir():
      raise ConversionError(
        f'{parent} is a file, so {output} cannot be a directory: choose another.'
      )
    if parent.exists():
      break
  # The folder that takes the sibling and the rename.
  nearest = next(parent for parent in output.parents if parent.exists())
  if not os.access(nearest, os.W_OK | os.X_OK):
    raise ConversionError(f'{nearest} is not writable: choose an output directory you can write.')
