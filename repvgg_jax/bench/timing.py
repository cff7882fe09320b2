"""Timing primitives and the machine's own figures, for `repvgg_jax.bench`.

Interleaved medians, multiply-add counts, the measured matmul and convolution
peaks (the roofline that achieved GFLOP/s are quoted against), and the
per-layer comparison of XLA's convolution with im2col behind ``conv_impl='auto'``.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import statistics
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.extend import core as jax_core

from repvgg_jax.model import create_model, shapes
from repvgg_jax.perf import compile_options, host_memory
from repvgg_jax.perf.conv_kernels import (
  KernelConv,
  choose_conv_impl,
  dense_applies,
  winograd_applies,
)

# B0's training step on one H200, bfloat16 (docs/performance.md, "Measured on a GPU"):
# the rate `bench input` tells the cores needed to feed.
B0_GPU_RATE = 9_259


def count_macs(fn: Callable, *args) -> int:
  """Multiply-adds of the convolutions and matmuls ``fn(*args)`` traces to.

  Taps over padding count, as in the paper's "FLOPs" (A0 deploy: 1.36 G at
  224x224). Trace with `nn.Conv` or im2col's `KernelConv`: both count the same.
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
        if isinstance(param, jax_core.ClosedJaxpr | jax_core.Jaxpr):
          total += walk(_open(param))
    return total

  return walk(_open(jax.make_jaxpr(fn)(*args)))


def _open(jaxpr):
  """The ``Jaxpr`` of a ``ClosedJaxpr``, or the ``Jaxpr`` itself (JAX 0.11 made the two
  one class, whose legacy ``.jaxpr`` is to go)."""
  return jaxpr if isinstance(jaxpr, jax_core.Jaxpr) else jaxpr.jaxpr


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


def compiled_forward(model, variables, images):
  """The jitted, compiled inference function of ``model`` and its temp memory."""
  forward = compile_options.jit(lambda v, x: model.apply(v, x, train=False), inference=True)
  compiled = forward.lower(variables, images).compile()
  return compiled, temp_bytes(compiled)


def temp_bytes(compiled) -> int | None:
  memory = compiled.memory_analysis()
  return getattr(memory, 'temp_size_in_bytes', None) if memory is not None else None


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
    'host_memory': host_memory.state(),
  }
  try:
    import torch

    info['torch'] = torch.__version__
  except ImportError:
    pass
  return info


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
    fn = compile_options.jit(jnp.dot).lower(a, a).compile()
    timed = {n: lambda fn=fn, a=a: fn(a, a).block_until_ready()}
    seconds, _ = interleaved_medians(timed, runs, 2)[n]
    matmul[n] = 2 * n**3 / seconds / 1e9
  batch, side, channels = (8, 28, 256) if on_cpu else (256, 56, 256)
  x = jax.random.normal(jax.random.key(0), (batch, side, side, channels), dt)
  conv = nn.Conv(channels, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, dtype=dt)
  params = conv.init(jax.random.key(1), x[:1])
  fn = compile_options.jit(conv.apply).lower(params, x).compile()
  seconds, _ = interleaved_medians({0: lambda: fn(params, x).block_until_ready()}, runs, 2)[0]
  conv_gflops = 2 * batch * side * side * 9 * channels * channels / seconds / 1e9
  row = {
    'kind': 'roofline',
    'dtype': dt.name,
    'backend': jax.default_backend(),
    'device': jax.devices()[0].device_kind,
    'matmul_gflops_per_sec': max(matmul.values()),
    'matmul_by_size': {str(n): g for n, g in matmul.items()},
    'conv_gflops_per_sec': conv_gflops,
    'conv_shape': [batch, side, side, channels],
  }
  return row


def peak_of(roofline_row: dict) -> float:
  """The peak shares are quoted against: matmul on CPUs, convolution elsewhere."""
  key = 'matmul_gflops_per_sec' if roofline_row['backend'] == 'cpu' else 'conv_gflops_per_sec'
  return roofline_row[key]


def benchmark_layers(
  name: str, batch: int, size: int, train: bool, runs: int = 5, warmup: int = 2
) -> list[dict]:
  """Each distinct 3x3 convolution of the fused ``name`` by each implementation; 'auto's pick.

  Winograd is timed on the stride-1 layers, the only ones it computes, and
  dense on input maps of 2x2 and below, the only ones it is meant for.

  With ``train``, times the forward and backward pass (gradients of input
  and kernel), which is what a training step pays per layer.
  """
  deploy = create_model(name, deploy=True)
  params = deploy.abstract_variables(size)['params']
  rows, seen = [], set()
  for side, block in shapes.block_layers(params, size):
    layer = (side, block.in_channels, block.out_channels, block.groups, block.stride)
    if layer not in seen:
      seen.add(layer)
      rows.append(_time_layer(*layer, batch=batch, train=train, runs=runs, warmup=warmup))
  return rows


def _time_layer(side, in_channels, features, groups, stride, *, batch, train, runs, warmup):
  x = jax.random.normal(jax.random.key(0), (batch, side, side, in_channels))
  fns, out_pixels = {}, ((side - 1) // stride + 1) ** 2
  impls = ['xla', 'im2col']
  if winograd_applies((3, 3), (stride, stride)):
    impls.append('winograd')
  if dense_applies((3, 3), side * side):
    impls.append('dense')
  for impl in impls:
    conv = KernelConv(
      features, (3, 3), stride, ((1, 1), (1, 1)), groups, conv_impl=impl, train=train
    )
    params = conv.init(jax.random.key(1), x[:1])
    if train:
      loss = lambda p, x, c=conv: jnp.sum(c.apply(p, x) ** 2)
      fn = compile_options.jit(jax.grad(loss, argnums=(0, 1)))
    else:
      fn = compile_options.jit(conv.apply)
    compiled = fn.lower(params, x).compile()
    fns[impl] = lambda c=compiled, p=params: jax.block_until_ready(c(p, x))
  medians = {impl: seconds for impl, (seconds, _) in interleaved_medians(fns, runs, warmup).items()}
  auto = choose_conv_impl(
    'auto',
    in_pixels=side * side,
    out_pixels=out_pixels,
    strides=(stride, stride),
    in_channels=in_channels,
    train=train,
    groups=groups,
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
    'xla_ms': medians['xla'] * 1e3,
    'im2col_ms': medians['im2col'] * 1e3,
    'winograd_ms': medians['winograd'] * 1e3 if 'winograd' in medians else None,
    'dense_ms': medians['dense'] * 1e3 if 'dense' in medians else None,
    'auto': auto,
    'faster': min(medians, key=medians.get),
  }
