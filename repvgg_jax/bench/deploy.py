"""One fused model, four runtimes: JAX, onnxruntime, PyTorch and a TF SavedModel.

    python -m repvgg_jax.bench deploy --model A0 --batches 1,32 --size 224 [--int8]

The deploy network (random weights and BatchNorm statistics, fused) runs in
JAX with XLA's convolutions (and, on CPUs, with `repvgg_jax.perf`'s kernels
and chunking, as ``bench infer`` does), is exported as the ONNX graph and the
SavedModel of `repvgg_jax.interop.export`, and is loaded into PyTorch
(`repvgg_jax.interop.torch_reference`, NCHW and channels-last). Every
runtime's logits are checked against JAX's first; then timed rounds alternate
between the runtimes (so a busy machine slows all alike) and the median of
each is reported. With ``--int8`` JAX also runs the model quantized by
`repvgg_jax.interop.quantize` (static ranges calibrated on two random batches,
and dynamic ranges), whose logits differ by design: their error is reported,
not checked.
"""

from __future__ import annotations

import functools
import pathlib
import tempfile
from collections.abc import Callable

import jax
import numpy as np

from repvgg_jax import perf
from repvgg_jax.bench import timing
from repvgg_jax.bench.models import randomized_variables
from repvgg_jax.interop import export, onnx_export
from repvgg_jax.interop.checkpoint_models import max_relative_difference
from repvgg_jax.model import create_model, fuse_params
from repvgg_jax.perf import compile_options

TOLERANCE = 1e-4  # Relative logit error a runtime may show against JAX's.
INT8_PREFIX = 'jax_int8_'  # Runtimes that quantize, exempt from TOLERANCE.
NUM_CLASSES = 1000


class RuntimeMismatchError(AssertionError):
  """A runtime computes other logits than JAX: its speed would compare different networks."""


def _runtimes(
  name: str, fused, size: int, directory: pathlib.Path, with_torch: bool, int8: bool = False
):
  """``{runtime: (prepare, run)}`` for the fused model in each runtime: ``prepare``
  turns NHWC numpy images into the runtime's own input (untimed), ``run`` computes
  the logits from it (timed)."""
  deploy = create_model(name, num_classes=NUM_CLASSES, deploy=True)
  runtimes: dict[str, tuple[Callable, Callable]] = {'jax': _jax_runtime(deploy, fused)}
  if jax.default_backend() == 'cpu':  # The CPU kernels and chunking, as `bench infer` uses.
    conv = perf.conv_layer('auto', train=False)
    tuned = perf.chunked(create_model(name, num_classes=NUM_CLASSES, deploy=True, conv=conv))
    runtimes['jax_cpu_kernels'] = _jax_runtime(tuned, fused)
  if int8:
    runtimes.update(_int8_runtimes(deploy, fused, size))
  onnx_export.write_onnx(directory / export.ONNX_FILE, fused, size)
  runtimes['onnxruntime'] = (np.asarray, onnx_export.load_onnx(directory / export.ONNX_FILE))
  if with_torch:
    import torch

    from repvgg_jax.bench import torch_side
    from repvgg_jax.interop import torch_reference

    for layout, memory_format in torch_side.LAYOUTS.items():
      model = torch_side.torch_model(name, fused, NUM_CLASSES, deploy=True)
      model = model.to(memory_format=memory_format)

      def prepare(x, memory_format=memory_format):
        return torch_reference.nchw(x).contiguous(memory_format=memory_format)

      def run(x, model=model):
        with torch.inference_mode():
          return model(x).numpy()

      runtimes[f'torch_{layout}'] = (prepare, run)
  export.export_saved_model(deploy, fused, size, directory / export.SAVED_MODEL_DIR)
  saved_model = export.load_saved_model(directory / export.SAVED_MODEL_DIR)
  runtimes['tf_saved_model'] = (np.asarray, saved_model)
  return runtimes


