"""The wider branch family (ACNet, DBB, MobileOne) fuses exactly into one 3x3 conv.

Random kernels and non-trivial BatchNorm statistics (`helpers.random_variables`),
relative error of the fused output against the training-time one in inference
mode; blocks at strides 1 and 2, groups 1, 2 and 4, odd and even sizes, both
conv implementations, then whole A0 models per ablation set.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_variables, relative_error

import repvgg_jax
from repvgg_jax import model as model_lib
from repvgg_jax import perf
from repvgg_jax.model import branches, fusion, reparam_family, shapes, trees

FLOAT32_TOLERANCE = 1e-5
NEW_KINDS = ('conv1x3', 'conv3x1', 'dbb_avg', 'dbb_1x1_3x3', 'parallel3x3_k4')
ABLATION_SETS = [
  ('conv3x3',),
  ('conv3x3', 'identity'),
  ('conv3x3', 'conv1x1'),
  ('conv3x3', 'conv1x1', 'identity'),
  ('conv3x3', 'conv1x3', 'conv3x1'),
  ('conv3x3', 'conv1x1', 'dbb_avg', 'dbb_1x1_3x3'),
  ('parallel3x3_k4', 'conv1x1', 'identity'),
]
BLOCK_SETS = [('conv3x3', kind) for kind in NEW_KINDS] + ABLATION_SETS
# (strides, in_channels, out_channels, groups, conv_impl, sizes): the identity
# joins at stride 1 with equal widths; 16 -> 8 makes DBB's inner width (the
# input's) differ from the output's. Every set runs on every conv
# implementation (Winograd at stride 1 only, the only stride it computes), at
# odd and even sizes: at stride 2 both, where the border pixels sampled differ.
BLOCK_SHAPES = [
  (1, 8, 8, 1, 'xla', (9,)),
  (1, 8, 8, 2, 'im2col', (8,)),
  (1, 16, 8, 4, 'xla', (7,)),
  (1, 16, 8, 2, 'winograd', (7,)),
  (2, 8, 16, 1, 'im2col', (9, 8)),
  (2, 8, 16, 2, 'xla', (9, 8)),
]


def make_blocks(strides, features, groups, branch_set, conv_impl='xla', dtype=jnp.float32):
  block = functools.partial(
    model_lib.RepVGGBlock,
    features,
    strides,
    groups,
    branch_set,
    dtype=dtype,
    precision='highest',
    conv=perf.conv_layer(conv_impl, train=False),
  )
  return block(), block(deploy=True)


def fuse_one_block(variables):
  return {'params': fusion.fuse_block(variables['params'], variables['batch_stats'])}


# A list of blocks fused in one compiled call.
fuse_blocks = jax.jit(lambda many: [fuse_one_block(v) for v in many])


def normal(shape, seed):
  """Random float32 inputs from numpy: jax.random compiles anew for every shape."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


@pytest.fixture(scope='module')
def fused_block_cases():
  """Per branch set, ``(block, deploy, variables, fused, in_channels, sizes)`` of every shape.

  All blocks are fused in one compiled call: on the CPU compiling dominates.
  """
  cases = {}
  for branch_set in BLOCK_SETS:
    for seed, (strides, in_channels, features, groups, impl, sizes) in enumerate(BLOCK_SHAPES):
      block, deploy = make_blocks(strides, features, groups, branch_set, impl)
      variables = random_variables(block, (2, 9, 9, in_channels), seed=seed)
      cases.setdefault(branch_set, []).append([block, deploy, variables, in_channels, sizes])
  flat = [case for per_set in cases.values() for case in per_set]
  for case, fused in zip(flat, fuse_blocks([case[2] for case in flat]), strict=True):
    case.insert(3, fused)
  return cases


@pytest.mark.xdist_group('branch_family_blocks')  # One worker builds the fixture.
@pytest.mark.parametrize('branch_set', BLOCK_SETS, ids='+'.join)
def test_fused_block_matches_training_block(branch_set, fused_block_cases):
  errors, built = [], set()
  for block, deploy, variables, fused, in_channels, sizes in fused_block_cases[branch_set]:
    built |= set(variables['params'])
    for size in sizes:
      x = normal((2, size, size, in_channels), seed=size)
      expected, actual = block.apply(variables, x), deploy.apply(fused, x)
      assert actual.shape == expected.shape
      assert np.std(np.asarray(expected)) > 0.1  # Not a ReLU-ed constant.
      errors.append(relative_error(actual, expected))
  assert built == set(branch_set)  # Every branch, the identity included, was exercised.
  assert len(errors) == sum(len(sizes) for *_, sizes in BLOCK_SHAPES)
  assert max(errors) <= FLOAT32_TOLERANCE, errors


