"""RepVGG blocks inside other networks: the public block, backbones with `name=`
and stage outputs, and `fuse_params` of a whole network's variables."""

import functools
import json
from collections.abc import Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_variables, relative_error, run_in_repo

import repvgg_jax
from repvgg_jax.model import trees, variants

# A shallow variant keeps random statistics from washing the signal out.
TINY = variants.Variant('RepVGG-tiny', (1, 2, 1, 1), (0.25, 0.5), groups=2)


class Segmenter(nn.Module):
  """A backbone with name= inside @nn.compact, a decoder of standalone blocks
  (one grouped, one with stride 2), a plain BatchNorm and a 1x1 head."""

  deploy: bool = False
  branches: Sequence[str] = repvgg_jax.PAPER_BRANCHES

  @nn.compact
  def __call__(self, x, train: bool = False):
    backbone = repvgg_jax.create_model(
      TINY, num_classes=0, out_indices=(1, 2, 3), deploy=self.deploy, name='backbone'
    )
    c1, c2, c3 = backbone(x, train=train)
    block = functools.partial(repvgg_jax.RepVGGBlock, deploy=self.deploy, branches=self.branches)
    y = block(16, strides=2, name='down')(c1, train=train)  # Stride 4 -> 8.
    y = jnp.concatenate([y, c2, jax.image.resize(c3, c2.shape[:3] + c3.shape[3:], 'nearest')], -1)
    y = block(32, groups=4, name='fuse')(y, train=train)
    y = nn.BatchNorm(use_running_average=not train, name='norm')(y)
    return nn.Conv(5, (1, 1), name='head')(y)


class Stacked(nn.Module):
  """Blocks held in a list (setup), nested `depth` modules deep."""

  features: Sequence[int]
  depth: int = 0
  deploy: bool = False

  def setup(self):
    if self.depth:
      self.inner = Stacked(self.features, self.depth - 1, self.deploy)
    else:
      self.blocks = [repvgg_jax.RepVGGBlock(f, deploy=self.deploy) for f in self.features]

  def __call__(self, x, train: bool = False):
    if self.depth:
      return self.inner(x, train=train)
    for block in self.blocks:
      x = block(x, train=train)
    return x


def deploy_shapes(module, shape):
  return jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros(shape)))


def same_structure(a, b) -> bool:
  shape = lambda tree: jax.tree.map(lambda leaf: (leaf.shape, leaf.dtype), tree)
  return shape(a) == shape(b)


def one_line(error) -> bool:
  return '\n' not in str(error.value)


@pytest.mark.parametrize('branches', [repvgg_jax.PAPER_BRANCHES, ('conv3x3', 'dbb_avg')])
def test_a_whole_network_fuses_to_its_deploy_twin(branches):
  shape = (2, 32, 32, 3)
  variables = random_variables(Segmenter(branches=branches), shape, seed=1)
  fused = jax.jit(repvgg_jax.fuse_params)(variables)
  deploy = Segmenter(deploy=True, branches=branches)
  assert same_structure(fused, deploy_shapes(deploy, shape))
  # The plain BatchNorm is not a block: its statistics stay, the blocks' go.
  assert list(fused['batch_stats']) == ['norm']
  x = jax.random.normal(jax.random.key(2), shape)
  expected = Segmenter(branches=branches).apply(variables, x)
  actual = deploy.apply(fused, x)
  assert relative_error(actual, expected) <= 1e-5
  np.testing.assert_array_equal(
    fused['params']['head']['kernel'], variables['params']['head']['kernel']
  )


@pytest.mark.parametrize('depth', [0, 1, 3])
def test_blocks_in_lists_at_any_depth(depth):
  shape = (1, 9, 9, 8)
  features = (8, 16, 16)
  variables = random_variables(Stacked(features, depth), shape, seed=depth)
  fused = repvgg_jax.fuse_params(variables)
  deploy = Stacked(features, depth, deploy=True)
  assert same_structure(fused, deploy_shapes(deploy, shape))
  assert 'batch_stats' not in fused  # Every BatchNorm was in a block.
  x = jax.random.normal(jax.random.key(0), shape)
  expected = Stacked(features, depth).apply(variables, x)
  assert relative_error(deploy.apply(fused, x), expected) <= 1e-5


