"""Checkpoint conversion: ``python -m repvgg_jax.convert {import,fuse,export,quantize} ...``.

    # PyTorch weights, reference or timm keys (.pth/.pt through torch, .safetensors, .npz) -> orbax.
    python -m repvgg_jax.convert import RepVGG-A0-train.pth out/a0
    # A trained orbax checkpoint (a workdir or one step directory) -> a deploy checkpoint.
    python -m repvgg_jax.convert fuse workdirs/digits out/digits-deploy
    # A deploy (or training) checkpoint -> jax.export artifact, TF SavedModel, ONNX.
    python -m repvgg_jax.convert export workdirs/digits out/digits-serving [--formats onnx]
    # A trained or deploy checkpoint -> int8 (Qwix), top-1 of both on the eval split.
    python -m repvgg_jax.convert quantize workdirs/digits out/digits-int8

``import`` and ``fuse`` write an orbax checkpoint (step 0) holding
``{'params'[, 'batch_stats']}`` and JSON metadata (model, deploy, num_classes);
``export`` (`repvgg_jax.interop.checkpoint_export`) writes the artifacts of
`repvgg_jax.interop.export`. These three run the source and the result on a random
batch and report the largest relative difference of their outputs; ``quantize``
evaluates both models (`repvgg_jax.interop.quantize_checkpoint`).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from repvgg_jax import checkpointing, run_files
from repvgg_jax.interop import (
  checkpoint_export,
  checkpoint_io,
  checkpoint_models,
  export,
  quantize_checkpoint,
  torch_layout,
  weight_files,
)
from repvgg_jax.interop.torch_layout import ConversionError
from repvgg_jax.model import create_model, fusion
from repvgg_jax.perf import compile_options


def import_weights(path, output_dir, model: str | None = None, verify: bool = True) -> dict:
  """Converts reference weights to an orbax checkpoint; returns the metadata written."""
  checkpoint_io.check_output_dir(output_dir)
  state_dict = weight_files.load_state_dict(path)
  variables, info = torch_layout.from_torch(state_dict, model=model)
  meta = {**info, 'source': str(path)}
  if verify:
    meta['verify'] = _verify_import(state_dict, variables, info)
  _save(output_dir, variables, meta)
  return meta


def _verify_import(state_dict, variables, info) -> dict:
  """Logits of the converted (and, for training-time weights, the fused) model vs the source.

  The source runs in PyTorch (`repvgg_jax.interop.torch_reference`, torch's own
  convolutions) when torch is installed, else through `reference_forward`
  (the source layout with ``lax`` convolutions). A backbone without classifier
  compares the last stage's feature maps.
  """
  images = checkpoint_models.random_images()
  expected, source = _source_outputs(state_dict, info, images)
  out = {'source': source}
  models = {'imported': (info['deploy'], variables)}
  if not info['deploy']:
    models['fused'] = (True, fusion.fuse_params(variables))
  for label, (deploy, tree) in models.items():
    flax_model = create_model(
      info['model'],
      num_classes=info['num_classes'],
      deploy=deploy,
      precision='highest',
    )
    actual = compile_options.jit(flax_model.apply)(tree, images)
    if info['num_classes'] == 0:  # The last stage, NHWC -> NCHW, one row per example.
      actual = jnp.transpose(actual[-1], (0, 3, 1, 2))
    actual = np.asarray(actual, np.float64).reshape(len(images), -1)
    out[label] = checkpoint_models.max_relative_difference(actual, expected)
  out['max_relative_logit_difference'] = max(out[label] for label in models)
  return out


def _source_outputs(state_dict, info, images) -> tuple[np.ndarray, str]:
  """The source model's outputs on ``images`` (flattened per example) and what ran it."""
  try:
    from repvgg_jax.interop import torch_reference
  except ImportError:
    if info['num_classes'] == 0:
      raise ConversionError(
        'Verifying a backbone without classifier needs torch: install it, or pass --no-verify.'
      ) from None
    nchw = np.asarray(images).transpose(0, 3, 1, 2)
    reference = torch_layout.to_reference_keys(state_dict)
    outputs, source = torch_layout.reference_forward(reference, nchw), 'lax (torch not installed)'
  else:
    torch_model = torch_reference.load(
      state_dict, info['model'], info['num_classes'], info['deploy'], info['key_style']
    )
    outputs, source = torch_reference.forward(torch_model, images), 'torch'
  return np.asarray(outputs, np.float64).reshape(len(images), -1), source


