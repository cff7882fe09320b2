"""The variant table: exact parameter counts, names, grouped layers."""

import functools

import jax
import jax.numpy as jnp
import pytest

import repvgg_jax
from repvgg_jax.model import shapes, variants

# ../shared/SPEC.md section 5: (deploy, training-time trainable) with 1000 classes.
PARAM_COUNTS = {
  'RepVGG-A0': (8_309_384, 9_108_968),
  'RepVGG-A1': (12_789_864, 14_092_264),
  'RepVGG-A2': (25_499_944, 28_210_600),
  'RepVGG-B0': (14_339_048, 15_817_960),
  'RepVGG-B1': (51_829_480, 57_415_016),
  'RepVGG-B1g2': (41_360_104, 45_782_376),
  'RepVGG-B1g4': (36_125_416, 39_966_056),
  'RepVGG-B2': (80_315_112, 89_022_376),
  'RepVGG-B2g2': (63_956_712, 70_846_376),
  'RepVGG-B2g4': (55_777_512, 61_758_376),
  'RepVGG-B3': (110_960_872, 123_085_288),
  'RepVGG-B3g2': (87_404_776, 96_911_848),
  'RepVGG-B3g4': (75_626_728, 83_825_128),
}


def variable_shapes(model):
  """The variables' shapes, from tracing ``init`` (no compilation); a 224x224 input."""
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))


def count(tree):
  return sum(leaf.size for leaf in jax.tree.leaves(tree))


def test_all_variants_listed_in_paper_order():
  assert repvgg_jax.list_models('repvgg') == list(PARAM_COUNTS)
  qa = [name.replace('RepVGG', 'QARepVGG') for name in PARAM_COUNTS]
  assert repvgg_jax.list_models() == list(PARAM_COUNTS) + qa


# One test per variant for both checks: tracing the init of B3 takes a second.
@pytest.mark.parametrize('name', list(PARAM_COUNTS))
def test_parameter_counts_are_exact_and_fusion_gives_the_deploy_shapes(name):
  training = repvgg_jax.create_model(name).abstract_variables()  # At 32x32.
  expected = variable_shapes(repvgg_jax.create_model(name, deploy=True))
  assert (count(expected['params']), count(training['params'])) == PARAM_COUNTS[name]
  fused = jax.eval_shape(repvgg_jax.fuse_params, training)
  assert jax.tree.map(lambda s: (s.shape, s.dtype), fused) == jax.tree.map(
    lambda s: (s.shape, s.dtype), expected
  )
  assert repvgg_jax.identify_variant(fused['params']) == name


def test_any_input_channels_and_a_backbone_cut_short_name_their_variant():
  grey = repvgg_jax.create_model('B1g2', num_classes=5, in_channels=1).abstract_variables()
  assert repvgg_jax.identify_variant(grey['params']) == 'RepVGG-B1g2'
  fused = jax.eval_shape(functools.partial(repvgg_jax.fuse_params, model='B1g2'), grey)
  assert repvgg_jax.identify_variant(fused['params']) == 'RepVGG-B1g2'
  short = repvgg_jax.create_model('B1g2', num_classes=0, out_indices=(0, 1, 2), deploy=True)
  params = short.abstract_variables()['params']
  assert shapes.has_shapes_of(params, 'B1g2') and shapes.has_shapes_of(params, 'QARepVGG-B1g2')
  assert not shapes.has_shapes_of(params, 'B1') and not shapes.has_shapes_of(params, 'B1g4')
  assert not shapes.has_shapes_of(grey['params'], 'B1g4')


@pytest.mark.parametrize('alias', ['RepVGG-B1g4', 'b1g4', 'B1G4', 'repvgg_b1g4', ' RepVGG-b1g4 '])
def test_names_are_case_and_prefix_insensitive(alias):
  assert variants.get_variant(alias).name == 'RepVGG-B1g4'


def test_stage_widths_follow_table_2():
  assert variants.get_variant('A0').stage_widths == (48, 48, 96, 192, 1280)
  assert variants.get_variant('B1').stage_widths == (64, 128, 256, 512, 2048)
  assert variants.get_variant('A2').stage_widths == (64, 96, 192, 384, 1408)


def test_grouped_blocks_are_the_even_running_indices():
  variant = variants.get_variant('B2g4')
  grouped = []
  running = 0
  for stage, _, _, _, _, groups in variant.blocks():
    if stage == 0:
      assert groups == 1
      continue
    running += 1
    if groups > 1:
      assert groups == 4
      grouped.append(running)
  assert grouped == list(range(2, 27, 2))


def test_strides_and_resolution():
  model = repvgg_jax.create_model('A0', num_classes=0)
  outputs = jax.eval_shape(
    lambda: model.init_with_output(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))[0]
  )
  assert [o.shape for o in outputs] == [
    (1, 112, 112, 48),
    (1, 56, 56, 48),
    (1, 28, 28, 96),
    (1, 14, 14, 192),
    (1, 7, 7, 1280),
  ]
