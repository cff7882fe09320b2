"""Bad inputs fail with messages that name the problem and the fix."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_variables

import repvgg_jax
from repvgg_jax import FusionError


@pytest.fixture(scope='module')
def a0():
  model = repvgg_jax.create_model('A0')
  return model, random_variables(model, (1, 32, 32, 3))


def test_unknown_model_name_lists_the_known_ones():
  with pytest.raises(ValueError, match='Unknown model name .RepVGG-C9.') as info:
    repvgg_jax.create_model('RepVGG-C9')
  for name in repvgg_jax.list_models():
    assert name in str(info.value)


def test_a_module_given_for_a_model_name_is_named_by_its_type(a0):
  """`fuse_params(model=create_model('B0'))`: one line, not the module's whole repr."""
  model, variables = a0
  with pytest.raises(TypeError, match=r"named by a string such as 'RepVGG-B0'.*got RepVGG\.$"):
    repvgg_jax.fuse_params(variables, model=model)
  with pytest.raises(TypeError, match=r'got int: 7\.$'):
    repvgg_jax.create_model(7)


@pytest.mark.parametrize(
  'shape,message',
  [
    ((32, 32, 3), r'got shape \(32, 32, 3\).*add a batch axis'),
    ((2, 3, 32, 32), r'got shape \(2, 3, 32, 32\).*NCHW'),
    ((2, 32, 32, 1), r'shape \(batch, height, width, 3\), got shape \(2, 32, 32, 1\)'),
    ((2, 32, 32), r'got shape \(2, 32, 32\)'),
  ],
)
def test_wrong_image_shape(a0, shape, message):
  model, variables = a0
  with pytest.raises(ValueError, match=message):
    model.apply(variables, jnp.zeros(shape))


def test_integer_images_are_rejected(a0):
  model, variables = a0
  with pytest.raises(TypeError, match='expects float images, got dtype uint8'):
    model.apply(variables, jnp.zeros((1, 32, 32, 3), jnp.uint8))


def test_fusing_a_fused_tree(a0):
  _, variables = a0
  fused = repvgg_jax.fuse_params(variables)
  with pytest.raises(FusionError, match='already fused'):
    repvgg_jax.fuse_params(fused)
  with pytest.raises(FusionError, match='already fused'):
    repvgg_jax.fuse_params({**fused, 'batch_stats': variables['batch_stats']})


def test_training_variables_on_the_deploy_model_and_the_reverse(a0):
  model, variables = a0
  deploy = repvgg_jax.create_model('A0', deploy=True)
  images = jnp.zeros((1, 32, 32, 3))
  with pytest.raises(ValueError, match=r'stage0_block0 is a deploy block.*fuse_params\(variables'):
    deploy.apply(variables, images)
  fused = repvgg_jax.fuse_params(variables)
  with pytest.raises(ValueError, match=r'block, but its params are fused.*deploy=True'):
    model.apply(fused, images)
  assert deploy.apply(fused, images).shape == model.apply(variables, images).shape == (1, 1000)


def test_fusing_without_batch_stats(a0):
  _, variables = a0
  with pytest.raises(FusionError, match=r"needs variables\['batch_stats'\]"):
    repvgg_jax.fuse_params({'params': variables['params']})