def fuse_checkpoint(path, output_dir, model: str | None = None) -> dict:
  """Fuses a training checkpoint into a deploy checkpoint; returns the metadata written."""
  checkpoint_io.check_output_dir(output_dir)
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f'No checkpoint at {path}.')
  ckpt, step, workdir = checkpoint_io.training_checkpoint(path)
  if ckpt.latest_step() is None:
    raise checkpoint_io.no_checkpoint(path, 'orbax training')
  state, saved = ckpt.restore(step=step)
  variables = {k: state[k] for k in ('params', 'batch_stats') if k in state}
  fused = fusion.fuse_params(variables, model=model)  # Refuses deploy checkpoints.
  train_model, deploy_model, run = _models_of(
    workdir, variables, fused, model or saved.get('model')
  )
  images = checkpoint_models.random_images(channels=train_model.in_channels)
  difference = checkpoint_models.max_relative_difference(
    checkpoint_models.outputs(deploy_model, fused, images),
    checkpoint_models.outputs(train_model, variables, images),
  )
  meta = {
    'model': train_model.variant.name,
    'deploy': True,
    'num_classes': train_model.num_classes,
    'source': str(path),
    'step': int(np.asarray(state.get('step', saved.get('step', 0)))),
    'verify': {'max_relative_logit_difference': difference},
  }
  # What predict and export need to feed and name it, as a run's own deploy/ keeps.
  meta.update({k: v for k, v in run_files.feeding(saved, run).items() if v is not None})
  _save(output_dir, fused, meta)
  return meta


def _models_of(workdir: pathlib.Path, variables, fused, name: str | None):
  """The training-time and deploy models of a checkpoint (``variables``, fused into
  ``fused``) and its training run ``(workdir, config)``: from the run's config.json
  when present, else the variant ``name`` with the checkpoint's classes, input
  channels and stages (a backbone's), and no run."""
  config = run_files.read_config(workdir)
  if config is not None:
    return *checkpoint_models.config_models(config, 'xla'), (workdir, config)
  if name is None:
    raise ConversionError(f'No config.json in {workdir}: give the variant with --model.')
  return *checkpoint_models.tree_models(name, fused['params'], variables['params'], 'xla'), None


def _save(output_dir, variables, meta) -> None:
  """Writes an orbax checkpoint (step 0) into a sibling of ``output_dir`` renamed onto
  it: a command killed while saving leaves no half-written output to be refused."""
  checkpoint_io.check_output_dir(output_dir)
  with export.staged_directory(output_dir) as staging:
    ckpt = checkpointing.Checkpoints(staging, keep=1)
    ckpt.save(0, jax.tree.map(jnp.asarray, variables), meta)
    ckpt.wait()
    ckpt.close()


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog='python -m repvgg_jax.convert', description=__doc__.split('\n')[0]
  )
  commands = parser.add_subparsers(dest='command', required=True)
  imp = commands.add_parser('import', help='PyTorch weights (reference or timm) -> orbax')
  imp.add_argument(
    'weights', help='a .pth, .pt, .safetensors or .npz state dict, or hf-hub:ORG/NAME[@REVISION]'
  )
  imp.add_argument('output', help='new directory for the orbax checkpoint')
  imp.add_argument('--model', help='variant (default: recognised from the shapes)')
  imp.add_argument(
    '--verify',
    action=argparse.BooleanOptionalAction,
    default=True,
    help='run the source (in torch when installed) and the converted model on a random batch '
    '(default: on)',
  )
  fuse = commands.add_parser('fuse', help='orbax training checkpoint -> deploy checkpoint')
  fuse.add_argument('checkpoint', help='a training workdir, its checkpoints dir, or a step dir')
  fuse.add_argument('output', help='new directory for the deploy checkpoint')
  fuse.add_argument('--model', help='variant, checked against the shapes')
  exp = commands.add_parser(
    'export', help='deploy, training or int8 checkpoint -> jax.export, TF SavedModel, ONNX'
  )
  exp.add_argument(
    'checkpoint', help='a workdir, a checkpoint dir (deploy or training), a step, or an int8 dir'
  )
  exp.add_argument('output', help='new directory for the artifacts')
  exp.add_argument('--model', help='variant (default: from the checkpoint)')
  exp.add_argument('--image-size', type=int, help='default: the training size, else 224')
  exp.add_argument(
    '--formats',
    help=f'comma-separated, from {", ".join(export.FORMATS)} (default: all; jax for int8)',
  )
  exp.add_argument('--platforms', help='e.g. cpu,cuda (default: the current backend)')
  exp.add_argument(
    '--conv-impl',
    default='xla',
    choices=('xla', 'im2col', 'winograd', 'dense'),
    help="how the artifact computes its convolutions: lax's, or a CPU kernel of repvgg_jax.perf",
  )
  exp.add_argument('--verify', action=argparse.BooleanOptionalAction, default=True)
  quant = commands.add_parser(
    'quantize', help='fused model -> int8 (Qwix), with top-1 before and after on the eval split'
  )
  quant.add_argument('source', help='a training workdir, or a deploy checkpoint (dir or step)')
  quant.add_argument('output', help='new directory for int8.msgpack and quantize.json')
  quant.add_argument(
    '--calibration-batches', type=int, default=8, help='training batches for static ranges'
  )
  quant.add_argument('--mode', default='static', help='static (calibrated) or dynamic ranges')
  quant.add_argument('--config', help="the training config (default: the workdir's config.json)")
  quant.add_argument(
    '--recalibrate',
    action='store_true',
    help='for a quantization-aware run: calibrate anew rather than use the ranges it learned',
  )
  return parser


