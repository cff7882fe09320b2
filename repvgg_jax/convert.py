"""Checkpoint conversion: ``python -m repvgg_jax.convert {import,fuse} ...``.

    # Reference PyTorch weights (.pth/.pt through torch, .safetensors, .npz) -> orbax.
    python -m repvgg_jax.convert import RepVGG-A0-train.pth out/a0 --verify
    # A trained orbax checkpoint (a workdir or one step directory) -> a deploy checkpoint.
    python -m repvgg_jax.convert fuse workdirs/digits out/digits-deploy

Both write an orbax checkpoint (step 0) holding ``{'params'[, 'batch_stats']}``
and JSON metadata (model, deploy, num_classes), and report the largest
relative logit difference between the source and the converted model on a
random batch.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import zipfile
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from repvgg_jax import checkpointing, fusion, torch_layout
from repvgg_jax.model import create_model
from repvgg_jax.torch_layout import ConversionError

WRAPPER_KEYS = ('state_dict', 'model', 'model_state_dict', 'module')


def _read_file(path: pathlib.Path) -> Mapping[str, Any]:
  """The raw key -> array mapping stored in ``path``, by its suffix."""
  suffix = path.suffix.lower()
  try:
    if suffix == '.npz':
      with np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}
    if suffix == '.safetensors':
      from safetensors.numpy import load_file

      return load_file(str(path))
    if suffix in ('.pth', '.pt', '.bin'):
      try:
        import torch
      except ImportError:
        raise ConversionError(
          f'Reading {path.name} needs PyTorch (pip install torch); or save the state dict '
          'as .safetensors or .npz, which need no torch.'
        ) from None
      return torch.load(path, map_location='cpu', weights_only=True)
  except ConversionError:
    raise
  except (OSError, ValueError, EOFError, RuntimeError, zipfile.BadZipFile) as error:
    raise ConversionError(
      f'Cannot read {path} ({suffix}): {error}. Is the file complete?'
    ) from error
  raise ConversionError(
    f'Unknown weight file type {suffix!r}: use .pth, .pt, .safetensors or .npz.'
  )


def _unwrap(tree: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The state dict inside training-script containers, without ``module.`` prefixes."""
  for key in WRAPPER_KEYS:
    while isinstance(tree.get(key), Mapping):
      tree = tree[key]
  out = {}
  for key, value in tree.items():
    if not hasattr(value, 'shape'):
      continue  # Epoch counters, optimizer names and the like.
    key = key.removeprefix('module.')
    out[key] = value.numpy() if hasattr(value, 'numpy') else np.asarray(value)
  return out


