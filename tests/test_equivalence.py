"""The fused deploy model computes what the training-time model computes.

Every variant (8 of the 14 with `-m slow`), with random non-trivial BatchNorm
statistics, scales and offsets (`helpers.calibrated_variables`), jitted; relative
error of the logits ``||deploy - train|| / ||train||``. The models use XLA's
convolution, which compiles several times faster than im2col; `test_conv.py` shows
the two agree.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import calibrated_variables, random_variables, relative_error

import repvgg_jax

FLOAT32_TOLERANCE = 1e-5
# bfloat16 keeps 8 significant bits (unit roundoff 2**-8 = 0.4%). Through ~20
# layers whose BatchNorms rescale activations, each model drifts a few percent
# from its float32 result (measured at 64x64: A0 2.7%, B0 3.5%, B1g4 4.0%).
# The two models round differently, so their drifts are independent and they
# end about sqrt(2) drifts apart (measured 1.36-1.46). The bound allows twice
# that, and 10% at most.
BFLOAT16_DRIFT_FACTOR = 2 * np.sqrt(2)
BFLOAT16_MAX_ERROR = 0.1


def normal(shape, seed):
  """Random float32 inputs from numpy: jax.random compiles anew for every shape."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def prepare(name, size, batch=2, seed=0, calibrate=True):
  """A random batch, variables of ``name`` for it and their jitted fusion.

  With ``calibrate=False`` the statistics are random rather than fitted to the
  batch (cheaper: no train-mode compile); enough at small sizes, where the
  logits still depend on the input (checked by `assert_non_trivial`).
  """
  images = normal((batch, size, size, 3), seed)
  model = repvgg_jax.create_model(name, precision='highest')
  if calibrate:
    variables = calibrated_variables(model, images, seed=seed)
  else:
    variables = random_variables(model, images.shape, seed=seed)
  return images, variables, jax.jit(repvgg_jax.fuse_params)(variables)


def logits_of(name, variables, images, deploy=False, dtype=jnp.float32):
  """The jitted logits of the training-time (or, with ``deploy``, the fused) model."""
  model = repvgg_jax.create_model(name, deploy=deploy, dtype=dtype, precision='highest')
  return jax.jit(model.apply)(variables, images)


def assert_non_trivial(logits):
  """The logits must differ between images, or the comparison proves little."""
  logits = np.asarray(logits)
  assert np.all(np.isfinite(logits))
  assert np.std(logits, axis=0).mean() > 1e-2 * np.std(logits)


# RepVGG's 13 and the largest QARepVGG (test_qarepvgg.py checks A0 and B1g4 at 48x48).
# Those that differ in what fusion meets (A's stages; groups 2 and 4; B3's depth and
# width) run by default; the other 8 repeat those blocks at other widths (`-m slow`).
DEFAULT_VARIANTS = 'RepVGG-A0 RepVGG-B1g2 RepVGG-B1g4 RepVGG-B3 RepVGG-B3g4 QARepVGG-B3g4'.split()


@pytest.mark.parametrize(
  'name',
  [
    name if name in DEFAULT_VARIANTS else pytest.param(name, marks=pytest.mark.slow)
    for name in [*repvgg_jax.list_models('repvgg'), 'QARepVGG-B3g4']
  ],
)
def test_every_variant_small_resolution(name):
  # Two images suffice for `assert_non_trivial`; at 32x32 stages 1-3 run at 8x8 to 2x2.
  images, variables, fused = prepare(name, size=32, calibrate=False)
  train = logits_of(name, variables, images)
  assert_non_trivial(train)
  assert relative_error(logits_of(name, fused, images, deploy=True), train) <= FLOAT32_TOLERANCE


@pytest.mark.parametrize('name', ['RepVGG-A0', pytest.param('RepVGG-B1g4', marks=pytest.mark.slow)])
def test_full_resolution_and_odd_size(name):
  # Calibrated at 224; the same variables serve at 225, which stays odd through
  # four stride-2 stages (225, 113, 57, 29, 15, 8).
  images, variables, fused = prepare(name, size=224)
  odd = normal((2, 225, 225, 3), seed=1)
  for size, batch in ((224, images), (225, odd)):
    train = logits_of(name, variables, batch)
    assert train.shape == (2, 1000)
    assert_non_trivial(train)
    error = relative_error(logits_of(name, fused, batch, deploy=True), train)
    assert error <= FLOAT32_TOLERANCE, f'{size}x{size}: {error}'


def test_bfloat16_compute():
  name = 'RepVGG-A0'
  images, variables, fused = prepare(name, size=64, batch=8)
  reference = logits_of(name, variables, images)
  train = logits_of(name, variables, images, dtype=jnp.bfloat16)
  deploy = logits_of(name, fused, images, deploy=True, dtype=jnp.bfloat16)
  assert train.dtype == deploy.dtype == jnp.float32
  # Fusion adds no error of its own: the fused bf16 model is no further from the
  # float32 result than the training-time bf16 model is (up to a factor 2).
  drift = relative_error(train, reference)
  assert relative_error(deploy, reference) <= 2 * drift
  assert relative_error(deploy, train) <= min(BFLOAT16_DRIFT_FACTOR * drift, BFLOAT16_MAX_ERROR)


