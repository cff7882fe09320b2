"""Benchmarks: fused vs training-time inference, training steps, PyTorch side by side.

    python -m repvgg_jax.bench --model A0 --batch 32 --size 224     # inference, both models
    python -m repvgg_jax.bench train --model A0 --batch 128 --size 32
    python -m repvgg_jax.bench roofline                             # the machine's matmul peak
    python -m repvgg_jax.bench layers --model A0 --batch 128 --size 32 --train
    python -m repvgg_jax.bench suite --out bench_results            # all of it, tables, plot

Every timed function is compiled and warmed up first; then timed runs
alternate between the functions compared (so a busy or throttling machine
slows all alike) and the median of each is reported. With torch installed the
same network runs in PyTorch (`repvgg_jax.torch_reference`), fed the converted
weights and checked to give the same logits before it is timed. Figures are
printed as tables and, with ``--json``, appended as JSON lines; `bench_report`
turns those into markdown and the paper's Figure 1.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.extend import core as jax_core
from ml_collections import ConfigDict

from repvgg_jax import bench_report, fusion, optim, variants
from repvgg_jax.conv import CONV_IMPLS, Conv, choose_conv_impl
from repvgg_jax.model import create_model


def count_macs(fn: Callable, *args) -> int:
  """Multiply-adds of the convolutions and matmuls ``fn(*args)`` traces to.

  Taps over padding count, as in the paper's "FLOPs" (A0 deploy: 1.36 G at
  224x224). Trace with ``conv_impl='xla'`` or 'im2col': both count the same.
  """

  def walk(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'conv_general_dilated':
        rhs, spec = eqn.invars[1].aval.shape, eqn.params['dimension_numbers'].rhs_spec
        per_output = rhs[spec[1]] * math.prod(rhs[i] for i in spec[2:])
        total += math.prod(eqn.outvars[0].aval.shape) * per_output
      elif eqn.primitive.name == 'dot_general':
        (contracted, _), _ = eqn.params['dimension_numbers']
        lhs = eqn.invars[0].aval.shape
        total += math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contracted)
      for param in eqn.params.values():
        if isinstance(param, jax_core.ClosedJaxpr):
          total += walk(param.jaxpr)
        elif isinstance(param, jax_core.Jaxpr):
          total += walk(param)
    return total

  return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def interleaved_medians(fns: dict[str, Callable[[], object]], runs: int, warmup: int):
  """Calls every function ``warmup`` times, then ``runs`` timed rounds alternating them.

  Each function must block until its result is ready. Returns, per name, the
  median seconds and every timed run.
  """
  for _ in range(warmup):
    for fn in fns.values():
      fn()
  times = {name: [] for name in fns}
  for _ in range(runs):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: (statistics.median(t), t) for name, t in times.items()}


def _compiled_forward(model, variables, images):
  """The jitted, compiled inference function of ``model`` and its temp memory."""
  compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, images).compile()
  return compiled, _temp_bytes(compiled)


def _temp_bytes(compiled) -> int | None:
  memory = compiled.memory_analysis()
  return getattr(memory, 'temp_size_in_bytes', None) if memory is not None else None


def _time_once(fn, variables, images) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(variables, images))
  return time.perf_counter() - start


def machine() -> dict:
  """What the figures were measured on."""
  info = {
    'date': datetime.date.today().isoformat(),
    'backend': jax.default_backend(),
    'device': jax.devices()[0].device_kind,
    'num_devices': jax.device_count(),
    'cpu': platform.processor() or platform.machine(),
    'cpu_count': os.cpu_count(),
    'jax': jax.__version__,
  }
  try:
    import torch

    info['torch'] = torch.__version__
  except ImportError:
    pass
  return info


def randomized_variables(model, images, seed: int = 0):
  """Initialised variables with random BatchNorm statistics, as a trained model has.

  Fresh statistics (mean 0, variance 1) would make the PyTorch logit check
  blind to a misplaced statistic.
  """
  variables = jax.jit(model.init)(jax.random.key(seed), images[:1])
  if 'batch_stats' not in variables:
    return variables
  leaves, treedef = jax.tree_util.tree_flatten_with_path(variables['batch_stats'])
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  stats = []
  for key, (path, leaf) in zip(keys, leaves, strict=True):
    if path[-1].key == 'var':
      stats.append(jax.random.uniform(key, leaf.shape, leaf.dtype, 0.5, 2.0))
    else:
      stats.append(0.1 * jax.random.normal(key, leaf.shape, leaf.dtype))
  return {**variables, 'batch_stats': jax.tree.unflatten(treedef, stats)}


def _rates(batch: int, seconds: float, all_seconds, macs: int, peak: float | None) -> dict:
  """Images/s and achieved GFLOP/s (2 per multiply-add) of one timed function."""
  gflops = 2 * macs * batch / seconds / 1e9
  return {
    'seconds_per_batch': seconds,
    'images_per_sec': batch / seconds,
    'all_seconds': all_seconds,
    'gflops_per_sec': gflops,
    'roofline_share': gflops / peak if peak else None,
  }


def benchmark(
  name: str,
  batch: int = 32,
  size: int = 224,
  runs: int = 5,
  warmup: int = 2,
  dtype: str = 'float32',
  seed: int = 0,
  conv_impl: str = 'auto',
  with_torch: bool = False,
  peak_gflops: float | None = None,
) -> dict:
  """Inference images/s of the training-time and the fused model, side by side.

  Args:
    name: the variant.
    batch, size: images per batch and their side.
    runs, warmup: timed and untimed runs of each model.
    dtype: compute dtype.
    seed: of the weights, BatchNorm statistics and images.
    conv_impl: see `repvgg_jax.conv`.
    with_torch: also time the same two networks in PyTorch (`bench_torch`).
    peak_gflops: the machine's measured roofline, for ``roofline_share``.

  Returns:
    A dict with, for ``train`` and ``deploy``: median seconds per batch,
    images/s, every timed run, GFLOP/s and compiled temporary memory in bytes;
    ``speedup`` (deploy over train images/s); with torch, ``torch`` timings
    and ``jax_over_torch`` ratios; and the set-up.
  """
  variant = variants.get_variant(name)
  model = create_model(variant, dtype=jnp.dtype(dtype), conv_impl=conv_impl)
  deploy = create_model(variant, deploy=True, dtype=jnp.dtype(dtype), conv_impl=conv_impl)
  images = jax.random.normal(jax.random.key(seed), (batch, size, size, 3), jnp.float32)
  variables = randomized_variables(model, images, seed)
  fused = jax.jit(fusion.fuse_params)(variables)
  extra = {}
  if with_torch:
    from repvgg_jax import bench_torch

    extra = bench_torch.inference_fns(variant, variables, fused, images)
  result, _ = benchmark_models(
    model, deploy, variables, fused, images, runs, warmup, extra=extra, peak_gflops=peak_gflops
  )
  return result


def benchmark_models(
  model,
  deploy,
  variables,
  fused,
  images,
  runs: int = 5,
  warmup: int = 2,
  extra: dict | None = None,
  peak_gflops: float | None = None,
):
  """Times ``model`` on ``variables`` against ``deploy`` on ``fused``, alternating runs.

  Args:
    model: the training-time `RepVGG`; ``deploy``: its fused counterpart.
    variables: ``model``'s variables; ``fused``: ``deploy``'s.
    images: the timed batch, NHWC float32.
    runs: timed runs of each model.
    warmup: untimed runs of each model after compiling.
    extra: more functions to time in the same rounds, e.g. PyTorch's
      (`bench_torch.inference_fns`): ``{name: (fn, info)}`` with ``fn()``
      blocking and ``info`` a dict stored under ``result['torch'][name]``.
    peak_gflops: the machine's measured roofline, for ``roofline_share``.

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
  fns = {
    key: (lambda fn=fn, v=inputs[key]: jax.block_until_ready(fn(v, images)))
    for key, (fn, _) in forward.items()
  }
  extra = extra or {}
  fns.update({name: fn for name, (fn, _) in extra.items()})
  medians = interleaved_medians(fns, runs, warmup)
  batch, size = images.shape[0], images.shape[1]
  result = {
    'kind': 'infer',
    'model': model.variant.name,
    'batch': batch,
    'size': size,
    'dtype': jnp.dtype(model.dtype).name,
    'conv_impl': model.conv_impl,
    'backend': jax.default_backend(),
    'device': jax.devices()[0].device_kind,
    'num_devices': 1,
    'runs': runs,
  }
  for key, (_, temp_bytes) in forward.items():
    chosen = model if key == 'train' else deploy
    macs = count_macs(lambda v, x, m=chosen: m.apply(v, x, train=False), inputs[key], images[:1])
    result[key] = {
      **_rates(batch, *medians[key], macs, peak_gflops),
      'temp_bytes': temp_bytes,
      'macs_per_image': macs,
      'params': sum(leaf.size for leaf in jax.tree.leaves(inputs[key]['params'])),
    }
  result['speedup'] = result['deploy']['images_per_sec'] / result['train']['images_per_sec']
  if extra:
    result['torch'] = {
      name: {**info, 'images_per_sec': batch / medians[name][0], 'all_seconds': medians[name][1]}
      for name, (_, info) in extra.items()
    }
    result['jax_over_torch'] = _ratios_to_torch(result, ('train', 'deploy'))
  compiled = {key: fn for key, (fn, _) in forward.items()}
  return result, compiled