@pytest.mark.parametrize('strides', [1, 2])
def test_bfloat16_compute(strides):
  """bf16 compute, float32 parameters: fusion adds no error beyond bf16's own."""
  branch_set = ('conv3x3', 'conv1x1', 'identity', *NEW_KINDS)
  features = 16
  block32, _ = make_blocks(strides, features, 2, branch_set)
  block16, deploy16 = make_blocks(strides, features, 2, branch_set, dtype=jnp.bfloat16)
  variables = random_variables(block32, (2, 9, 9, 16), seed=5)
  x = normal((2, 9, 9, 16), seed=3)
  reference = block32.apply(variables, x)
  train = block16.apply(variables, x)
  deploy = deploy16.apply(fuse_blocks([variables])[0], x)
  assert train.dtype == deploy.dtype == jnp.bfloat16
  drift = relative_error(train, reference)
  assert 0 < drift < 0.02
  assert relative_error(deploy, reference) <= 2 * drift


# ----------------------------------------------------------------------------
# DBB: the pooling and the 3x3 conv are padded with the first BN's value.


def bn(y, params, stats):
  return (y - stats['mean']) / np.sqrt(stats['var'] + 1e-5) * params['scale'] + params['bias']


def lax_conv(y, kernel, strides, groups):
  return jax.lax.conv_general_dilated(
    y,
    kernel,
    (strides, strides),
    'VALID',
    dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    feature_group_count=groups,
    precision='highest',
  )


def reference_dbb(x, kind, params, stats, strides, groups, pad_with):
  """A DBB branch written out: 1x1 conv-BN, padding, pooling or 3x3 conv-BN, ReLU.

  ``pad_with`` is 'bn' (the first BN's value at a zero input) or 'zero'.
  """
  params, stats = params[kind], stats[kind]
  first = bn(
    lax_conv(x, params['conv1x1']['conv']['kernel'], 1, groups),
    params['conv1x1']['bn'],
    stats['conv1x1']['bn'],
  )
  value = bn(jnp.zeros(first.shape[-1]), params['conv1x1']['bn'], stats['conv1x1']['bn'])
  if pad_with == 'zero':
    value = jnp.zeros_like(value)
  padded = jnp.pad(first - value, ((0, 0), (1, 1), (1, 1), (0, 0))) + value
  if kind == 'dbb_avg':
    channels = padded.shape[-1]
    mean_kernel = jnp.full((3, 3, 1, channels), 1 / 9)
    out = bn(
      lax_conv(padded, mean_kernel, strides, channels), params['avg']['bn'], stats['avg']['bn']
    )
  else:
    second = params['conv3x3']
    out = bn(
      lax_conv(padded, second['conv']['kernel'], strides, groups),
      second['bn'],
      stats['conv3x3']['bn'],
    )
  return jnp.maximum(out, 0)


@pytest.mark.parametrize('strides', [1, 2])
@pytest.mark.parametrize('kind', ['dbb_avg', 'dbb_1x1_3x3'])
def test_dbb_padding_is_the_bn_value_and_it_matters_at_the_border(kind, strides):
  block, deploy = make_blocks(strides, 16, 2, (kind,))
  variables = random_variables(block, (2, 9, 9, 8), seed=7)
  x = normal((2, 9, 9, 8), seed=7)
  train = block.apply(variables, x)
  fused = deploy.apply(fuse_blocks([variables])[0], x)
  args = variables['params'], variables['batch_stats'], strides, 2
  bn_padded = reference_dbb(x, kind, *args, pad_with='bn')
  zero_padded = reference_dbb(x, kind, *args, pad_with='zero')
  # The module is the official DBB's BNAndPadLayer formulation...
  assert relative_error(train, bn_padded) <= 1e-6
  # ...whose fusion is exact at the border pixels too (size 9 stays odd, so
  # stride 2 samples the bottom and right padding as well)...
  border = np.ones(train.shape[1:3], bool)
  border[1:-1, 1:-1] = False
  assert relative_error(fused[:, border], train[:, border]) <= FLOAT32_TOLERANCE
  # ...which zero padding would not be: it agrees inside, not at the border.
  assert relative_error(zero_padded[:, ~border], bn_padded[:, ~border]) <= 1e-6
  assert relative_error(zero_padded[:, border], fused[:, border]) > 0.05