@pytest.mark.parametrize(
  'branches', [('conv3x3', 'conv1x3', 'conv3x1'), ('dbb_1x1_3x3', 'identity'), ('parallel3x3_k3',)]
)
@pytest.mark.parametrize('strides,groups', [(1, 1), (2, 2), (1, 4)])
def test_standalone_blocks_of_every_kind(branches, strides, groups):
  wrap = lambda deploy: Wrapper(
    repvgg_jax.RepVGGBlock(16, strides, groups, branches, deploy=deploy, name='block')
  )
  shape = (2, 7, 8, 16)  # Odd and even sides.
  variables = random_variables(wrap(False), shape, seed=strides + groups)
  fused = repvgg_jax.fuse_params(variables)
  assert same_structure(fused, deploy_shapes(wrap(True), shape))
  x = jax.random.normal(jax.random.key(1), shape)
  expected = wrap(False).apply(variables, x)
  assert relative_error(wrap(True).apply(fused, x), expected) <= 1e-5


class Wrapper(nn.Module):
  """A module holding one block given from outside, under a parent name."""

  block: nn.Module

  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Dense(3, name='after')(self.block(x, train=train))


def test_stage_outputs_match_feature_info():
  for name, out_indices in [('A0', (0, 1, 2, 3, 4)), ('B1g4', (1, 3))]:
    model = repvgg_jax.create_model(name, num_classes=0, out_indices=out_indices)
    shapes = jax.eval_shape(
      lambda m=model: m.init_with_output(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    )
    outputs, variables = shapes
    info = model.feature_info()
    assert [f.stage for f in info] == list(out_indices)
    assert [o.shape for o in outputs] == [
      (1, 64 // f.reduction, 64 // f.reduction, f.channels) for f in info
    ]
    # Blocks after the last selected stage are left out.
    last = max(out_indices)
    stages = {int(key[5]) for key in variables['params']}
    assert stages == set(range(last + 1))
  a0 = repvgg_jax.get_variant('A0').feature_info()
  assert [(f.channels, f.reduction) for f in a0] == [
    (48, 2),
    (48, 4),
    (96, 8),
    (192, 16),
    (1280, 32),
  ]


def test_out_indices_and_block_arguments_are_checked():
  with pytest.raises(ValueError, match='out_indices must be distinct stages') as error:
    repvgg_jax.create_model('A0', num_classes=0, out_indices=(1, 5))
  assert one_line(error)
  with pytest.raises(ValueError, match='pass num_classes=0'):
    repvgg_jax.create_model('A0', out_indices=(3,))
  x = jnp.zeros((1, 8, 8, 6))
  with pytest.raises(ValueError, match='groups=4 must divide the 6 input channels'):
    repvgg_jax.RepVGGBlock(8, groups=4).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="none of the branches \\('identity',\\) applies"):
    repvgg_jax.RepVGGBlock(8, branches=('identity',)).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match='strides must be a positive int'):
    repvgg_jax.RepVGGBlock(8, strides=0).init(jax.random.key(0), x)


def test_a_tree_without_blocks_is_refused_in_one_line():
  variables = nn.Sequential([nn.Dense(4), nn.BatchNorm(use_running_average=True)]).init(
    jax.random.key(0), jnp.zeros((1, 3))
  )
  with pytest.raises(repvgg_jax.FusionError, match='No RepVGG block in params') as error:
    repvgg_jax.fuse_params(variables)
  assert one_line(error)