def _int8_runtimes(deploy, fused, size: int) -> dict[str, tuple[Callable, Callable]]:
  """The deploy model in int8 (Qwix), static and dynamic ranges."""
  from repvgg_jax.interop import quantize

  rng = np.random.default_rng(100)
  calibration = [rng.standard_normal((8, size, size, 3), np.float32) for _ in range(2)]
  runtimes = {}
  for mode in quantize.MODES:
    qmodel, qvariables = quantize.quantize(deploy, fused, calibration, mode)
    runtimes[f'{INT8_PREFIX}{mode}'] = _jax_runtime(qmodel, qvariables)
  return runtimes


def _machine() -> dict:
  """`timing.machine`, with the other runtimes' versions."""
  import onnxruntime
  import tensorflow as tf

  return {**timing.machine(), 'onnxruntime': onnxruntime.__version__, 'tensorflow': tf.__version__}


def _jax_runtime(model, variables) -> tuple[Callable, Callable]:
  forward = compile_options.jit(model.apply, inference=True)
  return jax.device_put, lambda x: jax.block_until_ready(forward(variables, x))


def benchmark_deploy(
  name: str,
  batches=(1, 32),
  size: int = 224,
  runs: int = 10,
  warmup: int = 2,
  with_torch: bool = True,
  int8: bool = False,
) -> list[dict]:
  """One row per (batch, runtime): images/s and ms per batch, medians of ``runs``."""
  model = create_model(name, num_classes=NUM_CLASSES)
  probe = jax.numpy.zeros((1, size, size, 3))
  fused = fuse_params(randomized_variables(model, probe))
  rows, machine = [], _machine()
  with tempfile.TemporaryDirectory() as directory:
    runtimes = _runtimes(name, fused, size, pathlib.Path(directory), with_torch, int8)
    for batch in batches:
      images = np.random.default_rng(batch).standard_normal((batch, size, size, 3), np.float32)
      inputs = {key: prepare(images) for key, (prepare, _) in runtimes.items()}
      outputs = {key: np.asarray(run(inputs[key])) for key, (_, run) in runtimes.items()}
      errors = {key: max_relative_difference(out, outputs['jax']) for key, out in outputs.items()}
      wrong = {
        key: error
        for key, error in errors.items()
        if not error <= TOLERANCE and not key.startswith(INT8_PREFIX)
      }
      if wrong:
        raise RuntimeMismatchError(
          f'Logits differ from JAX beyond {TOLERANCE} (relative): {wrong}; not timed.'
        )
      fns = {key: functools.partial(run, inputs[key]) for key, (_, run) in runtimes.items()}
      medians = timing.interleaved_medians(fns, runs, warmup)
      for key, (seconds, all_seconds) in medians.items():
        rows.append(
          {
            'model': create_model(name).variant.name,
            'batch': batch,
            'size': size,
            'runtime': key,
            'images_per_sec': batch / seconds,
            'ms_per_batch': 1e3 * seconds,
            'all_seconds': all_seconds,
            'relative_logit_error': errors[key],
            'machine': machine,
          }
        )
  return rows


def format_deploy(rows: list[dict]) -> str:
  """The rows as a markdown table: a column per batch size, a row per runtime."""
  batches = sorted({row['batch'] for row in rows})
  runtimes = list(dict.fromkeys(row['runtime'] for row in rows))
  cell = {(row['runtime'], row['batch']): row for row in rows}
  first = rows[0]
  lines = [
    f'{first["model"]}, fused, {first["size"]}x{first["size"]}, float32 (jax_int8_*: int8); '
    'images/s (ms per batch), median of interleaved runs',
    '',
    '| runtime | ' + ' | '.join(f'batch {b}' for b in batches) + ' | logit error vs JAX |',
    '|---|' + '---|' * (len(batches) + 1),
  ]
  for runtime in runtimes:
    cells = [
      f'{cell[runtime, b]["images_per_sec"]:,.1f} ({cell[runtime, b]["ms_per_batch"]:.1f} ms)'
      for b in batches
    ]
    error = max(cell[runtime, b]['relative_logit_error'] for b in batches)
    lines.append(f'| {runtime} | ' + ' | '.join(cells) + f' | {error:.1e} |')
  return '\n'.join(lines)