def test_dbb_1x1_starts_as_the_grouped_identity():
  block = model_lib.RepVGGBlock(16, 1, 2, ('conv3x3', 'dbb_1x1_3x3'))
  params = block.init(jax.random.key(0), jnp.zeros((1, 5, 5, 8)))['params']
  kernel = np.asarray(params['dbb_1x1_3x3']['conv1x1']['conv']['kernel'])
  assert kernel.shape == (1, 1, 4, 8)  # Inner width: the input's 8 channels, 2 groups.
  expected = np.asarray(branches.identity_kernel(8, 4))[1:2, 1:2]
  np.testing.assert_array_equal(kernel, expected)
  assert params['dbb_1x1_3x3']['conv3x3']['conv']['kernel'].shape == (3, 3, 4, 16)


def test_compose_1x1_then_kxk_per_group():
  """The composed kernel equals the two grouped convs run one after the other."""
  rng = np.random.default_rng(0)
  first = rng.normal(size=(1, 1, 3, 6))  # 6 -> 6 channels in 2 groups of 3.
  first_bias = rng.normal(size=6)
  second = rng.normal(size=(3, 3, 3, 4))  # 6 -> 4 channels in 2 groups.
  x = rng.normal(size=(1, 5, 5, 6))
  with jax.enable_x64(True):
    y = lax_conv(x, first, 1, 2) + first_bias
    y = jnp.pad(y - first_bias, ((0, 0), (1, 1), (1, 1), (0, 0))) + first_bias
    expected = lax_conv(y, second, 1, 2)
    kernel, bias = reparam_family.compose_1x1_then_kxk(
      jnp.asarray(first), jnp.asarray(first_bias), jnp.asarray(second)
    )
    actual = lax_conv(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), kernel, 1, 2) + bias
  assert kernel.shape == (3, 3, 3, 4)
  assert relative_error(actual, expected) <= 1e-12


# ----------------------------------------------------------------------------
# Whole models: every ablation set fuses to the same deploy network.


@pytest.fixture(scope='module')
def deploy_a0():
  deploy = repvgg_jax.create_model('A0', num_classes=10, deploy=True, precision='highest')
  shapes = jax.eval_shape(lambda: deploy.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))
  # ../shared/SPEC.md section 5 (8,309,384), less 990 of the 1000 classes.
  assert count(shapes['params']) == 8_309_384 - 990 * (1280 + 1)
  return deploy, shapes


def block_outputs(model, variables, images):
  """The logits and every block's output, by block name."""
  is_block = lambda module, method: isinstance(module, model_lib.RepVGGBlock)
  logits, state = model.apply(
    variables, images, capture_intermediates=is_block, mutable=['intermediates']
  )
  blocks = {name: out['__call__'][0] for name, out in state['intermediates'].items()}
  return logits, blocks


@pytest.mark.parametrize('branch_set', ABLATION_SETS, ids='+'.join)
def test_whole_model_fuses_exactly(branch_set, deploy_a0):
  deploy, deploy_shapes = deploy_a0
  model = repvgg_jax.create_model('A0', num_classes=10, branches=branch_set, precision='highest')
  variables = random_variables(model, (1, 16, 16, 3), seed=len(branch_set))
  assert {b for block in variables['params'].values() for b in block} - {'kernel', 'bias'} == set(
    branch_set
  )
  assert repvgg_jax.identify_variant(variables['params']) == 'RepVGG-A0'
  fused = repvgg_jax.fuse_params(variables, model='A0')
  # The same deploy tree, keys and shapes (so parameter count), whatever was trained.
  assert jax.tree.map(lambda a: (a.shape, a.dtype), fused) == jax.tree.map(
    lambda s: (s.shape, s.dtype), deploy_shapes
  )
  images = normal((4, 16, 16, 3), seed=0)
  train_logits, train_blocks = block_outputs(model, variables, images)
  deploy_logits, deploy_blocks = block_outputs(deploy, fused, images)
  assert relative_error(deploy_logits, train_logits) <= FLOAT32_TOLERANCE
  # Block by block: with random statistics a deep stack may forget its input
  # (late blocks output nearly the same for every image), the early ones not.
  assert len(train_blocks) == len(deploy_blocks) == 22
  for name, train in train_blocks.items():
    assert relative_error(deploy_blocks[name], train) <= FLOAT32_TOLERANCE, name
  stage1 = np.asarray(train_blocks['stage1_block1'])
  assert np.std(stage1, axis=0).mean() > 0.1 * np.std(stage1)