def test_a_fused_network_and_a_block_without_statistics_are_refused():
  shape = (1, 16, 16, 3)
  variables = random_variables(Segmenter(), shape)
  fused = repvgg_jax.fuse_params(variables)
  with pytest.raises(
    repvgg_jax.FusionError, match='already fused .*backbone/stage0_block0'
  ) as error:
    repvgg_jax.fuse_params(fused)
  assert one_line(error)
  stats = jax.tree.map(lambda a: a, variables['batch_stats'])
  del stats['fuse']['conv1x1']
  with pytest.raises(repvgg_jax.FusionError, match='fuse/conv1x1 has no batch_stats') as error:
    repvgg_jax.fuse_params({**variables, 'batch_stats': stats})
  assert one_line(error)
  with pytest.raises(repvgg_jax.FusionError, match="model='A0' names a RepVGG variant") as error:
    repvgg_jax.fuse_params(random_variables(Stacked((8,)), (1, 5, 5, 8)), model='A0')
  assert one_line(error)
  with pytest.raises(
    repvgg_jax.FusionError, match='at backbone have the shapes of no known variant'
  ):
    repvgg_jax.fuse_params(variables, model='A0')
  # A known variant's backbone cut short is named (stage 0 alone fits twelve variants).
  stage_0 = 'RepVGG-A1, RepVGG-A2, RepVGG-B0 and 9 other variants'
  for stages, names in [((0, 1), 'RepVGG-B1'), ((0,), stage_0)]:
    backbone = repvgg_jax.create_model('B1', num_classes=0, out_indices=stages)
    cut = random_variables(backbone, (1, 16, 16, 3))
    with pytest.raises(
      repvgg_jax.FusionError, match=f'have the shapes of {names}.*not of RepVGG-A0'
    ):
      repvgg_jax.fuse_params(cut, model='A0')


def test_the_segmentation_example_runs_and_fuses_exactly(tmp_path):
  out = tmp_path / 'results.json'
  run = run_in_repo(
    'examples/segment_digits.py',
    *('--tiny', '--steps', '4', '--batch-size', '4', '--train-canvases', '32'),
    *('--test-canvases', '8', '--speed-batch', '8', '--repeats', '1', '--out', str(out)),
  )
  assert run.returncode == 0, run.stderr[-2000:]
  results = json.loads(out.read_text())
  assert results['steps'] == 4 and results['pixels'] == 8 * 64 * 64
  assert results['relative_logit_difference'] <= 1e-5
  assert results['pixels_disagreeing'] <= 1e-4 * results['pixels']
  assert abs(results['mean_iou'] - results['mean_iou_fused']) <= 1e-3
  assert results['params_fused'] < results['params_training_time']
  assert results['images_per_second'] > 0 and results['images_per_second_fused'] > 0


def segmentation_example(monkeypatch):
  """examples/segment_digits.py, imported."""
  import importlib.util
  import pathlib
  import sys

  path = pathlib.Path(__file__).parents[1] / 'examples' / 'segment_digits.py'
  spec = importlib.util.spec_from_file_location('segment_digits', path)
  example = importlib.util.module_from_spec(spec)
  monkeypatch.setitem(sys.modules, spec.name, example)  # Its dataclasses look themselves up.
  spec.loader.exec_module(example)
  return example


def test_the_segmentation_example_has_the_parameters_docs_give(monkeypatch):
  """docs/composition.md's table: 5,592,267 parameters trained, 5,018,987 fused."""
  example = segmentation_example(monkeypatch)

  def count(model):
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    return sum(leaf.size for leaf in jax.tree.leaves(shapes['params']))

  assert count(example.DigitSegmenter()) == 5_592_267
  assert count(example.DigitSegmenter(deploy=True)) == 5_018_987


@pytest.mark.parametrize(
  'argv, message',
  [
    (['--steps', '0'], 'argument --steps: must be a positive int, got 0'),
    (['--repeats', '0'], 'argument --repeats: must be a positive int, got 0'),
    (['--batch-size', '100', '--train-canvases', '64'], 'lower it or raise --train-canvases'),
    (['--model', 'A9'], "--model: Unknown model name 'A9'"),
    (['--out', 'no/such/dir/results.json'], 'name a file in an existing directory'),
  ],
)
def test_the_segmentation_example_refuses_bad_flags_before_it_runs(
  argv, message, capsys, monkeypatch
):
  example = segmentation_example(monkeypatch)
  with pytest.raises(SystemExit) as exit_info:
    example.parse(argv)
  assert exit_info.value.code == 2
  assert message in capsys.readouterr().err