def test_fused_float32_model_is_as_accurate_as_the_training_model():
  """Against the float64 result, fusion costs no accuracy: the remaining
  difference between the float32 models is each one's own rounding. (A0 at
  64x64: the float32 programs are those of the bfloat16 test's reference.)"""
  name = 'RepVGG-A0'
  images, variables, fused = prepare(name, size=64, batch=8)
  train = logits_of(name, variables, images)
  deploy = logits_of(name, fused, images, deploy=True)
  with jax.enable_x64(True):
    exact_model = repvgg_jax.create_model(name, precision='highest').clone(dtype=jnp.float64)
    as64 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)
    exact = np.asarray(jax.jit(exact_model.apply)(as64(variables), as64(images)))
  train_error = relative_error(train, exact)
  assert relative_error(deploy, exact) <= 1.5 * train_error


def test_bfloat16_keeps_float32_parameters_and_statistics():
  model = repvgg_jax.create_model('A0', dtype=jnp.bfloat16)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}


def test_backbone_returns_the_five_stage_outputs():
  model = repvgg_jax.create_model('B1g2', num_classes=0, precision='highest')
  deploy = repvgg_jax.create_model('B1g2', num_classes=0, deploy=True, precision='highest')
  variables = random_variables(model, (1, 64, 64, 3))
  assert 'linear' not in variables['params']
  images = normal((2, 64, 64, 3), seed=0)
  train = jax.jit(model.apply)(variables, images)
  fused = jax.jit(deploy.apply)(repvgg_jax.fuse_params(variables), images)
  assert [t.shape for t in train] == [
    (2, 32, 32, 64),
    (2, 16, 16, 128),
    (2, 8, 8, 256),
    (2, 4, 4, 512),
    (2, 2, 2, 2048),
  ]
  for t, f in zip(train, fused, strict=True):
    assert relative_error(f, t) <= FLOAT32_TOLERANCE


@pytest.mark.parametrize(
  'branches',
  [('conv3x3',), ('conv3x3', 'identity'), ('conv3x3', 'conv1x1')],
  ids='+'.join,
)
def test_ablation_branch_sets_fuse_to_the_same_deploy_model(branches):
  model = repvgg_jax.create_model('A0', branches=branches, precision='highest')
  deploy = repvgg_jax.create_model('A0', deploy=True, precision='highest')
  variables = random_variables(model, (1, 32, 32, 3))
  for block in variables['params'].values():
    assert set(block) <= set(branches) | {'kernel', 'bias'}
  images = normal((2, 32, 32, 3), seed=0)
  train = jax.jit(model.apply)(variables, images)
  fused = jax.jit(deploy.apply)(repvgg_jax.fuse_params(variables), images)
  assert relative_error(fused, train) <= FLOAT32_TOLERANCE


def test_per_stage_branch_sets():
  per_stage = [('conv3x3',), ('conv3x3', 'conv1x1')] + [repvgg_jax.PAPER_BRANCHES] * 3
  model = repvgg_jax.create_model('A0', branches=per_stage, precision='highest')
  deploy = repvgg_jax.create_model('A0', deploy=True, precision='highest')
  variables = random_variables(model, (1, 32, 32, 3))
  assert set(variables['params']['stage0_block0']) == {'conv3x3'}
  assert set(variables['params']['stage1_block1']) == {'conv3x3', 'conv1x1'}
  assert set(variables['params']['stage2_block1']) == set(repvgg_jax.PAPER_BRANCHES)
  images = normal((2, 32, 32, 3), seed=0)
  train = jax.jit(model.apply)(variables, images)
  fused = jax.jit(deploy.apply)(repvgg_jax.fuse_params(variables), images)
  assert relative_error(fused, train) <= FLOAT32_TOLERANCE


def test_fuse_params_eager_equals_jitted():
  model = repvgg_jax.create_model('B1g4')
  variables = random_variables(model, (1, 32, 32, 3))
  eager = repvgg_jax.fuse_params(variables)
  jitted = jax.jit(repvgg_jax.fuse_params)(variables)
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_fusion_is_at_the_float32_floor():
  """The fused kernel is the float64 fusion rounded once to float32."""
  model = repvgg_jax.create_model('A0')
  variables = random_variables(model, (1, 32, 32, 3))
  params = variables['params']['stage1_block1']
  stats = variables['batch_stats']['stage1_block1']
  f64 = lambda a: np.asarray(a, np.float64)

  def fold(kernel, bn, st):
    scale = f64(bn['scale']) / np.sqrt(f64(st['var']) + 1e-5)
    return f64(kernel) * scale, f64(bn['bias']) - f64(st['mean']) * scale

  k3, b3 = fold(
    params['conv3x3']['conv']['kernel'], params['conv3x3']['bn'], stats['conv3x3']['bn']
  )
  k1, b1 = fold(
    params['conv1x1']['conv']['kernel'], params['conv1x1']['bn'], stats['conv1x1']['bn']
  )
  channels = k3.shape[-1]
  eye = np.zeros((3, 3, channels, channels))
  eye[1, 1] = np.eye(channels)
  kid, bid = fold(eye, params['identity'], stats['identity'])
  k3[1:2, 1:2] += k1
  expected_kernel = (k3 + kid).astype(np.float32)
  expected_bias = (b3 + b1 + bid).astype(np.float32)
  fused = repvgg_jax.fuse_params(variables)['params']['stage1_block1']['reparam']
  np.testing.assert_array_equal(np.asarray(fused['kernel']), expected_kernel)
  np.testing.assert_array_equal(np.asarray(fused['bias']), expected_bias)