def _run(args) -> dict:
  if args.command == 'import':
    return import_weights(args.weights, args.output, args.model, args.verify)
  if args.command == 'fuse':
    return fuse_checkpoint(args.checkpoint, args.output, args.model)
  if args.command == 'quantize':
    return quantize_checkpoint.quantize_checkpoint(
      args.source,
      args.output,
      calibration_batches=args.calibration_batches,
      mode=args.mode,
      config_file=args.config,
      recalibrate=args.recalibrate,
    )
  return checkpoint_export.export_checkpoint(
    args.checkpoint,
    args.output,
    args.model,
    args.image_size,
    tuple(args.formats.split(',')) if args.formats else None,
    tuple(args.platforms.split(',')) if args.platforms else None,
    args.conv_impl,
    args.verify,
  )


def _summary(args, meta: dict) -> str:
  if args.command == 'quantize':
    return (
      f'Wrote the int8 {meta["model"]} ({meta["mode"]} ranges) to {args.output}: top-1 '
      f'{meta["fp32_top1"]:.2%} in float32, {meta["int8_top1"]:.2%} in int8 on '
      f'{meta["eval_examples"]} {meta["eval_split"]} images; relative logit error '
      f'{meta["logit_relative_error"]:.1e}.'
    )
  if args.command == 'export':
    artifacts = ', '.join(meta['artifacts'].values())
    kind = 'int8' if meta.get('int8') else 'deploy'
    return (
      f'Wrote {artifacts} of the {kind} {meta["model"]} ({meta["num_classes"]} classes, '
      f'{meta["image_size"]}x{meta["image_size"]} images) to {args.output}.\n'
      f'Verification: {json.dumps(meta.get("verify", "skipped"))}'
      + ''.join(
        f'\nNot verified, {fmt}: {why}' for fmt, why in meta.get('not_verified', {}).items()
      )
    )
  kind = 'deploy' if meta['deploy'] else 'training-time'
  return (
    f'Wrote the {kind} {meta["model"]} ({meta["num_classes"]} classes) to {args.output}.\n'
    f'Verification: {json.dumps(meta.get("verify", "skipped"))}'
  )


def main(argv=None) -> int:
  from absl import logging

  logging.set_verbosity(logging.ERROR)  # Orbax's notes on read-only checkpoints are noise here.
  args = _parser().parse_args(argv)
  try:
    meta = _run(args)
  except (ConversionError, OSError, fusion.FusionError, ValueError) as error:
    print(f'error: {error}', file=sys.stderr)
    return 1
  print(_summary(args, meta))
  return 0
