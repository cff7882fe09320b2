"""Model benchmarks: inference of the training-time and fused models, training steps.

Each compares its functions side by side in one run (`bench_timing.interleaved_medians`),
with the same network in PyTorch beside them when asked (`bench_torch`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from repvgg_jax import perf
from repvgg_jax.bench.timing import compiled_forward, count_macs, interleaved_medians, temp_bytes
from repvgg_jax.model import create_model, fusion, shapes, variants
from repvgg_jax.perf import compile_options, host_memory, xla_cpu
from repvgg_jax.train import optim

# The memory layouts PyTorch is timed in (`bench_torch.LAYOUTS` maps them to torch's).
TORCH_LAYOUTS = ('nchw', 'channels_last')


class SettingsError(ValueError):
  """Settings a benchmark cannot run with; the message says the fix."""


def randomized_variables(model, images, seed: int = 0):
  """Initialised variables with random BatchNorm statistics, as a trained model has.

  Fresh statistics (mean 0, variance 1) would make the PyTorch logit check
  blind to a misplaced statistic.
  """
  variables = compile_options.jit(model.init)(jax.random.key(seed), images[:1])
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
  chunk_images: int | str = 'auto',
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
    conv_impl: the convolutions, as `repvgg_jax.perf.conv_layer` takes it.
    chunk_images: images per chunk of the large-map blocks, both models
      (`repvgg_jax.perf.chunked`).
    with_torch: also time the same two networks in PyTorch (`bench_torch`).
    peak_gflops: the machine's measured roofline, for ``roofline_share``.

  Returns:
    A dict with, for ``train`` and ``deploy``: median seconds per batch,
    images/s, every timed run, GFLOP/s and compiled temporary memory in bytes;
    ``speedup`` (deploy over train images/s); with torch, ``torch`` timings
    and ``jax_over_torch`` ratios; and the set-up.
  """
  variant = variants.get_variant(name)
  kwargs = dict(dtype=jnp.dtype(dtype), conv=perf.conv_layer(conv_impl, train=False))
  model = perf.chunked(create_model(variant, **kwargs), chunk_images)
  deploy = perf.chunked(create_model(variant, deploy=True, **kwargs), chunk_images)
  images = jax.random.normal(jax.random.key(seed), (batch, size, size, 3), jnp.float32)
  variables = randomized_variables(model, images, seed)
  fused = compile_options.jit(fusion.fuse_params)(variables)
  extra = {}
  if with_torch:
    from repvgg_jax.bench import torch_side as bench_torch

    extra = bench_torch.inference_fns(variant, variables, fused, images)
  result, _ = benchmark_models(
    model,
    deploy,
    variables,
    fused,
    images,
    runs,
    warmup,
    extra=extra,
    peak_gflops=peak_gflops,
    conv_impl=conv_impl,
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
  conv_impl: str = 'xla',
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
    conv_impl: what the models' convolutions are (`repvgg_jax.perf.conv_layer`),
      for the record.

  Returns:
    ``(result, compiled)``: the result as `benchmark` returns it, and the compiled
    inference functions ``{'train': fn, 'deploy': fn}``, called as
    ``fn(variables, images)`` with any values of the timed shapes.
  """
  forward = {
    'train': compiled_forward(model, variables, images),
    'deploy': compiled_forward(deploy, fused, images),
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
    'conv_impl': conv_impl,
    'chunk_images': getattr(model, 'chunk_images', 0),
    'chunks': dict(zip(('blocks', 'images'), _chunking(model, images.shape), strict=True)),
    'backend': jax.default_backend(),
    'device': jax.devices()[0].device_kind,
    'num_devices': 1,
    'runs': runs,
    'host_memory': host_memory.state(),
  }
  for key, (_, temp) in forward.items():
    chosen = model if key == 'train' else deploy
    macs = count_macs(lambda v, x, m=chosen: m.apply(v, x, train=False), inputs[key], images[:1])
    result[key] = {
      **_rates(batch, *medians[key], macs, peak_gflops),
      'temp_bytes': temp,
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


def _chunking(model, shape) -> tuple[int, int]:
  """``(blocks, images)`` of ``model``'s chunked inference on ``shape``; (0, 0) for none."""
  if isinstance(model, perf.ChunkedRepVGG):
    return model.chunking(shape, train=False)
  return 0, 0


def _ratios_to_torch(result: dict, keys) -> dict:
  """JAX images/s over the fastest PyTorch layout of the same model, per key."""
  ratios = {}
  for key in keys:
    torch_rates = [r['images_per_sec'] for r in result['torch'].values() if r['model'] == key]
    if torch_rates:
      ratios[key] = result[key]['images_per_sec'] / max(torch_rates)
  return ratios


def _train_program(model, options: dict, state, data, count: int, mesh):
  """A timed call of ``count`` training steps compiled as the trainer compiles them,
  from ``state`` on the first ``count`` batches of ``data``: ``(run, compiled)``."""
  from repvgg_jax.train import steps

  program, batch_sharding = steps.jit_training(mesh, stacked=count > 1, model=model, **options)
  if count == 1:
    batches = {key: value[0] for key, value in data.items()}
  else:
    batches = {key: value[:count] for key, value in data.items()}
  batches = jax.device_put(batches, batch_sharding)
  rng = jax.random.key(1)
  compiled = program.lower(state, batches, rng).compile()
  holder = {'state': jax.tree.map(jnp.copy, state)}  # Its own: donated off CPUs.

  def run():
    holder['state'], metrics = compiled(holder['state'], batches, rng)
    jax.block_until_ready(metrics)

  return run, compiled


def _initial_state(model, size: int, mesh: Mesh, freeze_stages: int):
  """The replicated train state of ``model`` with the paper's optimizer at a constant
  rate: SGD, momentum 0.9, weight decay 1e-4 where the trainer decays, twice the rate for biases,
  nothing for frozen stages. Initialised through `nn.Conv`, as the trainer does."""
  from repvgg_jax.train import steps

  tx = optim.sgd(
    0.1, momentum=0.9, weight_decay=1e-4, bias_lr_multiplier=2.0, frozen_stages=freeze_stages
  )
  variables = model.clone(conv=nn.Conv).init(jax.random.key(0), jnp.zeros((1, size, size, 3)))
  state = steps.TrainState.create(
    apply_fn=model.apply,
    params=variables['params'],
    tx=tx,
    batch_stats=variables['batch_stats'],
  )
  return jax.device_put(state, NamedSharding(mesh, P()))


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
  torch_layouts: tuple[str, ...] = TORCH_LAYOUTS,
  peak_gflops: float | None = None,
  steps_per_call: int = 1,
  freeze_stages: int = 0,
) -> dict:
  """Images/s of the trainer's SGD step, data parallel over every device.

  The step is `steps.train_step` jitted as the trainer jits it (batch sharded
  over a ``data`` mesh axis, state replicated and, off CPUs, donated), with the paper's
  optimizer (`optim.sgd`: momentum 0.9, weight decay 1e-4) at a constant
  learning rate. ``bn_group_size`` 0 computes BatchNorm statistics over the
  whole batch, as single-process PyTorch does. With ``steps_per_call`` > 1 each
  call runs that many steps on as many batches (`steps.train_steps`, as the
  trainer's ``config.steps_per_call``), timed per step, and one step per call
  is timed beside it (``jax_single``). ``freeze_stages`` > 0 times fine-tuning
  with the first stages frozen, as ``config.freeze_stages`` does.

  Returns:
    A dict with ``jax`` timings (images/s, GFLOP/s counting the backward pass
    as twice the forward even where frozen stages skip it, temporary memory),
    with torch the ``torch`` timings and ``jax_over_torch``, and the set-up.
  """

  mesh = Mesh(np.array(jax.devices()), ('data',))
  if batch % mesh.size:
    raise ValueError(f'--batch {batch} must be a multiple of the {mesh.size} devices.')
  variant = variants.get_variant(name)
  model = create_model(
    variant,
    num_classes=num_classes,
    dtype=jnp.dtype(dtype),
    conv=perf.conv_layer(conv_impl, train=True),
    frozen_stages=freeze_stages,
  )
  options = {'num_classes': num_classes, 'bn_group_size': bn_group_size}
  state = _initial_state(model, size, mesh, freeze_stages)
  _check_steps_per_call(conv_impl, state.params, size, steps_per_call)
  shape = (steps_per_call, batch)
  data = {
    'image': jax.random.normal(jax.random.key(2), (*shape, size, size, 3), jnp.float32),
    'label': jax.random.randint(jax.random.key(1), shape, 0, num_classes),
  }
  programs = {'jax': _train_program(model, options, state, data, steps_per_call, mesh)}
  if steps_per_call > 1:
    programs['jax_single'] = _train_program(model, options, state, data, 1, mesh)
  fns = {key: run for key, (run, _) in programs.items()}
  data = {key: value[0] for key, value in data.items()}  # One step's batch.
  torch_info = {}
  if with_torch:
    from repvgg_jax.bench import torch_side as bench_torch

    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    torch_info = bench_torch.train_step_fns(
      variant, variables, data, num_classes, layouts=torch_layouts
    )
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
    'host_memory': host_memory.state(),
    'steps_per_call': steps_per_call,
    'freeze_stages': freeze_stages,
  }
  timings = _train_timings(programs, torch_info, medians, batch, steps_per_call, peak_gflops, macs)
  return {**result, **timings}


