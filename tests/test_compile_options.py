"""The CPU compiler options: when they apply, and that programs compiled with them agree."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import calibrated_variables, flat_leaves, relative_error

import repvgg_jax
from repvgg_jax.perf import compile_options

# XLA's own defaults, spelled out: the suite compiles with the fast preset and -O1
# (conftest.py), so a plain `jax.jit` here would not be the default.
XLA_DEFAULT = {'xla_cpu_opt_preset': 'CPU_OPT_PRESET_DEFAULT', 'xla_backend_optimization_level': 3}
FULL_CODEGEN = {'xla_backend_optimization_level': 3}


def test_fast_compile_preset_on_one_cpu_device_only():
  assert compile_options.compiler_options('cpu', 1) == {
    'xla_cpu_opt_preset': 'CPU_OPT_PRESET_FAST_COMPILE'
  }
  assert compile_options.compiler_options('cpu', 1, light_codegen=True) == {
    'xla_cpu_opt_preset': 'CPU_OPT_PRESET_FAST_COMPILE',
    'xla_backend_optimization_level': 1,
  }
  assert compile_options.compiler_options('cpu', 8) is None  # See test_train's 1 vs 8 devices.
  assert compile_options.compiler_options('gpu', 1, light_codegen=True) is None
  assert compile_options.compiler_options('gpu', 1) is None
  assert compile_options.compiler_options('tpu', 1) is None


def test_the_state_is_donated_off_cpus_only():
  assert compile_options.state_donation('cpu') == ()
  assert compile_options.state_donation('gpu') == compile_options.state_donation('tpu') == (0,)


def test_a_preset_in_xla_flags_wins(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME')
  assert compile_options.compiler_options('cpu', 1) is None


def test_programs_with_the_preset_match_the_default():
  """Logits and a training gradient, with and without the preset, agree to float rounding."""
  variant = dataclasses.replace(
    repvgg_jax.get_variant('A0'), num_blocks=(1, 2, 1, 1), width_multipliers=(0.25, 0.25)
  )
  model = repvgg_jax.create_model(variant, num_classes=10)
  images = jax.random.normal(jax.random.key(0), (8, 32, 32, 3))
  variables = calibrated_variables(model, images)
  forward = lambda v: model.apply(v, images)

  def loss(params):
    logits, _ = model.apply(
      {**variables, 'params': params}, images, train=True, mutable=['batch_stats']
    )
    return jnp.mean(jax.nn.log_softmax(logits)[:, 0])

  presets = (
    {**compile_options.CPU_FAST_COMPILE, **FULL_CODEGEN},
    {**compile_options.CPU_FAST_COMPILE, **compile_options.CPU_LIGHT_CODEGEN},
  )
  for fn, args in ((forward, variables), (jax.grad(loss), variables['params'])):
    default = jax.jit(fn, compiler_options=XLA_DEFAULT)(args)
    for options in presets:
      fast = jax.jit(fn, compiler_options=options)(args)
      assert relative_error(flat_leaves(fast), flat_leaves(default)) <= 1e-5


def test_light_codegen_initialises_the_same_parameters():
  """The trainer initialises with LLVM's -O1: the same values, bit for bit."""
  variant = dataclasses.replace(repvgg_jax.get_variant('A0'), num_blocks=(1, 2, 1, 1))
  model = repvgg_jax.create_model(variant, num_classes=10)
  images = jnp.zeros((1, 32, 32, 3))
  light = compile_options.jit(model.init, light_codegen=True)(jax.random.key(3), images)
  options = {**compile_options.CPU_FAST_COMPILE, **FULL_CODEGEN}
  default = jax.jit(model.init, compiler_options=options)(jax.random.key(3), images)
  np.testing.assert_array_equal(flat_leaves(light), flat_leaves(default))


def test_jit_hands_its_options_to_xla(monkeypatch):
  """The programs compared above differ: an option XLA does not know reaches it and fails."""
  if compile_options.compiler_options() is None:
    pytest.skip('no compiler options here (several devices, another backend, XLA_FLAGS)')
  x = jnp.ones((4,))
  bogus = {'xla_no_such_option_for_this_test': 1}
  monkeypatch.setattr(compile_options, 'CPU_FAST_COMPILE', bogus)
  with pytest.raises(Exception, match='xla_no_such_option_for_this_test'):
    compile_options.jit(jnp.sin)(x)
  monkeypatch.setattr(compile_options, 'CPU_FAST_COMPILE', {})
  monkeypatch.setattr(compile_options, 'CPU_LIGHT_CODEGEN', bogus)
  np.testing.assert_array_equal(compile_options.jit(jnp.cos)(x), jnp.cos(x))  # Not asked for.
  with pytest.raises(Exception, match='xla_no_such_option_for_this_test'):
    compile_options.jit(jnp.tan, light_codegen=True)(x)


def test_inference_programs_get_one_call_per_convolution():
  single = compile_options.CPU_SEPARATE_CONVOLUTIONS
  assert compile_options.compiler_options('cpu', 1, inference=True) == {
    **compile_options.CPU_FAST_COMPILE,
    **single,
  }
  assert compile_options.compiler_options('cpu', 8, inference=True) == single
  assert compile_options.compiler_options('gpu', 1, inference=True) is None


def test_ynnpack_fusions_in_xla_flags_win(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_experimental_ynn_fusion_type=individual_dot')
  assert compile_options.compiler_options('cpu', 1, inference=True) == {
    **compile_options.CPU_FAST_COMPILE
  }
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME')
  assert compile_options.compiler_options('cpu', 1, inference=True) == (
    compile_options.CPU_SEPARATE_CONVOLUTIONS
  )


def most_convolutions_in_one_computation(compiled) -> int:
  return max(block.count(' convolution(') for block in compiled.as_text().split('\n\n'))


def test_the_fused_models_convolutions_stay_apart_in_inference():
  """With XLA's default preset, XLA:CPU takes the fused A0's chain of stage-3 and
  stage-4 convolutions (batch 2, 64x64: 4x4 and 2x2 maps) into one computation,
  where it ran slower than the unfused model (docs/performance.md, "Compiler
  options"); inference programs keep each on its own. Compiled only: the shapes
  decide."""
  deploy = repvgg_jax.create_model('A0', deploy=True)
  variables = deploy.abstract_variables(64)
  images = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  forward = lambda v, x: deploy.apply(v, x)
  inference = compile_options.jit(forward, inference=True).lower(variables, images).compile()
  assert most_convolutions_in_one_computation(inference) == 1
  plain = jax.jit(forward, compiler_options=XLA_DEFAULT).lower(variables, images).compile()
  assert most_convolutions_in_one_computation(plain) >= 14
  separate = {**XLA_DEFAULT, **compile_options.CPU_SEPARATE_CONVOLUTIONS}  # Without the preset.
  alone = jax.jit(forward, compiler_options=separate).lower(variables, images).compile()
  assert most_convolutions_in_one_computation(alone) == 1


def test_inference_programs_compute_what_the_default_computes():
  variant = dataclasses.replace(repvgg_jax.get_variant('A0'), num_blocks=(1, 2, 2, 1))
  model = repvgg_jax.create_model(variant, num_classes=10)
  images = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  fused = repvgg_jax.fuse_params(calibrated_variables(model, images))
  deploy = repvgg_jax.create_model(variant, num_classes=10, deploy=True)
  forward = lambda v: deploy.apply(v, images)
  default = jax.jit(forward, compiler_options=XLA_DEFAULT)(fused)
  inference = compile_options.jit(forward, inference=True)(fused)
  assert relative_error(inference, default) <= 1e-5
