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
``{'params'[, 'batch_stats']}`` and JSON metadata (model, deploy,
num_classes); ``export`` writes the artifacts of `repvgg_jax.interop.export`. These
three run the source and the result on a random batch and report the largest
relative difference of their outputs; ``quantize`` evaluates both models
(`repvgg_jax.interop.quantize`).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from repvgg_jax import checkpointing, perf, run_files
from repvgg_jax.data import MEAN_RGB, STDDEV_RGB
from repvgg_jax.interop import (
  checkpoint_io,
  export,
  onnx_export,
  quantize,
  torch_layout,
  weight_files,
)
from repvgg_jax.interop.torch_layout import ConversionError
from repvgg_jax.model import PAPER_BRANCHES, create_model, fusion, get_variant, model_from_config
from repvgg_jax.model.branches import POST_NORM_KEY, get_branch
from repvgg_jax.model.network import NUM_STAGES
from repvgg_jax.perf import compile_options


def _outputs(model, variables, images) -> np.ndarray:
  """The model's logits (or a backbone's stage outputs) as one float64 row per image."""
  return _flat(compile_options.jit(model.apply)(variables, images))


def max_relative_difference(a: np.ndarray, b: np.ndarray) -> float:
  """Largest per-example ``||a - b|| / ||b||``."""
  diff = np.linalg.norm(a - b, axis=-1) / np.maximum(np.linalg.norm(b, axis=-1), 1e-12)
  return float(diff.max())


