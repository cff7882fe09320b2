"""Benchmarks: fused vs training-time inference, training steps, PyTorch side by side.

    python -m repvgg_jax.bench --model A0 --batch 32 --size 224     # inference, both models
    python -m repvgg_jax.bench train --model A0 --batch 128 --size 32
    python -m repvgg_jax.bench roofline                             # the machine's matmul peak
    python -m repvgg_jax.bench layers --model A0 --batch 128 --size 32 --train
    python -m repvgg_jax.bench deploy --model A0 --batches 1,32     # JAX, onnxruntime, PyTorch, TF
    python -m repvgg_jax.bench deploy --model A0 --int8 --no-torch  # and int8 in JAX
    python -m repvgg_jax.bench input                                # JPEG decode + crop per core
    python -m repvgg_jax.bench suite --out bench_results            # all of it, tables, plot

Every timed function is compiled and warmed up first; then timed runs
alternate between the functions compared (so a busy or throttling machine
slows all alike) and the median of each is reported. With torch installed the
same network runs in PyTorch (`repvgg_jax.interop.torch_reference`), fed the converted
weights and checked to give the same logits before it is timed. Figures are
printed as tables and, with ``--json``, appended as JSON lines; `bench_report`
turns those into markdown and the paper's Figure 1.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax

from repvgg_jax import jsonfiles
from repvgg_jax.bench import report as bench_report
from repvgg_jax.bench import suite, timing
from repvgg_jax.bench.models import (
  TORCH_LAYOUTS,
  SettingsError,
  benchmark,
  benchmark_train_step,
)
from repvgg_jax.bench.timing import benchmark_layers
from repvgg_jax.model import network, variants
from repvgg_jax.perf import CONV_IMPLS, host_memory
from repvgg_jax.startup import quiet_startup


def _with_torch(parser, asked: bool | None, training_models=()) -> bool:
  """``--torch``/``--no-torch``, or whether torch is installed when neither is given.

  The PyTorch reference builds RepVGG's training-time block only: with other
  block kinds among ``training_models``, PyTorch is left out (an error if asked).
  """
  if asked and not suite.torch_available():
    parser.error('--torch needs PyTorch: pip install -r requirements-test.txt')
  others = [name for name in training_models if variants.get_variant(name).block != 'repvgg']
  if others and asked:
    parser.error(f'--torch: the PyTorch reference has no {others[0]} training-time block.')
  return suite.torch_available() and not others if asked is None else asked


def _layouts(text: str) -> tuple[str, ...]:
  layouts = tuple(part.strip() for part in text.split(',') if part.strip())
  unknown = sorted(set(layouts) - set(TORCH_LAYOUTS))
  if not layouts or unknown:
    raise argparse.ArgumentTypeError(
      f'unknown layout(s) {unknown or text!r}: use {" and/or ".join(TORCH_LAYOUTS)}, '
      'comma-separated'
    )
  return layouts


def _batches(text: str) -> tuple[int, ...]:
  try:
    batches = tuple(int(b) for b in text.split(','))
  except ValueError:
    batches = ()
  if not batches or min(batches) < 1:
    raise argparse.ArgumentTypeError(f'{text!r}: give positive batch sizes, e.g. 1,32')
  return batches


def _chunk_images(text: str) -> int | str:
  if text == 'auto':
    return text
  if not text.isdigit():
    raise argparse.ArgumentTypeError(f"use 'auto' or an int >= 0 (0: no chunks), got {text!r}")
  return int(text)


def _add_host_memory(parser) -> None:
  parser.add_argument(
    '--reuse-host-memory',
    action='store_true',
    help='keep freed host memory for reuse (repvgg_jax.perf.host_memory), as train.py '
    '--reuse_host_memory does; for JAX and PyTorch alike',
  )


def _add_torch_flag(parser, what: str) -> None:
  parser.add_argument(
    '--torch',
    action=argparse.BooleanOptionalAction,
    default=None,
    help=f'{what} (default: when torch is installed)',
  )


def _add_common(parser, batch: int, size: int, *, whole_model: bool = True) -> None:
  """The flags of ``infer``, ``train`` and (without those of a ``whole_model``:
  dtype, convolutions, PyTorch) ``layers``."""
  parser.add_argument('--model', default='A0', help='variant name (see --list)')
  parser.add_argument('--batch', type=int, default=batch, help='images per batch')
  parser.add_argument('--size', type=int, default=size, help='image height and width')
  parser.add_argument('--runs', type=int, default=5, help='timed runs of each function')
  parser.add_argument('--warmup', type=int, default=2, help='untimed runs after compiling')
  if whole_model:
    parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
    parser.add_argument(
      '--conv-impl',
      default='auto',
      choices=CONV_IMPLS,
      help='convolution implementation (auto: per layer, by backend and feature-map size)',
    )
    _add_torch_flag(parser, 'also time the same network in PyTorch (float32 only)')
  parser.add_argument('--json', help='append the result as JSON lines to this file')
  _add_host_memory(parser)


def _add_deploy_commands(sub) -> None:
  """``deploy`` (the fused model in four runtimes) and ``input`` (feeding a GPU)."""
  deploy = sub.add_parser(
    'deploy', help='the fused model in JAX, onnxruntime, PyTorch and a TF SavedModel'
  )
  deploy.add_argument('--model', default='A0', help='variant name (see --list)')
  deploy.add_argument('--batches', default='1,32', type=_batches, help='comma-separated sizes')
  deploy.add_argument('--size', type=int, default=224, help='image height and width')
  deploy.add_argument('--runs', type=int, default=10, help='timed runs of each runtime')
  deploy.add_argument('--warmup', type=int, default=2, help='untimed runs after loading')
  _add_torch_flag(deploy, 'include PyTorch')
  deploy.add_argument('--int8', action='store_true', help='also int8 in JAX (Qwix)')
  deploy.add_argument('--json', help='append the rows as JSON lines to this file')
  _add_host_memory(deploy)
  feed = sub.add_parser('input', help='JPEG decode, random-resized crop and flip, per core')
  feed.add_argument('--images', type=int, default=512, help='JPEGs made and decoded per pass')
  feed.add_argument('--size', type=int, default=224, help='side of the training crops')
  feed.add_argument('--runs', type=int, default=3, help='timed passes of each form')
  feed.add_argument(
    '--gpu-rate',
    type=float,
    default=timing.B0_GPU_RATE,
    help="images/s one GPU trains at (default: %(default)s, B0's on one H200 in bfloat16)",
  )
  feed.add_argument('--json', help='append the rows as JSON lines to this file')
  _add_host_memory(feed)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog='python -m repvgg_jax.bench',
    description=__doc__.split('\n')[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument('--list', action='store_true', help='list the variants and exit')
  sub = parser.add_subparsers(dest='command')
  infer = sub.add_parser('infer', help='training-time vs fused inference (default)')
  _add_common(infer, 32, 224)
  infer.add_argument(
    '--chunk-images',
    default='auto',
    type=_chunk_images,
    help='images per chunk through the large-map blocks (0: none; auto: 4 on CPUs)',
  )
  train = sub.add_parser('train', help="the trainer's SGD step, over all devices")
  _add_common(train, 128, 32)
  train.add_argument('--num-classes', type=int, default=1000, help='classifier outputs')
  train.add_argument('--bn-group-size', type=int, default=0, help='0: BatchNorm over the batch')
  train.add_argument(
    '--steps-per-call',
    type=int,
    default=1,
    help='steps per call, as config.steps_per_call (> 1: one step per call timed beside it)',
  )
  train.add_argument(
    '--freeze-stages',
    type=int,
    default=0,
    help='leading stages frozen, as config.freeze_stages (fine-tuning)',
  )
  train.add_argument(
    '--torch-layouts',
    default=','.join(TORCH_LAYOUTS),
    type=_layouts,
    help=f'PyTorch memory layouts to time, comma-separated (of {", ".join(TORCH_LAYOUTS)})',
  )
  roof = sub.add_parser('roofline', help='measured matmul and convolution peaks')
  roof.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  roof.add_argument('--json', help='append the result as JSON lines to this file')
  _add_host_memory(roof)
  layers = sub.add_parser('layers', help="per-layer XLA, im2col and Winograd, and 'auto's choice")
  _add_common(layers, 32, 224, whole_model=False)  # Float32, every implementation.
  layers.add_argument('--train', action='store_true', help='time forward and backward')
  _add_deploy_commands(sub)
  suite = sub.add_parser('suite', help='everything, as JSON lines, markdown and Figure 1')
  suite.add_argument('--out', default='bench_results', help='output directory')
  suite.add_argument('--runs', type=int, default=5, help='timed runs of each function')
  suite.add_argument('--warmup', type=int, default=2, help='untimed runs after compiling')
  suite.add_argument('--models', default='all', help="Figure 1's variants, comma-separated")
  suite.add_argument(
    '--figure-batch', type=int, default=None, help="Figure 1's batch (default: 8 on CPUs, else 128)"
  )
  _add_torch_flag(suite, 'PyTorch beside JAX where the suite compares them')
  suite.add_argument('--figure-size', type=int, default=224, help="Figure 1's image side")
  _add_host_memory(suite)
  return parser


def main(argv=None) -> int:
  quiet_startup()  # Before JAX picks its backend (at the first device query).
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or (argv[0].startswith('-') and argv[0] not in ('--list', '-h', '--help')):
    argv = ['infer', *argv]  # The inference pair is the default command.
  parser = _parser()
  args = parser.parse_args(argv)
  if args.list:
    print('\n'.join(variants.list_models()))
    return 0
  _check_json(parser, getattr(args, 'json', None))
  if args.reuse_host_memory and not host_memory.reuse_freed_memory():
    print('--reuse-host-memory: not applied (glibc on a CPU-only run only).', file=sys.stderr)
  if min(getattr(args, 'warmup', 0), 0) < 0:
    parser.error('--warmup must be 0 or more.')
  if args.command == 'suite':
    return _run_suite(parser, args)
  if args.command == 'input':
    return _run_deployment_bench(parser, args)
  if args.command == 'roofline':
    row = suite.roofline(args.dtype)
    bench_report.emit(row, bench_report.format_roofline(row), args.json)
    return 0
  _check_model(parser, args.model)
  if args.command == 'deploy':
    return _run_deployment_bench(parser, args)
  if args.batch < 1 or args.size < 1 or args.runs < 1:
    parser.error('--batch, --size and --runs must be positive.')
  if args.command == 'layers':
    rows = benchmark_layers(args.model, args.batch, args.size, args.train, args.runs, args.warmup)
    print(bench_report.format_layers(rows))
    for row in rows if args.json else ():
      jsonfiles.append_jsonl(args.json, row)
    return 0
  with_torch = _with_torch(parser, args.torch, [args.model])
  if args.dtype != 'float32' and with_torch:
    if args.torch:
      parser.error(f'--torch: the PyTorch reference runs float32 only, not {args.dtype}.')
    with_torch = False  # Not compared with float32 PyTorch unasked.
  if args.command == 'train':
    with_torch = _check_train(parser, args, with_torch)
  return _run_model_bench(parser, args, with_torch)


def _run_suite(parser, args) -> int:
  """``suite``: the settings checked, then every table and figure (`suite.run_suite`)."""
  if pathlib.Path(args.out).exists() and not pathlib.Path(args.out).is_dir():
    parser.error(f'--out {args.out} is a file: give a directory for the results.')
  names = variants.list_models('repvgg') if args.models == 'all' else args.models.split(',')
  for name in names:
    _check_model(parser, name)
  if min(args.runs, args.figure_size, 1 if args.figure_batch is None else args.figure_batch) < 1:
    parser.error('--runs, --figure-size and --figure-batch must be positive.')
  with_torch = _with_torch(parser, args.torch)  # Figure 1's models run in JAX only.
  suite.run_suite(
    args.out, args.runs, args.warmup, args.figure_batch, args.figure_size, names, with_torch
  )
  return 0


def _run_model_bench(parser, args, with_torch: bool) -> int:
  """``train`` or ``infer`` of one model: one row, printed (and appended to
  ``--json``); settings the train bench refuses end as a usage error."""
  common = dict(runs=args.runs, warmup=args.warmup, dtype=args.dtype, conv_impl=args.conv_impl)
  if args.command == 'train':
    try:
      row = benchmark_train_step(
        args.model,
        args.batch,
        args.size,
        num_classes=args.num_classes,
        bn_group_size=args.bn_group_size,
        with_torch=with_torch,
        torch_layouts=args.torch_layouts,
        steps_per_call=args.steps_per_call,
        freeze_stages=args.freeze_stages,
        **common,
      )
    except SettingsError as error:
      parser.error(str(error))
    bench_report.emit(row, bench_report.format_train(row), args.json)
  else:
    row = benchmark(
      args.model,
      args.batch,
      args.size,
      chunk_images=args.chunk_images,
      with_torch=with_torch,
      **common,
    )
    bench_report.emit(row, bench_report.format_infer(row), args.json)
  return 0


def _check_train(parser, args, with_torch: bool) -> bool:
  """Refuses ``train`` settings that cannot run; returns whether PyTorch still runs
  (not with frozen stages; its channels-last training step crashes on CPUs at large
  images: left out)."""
  if args.num_classes < 1 or args.steps_per_call < 1 or args.bn_group_size < 0:
    parser.error('--num-classes and --steps-per-call must be positive, --bn-group-size >= 0.')
  if args.bn_group_size and args.batch % args.bn_group_size:
    parser.error(
      f'--batch {args.batch} does not split into BatchNorm groups of {args.bn_group_size}.'
    )
  if with_torch and jax.default_backend() == 'cpu' and args.size > 32:
    if 'channels_last' in args.torch_layouts:
      crashes = "PyTorch's channels-last training step crashes on CPUs at large images"
      if args.torch_layouts == ('channels_last',):
        parser.error(f'{crashes} (seen at 224): use --torch-layouts nchw at {args.size}.')
      print(f'{crashes} (seen at 224): timed in NCHW only at {args.size}.', file=sys.stderr)
    args.torch_layouts = ('nchw',)
  if args.freeze_stages:
    if not 0 < args.freeze_stages <= network.NUM_STAGES:
      parser.error(f'--freeze-stages must be from 0 to {network.NUM_STAGES}.')
    if args.torch:
      parser.error('--torch: the PyTorch step trains every stage; leave out --freeze-stages.')
    with_torch = False
  return with_torch


def _check_json(parser, path) -> None:
  """A ``--json`` file goes into a directory that exists (else the figures are lost)."""
  if path and not pathlib.Path(path).absolute().parent.is_dir():
    parser.error(f'--json {path}: no directory {pathlib.Path(path).absolute().parent}.')
  if path and pathlib.Path(path).is_dir():
    parser.error(
      f'--json {path} is a directory: give a file in it, e.g. {pathlib.Path(path) / "rows.jsonl"}.'
    )


def _run_deployment_bench(parser, args) -> int:
  """``deploy`` or ``input``: its table printed, its rows appended to ``--json``."""
  # Imported by their own command alone: TensorFlow and the exporters take seconds.
  if args.command == 'deploy':
    from repvgg_jax.bench import deploy as bench_deploy

    if args.size < 1 or args.runs < 1:
      parser.error('--size and --runs must be positive.')
    torch = _with_torch(parser, args.torch)
    rows = bench_deploy.benchmark_deploy(
      args.model, args.batches, args.size, args.runs, args.warmup, torch, args.int8
    )
    print(bench_deploy.format_deploy(rows))
  else:
    from repvgg_jax.bench import input as bench_input

    if min(args.images, args.size, args.runs) < 1 or args.gpu_rate <= 0:
      parser.error('--images, --size, --runs and --gpu-rate must be positive.')
    rows = bench_input.benchmark_input(args.images, args.size, args.runs, args.gpu_rate)
    print(bench_input.format_input(rows))
  for row in rows if args.json else ():
    jsonfiles.append_jsonl(args.json, row)
  return 0


def _check_model(parser, name: str) -> None:
  try:
    variants.get_variant(name)
  except ValueError as error:
    parser.error(str(error))