def test_batch_stats_of_another_variant(a0):
  _, variables = a0
  a1 = repvgg_jax.create_model('A1')
  other = jax.eval_shape(lambda: a1.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  mixed = {'params': variables['params'], 'batch_stats': other['batch_stats']}
  with pytest.raises(FusionError, match='different models'):
    repvgg_jax.fuse_params(mixed)


def test_block_of_another_variant(a0):
  _, variables = a0
  b0 = repvgg_jax.create_model('B0')
  other = jax.eval_shape(lambda: b0.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  params = dict(variables['params'])
  params['stage2_block0'] = other['params']['stage2_block0']
  with pytest.raises(FusionError, match='mixes'):
    repvgg_jax.fuse_params({**variables, 'params': params})


def test_expected_variant_is_checked(a0):
  _, variables = a0
  with pytest.raises(FusionError, match='shapes of RepVGG-A0, not of RepVGG-B0'):
    repvgg_jax.fuse_params(variables, model='B0')
  assert (
    repvgg_jax.fuse_params(variables, model='a0')['params'].keys() == variables['params'].keys()
  )


def test_not_variables():
  with pytest.raises(FusionError, match="takes {'params', 'batch_stats'}"):
    repvgg_jax.fuse_params({'weights': {}})
  for params, got in ((None, 'NoneType'), ([1], 'list')):
    with pytest.raises(FusionError, match=f"'params'\\] must be a mapping .*got a {got}"):
      repvgg_jax.fuse_params({'params': params})


@pytest.mark.parametrize(
  'options,message',
  [
    ({'branches': None}, 'branches must be a collection of branch names, got None'),
    ({'branches': ('conv3x3', 'conv3x3')}, 'branches repeats a branch kind'),
    ({'groups': True}, 'groups must be a positive int, got True'),
    # Trains, but fusion has no kernel to fold it into: refused when built.
    ({'branches': ('identity',)}, r"RepVGGBlock: the branches \('identity',\) have no convol"),
    ({'branches': ('identity',), 'post_norm': True}, 'have no convolution kernel to fuse into'),
    ({'branches': ('conv3x3', 'conv5x5')}, "RepVGGBlock: Unknown branch kind 'conv5x5'"),
  ],
)
def test_bad_block_options(options, message):
  block = repvgg_jax.RepVGGBlock(8, **options)
  with pytest.raises(ValueError, match=message):
    block.init(jax.random.key(0), jnp.zeros((1, 8, 8, 8)))


@pytest.mark.parametrize(
  'branches,message',
  [
    (('conv3x3', 'conv5x5'), "Unknown branch kind 'conv5x5'"),
    (('identity',), 'none of which can change the resolution'),
    (('conv3x3', 'conv3x3'), 'repeats a branch kind'),
    ([('conv3x3',)] * 4, 'one set per stage'),
    ('conv3x3', 'must be a sequence of branch names'),
    ([None] * 5, 'branches of stage 0 must be a collection of branch names, got None'),
  ],
)
def test_bad_branch_sets(branches, message):
  with pytest.raises(ValueError, match=message):
    repvgg_jax.create_model('A0', branches=branches)


def test_bad_options():
  with pytest.raises(ValueError, match='num_classes must be an int >= 0'):
    repvgg_jax.create_model('A0', num_classes=-1)
  with pytest.raises(ValueError, match='dtype must be float32 or bfloat16, got float16'):
    repvgg_jax.create_model('A0', dtype=jnp.float16)


def test_missing_blocks_are_named(a0):
  _, variables = a0
  params = {k: v for k, v in variables['params'].items() if k != 'stage3_block5'}
  with pytest.raises(FusionError, match='lacks blocks stage3_block5:'):
    repvgg_jax.fuse_params({**variables, 'params': params})
  without_stage = {k: v for k, v in variables['params'].items() if not k.startswith('stage2')}
  with pytest.raises(FusionError, match='lacks blocks stage2_block0:'):
    repvgg_jax.fuse_params({**variables, 'params': without_stage})


def test_one_blocks_own_variables_point_to_fuse_block():
  block = repvgg_jax.RepVGGBlock(8)
  variables = block.init(jax.random.key(0), jnp.zeros((1, 8, 8, 8)))
  with pytest.raises(
    FusionError, match=r'params is one block itself .*: fuse it with fuse_block\('
  ):
    repvgg_jax.fuse_params(variables)


@pytest.mark.parametrize(
  'options,message',
  [
    ({'num_classes': True}, 'num_classes must be an int >= 0'),
    ({'num_classes': 0, 'out_indices': None}, 'out_indices must be distinct stages'),
    ({'num_classes': 0, 'out_indices': (1.0,)}, 'out_indices must be distinct stages'),
    ({'in_channels': 0}, 'in_channels must be a positive int, got 0'),
    ({'dtype': None}, 'dtype must be float32 or bfloat16, got None'),
  ],
)
def test_bad_model_options(options, message):
  with pytest.raises(ValueError, match=message):
    repvgg_jax.create_model('A0', **options)


def test_numpy_integers_are_counts():
  model = repvgg_jax.create_model('A0', num_classes=np.int64(10))
  assert model.num_classes == 10 and type(model.num_classes) is int
  backbone = repvgg_jax.create_model('A0', num_classes=0, out_indices=np.array([4, 2]))
  assert backbone.out_indices == (2, 4) and all(type(s) is int for s in backbone.out_indices)
  sets = repvgg_jax.create_model('A0', branches=[frozenset({'conv3x3', 'identity'})] * 5)
  assert all(set(names) == {'conv3x3', 'identity'} for names in sets.branches)


@pytest.mark.parametrize(
  'fields,message',
  [
    ({'num_blocks': (1, 1, 1)}, r'num_blocks must be 4 positive ints .*got \(1, 1, 1\)'),
    ({'num_blocks': (1, 0, 1, 1)}, 'num_blocks must be 4 positive ints'),
    ({'num_blocks': 3}, r'num_blocks must be 4 positive ints .*got 3\.'),
    ({'width_multipliers': (0.01, 1)}, r'width_multipliers \(0.01, 1\) leave a stage without'),
    ({'groups': 0}, 'groups must be a positive int'),
    ({'block': 'resnet'}, "block must be one of .*got 'resnet'"),
  ],
)
def test_bad_variants(fields, message):
  with pytest.raises(ValueError, match=f'RepVGG-A0: {message}'):
    dataclasses.replace(repvgg_jax.get_variant('A0'), **fields)


def test_a_variant_given_lists_holds_tuples_and_is_hashable():
  variant = repvgg_jax.Variant('RepVGG-T', [1, np.int64(2), 1, 1], [0.25, 0.5])
  assert variant.num_blocks == (1, 2, 1, 1) and type(variant.num_blocks[1]) is int
  assert variant.width_multipliers == (0.25, 0.5)
  assert hash(variant) == hash(repvgg_jax.Variant('RepVGG-T', (1, 2, 1, 1), (0.25, 0.5)))