def _check_steps_per_call(conv_impl: str, params, size: int, steps_per_call: int) -> None:
  """Raises `SettingsError` where the trainer would refuse ``steps_per_call`` (`xla_cpu`)."""
  try:
    xla_cpu.check_steps_per_call(
      conv_impl,
      shapes.block_layers(params, size),
      steps_per_call,
      'use --steps-per-call 1 or --conv-impl im2col',
    )
  except ValueError as error:
    raise SettingsError(str(error)) from None


def _train_timings(
  programs: dict,
  torch_info: dict,
  medians: dict,
  batch: int,
  steps_per_call: int,
  peak_gflops: float | None,
  macs: int,
) -> dict:
  """`benchmark_train_step`'s timings per training step, from the ``medians`` of its calls.

  ``jax`` (whose calls run ``steps_per_call`` steps) and ``jax_single``; with torch,
  ``torch`` and ``jax_over_torch``. A step counts as three forward passes of ``macs``
  multiply-adds an image.
  """
  result = {}
  for key, (_, compiled) in programs.items():
    count = steps_per_call if key == 'jax' else 1
    seconds, all_seconds = medians[key][0] / count, [t / count for t in medians[key][1]]
    result[key] = {
      **_rates(batch, seconds, all_seconds, 3 * macs, peak_gflops),
      'temp_bytes': temp_bytes(compiled),
    }
  if torch_info:
    result['torch'] = {
      key: {**info, 'images_per_sec': batch / medians[key][0], 'all_seconds': medians[key][1]}
      for key, (_, info) in torch_info.items()
    }
    best = max(r['images_per_sec'] for r in result['torch'].values())
    result['jax_over_torch'] = {'train_step': result['jax']['images_per_sec'] / best}
  return result
