"""Property tests of one block: fusion is exact for every shape and branch set."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import bn_formula, lax_conv, random_variables, relative_error

from repvgg_jax import model as model_lib
from repvgg_jax.model import branches as branches_lib
from repvgg_jax.model import fusion

OPTIONAL_BRANCHES = ('conv1x1', 'identity')
BRANCH_SETS = [
  ('conv3x3', *subset)
  for r in range(len(OPTIONAL_BRANCHES) + 1)
  for subset in itertools.combinations(OPTIONAL_BRANCHES, r)
]
CHANNELS = [(8, 8), (8, 16), (16, 8)]


def make_blocks(in_out, strides, groups, branches):
  block = functools.partial(
    model_lib.RepVGGBlock, in_out[1], strides, groups, branches, precision='highest'
  )
  return block(), block(deploy=True)


@jax.jit
def _fuse(variables):
  return {'params': fusion.fuse_block(variables['params'], variables['batch_stats'])}


@pytest.mark.parametrize('branches', BRANCH_SETS, ids='+'.join)
@pytest.mark.parametrize('groups', [1, 2, 4])
@pytest.mark.parametrize('strides', [1, 2])
@pytest.mark.parametrize('in_out', CHANNELS, ids=lambda c: f'{c[0]}to{c[1]}')
def test_fused_block_matches_training_block(in_out, strides, groups, branches):
  block, deploy = make_blocks(in_out, strides, groups, branches)
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, in_out[0]))
  variables = random_variables(block, x.shape, seed=strides * 10 + groups)
  fused = _fuse(variables)
  has_identity = 'identity' in variables['params']
  assert has_identity == ('identity' in branches and in_out[0] == in_out[1] and strides == 1)
  # Odd and even sizes: stride 2 on even sizes is where 'SAME' padding goes wrong.
  for size in (9, 8):
    x = jax.random.normal(jax.random.key(size), (2, size, size, in_out[0]))
    expected = block.apply(variables, x)
    actual = deploy.apply(fused, x)
    assert actual.shape == expected.shape
    assert relative_error(actual, expected) <= 1e-6


def reference_block(x, params, stats, strides, groups):
  """The block written out with lax, PyTorch-style padding, BN by its formula."""
  bn = bn_formula
  conv = functools.partial(lax_conv, strides=strides, groups=groups)

  out = bn(
    conv(x, params['conv3x3']['conv']['kernel'], 1), params['conv3x3']['bn'], stats['conv3x3']['bn']
  )
  out += bn(
    conv(x, params['conv1x1']['conv']['kernel'], 0), params['conv1x1']['bn'], stats['conv1x1']['bn']
  )
  if 'identity' in params:
    out += bn(x, params['identity'], stats['identity'])
  return jnp.maximum(out, 0)


@pytest.mark.parametrize('strides,in_out', [(1, (8, 8)), (2, (8, 16))])
@pytest.mark.parametrize('size', [8, 9])
def test_training_block_matches_the_paper_formula(strides, in_out, size):
  block, _ = make_blocks(in_out, strides, 2, branches_lib.PAPER_BRANCHES)
  x = jax.random.normal(jax.random.key(1), (2, size, size, in_out[0]))
  variables = random_variables(block, x.shape, seed=3)
  expected = reference_block(x, variables['params'], variables['batch_stats'], strides, 2)
  assert relative_error(block.apply(variables, x), expected) <= 1e-6


def test_identity_kernel_is_grouped_identity():
  kernel = np.asarray(branches_lib.identity_kernel(8, 2))
  x = np.random.default_rng(0).normal(size=(1, 5, 5, 8)).astype(np.float32)
  y = jax.lax.conv_general_dilated(
    x,
    kernel,
    (1, 1),
    ((1, 1), (1, 1)),
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    feature_group_count=4,
    precision='highest',
  )
  np.testing.assert_array_equal(np.asarray(y), x)


def test_one_by_one_is_padded_into_the_centre_tap():
  kernel = np.arange(6, dtype=np.float32).reshape(1, 1, 2, 3)
  padded = np.array(branches_lib.pad_to_3x3(kernel))
  assert padded.shape == (3, 3, 2, 3)
  np.testing.assert_array_equal(padded[1, 1], kernel[0, 0])
  padded[1, 1] = 0
  assert not padded.any()


def test_batchnorm_statistics_update_with_momentum_0_1_and_the_biased_variance():
  """The running statistics move a tenth of the way to the batch's, as PyTorch's
  momentum=0.1 does, with the batch's biased variance (Flax's; PyTorch keeps the
  unbiased one: README, docs/training.md)."""
  block, _ = make_blocks((8, 8), 1, 1, branches_lib.PAPER_BRANCHES)
  x = jax.random.normal(jax.random.key(1), (4, 6, 6, 8)) * 3.0 + 1.0
  variables = random_variables(block, x.shape, seed=5)
  _, updated = block.apply(variables, x, train=True, mutable=['batch_stats'])
  old, new = variables['batch_stats']['identity'], updated['batch_stats']['identity']
  x64 = np.asarray(x, np.float64)  # The identity branch normalises the block's input.
  expected_mean = 0.9 * np.asarray(old['mean'], np.float64) + 0.1 * x64.mean((0, 1, 2))
  expected_var = 0.9 * np.asarray(old['var'], np.float64) + 0.1 * x64.var((0, 1, 2))
  np.testing.assert_allclose(new['mean'], expected_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new['var'], expected_var, rtol=1e-5)
  unbiased = 0.9 * np.asarray(old['var'], np.float64) + 0.1 * x64.var((0, 1, 2), ddof=1)
  assert not np.allclose(new['var'], unbiased, rtol=1e-5)  # 144 values: 1/143 apart.