class Named(nn.Module):
  """Holds one layer, made by ``make``, under its own name: ``{name: {layer: ...}}``."""

  make: Callable[[], nn.Module]

  @nn.compact
  def __call__(self, x, train: bool = False):
    return self.make()(x)


class ConvBN(nn.Module):
  """A conv-BN whose layers have Flax's default names (Conv_0, BatchNorm_0)."""

  @nn.compact
  def __call__(self, x):
    return nn.BatchNorm(use_running_average=True)(nn.Conv(8, (3, 3), use_bias=False)(x))


class LookAlikes(nn.Module):
  """Modules whose only child is named like a branch, but holds other layers."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = Named(functools.partial(nn.Conv, 8, (1, 1), use_bias=False, name='conv1x1'), name='proj')(x)
    x = Named(functools.partial(ConvBN, name='conv3x3'), name='pair')(x)
    return repvgg_jax.RepVGGBlock(8, name='block')(x, train=train)


def test_layers_that_only_look_like_branches_are_copied():
  shape = (1, 6, 6, 3)
  variables = random_variables(LookAlikes(), shape)
  assert set(variables['params']['proj']) == {'conv1x1'}  # Named like a block's branches.
  fused = repvgg_jax.fuse_params(variables)
  assert same_structure(fused['params']['proj'], variables['params']['proj'])
  assert same_structure(fused['params']['pair'], variables['params']['pair'])
  assert set(fused['params']['block']) == {'reparam'}
  assert set(fused['batch_stats']) == {'pair'}
  np.testing.assert_array_equal(
    fused['params']['proj']['conv1x1']['kernel'], variables['params']['proj']['conv1x1']['kernel']
  )


def test_frozen_trees_mixed_trees_and_backbones_built_to_a_stage():
  shape = (1, 16, 16, 3)
  variables = random_variables(Segmenter(), shape)
  frozen = flax.core.freeze(variables)
  fused = repvgg_jax.fuse_params(frozen)
  assert same_structure(fused, deploy_shapes(Segmenter(deploy=True), shape))
  assert type(fused['params']['head']) is dict
  # A fused backbone beside training-time blocks: those are fused, the backbone copied.
  params = dict(fused['params'], down=variables['params']['down'])
  stats = dict(fused['batch_stats'], down=variables['batch_stats']['down'])
  again = repvgg_jax.fuse_params({'params': params, 'batch_stats': stats})
  assert same_structure(again, fused)
  np.testing.assert_array_equal(
    again['params']['down']['reparam']['kernel'], fused['params']['down']['reparam']['kernel']
  )
  # model= checks a backbone built only up to the stages it returns.
  backbone = repvgg_jax.create_model('A0', num_classes=0, out_indices=(1, 2))
  partial = random_variables(backbone, (1, 32, 32, 3))
  assert repvgg_jax.fuse_params(partial, model='A0')['params'].keys() == partial['params'].keys()
  with pytest.raises(repvgg_jax.FusionError, match='not of RepVGG-B0'):
    repvgg_jax.fuse_params(partial, model='B0')


def test_branch_layouts_are_read_apart_from_the_module_that_asks():
  trees._branch_variables.cache_clear()

  class Asks(nn.Module):
    @nn.compact
    def __call__(self, x):
      assert trees.branch_layout('conv1x1') == {
        ('conv', 'kernel'),
        ('bn', 'scale'),
        ('bn', 'bias'),
      }
      return nn.Dense(2, name='dense')(x)

  variables = Asks().init(jax.random.key(0), jnp.zeros((1, 3)))
  assert list(variables['params']) == ['dense']  # No stray branch module.
  assert jax.jit(lambda: len(trees.branch_layout('dbb_avg')))() == 5