def load_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """Reads a reference state dict from .pth/.pt (torch), .safetensors or .npz.

  Raises:
    FileNotFoundError: no such file.
    ConversionError: unreadable, truncated or of an unknown type.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'No weight file at {path}.')
  return _unwrap(_read_file(path))


def _logits(model, variables, images):
  return np.asarray(jax.jit(model.apply)(variables, images), np.float64)


def max_relative_difference(a: np.ndarray, b: np.ndarray) -> float:
  """Largest per-example ``||a - b|| / ||b||``."""
  diff = np.linalg.norm(a - b, axis=-1) / np.maximum(np.linalg.norm(b, axis=-1), 1e-12)
  return float(diff.max())


def _random_images(size: int = 64, batch: int = 4) -> jax.Array:
  return jax.random.normal(jax.random.key(0), (batch, size, size, 3))


def import_weights(path, output_dir, model: str | None = None, verify: bool = True) -> dict:
  """Converts reference weights to an orbax checkpoint; returns the metadata written."""
  state_dict = load_state_dict(path)
  variables, info = torch_layout.from_torch(state_dict, model=model)
  meta = {**info, 'source': str(path)}
  if verify:
    meta['verify'] = _verify_import(state_dict, variables, info)
  _save(output_dir, variables, meta)
  return meta


def _verify_import(state_dict, variables, info) -> dict:
  """Logits of the converted model vs the source weights run in their own layout."""
  if info['num_classes'] == 0:
    return {'skipped': 'a backbone without classifier has no logits to compare'}
  images = _random_images()
  flax_model = create_model(
    info['model'], num_classes=info['num_classes'], deploy=info['deploy'], precision='highest'
  )
  nchw = np.asarray(images).transpose(0, 3, 1, 2)
  expected = np.asarray(torch_layout.reference_forward(state_dict, nchw), np.float64)
  actual = _logits(flax_model, variables, images)
  return {'max_relative_logit_difference': max_relative_difference(actual, expected)}


def _training_checkpoint(
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


def fuse_checkpoint(path, output_dir, model: str | None = None) -> dict:
  """Fuses a training checkpoint into a deploy checkpoint; returns the metadata written."""
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f'No checkpoint at {path}.')
  ckpt, step, workdir = _training_checkpoint(path)
  if ckpt.latest_step() is None:
    raise ConversionError(f'No orbax training checkpoint in {path}.')
  state, saved = ckpt.restore(step=step)
  variables = {k: state[k] for k in ('params', 'batch_stats') if k in state}
  fused = fusion.fuse_params(variables, model=model)  # Refuses deploy checkpoints.
  train_model, deploy_model = _models_of(workdir, variables, model or saved.get('model'))
  images = _random_images()
  difference = max_relative_difference(
    _logits(deploy_model, fused, images), _logits(train_model, variables, images)
  )
  meta = {
    'model': train_model.variant.name,
    'deploy': True,
    'num_classes': train_model.num_classes,
    'source': str(path),
    'step': int(np.asarray(state.get('step', saved.get('step', 0)))),
    'verify': {'max_relative_logit_difference': difference},
  }
  _save(output_dir, fused, meta)
  return meta


def _models_of(workdir: pathlib.Path, variables, name: str | None):
  """The training-time and deploy models of a checkpoint: from its config.json when present."""
  config_path = workdir / 'config.json'
  if config_path.is_file():
    from repvgg_jax import trainer

    config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
    return trainer.build_model(config), trainer.build_model(config, deploy=True)
  if name is None:
    raise ConversionError(f'No config.json in {workdir}: give the variant with --model.')
  num_classes = variables['params']['linear']['kernel'].shape[1]
  branches = _branches_per_stage(variables['params'])
  return (
    create_model(name, num_classes=num_classes, branches=branches),
    create_model(name, num_classes=num_classes, deploy=True),
  )


def _branches_per_stage(params) -> list[tuple[str, ...]]:
  stages: dict[int, set[str]] = {}
  for key in fusion.block_keys(params):
    stage, _ = fusion.block_position(key)
    stages.setdefault(stage, set()).update(params[key])
  return [tuple(sorted(stages[s])) for s in sorted(stages)]


def _save(output_dir, variables, meta) -> None:
  output = pathlib.Path(output_dir).absolute()
  if output.exists() and any(output.iterdir()):
    raise ConversionError(f'{output} is not empty: choose a new output directory.')
  ckpt = checkpointing.Checkpoints(output, keep=1)
  ckpt.save(0, jax.tree.map(jnp.asarray, variables), meta)
  ckpt.wait()
  ckpt.close()


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  commands = parser.add_subparsers(dest='command', required=True)
  imp = commands.add_parser('import', help='reference PyTorch weights -> orbax checkpoint')
  imp.add_argument('weights', help='.pth, .pt, .safetensors or .npz state dict')
  imp.add_argument('output', help='new directory for the orbax checkpoint')
  imp.add_argument('--model', help='variant (default: recognised from the shapes)')
  imp.add_argument(
    '--no-verify',
    dest='verify',
    action='store_false',
    help='skip running both models on a random batch',
  )
  fuse = commands.add_parser('fuse', help='orbax training checkpoint -> deploy checkpoint')
  fuse.add_argument('checkpoint', help='a training workdir, its checkpoints dir, or a step dir')
  fuse.add_argument('output', help='new directory for the deploy checkpoint')
  fuse.add_argument('--model', help='variant, checked against the shapes')
  args = parser.parse_args(argv)
  try:
    if args.command == 'import':
      meta = import_weights(args.weights, args.output, args.model, args.verify)
    else:
      meta = fuse_checkpoint(args.checkpoint, args.output, args.model)
  except (ConversionError, FileNotFoundError, fusion.FusionError) as error:
    print(f'error: {error}', file=sys.stderr)
    return 1
  kind = 'deploy' if meta['deploy'] else 'training-time'
  print(f'Wrote the {kind} {meta["model"]} ({meta["num_classes"]} classes) to {args.output}.')
  print(f'Verification: {json.dumps(meta.get("verify", "skipped"))}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
