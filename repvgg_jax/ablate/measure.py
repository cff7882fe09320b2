"""What the ablation measures of a trained run besides its summary: trainable
parameters, how far its saved fused model is from the trained one, its int8 top-1,
and the speed of every row's two models, timed together round robin."""

from __future__ import annotations

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from repvgg_jax.ablate import stats
from repvgg_jax.ablate.rows import AblationError
from repvgg_jax.bench import timing as bench_timing
from repvgg_jax.data import datasets as data
from repvgg_jax.interop import checkpoint_io, quantize_checkpoint
from repvgg_jax.perf import compile_options
from repvgg_jax.train import trainer


def count_params(model, image_size: int) -> int:
  """Trainable parameters of ``model`` (BatchNorm statistics are not parameters)."""
  params = model.abstract_variables(image_size)['params']
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def logit_error(config, directory: pathlib.Path) -> float:
  """How far the run's saved fused model is from its trained one: ``max |fused -
  unfused| / max |unfused|`` over the logits of the whole eval split, the last
  training checkpoint against the saved deploy checkpoint, in inference mode."""
  state = checkpoint_io.restore(directory / 'checkpoints')[0]
  variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
  fused = checkpoint_io.restore(directory / 'deploy')[0]
  train_forward = compile_options.jit(trainer.build_model(config).apply)
  deploy_forward = compile_options.jit(trainer.build_model(config, deploy=True).apply)
  error, scale = 0.0, 0.0
  for batch in data.eval_batches(config.dataset, global_batch_size=config.eval_batch_size):
    mask = batch['mask']
    unfused = np.asarray(train_forward(variables, batch['image']), np.float64)[mask]
    deploy = np.asarray(deploy_forward(fused, batch['image']), np.float64)[mask]
    error = max(error, float(np.abs(deploy - unfused).max(initial=0.0)))
    scale = max(scale, float(np.abs(unfused).max(initial=0.0)))
  return error / scale


def int8_results(config, directory: pathlib.Path, calibration_batches: int) -> dict:
  """The run's saved fused model after int8 post-training quantization.

  Args:
    config: the run's training config.
    directory: the run's directory; its ``deploy/`` checkpoint is quantized.
    calibration_batches: training batches that calibrate the static activation
      ranges (`quantize_checkpoint.quantize_and_evaluate`; int8 weights per output channel).

  Returns:
    ``top1_int8`` (over the eval split), ``int8_logit_rel_error`` (to the float
    model) and ``int8_calibration_batches``, for the run's record.

  Raises:
    AblationError: no fused model in ``directory``, or one that cannot be quantized.
  """
  try:
    fused = checkpoint_io.restore(directory / 'deploy')[0]
    _, results = quantize_checkpoint.quantize_and_evaluate(
      config, {'params': fused['params']}, calibration_batches=calibration_batches
    )
  except (FileNotFoundError, ValueError) as error:  # QuantizationError is a ValueError.
    raise AblationError(f'{directory}: the int8 evaluation failed: {error}') from None
  return {
    'top1_int8': results['int8_top1'],
    'int8_logit_rel_error': results['logit_relative_error'],
    'int8_calibration_batches': calibration_batches,
  }


def deploy_network(config) -> str:
  """What the fused model of a row's config depends on: its model settings but the
  branches, and its classes."""
  model = {key: value for key, value in config.model.to_dict().items() if key != 'branches'}
  return json.dumps([model, config.dataset.num_classes], sort_keys=True, default=str)


def time_rows(configs: dict, directories: dict, settings: dict) -> dict[str, dict]:
  """Images/s of every row's unfused and fused model, timed in one round-robin loop;
  the models are those saved in each row's directory (``directories[row]``).

  Each round times every row's trained unfused model and then its fused one once,
  row after row, on the same random images; ``settings['runs']`` rounds follow
  ``settings['warmup']`` untimed ones. Every figure thus sees the same machine
  load, every row's fused/unfused ratio comes from the same rounds, and the
  fused models of rows that differ in branches only, one deploy network (and
  one compiled program), should come out at one speed. Returns per row the
  quartiles of both rates and the median of the per-round ratios.
  """
  names = list(configs)
  first = configs[names[0]]
  shape = (settings['batch'], settings['size'], settings['size'], 3)
  images = jax.random.normal(jax.random.key(first.seed), shape, jnp.float32)
  unfused, fused, deploy_forwards = {}, {}, {}
  for name, config in configs.items():
    directory = directories[name]
    state = checkpoint_io.restore(directory / 'checkpoints')[0]
    variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
    forward, _ = bench_timing.compiled_forward(trainer.build_model(config), variables, images)
    unfused[name] = (forward, variables)
    fused[name] = checkpoint_io.restore(directory / 'deploy')[0]
    network = deploy_network(config)  # A row may set another model (its name, widths ...).
    if network not in deploy_forwards:
      deploy_model = trainer.build_model(config, deploy=True)
      deploy_forwards[network] = bench_timing.compiled_forward(deploy_model, fused[name], images)[0]
    fused[name] = (deploy_forwards[network], fused[name])
  calls = {}  # In timing order: each row's unfused model, then its fused one.
  for name in names:
    for form, (forward, variables) in (('unfused', unfused[name]), ('fused', fused[name])):
      calls[name, form] = lambda f=forward, v=variables: jax.block_until_ready(f(v, images))
  timed = bench_timing.interleaved_medians(calls, settings['runs'], settings['warmup'])
  seconds = {name: (timed[name, 'unfused'][1], timed[name, 'fused'][1]) for name in names}
  batch = settings['batch']
  return {
    name: {
      'unfused_images_per_sec': stats.quartiles([batch / t for t in slow]),
      'fused_images_per_sec': stats.quartiles([batch / t for t in fast]),
      'speedup': float(np.median(np.asarray(slow) / np.asarray(fast))),
      'settings': settings,
      'backend': jax.default_backend(),
      'device': jax.devices()[0].device_kind,
    }
    for name, (slow, fast) in seconds.items()
  }
