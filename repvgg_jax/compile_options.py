"""XLA compiler options for this codebase's jitted programs.

On CPUs XLA's ``CPU_OPT_PRESET_FAST_COMPILE`` compiles RepVGG's programs about
twice as fast as the default preset, and they run as fast. Measured for the
digits config's programs (RepVGG-A0, 32x32, 2-core AVX-512, jax 0.10.2):
training step 17-21 s -> 7-10 s to compile, evaluation 8-9 s -> 3-5 s, with
step times within run-to-run noise (172-182 against 139-186 ms), as for A0's
inference at 224 and its training step at batch 128, 32x32.

Only single-device programs get it: with 8 host devices and the preset, two
data-parallel training steps of the test model ended 4% away (largest
relative difference of a parameter) from the same steps on one device, where
without it the two agree to 1e-6 (jax 0.10.2); its gradients alone agreed,
so the fault is somewhere in the partitioned step, and we keep clear of it.
Other backends get no options, and a preset in ``XLA_FLAGS`` is the user's
choice and wins.
"""

from __future__ import annotations

import os

import jax

CPU_FAST_COMPILE = {'xla_cpu_opt_preset': 'CPU_OPT_PRESET_FAST_COMPILE'}


def compiler_options(
  backend: str | None = None, device_count: int | None = None
) -> dict[str, str] | None:
  """The ``compiler_options`` for `jax.jit` (defaults: JAX's backend and device count)."""
  if 'xla_cpu_opt_preset' in os.environ.get('XLA_FLAGS', ''):
    return None
  if (backend or jax.default_backend()) != 'cpu':
    return None
  if (device_count or jax.device_count()) > 1:
    return None
  return dict(CPU_FAST_COMPILE)


def jit(fun, **kwargs):
  """`jax.jit` with this module's `compiler_options`."""
  return jax.jit(fun, compiler_options=compiler_options(), **kwargs)