def _random_images(size: int = 64, batch: int = 4, channels: int = 3) -> jax.Array:
  return jax.random.normal(jax.random.key(0), (batch, size, size, channels))


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
  images = _random_images()
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
    out[label] = max_relative_difference(actual, expected)
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
  images = _random_images(channels=train_model.in_channels)
  difference = max_relative_difference(
    _outputs(deploy_model, fused, images), _outputs(train_model, variables, images)
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
    return *_config_models(config, 'xla'), (workdir, config)
  if name is None:
    raise ConversionError(f'No config.json in {workdir}: give the variant with --model.')
  return *_tree_models(name, fused['params'], variables['params'], 'xla'), None


def _config_models(config: dict, conv_impl: str):
  """``(training-time model, deploy model)`` of a run's ``config``, in float32 as
  exported whatever the run computed in; the deploy one with ``conv_impl``."""
  config = ml_collections.ConfigDict(config)
  conv = perf.conv_layer(conv_impl, train=False)
  return (
    model_from_config(config, dtype='float32'),
    model_from_config(config, deploy=True, conv=conv, dtype='float32'),
  )


def _tree_models(name: str, fused_params, training_params, conv_impl: str):
  """``(training-time model, deploy model)`` of the variant ``name`` with the classes,
  input channels and stages of ``fused_params``; the training-time one has the branches
  of ``training_params`` (None: no training-time model)."""
  options = _model_options(fused_params, conv_impl)
  training_model = None
  if training_params is not None:
    branches = _branches_per_stage(training_params)
    training_model = create_model(name, branches=branches, **options)
  return training_model, create_model(name, deploy=True, **options)


def _branches_per_stage(params) -> list[tuple[str, ...]]:
  """The branch kinds of each stage's blocks (the paper's for stages a backbone left out).

  A kind that stands in for another where that one does not apply (QARepVGG's
  plain 1x1 for its 1x1-plus-identity) is left to the kind it stands in for.
  """
  stages: dict[int, set[str]] = {}
  for key in fusion.block_keys(params):
    stage, _ = fusion.block_position(key)
    stages.setdefault(stage, set()).update(k for k in params[key] if k != POST_NORM_KEY)
  for kinds in stages.values():
    kinds -= {get_branch(kind).fallback for kind in kinds}
  return [tuple(sorted(stages.get(s, PAPER_BRANCHES))) for s in range(NUM_STAGES)]


def export_checkpoint(
  path,
  output_dir,
  model: str | None = None,
  image_size: int | None = None,
  formats=None,
  platforms=None,
  conv_impl: str = 'xla',
  verify: bool = True,
) -> dict:
  """Exports a deploy checkpoint (a training one is fused first) or an int8 directory
  (`quantize.save_int8`'s; jax.export only); returns export.json's content.

  ``formats``: from `export.FORMATS`; by default all of them (jax for int8).
  """
  checkpoint_io.check_output_dir(output_dir)
  if (pathlib.Path(path) / quantize.META_FILE).is_file():
    return _export_int8(pathlib.Path(path), output_dir, image_size, formats, platforms, verify)
  formats = formats or export.FORMATS
  deploy_model, variables, training_model, training, saved = _export_models(
    pathlib.Path(path), model, conv_impl
  )
  image_size = image_size if image_size is not None else saved.get('image_size') or 224
  meta = {
    'model': deploy_model.variant.name,
    'num_classes': deploy_model.num_classes,
    'source': str(path),
    'fused_from_training_checkpoint': training is not None,
  }
  meta.update(_preprocess(deploy_model.in_channels))
  meta.update(_feeding(saved))

  def compare(staging: pathlib.Path, runnable) -> dict:
    differences = _verify_export(staging, deploy_model, variables, image_size, runnable)
    if training is not None:  # And the deploy model against the checkpoint's training-time one.
      images = _random_images(image_size, batch=3, channels=deploy_model.in_channels)
      differences['fused_vs_training'] = max_relative_difference(
        _outputs(deploy_model, variables, images), _outputs(training_model, training, images)
      )
    return differences

  check = _verification(formats, platforms, compare) if verify else None
  output = export.write_export(
    output_dir, deploy_model, variables, image_size, meta, formats, platforms, check
  )
  return json.loads((output / export.META_FILE).read_text())


def _export_models(path: pathlib.Path, model: str | None, conv_impl: str):
  """``(deploy model, its variables, training-time model, its variables, saved
  metadata)`` of the checkpoint to export; the training-time pair is None for a
  deploy checkpoint. The models are those of the training run's config.json where
  the checkpoint lies in a run and ``model`` is not given (a scaled variant
  included), else ``model``, the one the checkpoint names or the one it has the
  shapes of. What the checkpoint does not record (one written before it recorded its
  image size), its run, if any, supplies."""
  run = run_files.training_run(path)
  if run is None or model is not None:
    *models, saved = _named_models(path, model, conv_impl)
    if run is not None and not _describes(run[1], models[0]):
      run = None  # A run around the checkpoint, but not the one that trained it.
  else:
    *models, saved = _run_models(path, run, conv_impl)
  return *models, {**saved, **run_files.feeding(saved, run)}


def _describes(config: dict, deploy_model) -> bool:
  """Whether a run's ``config`` trains the variant and classes of ``deploy_model``."""
  try:
    name = get_variant(config['model']['name']).name
  except (KeyError, TypeError, ValueError):
    return False
  classes = config['dataset'].get('num_classes')
  return name == deploy_model.variant.name and classes == deploy_model.num_classes


def _named_models(path: pathlib.Path, model: str | None, conv_impl: str):
  """`_export_models` of a variant of the paper: ``model`` or the checkpoint's."""
  name, variables, training, saved = checkpoint_io.deploy_variables(path, model)
  training_params = None if training is None else training['params']
  training_model, deploy_model = _tree_models(name, variables['params'], training_params, conv_impl)
  return deploy_model, variables, training_model, training, saved


def _run_models(path: pathlib.Path, run: tuple[pathlib.Path, dict], conv_impl: str):
  """`_export_models` as the training ``run``'s config.json builds them."""
  variables, training, saved = checkpoint_io.fused_variables(path)
  training_model, deploy_model = _config_models(run[1], conv_impl)
  training_model = None if training is None else training_model
  described = f'{run[0]}/{run_files.CONFIG_FILE}'
  name = run[1]['model']['name']
  if saved.get('model', name) != name:
    raise ConversionError(
      f'{path} holds a {saved["model"]}, but {described} describes a {name}: '
      'give the variant with --model.'
    )
  if not deploy_model.matches(variables['params']) or not (
    training is None or training_model.matches(training['params'])
  ):
    raise ConversionError(
      f'{path} does not hold the {deploy_model.variant.name} that {described} describes: '
      'give the variant with --model.'
    )
  return deploy_model, variables, training_model, training, saved


def _feeding(saved: dict) -> dict:
  """What predict needs to feed the model and name its outputs, where the run recorded it."""
  return {key: saved[key] for key in ('eval_preprocess', 'classes') if saved.get(key)}


def _preprocess(in_channels: int) -> dict:
  """export.json's ``preprocess``: what training fed an RGB model, (pixels / 255 - mean) / std."""
  if in_channels != 3:
    return {}
  return {'preprocess': {'scale': '1/255', 'mean': list(MEAN_RGB), 'std': list(STDDEV_RGB)}}


def _export_int8(path: pathlib.Path, output_dir, image_size, formats, platforms, verify) -> dict:
  """Exports an int8 directory as a `jax.export` artifact (Qwix's int8 ops kept as they are)."""
  formats = tuple(formats or ('jax',))
  if formats != ('jax',):
    raise ConversionError(
      f'An int8 model exports with --formats jax only, not {",".join(formats)}: export the '
      'float deploy checkpoint for TF or ONNX.'
    )
  qmodel, qvariables, qmeta = quantize.load_int8(path)
  image_size = image_size if image_size is not None else qmeta.get('image_size') or 224
  meta = {
    'model': qmeta['model'],
    'num_classes': qmeta['num_classes'],
    'source': str(path),
    'int8': {key: qmeta[key] for key in ('mode', 'fp32_top1', 'int8_top1') if key in qmeta},
    **_preprocess(qmeta['in_channels']),
  }
  meta.update(_feeding(qmeta))

  def compare(staging: pathlib.Path, runnable) -> dict:
    images = _random_images(image_size, batch=3, channels=qmeta['in_channels'])
    return {  # Against the model as `quantize` evaluates it: jitted.
      fmt: max_relative_difference(
        _run_artifact(export.load_jax_export, staging, fmt, images),
        _flat(jax.jit(qmodel.apply)(qvariables, images)),
      )
      for fmt in runnable  # jax alone.
    }

  check = _verification(formats, platforms, compare) if verify else None
  # Unfolded: the artifact computes exactly what `quantize` evaluated.
  output = export.write_export(
    output_dir,
    qmodel,
    qvariables,
    image_size,
    meta,
    formats,
    platforms,
    check,
    fold_variables=False,
  )
  return json.loads((output / export.META_FILE).read_text())


def _model_options(params, conv_impl: str) -> dict:
  """`create_model` arguments that fit a (fused) parameter tree: its classes, input
  channels and, for a backbone, every stage it holds (out_indices may have cut it short)."""
  num_classes = int(params['linear']['kernel'].shape[1]) if 'linear' in params else 0
  last_stage = fusion.architecture(params)[-1].stage if num_classes == 0 else NUM_STAGES - 1
  return {
    'num_classes': num_classes,
    'in_channels': int(params['stage0_block0']['reparam']['kernel'].shape[2]),
    'conv': perf.conv_layer(conv_impl, train=False),
    'out_indices': tuple(range(last_stage + 1)),
  }


def _runnable_here(formats, platforms) -> tuple[tuple[str, ...], dict[str, str]]:
  """The formats whose artifacts this machine can run, and why each other is not verified
  here: ONNX always; jax.export where it was lowered for this backend; the SavedModel,
  which TensorFlow runs on its CPU here (`export.load_saved_model`), where lowered for cpu."""
  backend = jax.default_backend()
  lowered = tuple(platforms) if platforms else (jax.export.default_export_platform(),)
  runs = {'onnx': True, 'jax': export.runs_here(lowered), 'tf': 'cpu' in lowered}
  why = f'lowered for {",".join(lowered)}; this machine runs it on {{}}: load it where it runs'
  skipped = {f: why.format('cpu' if f == 'tf' else backend) for f in formats if not runs[f]}
  return tuple(f for f in formats if runs[f]), skipped


def _verification(formats, platforms, compare) -> Callable[[pathlib.Path], dict]:
  """The check `export.write_export` runs on its staging directory: the differences
  that ``compare(staging, formats)`` measures for the formats this machine runs, and
  why each other one is not verified here."""

  def check(staging: pathlib.Path) -> dict:
    runnable, skipped = _runnable_here(formats, platforms)
    checked = {'not_verified': skipped} if skipped else {}
    return {**checked, 'verify': compare(staging, runnable)}

  return check


def _verify_export(output, deploy_model, variables, image_size, formats) -> dict:
  """Reloads each artifact and compares it with the deploy model on a batch of 3."""
  images = _random_images(image_size, batch=3, channels=deploy_model.in_channels)
  expected = _outputs(deploy_model, variables, images)
  loaders = {
    'jax': export.load_jax_export,
    'tf': export.load_saved_model,
    'onnx': onnx_export.load_onnx,
  }
  return {
    fmt: max_relative_difference(_run_artifact(loaders[fmt], output, fmt, images), expected)
    for fmt in formats
  }


def _run_artifact(load, output, fmt: str, images) -> np.ndarray:
  """The outputs of the ``fmt`` artifact in ``output`` on ``images``; one line where the
  runtime cannot load or run it (an onnxruntime too old for the file, say)."""
  try:
    return _flat(load(output)(images))
  except Exception as error:  # noqa: BLE001 (onnxruntime, TensorFlow and XLA raise many kinds)
    reason = ' '.join(str(error).split())[:300] or type(error).__name__
    raise ConversionError(
      f'The {fmt} artifact does not run here ({reason}); nothing was written. Update that '
      'runtime, or pass --no-verify to write it unchecked.'
    ) from error


def _flat(outputs) -> np.ndarray:
  """Outputs (logits, or the stage outputs of a backbone) as one float64 row per example."""
  leaves = [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(outputs)]
  return np.concatenate([leaf.reshape(len(leaf), -1) for leaf in leaves], axis=1)


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
    return quantize.quantize_checkpoint(
      args.source,
      args.output,
      calibration_batches=args.calibration_batches,
      mode=args.mode,
      config_file=args.config,
      recalibrate=args.recalibrate,
    )
  return export_checkpoint(
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
