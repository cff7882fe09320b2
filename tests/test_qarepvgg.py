"""QARepVGG's block (Chu et al., AAAI 2024): its formula, its exact fusion into
the same deploy model as RepVGG's, its parameter counts and its names."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import bn_formula, calibrated_variables, lax_conv, random_variables, relative_error

import repvgg_jax
from repvgg_jax.model import branches as branches_lib
from repvgg_jax.model import fusion, variants
from repvgg_jax.train import optim

QA = functools.partial(
  repvgg_jax.RepVGGBlock, branches=branches_lib.QA_BRANCHES, post_norm=True, precision='highest'
)
CHANNELS = [(8, 8), (8, 16), (16, 8)]

# Training-time trainable parameters with 1000 classes. Against RepVGG's
# (tests/test_variants.py): each block trades the 1x1 branch's BatchNorm for
# the BatchNorm of the sum, and drops the identity's, so QARepVGG has 2 * C
# fewer per block with an identity (C: its channels). Deploy counts are
# RepVGG's: the fused networks are the same.
QA_TRAINING_PARAMS = {
  'QARepVGG-A0': 9_103_304,
  'QARepVGG-A1': 14_084_712,
  'QARepVGG-A2': 28_199_272,
  'QARepVGG-B0': 15_808_616,
  'QARepVGG-B1': 57_396_328,
  'QARepVGG-B1g2': 45_763_688,
  'QARepVGG-B1g4': 39_947_368,
  'QARepVGG-B2': 88_999_016,
  'QARepVGG-B2g2': 70_823_016,
  'QARepVGG-B2g4': 61_735_016,
  'QARepVGG-B3': 123_057_256,
  'QARepVGG-B3g2': 96_883_816,
  'QARepVGG-B3g4': 83_797_096,
}


@jax.jit
def _fuse(variables):
  return {'params': fusion.fuse_block(variables['params'], variables['batch_stats'])}


def qa_formula(x, params, stats, strides, groups):
  """ReLU(BN_post(BN_3(conv3x3(x)) + conv1x1(x) + [x])), written out with lax."""
  bn = bn_formula
  conv = functools.partial(lax_conv, strides=strides, groups=groups)

  dense = params['conv3x3']
  out = bn(conv(x, dense['conv']['kernel'], 1), dense['bn'], stats['conv3x3']['bn'])
  one = params.get('conv1x1_identity') or params['conv1x1_nobn']
  out += conv(x, one['conv']['kernel'], 0)
  if 'conv1x1_identity' in params:
    out += x
  return jnp.maximum(bn(out, params['post_bn'], stats['post_bn']), 0)


@pytest.mark.parametrize('groups', [1, 2, 4])
@pytest.mark.parametrize('strides', [1, 2])
@pytest.mark.parametrize('in_out', CHANNELS, ids=lambda c: f'{c[0]}to{c[1]}')
def test_qa_block_is_the_formula_and_fuses_exactly(in_out, strides, groups):
  block, deploy = QA(in_out[1], strides, groups), QA(in_out[1], strides, groups, deploy=True)
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, in_out[0]))
  variables = random_variables(block, x.shape, seed=strides * 10 + groups)
  params, stats = variables['params'], variables['batch_stats']
  # The identity joins the 1x1 conv only where the shape allows it, as in RepVGG.
  identity = in_out[0] == in_out[1] and strides == 1
  one = 'conv1x1_identity' if identity else 'conv1x1_nobn'
  assert sorted(params) == sorted(['conv3x3', one, 'post_bn'])
  assert sorted(stats) == ['conv3x3', 'post_bn']  # No BatchNorm on the 1x1 or the identity.
  fused = _fuse(variables)
  # Odd and even sizes: stride 2 on even sizes is where 'SAME' padding goes wrong.
  for size in (9, 8):
    x = jax.random.normal(jax.random.key(size), (2, size, size, in_out[0]))
    expected = block.apply(variables, x)
    assert relative_error(expected, qa_formula(x, params, stats, strides, groups)) <= 1e-6
    assert relative_error(deploy.apply(fused, x), expected) <= 1e-6


@pytest.mark.parametrize('name', ['QARepVGG-A0', 'QARepVGG-B1g4'])
def test_qa_network_fuses_into_repvggs_deploy_model(name):
  images = jnp.asarray(np.random.default_rng(0).standard_normal((2, 48, 48, 3), np.float32))
  model = repvgg_jax.create_model(name, num_classes=10, precision='highest')
  variables = calibrated_variables(model, images)
  fused = jax.jit(repvgg_jax.fuse_params)(variables)
  plain = name.replace('QARepVGG', 'RepVGG')
  deploy = repvgg_jax.create_model(plain, num_classes=10, deploy=True, precision='highest')
  expected = model.apply(variables, images)
  assert np.std(np.asarray(expected), axis=0).mean() > 1e-2 * np.std(np.asarray(expected))
  assert relative_error(deploy.apply(fused, images), expected) <= 1e-5
  assert repvgg_jax.identify_variant(variables['params']) == name
  assert repvgg_jax.identify_variant(fused['params']) == plain


@pytest.mark.parametrize('name', list(QA_TRAINING_PARAMS))
def test_qa_parameter_counts(name):
  def count(model):
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
    return sum(leaf.size for leaf in jax.tree.leaves(shapes['params'])), shapes

  training, shapes = count(repvgg_jax.create_model(name))
  assert training == QA_TRAINING_PARAMS[name]
  plain = name.replace('QARepVGG', 'RepVGG')
  plain_training, _ = count(repvgg_jax.create_model(plain))
  identities = [
    b
    for b in variants.get_variant(name).blocks()
    if b.in_channels == b.out_channels and b.stride == 1
  ]
  assert plain_training - training == sum(2 * b.out_channels for b in identities)
  deploy, deploy_shapes = count(repvgg_jax.create_model(plain, deploy=True))
  fused = jax.eval_shape(repvgg_jax.fuse_params, shapes)
  assert jax.tree.map(lambda s: s.shape, fused) == jax.tree.map(lambda s: s.shape, deploy_shapes)


@pytest.mark.parametrize(
  'alias', ['QARepVGG-B1g4', 'qarepvgg_b1g4', ' QAREPVGG-B1G4', 'qarepvggb1g4']
)
def test_names(alias):
  variant = variants.get_variant(alias)
  assert (variant.name, variant.block, variant.groups) == ('QARepVGG-B1g4', 'qarepvgg', 4)
  assert repvgg_jax.list_models('qarepvgg') == list(QA_TRAINING_PARAMS)
  with pytest.raises(ValueError, match='Known models: RepVGG-A0'):
    variants.get_variant('qarepvgg-c0')


def test_wrong_variant_and_broken_post_norm_are_refused():
  model = repvgg_jax.create_model('QARepVGG-A0', num_classes=10)
  variables = random_variables(model, (1, 32, 32, 3))
  with pytest.raises(fusion.FusionError, match='shapes of QARepVGG-A0, not of RepVGG-A0'):
    repvgg_jax.fuse_params(variables, model='RepVGG-A0')
  assert repvgg_jax.fuse_params(variables, model='qarepvgg-a0')['params'].keys()
  stats = dict(variables['batch_stats'])
  stats['stage0_block0'] = dict(stats['stage0_block0'])
  del stats['stage0_block0']['post_bn']
  with pytest.raises(fusion.FusionError, match='stage0_block0/post_bn has no batch_stats'):
    repvgg_jax.fuse_params({**variables, 'batch_stats': stats})
  params = dict(variables['params'])
  params['stage1_block1'] = {
    **params['stage1_block1'],
    'post_bn': {'scale': jnp.ones(3), 'bias': jnp.ones(3)},
  }
  with pytest.raises(fusion.FusionError, match='post_bn has a scale of shape'):
    repvgg_jax.fuse_params({**variables, 'params': params})


class Decoder(nn.Module):
  """QARepVGG blocks in a network of one's own, one of each shape case."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(8, (3, 3), name='stem')(x)
    x = QA(8, 1, name='same')(x, train=train)  # 1x1 + identity.
    x = QA(8, 2, 2, name='down')(x, train=train)  # Same channels, stride 2: no identity.
    return QA(16, 1, name='wider')(x, train=train)