def _ratios_to_torch(result: dict, keys) -> dict:
  """JAX images/s over the fastest PyTorch layout of the same model, per key."""
  ratios = {}
  for key in keys:
    torch_rates = [r['images_per_sec'] for r in result['torch'].values() if r['model'] == key]
    if torch_rates:
      ratios[key] = result[key]['images_per_sec'] / max(torch_rates)
  return ratios


def _train_config(num_classes: int, bn_group_size: int) -> ConfigDict:
  """The fields `steps.train_step` reads."""
  return ConfigDict(
    {
      'dataset': {'num_classes': num_classes},
      'model': {'bn_group_size': bn_group_size},
      'optimizer': {'mixup_alpha': 0.0, 'label_smoothing': 0.0},
    }
  )


def benchmark_train_step(
  name: str,
  batch: int = 128,
  size: int = 32,
  runs: int = 5,
  warmup: int = 2,
  dtype: str = 'float32',
  conv_impl: str = 'auto',
  num_classes: int = 1000,
  bn_group_size: int = 0,
  with_torch: bool = False,
  peak_gflops: float | None = None,
) -> dict:
  """Images/s of the trainer's SGD step, data parallel over every device.

  The step is `steps.train_step` jitted as the trainer jits it (batch sharded
  over a ``data`` mesh axis, state replicated and donated), with the paper's
  optimizer (SGD, momentum 0.9, weight decay 1e-4 on kernels) at a constant
  learning rate. ``bn_group_size`` 0 computes BatchNorm statistics over the
  whole batch, as single-process PyTorch does.

  Returns:
    A dict with ``jax`` timings (images/s, GFLOP/s counting the backward pass
    as twice the forward, temporary memory), with torch the ``torch`` timings
    and ``jax_over_torch``, and the set-up.
  """
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  from repvgg_jax import steps

  mesh = Mesh(np.array(jax.devices()), ('data',))
  if batch % mesh.size:
    raise ValueError(f'--batch {batch} must be a multiple of the {mesh.size} devices.')
  variant = variants.get_variant(name)
  model = create_model(
    variant, num_classes=num_classes, dtype=jnp.dtype(dtype), conv_impl=conv_impl
  )
  config = _train_config(num_classes, bn_group_size)
  tx = optax.chain(
    optax.add_decayed_weights(1e-4, mask=optim.weight_decay_mask), optax.sgd(0.1, momentum=0.9)
  )
  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  variables = model.clone(conv_impl='xla').init(jax.random.key(0), jnp.zeros((1, size, size, 3)))
  state = jax.device_put(
    steps.TrainState.create(
      apply_fn=model.apply,
      params=variables['params'],
      tx=tx,
      batch_stats=variables['batch_stats'],
    ),
    replicated,
  )
  step = jax.jit(
    lambda state, batch, rng: steps.train_step(state, batch, rng, model=model, config=config),
    in_shardings=(replicated, sharded, replicated),
    out_shardings=(replicated, replicated),
    donate_argnums=0,
  )
  rng = jax.random.key(1)
  data = {
    'image': jax.device_put(
      jax.random.normal(jax.random.key(2), (batch, size, size, 3), jnp.float32), sharded
    ),
    'label': jax.device_put(jax.random.randint(rng, (batch,), 0, num_classes), sharded),
  }
  compiled = step.lower(state, data, rng).compile()
  holder = {'state': state}

  def run_step():
    holder['state'], metrics = compiled(holder['state'], data, rng)
    jax.block_until_ready(metrics)

  fns = {'jax': run_step}
  torch_info = {}
  if with_torch:
    from repvgg_jax import bench_torch

    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    torch_info = bench_torch.train_step_fns(variant, variables, data, num_classes)
    fns.update({key: fn for key, (fn, _) in torch_info.items()})
  medians = interleaved_medians(fns, runs, warmup)
  macs = count_macs(
    lambda v, x: model.apply(v, x, train=False),
    {'params': state.params, 'batch_stats': state.batch_stats},
    data['image'][:1],
  )
  result = {
    'kind': 'train',
    'model': variant.name,
    'batch': batch,
    'size': size,
    'dtype': jnp.dtype(dtype).name,
    'conv_impl': conv_impl,
    'num_classes': num_classes,
    'bn_group_size': bn_group_size,
    'backend': jax.default_backend(),
    'device': jax.devices()[0].device_kind,
    'num_devices': mesh.size,
    'runs': runs,
    'jax': {
      **_rates(batch, *medians['jax'], 3 * macs, peak_gflops),
      'temp_bytes': _temp_bytes(compiled),
    },
  }
  if torch_info:
    result['torch'] = {
      key: {**info, 'images_per_sec': batch / medians[key][0], 'all_seconds': medians[key][1]}
      for key, (_, info) in torch_info.items()
    }
    best = max(r['images_per_sec'] for r in result['torch'].values())
    result['jax_over_torch'] = {'train_step': result['jax']['images_per_sec'] / best}
  return result


