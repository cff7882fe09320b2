"""XLA compiler options for this codebase's jitted programs on CPUs.

Single-device CPU programs get XLA's ``CPU_OPT_PRESET_FAST_COMPILE``, which
compiles RepVGG's programs faster than the default preset, and
programs whose run time is in library kernels or that run once (the
initialisation, the training step) also get LLVM's ``-O1`` for the loops XLA
generates (``light_codegen``). Multi-device programs, other backends and a
preset the user set in ``XLA_FLAGS`` get none of these. Inference programs on
CPUs (``inference``) also hand each convolution to YNNPACK on its own: left
to itself, XLA:CPU takes the fused model's chain of small-map convolutions into
one computation, where the fused model ran slower than the training-time one.
The measurements behind these choices are in docs/performance.md, "Compiler
options".
"""

from __future__ import annotations

import os

import jax

CPU_FAST_COMPILE = {'xla_cpu_opt_preset': 'CPU_OPT_PRESET_FAST_COMPILE'}
CPU_LIGHT_CODEGEN = {'xla_backend_optimization_level': 1}
# Only single convolutions go to YNNPACK: each convolution is one call of its own.
CPU_SEPARATE_CONVOLUTIONS = {
  'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION'
}


def compiler_options(
  backend: str | None = None,
  device_count: int | None = None,
  *,
  light_codegen: bool = False,
  inference: bool = False,
) -> dict[str, str | int] | None:
  """The ``compiler_options`` for `jax.jit` (defaults: JAX's backend and device count).

  ``light_codegen``: also LLVM's ``-O1``, for programs that run once or spend
  their time in library kernels. ``inference``: each convolution a YNNPACK call
  of its own, unless ``XLA_FLAGS`` chooses YNNPACK's fusions (see the module's
  docstring).
  """
  if (backend or jax.default_backend()) != 'cpu':
    return None
  flags = os.environ.get('XLA_FLAGS', '')
  options = {}
  if 'xla_cpu_opt_preset' not in flags and (device_count or jax.device_count()) == 1:
    options = {**CPU_FAST_COMPILE, **(CPU_LIGHT_CODEGEN if light_codegen else {})}
  if inference and 'xla_cpu_experimental_ynn_fusion_type' not in flags:
    options.update(CPU_SEPARATE_CONVOLUTIONS)
  return options or None


def jit(fun, *, light_codegen: bool = False, inference: bool = False, **kwargs):
  """`jax.jit` with this module's `compiler_options`."""
  options = compiler_options(light_codegen=light_codegen, inference=inference)
  return jax.jit(fun, compiler_options=options, **kwargs)


def state_donation(backend: str | None = None) -> tuple[int, ...]:
  """``donate_argnums`` for a training step whose first argument is the state.

  Donated everywhere but on CPUs. Donating lets the new state overwrite the old
  one; XLA:CPU then copies each kernel that the backward pass still reads after
  the optimizer has updated it in place, and the digits training step ran slower
  with donation than without (docs/performance.md, "Compiler options"). On a CPU
  the second copy of the state costs host memory only.
  """
  return () if (backend or jax.default_backend()) == 'cpu' else (0,)