def test_qa_blocks_in_a_network_of_ones_own_fuse_exactly():
  x = jax.random.normal(jax.random.key(2), (2, 12, 12, 3))
  variables = random_variables(Decoder(), x.shape)
  assert 'conv1x1_identity' in variables['params']['same']
  assert 'conv1x1_nobn' in variables['params']['down']
  fused = repvgg_jax.fuse_params(variables)
  assert sorted(fused['params']['down']) == ['reparam']

  class DeployDecoder(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(8, (3, 3), name='stem')(x)
      x = QA(8, 1, deploy=True, name='same')(x)
      x = QA(8, 2, 2, deploy=True, name='down')(x)
      return QA(16, 1, deploy=True, name='wider')(x)

  expected = Decoder().apply(variables, x)
  assert relative_error(DeployDecoder().apply(fused, x), expected) <= 1e-6


def test_the_sums_batchnorm_follows_the_references_weight_decay_rule():
  model = repvgg_jax.create_model('QARepVGG-A0', num_classes=10)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  mask = optim.weight_decay_mask(shapes['params'])['stage1_block1']
  # The reference decays every name without 'bias' or 'bn': the kernels, not the BatchNorms.
  assert mask['conv1x1_identity']['conv']['kernel'] and mask['conv3x3']['conv']['kernel']
  assert not mask['post_bn']['scale'] and not mask['conv3x3']['bn']['scale']