def roofline(dtype: str = 'float32', runs: int = 5) -> dict:
  """The machine's measured peaks: a square matmul and a wide 3x3 convolution, in GFLOP/s.

  Shares of achieved GFLOP/s are quoted against the matmul peak on CPUs and
  the convolution peak on GPUs (`peak_of`).
  """
  dt = jnp.dtype(dtype)
  on_cpu = jax.default_backend() == 'cpu'
  matmul = {}
  for n in (1024, 2048) if on_cpu else (4096, 8192):
    a = jax.random.normal(jax.random.key(0), (n, n), dt)
    fn = jax.jit(jnp.dot).lower(a, a).compile()
    timed = {n: lambda fn=fn, a=a: fn(a, a).block_until_ready()}
    seconds, _ = interleaved_medians(timed, runs, 2)[n]
    matmul[n] = 2 * n**3 / seconds / 1e9
  batch, side, channels = (8, 28, 256) if on_cpu else (256, 56, 256)
  x = jax.random.normal(jax.random.key(0), (batch, side, side, channels), dt)
  conv = Conv(channels, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, dtype=dt, conv_impl='xla')
  params = conv.init(jax.random.key(1), x[:1])
  fn = jax.jit(conv.apply).lower(params, x).compile()
  seconds, _ = interleaved_medians({0: lambda: fn(params, x).block_until_ready()}, runs, 2)[0]
  conv_gflops = 2 * batch * side * side * 9 * channels * channels / seconds / 1e9
  return {
    'kind': 'roofline',
    'dtype': dt.name,
    'backend': jax.default_backend(),
    'device': jax.devices()[0].device_kind,
    'matmul_gflops_per_sec': max(matmul.values()),
    'matmul_by_size': {str(n): g for n, g in matmul.items()},
    'conv_gflops_per_sec': conv_gflops,
    'conv_shape': [batch, side, side, channels],
  }