def test_grouped_tree_architecture_and_fused_structure():
  """A grouped toy variant: `architecture` reads groups off DBB's inner widths too."""
  variant = repvgg_jax.Variant('RepVGG-toy-g2', (2, 2, 1, 1), (0.25, 0.125), groups=2)
  branch_set = ('conv3x3', 'conv1x1', 'identity', *NEW_KINDS)
  model = repvgg_jax.create_model(variant, num_classes=10, branches=branch_set)
  deploy = repvgg_jax.create_model(variant, num_classes=10, deploy=True)
  abstract = lambda m: jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1, 15, 15, 3))))
  training = abstract(model)
  expected = list(variant.blocks())
  assert [g for *_, g in expected] == [1, 1, 2, 1, 2, 1, 2]
  assert shapes.architecture(training['params']) == expected
  fused = jax.eval_shape(repvgg_jax.fuse_params, training)
  assert shapes.architecture(fused['params']) == expected
  assert jax.tree.map(lambda a: (a.shape, a.dtype), fused) == jax.tree.map(
    lambda a: (a.shape, a.dtype), abstract(deploy)
  )


def count(tree):
  return sum(leaf.size for leaf in jax.tree.leaves(tree))


def training_shapes(branch_set, num_classes=10):
  model = repvgg_jax.create_model('A0', num_classes=num_classes, branches=branch_set)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))


def test_training_parameter_count_of_a_block_by_hand():
  # 4 -> 8 channels, stride 2: conv3x3 9*4*8 + BN 2*8 = 304; dbb_1x1_3x3 1x1
  # 4*4 + BN 2*4, 3x3 9*4*8 + BN 2*8 = 328; dbb_avg 1x1 4*8 + 2 BNs 4*8 = 64.
  block, _ = make_blocks(2, 8, 1, ('conv3x3', 'dbb_1x1_3x3', 'dbb_avg'))
  shapes = jax.eval_shape(lambda: block.init(jax.random.key(0), jnp.zeros((1, 6, 6, 4))))
  assert count(shapes['params']) == 304 + 328 + 64
  # Grouped (2), 8 -> 8, stride 1: parallel3x3_k4 4*(9*4*8 + 16) = 1216,
  # conv1x1 4*8 + 16 = 48, identity 16.
  block, _ = make_blocks(1, 8, 2, ('parallel3x3_k4', 'conv1x1', 'identity'))
  shapes = jax.eval_shape(lambda: block.init(jax.random.key(0), jnp.zeros((1, 6, 6, 8))))
  assert count(shapes['params']) == 1216 + 48 + 16
  assert jax.tree.map(jnp.shape, shapes['params']['parallel3x3_k4']['conv3x3_3']) == {
    'conv': {'kernel': (3, 3, 4, 8)},
    'bn': {'scale': (8,), 'bias': (8,)},
  }


def test_training_parameter_count_of_the_dbb_a0():
  """A0 with the DBB set, 10 classes, from the per-block formula.

  A block of c_in -> c channels holds 3x3 9*c_in*c + 2c, 1x1 c_in*c + 2c,
  dbb_avg c_in*c + 4c, dbb_1x1_3x3 c_in^2 + 2*c_in + 9*c_in*c + 2c.
  """
  dbb_set = ('conv3x3', 'conv1x1', 'dbb_avg', 'dbb_1x1_3x3')
  by_formula = sum(
    20 * c_in * c + c_in**2 + 2 * c_in + 10 * c
    for *_, c_in, c, _, _ in repvgg_jax.get_variant('A0').blocks()
  )
  classifier = 1280 * 10 + 10
  assert by_formula + classifier == 16_232_729
  assert count(training_shapes(dbb_set)['params']) == 16_232_729


# ----------------------------------------------------------------------------
# The registry.


