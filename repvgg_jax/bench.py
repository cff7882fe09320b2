"""Inference benchmark: training-time vs fused model, side by side in one run.

    python -m repvgg_jax.bench --model A0 --batch 32 --size 224

Both models are compiled first; then timed runs alternate between them (so a
busy or throttling machine slows both alike) and the median of each is
reported, with the speed ratio and XLA's compiled temporary memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from repvgg_jax import fusion, variants
from repvgg_jax.model import create_model


def _compiled_forward(model, variables, images):
  """The jitted, compiled inference function of ``model`` and its temp memory."""
  compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, images).compile()
  memory = compiled.memory_analysis()
  temp_bytes = getattr(memory, 'temp_size_in_bytes', None) if memory is not None else None
  return compiled, temp_bytes


def _time_once(fn, variables, images) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(variables, images))
  return time.perf_counter() - start


def benchmark(
  name: str,
  batch: int = 32,
  size: int = 224,
  runs: int = 5,
  warmup: int = 2,
  dtype: str = 'float32',
  seed: int = 0,
  conv_impl: str = 'auto',
) -> dict:
  """Measures images/s of the training-time (inference mode) and fused models.

  Returns:
    A dict with, for ``train`` and ``deploy``: median seconds per batch,
    images/s, every timed run, and compiled temporary memory in bytes; plus
    ``speedup`` (deploy over train images/s) and the set-up.
  """
  variant = variants.get_variant(name)
  model = create_model(variant, dtype=jnp.dtype(dtype), conv_impl=conv_impl)
  deploy = create_model(variant, deploy=True, dtype=jnp.dtype(dtype), conv_impl=conv_impl)
  images = jax.random.normal(jax.random.key(seed), (batch, size, size, 3), jnp.float32)
  variables = jax.jit(model.init)(jax.random.key(seed), images[:1])
  fused = jax.jit(fusion.fuse_params)(variables)
  result, _ = benchmark_models(model, deploy, variables, fused, images, runs, warmup)
  return result


def benchmark_models(model, deploy, variables, fused, images, runs: int = 5, warmup: int = 2):
  """Times ``model`` on ``variables`` against ``deploy`` on ``fused``, alternating runs.

  Args:
    model: the training-time `RepVGG`; ``deploy``: its fused counterpart.
    variables: ``model``'s variables; ``fused``: ``deploy``'s.
    images: the timed batch, NHWC float32.
    runs: timed runs of each model.
    warmup: untimed runs of each model after compiling.

  Returns:
    ``(result, compiled)``: the result as `benchmark` returns it, and the compiled
    inference functions ``{'train': fn, 'deploy': fn}``, called as
    ``fn(variables, images)`` with any values of the timed shapes.
  """
  forward = {
    'train': _compiled_forward(model, variables, images),
    'deploy': _compiled_forward(deploy, fused, images),
  }
  inputs = {'train': variables, 'deploy': fused}
  for _ in range(warmup):
    for key, (fn, _) in forward.items():
      _time_once(fn, inputs[key], images)
  times = {key: [] for key in forward}
  for _ in range(runs):
    for key, (fn, _) in forward.items():
      times[key].append(_time_once(fn, inputs[key], images))
  batch, size = images.shape[0], images.shape[1]
  result = {
    'model': model.variant.name,
    'batch': batch,
    'size': size,
    'dtype': jnp.dtype(model.dtype).name,
    'conv_impl': model.conv_impl,
    'backend': jax.default_backend(),
    'device': jax.devices()[0].device_kind,
    'runs': runs,
  }
  for key, (_, temp_bytes) in forward.items():
    median = statistics.median(times[key])
    result[key] = {
      'seconds_per_batch': median,
      'images_per_sec': batch / median,
      'all_seconds': times[key],
      'temp_bytes': temp_bytes,
    }
  result['speedup'] = result['deploy']['images_per_sec'] / result['train']['images_per_sec']
  compiled = {key: fn for key, (fn, _) in forward.items()}
  return result, compiled


def _mib(num_bytes) -> str:
  return 'n/a' if num_bytes is None else f'{num_bytes / 2**20:,.1f} MiB'


def format_result(result: dict) -> str:
  """A small table a person can read."""
  lines = [
    f'{result["model"]}, batch {result["batch"]}, {result["size"]}x{result["size"]}, '
    f'{result["dtype"]}, {result["conv_impl"]} conv, {result["backend"]} ({result["device"]}), '
    f'median of {result["runs"]} runs',
    f'{"model":<15}{"images/s":>12}{"ms/batch":>12}{"temp memory":>16}',
  ]
  for key, label in (('train', 'training-time'), ('deploy', 'fused')):
    r = result[key]
    lines.append(
      f'{label:<15}{r["images_per_sec"]:>12,.1f}{r["seconds_per_batch"] * 1e3:>12,.1f}'
      f'{_mib(r["temp_bytes"]):>16}'
    )
  lines.append(f'fused / training-time speed: {result["speedup"]:.2f}x')
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='A0', help='variant name (see --list)')
  parser.add_argument('--batch', type=int, default=32, help='images per batch')
  parser.add_argument('--size', type=int, default=224, help='image height and width')
  parser.add_argument('--runs', type=int, default=5, help='timed runs of each model')
  parser.add_argument('--warmup', type=int, default=2, help='untimed runs after compiling')
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument(
    '--conv-impl',
    default='auto',
    choices=['auto', 'xla', 'im2col'],
    help='convolution implementation (auto: im2col on CPU, XLA elsewhere)',
  )
  parser.add_argument('--json', help='append the result as one JSON line to this file')
  parser.add_argument('--list', action='store_true', help='list the variants and exit')
  args = parser.parse_args(argv)
  if args.list:
    print('\n'.join(variants.list_models()))
    return 0
  try:
    variants.get_variant(args.model)
  except ValueError as error:
    parser.error(str(error))
  if args.batch < 1 or args.size < 1 or args.runs < 1:
    parser.error('--batch, --size and --runs must be positive.')
  result = benchmark(
    args.model, args.batch, args.size, args.runs, args.warmup, args.dtype, conv_impl=args.conv_impl
  )
  print(format_result(result))
  if args.json:
    with open(args.json, 'a') as f:
      f.write(json.dumps(result) + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(main())
