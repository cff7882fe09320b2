"""PyTorch state dicts (reference and timm keys) <-> Flax variables: exact, strict,
layout-correct."""

import jax
import numpy as np
import pytest
from helpers import random_variables, relative_error

import repvgg_jax
from repvgg_jax.interop import torch_layout
from repvgg_jax.interop.torch_layout import ConversionError


def reference_state_dict(name, deploy=False, num_classes=1000, seed=0, style='reference'):
  model = repvgg_jax.create_model(name, deploy=deploy, num_classes=num_classes)
  variables = random_variables(model, (1, 32, 32, 3), seed=seed)
  state_dict = torch_layout.to_torch(variables, style)
  return variables, state_dict


def check_round_trip(name, deploy, variables, style, state_dict=None):
  """``variables`` -> a state dict of ``style`` -> the same variables, and the model named."""
  state_dict = state_dict or torch_layout.to_torch(variables, style)
  if style == 'reference':
    if not deploy:
      assert 'stage1.0.rbr_dense.conv.weight' in state_dict
      assert 'stage1.1.rbr_identity.running_var' in state_dict
      assert 'stage0.rbr_1x1.bn.running_mean' in state_dict
    else:
      assert 'stage4.0.rbr_reparam.bias' in state_dict
    state_dict['stage0.rbr_dense.bn.num_batches_tracked'] = np.array(7)  # Saved by PyTorch.
  else:
    if not deploy:
      assert 'stem.conv_kxk.conv.weight' in state_dict
      assert 'stages.0.1.identity.running_var' in state_dict
      assert 'stages.2.3.conv_1x1.bn.bias' in state_dict
    else:
      assert 'stages.3.0.reparam_conv.bias' in state_dict
    assert 'head.fc.weight' in state_dict
    state_dict['stem.conv_kxk.bn.num_batches_tracked'] = np.array(7)
  restored, info = torch_layout.from_torch(state_dict)
  assert info == {
    'model': name,
    'deploy': deploy,
    'num_classes': 1000,
    'looks_like': name,
    'key_style': style,
  }
  assert_same_variables(restored, variables)


# Both key styles from one set of variables: random variables of B3 take seconds.
# Deploy keys of the two styles differ only in the reparam branch: timm's on two variants.
@pytest.mark.parametrize('deploy', [False, True], ids=['train', 'deploy'])
@pytest.mark.parametrize('name', repvgg_jax.list_models('repvgg'))
def test_round_trip_every_variant(name, deploy):
  variables, state_dict = reference_state_dict(name, deploy)
  check_round_trip(name, deploy, variables, 'reference', state_dict)
  if not deploy or name in ('RepVGG-A0', 'RepVGG-B1g4'):
    check_round_trip(name, deploy, variables, 'timm')