def test_parametrized_family_resolves_by_name():
  kind = branches.get_branch('parallel3x3_k4')
  assert kind.name == 'parallel3x3_k4'
  assert branches.get_branch('parallel3x3_k4') is kind
  assert branches.get_branch('parallel3x3_k1').name == 'parallel3x3_k1'
  block, _ = make_blocks(1, 8, 1, ('parallel3x3_k12',))
  params = jax.eval_shape(lambda: block.init(jax.random.key(0), jnp.zeros((1, 5, 5, 8))))['params']
  assert list(params) == ['parallel3x3_k12']
  assert len(params['parallel3x3_k12']) == 12


@pytest.mark.parametrize(
  'name', ['parallel3x3_kx', 'parallel3x3_k0', 'parallel3x3_k04', 'parallel3x3_k', 'conv5x5']
)
def test_unknown_branch_names(name):
  with pytest.raises(ValueError, match=f"Unknown branch kind '{name}'") as info:
    branches.get_branch(name)
  message = str(info.value)
  for known in (*branches.BRANCH_KINDS, 'parallel3x3_k{K} (K >= 1)'):
    assert known in message
  with pytest.raises(ValueError, match=f"Unknown branch kind '{name}'"):
    repvgg_jax.create_model('A0', branches=('conv3x3', name))


def test_fusion_names_an_unknown_or_inconsistent_branch():
  model = repvgg_jax.create_model('A0', branches=('conv3x3', 'dbb_1x1_3x3'))
  variables = random_variables(model, (1, 16, 16, 3))
  params = {**variables['params']}
  block = dict(params['stage1_block1'])
  block['parallel3x3_kx'] = block.pop('dbb_1x1_3x3')
  params['stage1_block1'] = block
  with pytest.raises(repvgg_jax.FusionError, match='parallel3x3_kx is an unknown branch.*families'):
    repvgg_jax.fuse_params({**variables, 'params': params})
  # A DBB inner layer from a block of other widths.
  block = {k: dict(v) for k, v in variables['params']['stage1_block1'].items()}
  block['dbb_1x1_3x3']['conv1x1'] = variables['params']['stage2_block1']['dbb_1x1_3x3']['conv1x1']
  params['stage1_block1'] = block
  with pytest.raises(repvgg_jax.FusionError, match='stage1_block1/dbb_1x1_3x3 .*different models'):
    repvgg_jax.fuse_params({**variables, 'params': params})


def test_registering_a_family_member_name_is_refused():
  with pytest.raises(ValueError, match='parallel3x3_k'):
    branches.register_branch(branches.conv_bn_kind('parallel3x3_k7', (3, 3)))
  assert 'parallel3x3_k7' not in branches.BRANCH_KINDS


def test_registering_a_reserved_name_or_not_a_kind_is_refused():
  for name in (branches.FUSED_KEY, branches.POST_NORM_KEY):
    with pytest.raises(ValueError, match=f"'{name}' names the layer it is in block trees"):
      branches.register_branch(branches.conv_bn_kind(name, (3, 3)))
    assert name not in branches.BRANCH_KINDS
  with pytest.raises(TypeError, match='register_branch takes a BranchKind, got str'):
    branches.register_branch('conv7x7')


def test_a_kind_whose_fuse_gives_another_shape_is_refused(monkeypatch):
  """A 1x1 kernel left unpadded would be added to the 3x3 ones by broadcasting."""
  one_by_one = branches.conv_bn_kind('unpadded_1x1_test', (1, 1))
  unpadded = lambda params, stats, _: branches.fuse_conv_bn(
    params['conv']['kernel'], params['bn'], stats['bn']
  )
  kind = dataclasses.replace(one_by_one, fuse=unpadded)
  monkeypatch.setitem(branches.BRANCH_KINDS, kind.name, kind)  # Registered for this test.
  block = repvgg_jax.RepVGGBlock(8, branches=('conv3x3', kind.name))
  variables = block.init(jax.random.key(0), jnp.zeros((1, 6, 6, 8)))
  message = (
    r"Branch kind 'unpadded_1x1_test' fused into a kernel of shape \(1, 1, 8, 8\) and a bias "
    r'of shape \(8,\), where its block needs \(3, 3, 8, 8\) and \(8,\)'
  )
  with pytest.raises(fusion.FusionError, match=message):
    fusion.fuse_block(variables['params'], variables['batch_stats'])