def peak_of(roofline_row: dict) -> float:
  """The peak shares are quoted against: matmul on CPUs, convolution elsewhere."""
  key = 'matmul_gflops_per_sec' if roofline_row['backend'] == 'cpu' else 'conv_gflops_per_sec'
  return roofline_row[key]


def benchmark_layers(
  name: str, batch: int, size: int, train: bool, runs: int = 5, warmup: int = 2
) -> list[dict]:
  """Each distinct 3x3 convolution of the fused ``name``: XLA's vs im2col, and 'auto's pick.

  With ``train``, times the forward and backward pass (gradients of input
  and kernel), which is what a training step pays per layer.
  """
  deploy = create_model(name, deploy=True, conv_impl='xla')
  params = jax.eval_shape(deploy.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))['params']
  rows, side, last_stage, seen = [], size, None, set()
  for stage, features, in_per_group, groups in fusion.architecture(params):
    stride = 2 if stage != last_stage else 1  # Each stage opens with a stride-2 block.
    layer = (side, in_per_group * groups, features, groups, stride)
    if layer not in seen:
      seen.add(layer)
      rows.append(_time_layer(*layer, batch=batch, train=train, runs=runs, warmup=warmup))
    side, last_stage = (side + 2 - 3) // stride + 1, stage
  return rows


