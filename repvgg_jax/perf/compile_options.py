"""XLA compiler options for this codebase's jitted programs.

On CPUs XLA's ``CPU_OPT_PRESET_FAST_COMPILE`` compiles RepVGG's programs about
twice as fast as the default preset. Measured for the digits config's
programs (RepVGG-A0, 32x32, 2-core AVX-512, jax 0.10.2): training step
17-21 s -> 7-10 s to compile, evaluation 8-9 s -> 3-5 s, with step times
within run-to-run noise (172-182 against 139-186 ms), as for A0's inference
at 224 and its training step at batch 128, 32x32. Winograd's layers have
since raised the step's compile to 10-12 s and the evaluation's to 4 s, and
the preset no longer runs every program as fast: side by side, A0's fused
model at batch 32, 224x224 ran about 8% slower with it, its training-time
model up to 27% faster (README).

Only single-device programs get it. It was withheld from multi-device ones
when two data-parallel steps of the test model with it ended 4% (largest
relative difference of a parameter) from one device's. Re-measured since, that
is no fault of the preset: two SGD steps are not smooth in the parameters (a
ReLU input within rounding of zero switches its gradient), and on one device
the default and fast presets end a BatchNorm bias element 1% of its leaf apart
on some batches, float64 siding with the fast one; with one preset for both,
1 and 8 devices agree to 2e-6. How fast multi-device programs compile with it
is not measured, so they keep the default. Other backends get no options, and
a preset in ``XLA_FLAGS`` is the user's choice and wins.

Programs whose run time is not in the loops XLA generates also get LLVM's
``-O1`` for those loops (``light_codegen``): the initialisation, random draws
run once, and the training step, whose time is in YNNPACK's convolutions and
dots. Measured side by side on the 2-core AVX-512 VM (jax 0.10.2): the digits
config's initialisation compiled in 1.7 s against 3.4 s with the same values,
bit for bit; its training step in 5.1-5.3 s against 5.9 s (tracing included),
the same parameters after a step bit for bit, 89.5 against 90.2 ms a step;
A0's training step at batch 32, 224x224 in 3.1 against 3.5 s, 2,436 against
2,450 ms a step. Inference does not get it: A0's chunked inference at 224 ran
3-4% slower with it. At ``-O0`` the initialisation's values change and the
training step ran 2x slower.
"""

from __future__ import annotations

import os

import jax

CPU_FAST_COMPILE = {'xla_cpu_opt_preset': 'CPU_OPT_PRESET_FAST_COMPILE'}
CPU_LIGHT_CODEGEN = {'xla_backend_optimization_level': 1}


def compiler_options(
  backend: str | None = None, device_count: int | None = None, *, light_codegen: bool = False
) -> dict[str, str | int] | None:
  """The ``compiler_options`` for `jax.jit` (defaults: JAX's backend and device count).

  ``light_codegen``: also LLVM's ``-O1``, for programs that run once or spend
  their time in library kernels (see the module's docstring).
  """
  if 'xla_cpu_opt_preset' in os.environ.get('XLA_FLAGS', ''):
    return None
  if (backend or jax.default_backend()) != 'cpu':
    return None
  if (device_count or jax.device_count()) > 1:
    return None
  return {**CPU_FAST_COMPILE, **(CPU_LIGHT_CODEGEN if light_codegen else {})}


def jit(fun, *, light_codegen: bool = False, **kwargs):
  """`jax.jit` with this module's `compiler_options`."""
  return jax.jit(fun, compiler_options=compiler_options(light_codegen=light_codegen), **kwargs)


def state_donation(backend: str | None = None) -> tuple[int, ...]:
  """``donate_argnums`` for a training step whose first argument is the state.

  Donated everywhere but on CPUs. Donating lets the new state overwrite the old
  one; XLA:CPU then copies each kernel that the backward pass still reads after
  the optimizer has updated it in place, and the digits training step (A0, batch
  64, 32x32, 2 cores, jax 0.10.2) ran 4-5% slower with donation than without
  (162-163 against 155-157 ms, medians side by side). On a CPU the second copy of
  the state costs host memory only.
  """
  return () if (backend or jax.default_backend()) == 'cpu' else (0,)