@pytest.mark.parametrize('order', [1, -1])
def test_a_kind_without_parameters_is_refused_when_built(monkeypatch, order):
  """Fusion finds branches by their parameters: one without any would be dropped."""
  kind = branches.BranchKind(
    'bare_identity_test',
    lambda features, strides, groups, conv, norm, name: lambda x: x,
    lambda params, stats, in_per_group: None,
    applies=branches.IDENTITY.applies,
  )
  monkeypatch.setitem(branches.BRANCH_KINDS, kind.name, kind)
  block = repvgg_jax.RepVGGBlock(8, branches=('conv3x3', kind.name)[::order])
  with pytest.raises(ValueError, match="the branch 'bare_identity_test' has no parameters"):
    block.init(jax.random.key(0), jnp.zeros((1, 6, 6, 8)))


def test_a_kind_that_cannot_be_built_where_its_layout_is_read_is_named(monkeypatch):
  def build(features, strides, groups, conv, norm, name):
    raise ZeroDivisionError('float division by zero')

  kind = dataclasses.replace(branches.conv_bn_kind('unbuildable_test', (1, 1)), build=build)
  monkeypatch.setitem(branches.BRANCH_KINDS, kind.name, kind)
  message = (
    "Branch kind 'unbuildable_test' cannot be built from 64 to 64 channels at stride 1, where "
    'its parameter layout is read: ZeroDivisionError: float division by zero.'
  )
  with pytest.raises(ValueError, match=message):
    trees.branch_layout(kind.name)


@pytest.mark.parametrize(
  'branch_sets',
  [
    [('conv1x1_nobn',)] + [('conv3x3', 'conv1x1', 'identity')] * 4,  # Stage 0 without BN.
    ('conv1x1_nobn',),  # No BatchNorm anywhere: init makes no batch_stats.
    ('conv1x1_identity',),
  ],
  ids=['one stage', 'conv1x1_nobn', 'conv1x1_identity'],
)
def test_blocks_without_batchnorm_fuse(branch_sets):
  model = repvgg_jax.create_model('A0', num_classes=10, branches=branch_sets, precision='highest')
  variables = random_variables(model, (1, 16, 16, 3), seed=3)
  stats = variables.get('batch_stats', {})
  assert 'stage0_block0' not in stats and ('stage1_block0' in stats) == (len(branch_sets) == 5)
  fused = repvgg_jax.fuse_params(variables)
  deploy = repvgg_jax.create_model('A0', num_classes=10, deploy=True, precision='highest')
  images = normal((2, 16, 16, 3), seed=1)
  assert relative_error(deploy.apply(fused, images), model.apply(variables, images)) <= 1e-5
  block = variables['params']['stage0_block0']
  assert set(fusion.fuse_block(block, None)['reparam']) == {'kernel', 'bias'}


class _LayerScale(nn.Module):
  """``x * scale``, per channel: a parameter named as BatchNorm's, but no BatchNorm."""

  @nn.compact
  def __call__(self, x):
    return x * self.param('scale', nn.initializers.ones, (x.shape[-1],))


def _layer_scale_fuse(params, batch_stats, in_per_group):
  assert not batch_stats  # It keeps no statistics.
  scale = params['scale']
  return branches.identity_kernel(scale.shape[0], in_per_group, scale.dtype) * scale, 0 * scale


def test_a_kind_with_a_scale_that_is_no_batchnorm_fuses(monkeypatch):
  kind = branches.BranchKind(
    'layer_scale_test',
    lambda features, strides, groups, conv, norm, name: _LayerScale(name=name),
    _layer_scale_fuse,
    applies=branches.IDENTITY.applies,
  )
  monkeypatch.setitem(branches.BRANCH_KINDS, kind.name, kind)  # Registered for this test.
  model = repvgg_jax.create_model('A0', num_classes=10, branches=('conv3x3', 'layer_scale_test'))
  variables = random_variables(model, (1, 16, 16, 3), seed=4)
  assert 'layer_scale_test' not in variables['batch_stats']['stage1_block1']
  fused = repvgg_jax.fuse_params(variables)
  deploy = repvgg_jax.create_model('A0', num_classes=10, deploy=True)
  images = normal((2, 16, 16, 3), seed=2)
  assert relative_error(deploy.apply(fused, images), model.apply(variables, images)) <= 1e-5