def _time_layer(side, in_channels, features, groups, stride, *, batch, train, runs, warmup):
  x = jax.random.normal(jax.random.key(0), (batch, side, side, in_channels))
  fns, out_pixels = {}, ((side - 1) // stride + 1) ** 2
  for impl in ('xla', 'im2col'):
    conv = Conv(features, (3, 3), stride, ((1, 1), (1, 1)), groups, conv_impl=impl, train=train)
    params = conv.init(jax.random.key(1), x[:1])
    if train:
      fn = jax.jit(jax.grad(lambda p, x, c=conv: jnp.sum(c.apply(p, x) ** 2), argnums=(0, 1)))
    else:
      fn = jax.jit(conv.apply)
    compiled = fn.lower(params, x).compile()
    fns[impl] = lambda c=compiled, p=params: jax.block_until_ready(c(p, x))
  medians = interleaved_medians(fns, runs, warmup)
  auto = choose_conv_impl(
    'auto', out_pixels=out_pixels, strides=(stride, stride), in_channels=in_channels, train=train
  )
  return {
    'kind': 'layer',
    'side': side,
    'out_side': (side - 1) // stride + 1,
    'in_channels': in_channels,
    'features': features,
    'groups': groups,
    'stride': stride,
    'batch': batch,
    'train': train,
    'xla_ms': medians['xla'][0] * 1e3,
    'im2col_ms': medians['im2col'][0] * 1e3,
    'auto': auto,
    'faster': 'xla' if medians['xla'][0] < medians['im2col'][0] else 'im2col',
  }


def _torch_available() -> bool:
  try:
    import torch  # noqa: F401
  except ImportError:
    return False
  return True


def _emit(row: dict, text: str, json_path) -> dict:
  print(text, flush=True)
  if json_path:
    bench_report.append_jsonl(json_path, row)
  return row


def run_suite(out_dir, runs: int, warmup: int, figure_batch: int, figure_size: int, models):
  """The tables and plot of the README's performance section, for this machine.

  On a CPU: the roofline; A0 and B0 inference at batch 32, 224x224 and A0 at
  batch 128, 32x32; training steps of A0 at batch 128, 32x32, at batch 32,
  224x224 and as the digits config runs it (batch 64, 10 classes), each
  beside PyTorch when torch is installed; then Figure 1 over ``models``. On a
  GPU: A0 and B0 fused inference at batch 256, B0 training in bfloat16 at
  batch 256, 224x224, then Figure 1.
  """
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  results = out / 'results.jsonl'
  with_torch = _torch_available()
  roof = _emit(roofline(), bench_report.format_roofline(roofline()), results)
  for dtype in ('bfloat16',) if jax.default_backend() != 'cpu' else ():
    _emit(r := roofline(dtype), bench_report.format_roofline(r), results)
  peak = peak_of(roof)
  common = dict(runs=runs, warmup=warmup, peak_gflops=peak)
  if jax.default_backend() == 'cpu':
    infers = [('A0', 32, 224), ('B0', 32, 224), ('A0', 128, 32)]
    trains = [
      ('A0', 128, 32, 1000, 'float32'),
      ('A0', 32, 224, 1000, 'float32'),
      ('A0', 64, 32, 10, 'float32'),
    ]
  else:
    infers = [('A0', 256, 224), ('B0', 256, 224)]
    trains = [('B0', 256, 224, 1000, 'bfloat16')]
  for name, batch, size in infers:
    row = benchmark(name, batch, size, with_torch=with_torch, **common)
    _emit(row, bench_report.format_infer(row), results)
  for name, batch, size, classes, dtype in trains:
    row = benchmark_train_step(
      name, batch, size, num_classes=classes, dtype=dtype, with_torch=with_torch, **common
    )
    _emit(row, bench_report.format_train(row), results)
  figure_rows = []
  for name in models:
    row = benchmark(name, figure_batch, figure_size, runs=3, warmup=1, peak_gflops=peak)
    row['kind'] = 'infer'
    figure_rows.append(_emit(row, bench_report.format_infer(row), out / 'figure1.jsonl'))
  bench_report.plot_figure1(figure_rows, out / 'figure1.png')
  rows = bench_report.read_jsonl(results)
  (out / 'results.md').write_text(
    f'Measured on {json.dumps(machine())}\n\n'
    + bench_report.markdown(rows)
    + '\n'
    + f'Figure 1 data (batch {figure_batch}, {figure_size}x{figure_size}):\n\n'
    + bench_report.markdown(figure_rows)
  )
  print(f'Wrote {results}, {out / "results.md"}, {out / "figure1.png"}.')


def _add_common(parser, batch: int, size: int) -> None:
  parser.add_argument('--model', default='A0', help='variant name (see --list)')
  parser.add_argument('--batch', type=int, default=batch, help='images per batch')
  parser.add_argument('--size', type=int, default=size, help='image height and width')
  parser.add_argument('--runs', type=int, default=5, help='timed runs of each function')
  parser.add_argument('--warmup', type=int, default=2, help='untimed runs after compiling')
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument(
    '--conv-impl',
    default='auto',
    choices=CONV_IMPLS,
    help='convolution implementation (auto: per layer, by backend and feature-map size)',
  )
  parser.add_argument(
    '--torch',
    action=argparse.BooleanOptionalAction,
    default=None,
    help='also time the same network in PyTorch (default: when torch is installed)',
  )
  parser.add_argument('--json', help='append the result as JSON lines to this file')


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    description=__doc__.split('\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('--list', action='store_true', help='list the variants and exit')
  sub = parser.add_subparsers(dest='command')
  _add_common(sub.add_parser('infer', help='training-time vs fused inference (default)'), 32, 224)
  train = sub.add_parser('train', help="the trainer's SGD step, over all devices")
  _add_common(train, 128, 32)
  train.add_argument('--num-classes', type=int, default=1000, help='classifier outputs')
  train.add_argument('--bn-group-size', type=int, default=0, help='0: BatchNorm over the batch')
  roof = sub.add_parser('roofline', help='measured matmul and convolution peaks')
  roof.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  roof.add_argument('--json', help='append the result as JSON lines to this file')
  layers = sub.add_parser('layers', help="per-layer XLA vs im2col, and 'auto's choice")
  _add_common(layers, 32, 224)
  layers.add_argument('--train', action='store_true', help='time forward and backward')
  suite = sub.add_parser('suite', help='everything, as JSON lines, markdown and Figure 1')
  suite.add_argument('--out', default='bench_results', help='output directory')
  suite.add_argument('--runs', type=int, default=5, help='timed runs of each function')
  suite.add_argument('--warmup', type=int, default=2, help='untimed runs after compiling')
  suite.add_argument('--models', default='all', help="Figure 1's variants, comma-separated")
  suite.add_argument('--figure-batch', type=int, default=8, help="Figure 1's batch")
  suite.add_argument('--figure-size', type=int, default=224, help="Figure 1's image side")
  return parser


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] != ['--list'] and (not argv or argv[0].startswith('-')):
    argv = ['infer', *argv]  # The inference pair is the default command.
  parser = _parser()
  args = parser.parse_args(argv)
  if args.list:
    print('\n'.join(variants.list_models()))
    return 0
  if args.command == 'suite':
    names = variants.list_models() if args.models == 'all' else args.models.split(',')
    for name in names:
      _check_model(parser, name)
    run_suite(args.out, args.runs, args.warmup, args.figure_batch, args.figure_size, names)
    return 0
  if args.command == 'roofline':
    row = roofline(args.dtype)
    _emit(row, bench_report.format_roofline(row), args.json)
    return 0
  _check_model(parser, args.model)
  if args.batch < 1 or args.size < 1 or args.runs < 1:
    parser.error('--batch, --size and --runs must be positive.')
  if args.command == 'layers':
    rows = benchmark_layers(args.model, args.batch, args.size, args.train, args.runs, args.warmup)
    print(bench_report.format_layers(rows))
    for row in rows if args.json else ():
      bench_report.append_jsonl(args.json, row)
    return 0
  with_torch = _torch_available() if args.torch is None else args.torch
  if with_torch and not _torch_available():
    parser.error('--torch needs PyTorch: pip install -r requirements-test.txt')
  common = dict(runs=args.runs, warmup=args.warmup, dtype=args.dtype, conv_impl=args.conv_impl)
  if args.command == 'train':
    row = benchmark_train_step(
      args.model,
      args.batch,
      args.size,
      num_classes=args.num_classes,
      bn_group_size=args.bn_group_size,
      with_torch=with_torch,
      **common,
    )
    _emit(row, bench_report.format_train(row), args.json)
  else:
    row = benchmark(args.model, args.batch, args.size, with_torch=with_torch, **common)
    _emit(row, bench_report.format_infer(row), args.json)
  return 0


def _check_model(parser, name: str) -> None:
  try:
    variants.get_variant(name)
  except ValueError as error:
    parser.error(str(error))


if __name__ == '__main__':
  sys.exit(main())