def assert_same_variables(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  leaves = jax.tree_util.tree_leaves_with_path(actual)
  for (path, a), b in zip(leaves, jax.tree.leaves(expected), strict=True):
    b = np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype, jax.tree_util.keystr(path)
    assert np.array_equal(a, b), jax.tree_util.keystr(path)


def test_timm_and_reference_keys_name_the_same_tensors():
  _, reference = reference_state_dict('B1g4', num_classes=10)
  _, timm = reference_state_dict('B1g4', num_classes=10, style='timm')
  assert len(timm) == len(reference)
  for key, value in timm.items():
    np.testing.assert_array_equal(reference[torch_layout.timm_to_reference_key(key)], value)
  assert torch_layout.timm_to_reference_key('stages.3.0.conv_kxk.conv.weight') == (
    'stage4.0.rbr_dense.conv.weight'
  )
  assert torch_layout.timm_to_reference_key('stem.identity.weight') == 'stage0.rbr_identity.weight'
  # Grouped blocks: timm's odd block indices are the reference's even running numbers.
  assert timm['stages.0.1.conv_kxk.conv.weight'].shape[1] == 128 // 4
  assert timm['stages.1.0.conv_kxk.conv.weight'].shape[1] == 128
  assert timm['stages.1.1.conv_kxk.conv.weight'].shape[1] == 256 // 4


def test_mixed_key_styles_are_refused(a0_state_dict):
  mixed = {**a0_state_dict, 'head.fc.bias': np.zeros(10, np.float32)}
  with pytest.raises(ConversionError, match='mixes timm keys'):
    torch_layout.from_torch(mixed)


def test_unknown_timm_key_is_listed():
  _, timm = reference_state_dict('A0', num_classes=10, style='timm')
  broken = {**timm, 'stages.1.0.attn.fc1.weight': np.zeros((4, 96, 1, 1))}
  with pytest.raises(ConversionError, match=r'unexpected \(1\): stages.1.0.attn.fc1.weight'):
    torch_layout.from_torch(broken)


# Grouped training-time weights are checked against torch in test_torch_cross.py.
@pytest.mark.parametrize(
  'name, deploy', [('RepVGG-A0', False), ('RepVGG-A0', True), ('RepVGG-B1g4', True)]
)
def test_imported_model_computes_what_the_reference_computes(name, deploy):
  _, state_dict = reference_state_dict(name, deploy, num_classes=10, seed=1)
  images = np.random.default_rng(0).standard_normal((2, 32, 32, 3), np.float32)
  expected = torch_layout.reference_forward(state_dict, images.transpose(0, 3, 1, 2))
  variables, info = torch_layout.from_torch(state_dict)
  model = repvgg_jax.create_model(info['model'], num_classes=10, deploy=deploy, precision='highest')
  actual = jax.jit(model.apply)(variables, images)
  assert relative_error(actual, expected) <= 1e-5
  if not deploy:  # And fused after import.
    fused = repvgg_jax.fuse_params(variables)
    deploy_model = repvgg_jax.create_model(
      info['model'], num_classes=10, deploy=True, precision='highest'
    )
    assert relative_error(jax.jit(deploy_model.apply)(fused, images), expected) <= 1e-5


@pytest.fixture(scope='module')
def a0_state_dict():
  return reference_state_dict('A0', num_classes=10)[1]


def test_missing_key(a0_state_dict):
  broken = dict(a0_state_dict)
  del broken['stage2.3.rbr_1x1.bn.running_var']
  with pytest.raises(ConversionError, match=r'missing \(1\): batch_stats/stage2_block3/conv1x1'):
    torch_layout.from_torch(broken)


def test_unexpected_key(a0_state_dict):
  broken = {**a0_state_dict, 'stage1.0.se.down.weight': np.zeros((4, 48, 1, 1))}
  with pytest.raises(ConversionError, match=r'unexpected \(1\): stage1.0.se.down.weight'):
    torch_layout.from_torch(broken)


def test_wrong_shape(a0_state_dict):
  broken = {**a0_state_dict, 'stage3.5.rbr_dense.bn.weight': np.zeros(7, np.float32)}
  with pytest.raises(ConversionError, match=r'wrong shape \(1\).*\(7,\) instead of \(192,\)'):
    torch_layout.from_torch(broken, model='A0')


def test_another_variant_is_named(a0_state_dict):
  message = 'RepVGG-B0 .*; it holds RepVGG-A0: give that variant, or none to have it recognised'
  with pytest.raises(ConversionError, match=message):
    torch_layout.from_torch(a0_state_dict, model='RepVGG-B0')


def test_a_fused_qarepvgg_with_an_extra_key_is_not_sent_to_another_variant():
  """Fused, QARepVGG-A0 has RepVGG-A0's shapes: the key is the problem, not the variant."""
  _, state_dict = reference_state_dict('QARepVGG-A0', deploy=True, num_classes=10)
  state_dict['neck.weight'] = np.zeros(3, np.float32)
  with pytest.raises(ConversionError, match='it looks like RepVGG-A0. unexpected') as error:
    torch_layout.from_torch(state_dict, model='QARepVGG-A0')
  assert 'give that variant' not in str(error.value)


def test_not_a_repvgg_checkpoint():
  with pytest.raises(ConversionError, match='not a RepVGG checkpoint of the reference'):
    torch_layout.from_torch({'conv1.weight': np.zeros((64, 3, 7, 7)), 'fc.bias': np.zeros(10)})


def test_truncated_checkpoint(a0_state_dict):
  half = dict(list(a0_state_dict.items())[: len(a0_state_dict) // 2])
  with pytest.raises(ConversionError, match='missing|no known variant'):
    torch_layout.from_torch(half, model='A0')
