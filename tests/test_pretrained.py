"""Pretrained weights into backbones and into a named part of a larger network."""

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_variables, relative_error
from safetensors.numpy import save_file

import repvgg_jax
from repvgg_jax.interop import convert, torch_layout
from repvgg_jax.interop.pretrained import load_pretrained
from repvgg_jax.interop.torch_layout import ConversionError

IMAGES = (2, 32, 32, 3)


@pytest.fixture(scope='module')
def a0_weights(tmp_path_factory):
  """Random training-time A0 weights with 10 classes, as an .npz of reference keys."""
  model = repvgg_jax.create_model('A0', num_classes=10)
  variables = random_variables(model, IMAGES, seed=3)
  path = tmp_path_factory.mktemp('weights') / 'a0.npz'
  np.savez(path, **torch_layout.to_torch(variables))
  return path, variables


class Encoder(nn.Module):
  """A network holding A0 as ``encoder/backbone`` next to a head of its own."""

  deploy: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    backbone = repvgg_jax.create_model(
      'A0', num_classes=0, out_indices=(2, 3), deploy=self.deploy, name='backbone'
    )
    _, c3 = backbone(x, train=train)
    return nn.Dense(4, name='head')(jnp.mean(c3, axis=(1, 2)))


class Outer(nn.Module):
  deploy: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    return Encoder(self.deploy, name='encoder')(x, train=train)


def init(module):
  return module.init(jax.random.key(0), jnp.zeros(IMAGES))


def shapes(module):
  """The variables of ``module`` as `jax.eval_shape` gives them: what the weights replace."""
  return jax.eval_shape(lambda: init(module))


def all_arrays(tree):
  return all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(tree))


def test_weights_into_a_backbone_give_the_classifiers_stage_outputs(a0_weights):
  path, source = a0_weights
  backbone = repvgg_jax.create_model('A0', num_classes=0, out_indices=(1, 2, 3))
  assert repvgg_jax.load_pretrained is load_pretrained  # Also at the top level.
  variables = repvgg_jax.load_pretrained(shapes(backbone), path)
  assert 'linear' not in variables['params']
  assert not any(key.startswith('stage4') for key in variables['params'])  # Not built.
  x = jax.random.normal(jax.random.key(1), IMAGES)
  full = repvgg_jax.create_model('A0', num_classes=0)
  without_classifier = {
    'params': {k: v for k, v in source['params'].items() if k != 'linear'},
    'batch_stats': source['batch_stats'],
  }
  expected = full.apply(without_classifier, x)[1:4]
  for actual, wanted in zip(backbone.apply(variables, x), expected, strict=True):
    assert relative_error(actual, wanted) <= 1e-6


def test_a_backbone_cut_short_loads_into_one_cut_as_short(tmp_path):
  """Weights of A0's stages 0-3 alone are of no known variant: the model checks them."""
  full = repvgg_jax.create_model('A0', num_classes=0)
  variables = random_variables(full, IMAGES, seed=4)
  short = {
    name: {k: v for k, v in tree.items() if not k.startswith('stage4')}
    for name, tree in variables.items()
  }
  np.savez(tmp_path / 'short.npz', **torch_layout.to_torch(short))
  backbone = repvgg_jax.create_model('A0', num_classes=0, out_indices=(0, 1, 2, 3))
  loaded = load_pretrained(shapes(backbone), tmp_path / 'short.npz')
  x = jax.random.normal(jax.random.key(1), IMAGES)
  for actual, wanted in zip(backbone.apply(loaded, x), full.apply(variables, x)[:4], strict=True):
    assert relative_error(actual, wanted) <= 1e-6
  with pytest.raises(
    ConversionError, match=r'short.npz do not fit the RepVGG-A0 at the top of the tree: missing'
  ):
    load_pretrained(shapes(full), tmp_path / 'short.npz')
  np.savez(tmp_path / 'neck.npz', **torch_layout.to_torch(short), **{'neck.conv.weight': x})
  with pytest.raises(ConversionError, match=r"keys of no RepVGG layer: \['neck.conv.weight'\]"):
    load_pretrained(shapes(backbone), tmp_path / 'neck.npz')


def test_weights_into_a_named_subtree_training_time_and_fused(a0_weights):
  path, source = a0_weights
  x = jax.random.normal(jax.random.key(2), IMAGES)
  fresh = init(Outer())
  loaded = load_pretrained(fresh, path, at='encoder/backbone')
  # The head outside the subtree is untouched; the blocks hold the weights.
  np.testing.assert_array_equal(
    loaded['params']['encoder']['head']['kernel'], fresh['params']['encoder']['head']['kernel']
  )
  np.testing.assert_array_equal(
    loaded['params']['encoder']['backbone']['stage2_block3']['conv3x3']['conv']['kernel'],
    source['params']['stage2_block3']['conv3x3']['conv']['kernel'],
  )
  # Training-time weights into the deploy network are fused on the way.
  deployed = load_pretrained(init(Outer(deploy=True)), path, at=('encoder', 'backbone'))
  fused_whole = repvgg_jax.fuse_params(loaded)
  assert (
    relative_error(Outer(deploy=True).apply(deployed, x), Outer(deploy=True).apply(fused_whole, x))
    <= 1e-6
  )
  assert relative_error(Outer(deploy=True).apply(deployed, x), Outer().apply(loaded, x)) <= 1e-5


def test_a_classifier_of_another_size_keeps_its_own_head(a0_weights, tmp_path, monkeypatch):
  path, source = a0_weights
  model = repvgg_jax.create_model('A0', num_classes=3)
  fresh = init(model)
  with pytest.warns(UserWarning, match="10 classes, the model at .* 3: its classifier 'linear'"):
    loaded = load_pretrained(fresh, path)
  # Code given as text ('<string>', as `python -c` runs it) is the caller, wherever the
  # working directory is (here inside the package, where '<string>' would resolve).
  monkeypatch.chdir(pathlib.Path(repvgg_jax.__file__).parent)
  snippet = compile('load_pretrained(fresh, path)', '<string>', 'exec')
  with pytest.warns(UserWarning, match='its classifier') as warned:
    exec(snippet, {'load_pretrained': load_pretrained, 'fresh': fresh, 'path': path})
  assert [(record.filename, record.lineno) for record in warned] == [('<string>', 1)]
  np.testing.assert_array_equal(
    loaded['params']['linear']['kernel'], fresh['params']['linear']['kernel']
  )
  # Into the shapes alone: the weights fill every leaf, or leave the head abstract.
  with pytest.warns(UserWarning, match='its classifier'):
    headless = load_pretrained(shapes(model), path)
  assert isinstance(headless['params']['linear']['kernel'], jax.ShapeDtypeStruct)
  assert all_arrays({**headless['params'], 'linear': {}})
  same = load_pretrained(shapes(repvgg_jax.create_model('A0', num_classes=10)), path)
  assert all_arrays(same)
  np.testing.assert_array_equal(
    same['params']['linear']['kernel'], source['params']['linear']['kernel']
  )
  # A checkpoint written by `convert import` loads the same way.
  convert.import_weights(path, tmp_path / 'imported', verify=False)
  again = load_pretrained(
    init(repvgg_jax.create_model('A0', num_classes=10)), tmp_path / 'imported'
  )
  assert jax.tree.all(jax.tree.map(np.array_equal, again, same))


def test_what_does_not_fit_is_refused_in_one_line(a0_weights, tmp_path):
  path, _ = a0_weights
  cases = [
    (
      shapes(repvgg_jax.create_model('B0', num_classes=0)),
      '',
      r'weights of .* \(RepVGG-A0\) do not fit the RepVGG-B0 at the top',
    ),
    (shapes(Outer()), 'encoder', r"No RepVGG .* at encoder .*\['backbone', 'head'\]"),
    (shapes(Outer()), 'decoder', 'No RepVGG .* at decoder'),
  ]
  for variables, at, message in cases:
    with pytest.raises(ConversionError, match=message) as error:
      load_pretrained(variables, path, at=at)
    assert '\n' not in str(error.value)
  fused = tmp_path / 'fused.npz'
  source = repvgg_jax.create_model('A0', num_classes=10)
  deploy = repvgg_jax.fuse_params(random_variables(source, IMAGES))
  np.savez(fused, **torch_layout.to_torch(deploy))
  with pytest.raises(ConversionError, match='weights are fused .* build it with deploy=True'):
    load_pretrained(shapes(repvgg_jax.create_model('A0', num_classes=0)), fused)
  name = 'timm/repvgg_a0.rvgg_in1k'  # timm's name for its hub weights: the reference is said.
  with pytest.raises(FileNotFoundError, match=f'No weights at {name} .*write hf-hub:{name}'):
    load_pretrained(shapes(Outer()), name, at='encoder/backbone')
  with pytest.raises(FileNotFoundError, match='No weights at'):
    load_pretrained(shapes(Outer()), tmp_path / 'nothing.pth', at='encoder/backbone')


HUB_REPO = 'timm/repvgg_a0.rvgg_in1k'


def hub_cache(root, state, repo=HUB_REPO, commit='0123456789abcdef0123456789abcdef01234567'):
  """The Hugging Face cache layout of ``repo`` holding the state dict ``state`` in the
  snapshot ``commit``, as ``hf download`` leaves it; the first snapshot is refs/main's."""
  folder = root / f'models--{repo.replace("/", "--")}'
  if not (folder / 'refs').exists():
    (folder / 'refs').mkdir(parents=True)
    (folder / 'refs' / 'main').write_text(commit)
  snapshot = folder / 'snapshots' / commit
  snapshot.mkdir(parents=True)
  contiguous = {key: np.ascontiguousarray(value) for key, value in state.items()}
  save_file(contiguous, str(snapshot / 'model.safetensors'))
  return root


def test_hub_references_load_offline_from_the_cache(a0_weights, tmp_path, monkeypatch):
  _, source = a0_weights
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  timm_keys = torch_layout.to_torch(source, style='timm')
  monkeypatch.setenv('HF_HUB_CACHE', str(hub_cache(tmp_path / 'hub', timm_keys)))
  reference = f'hf-hub:{HUB_REPO}'
  model, variables = repvgg_jax.create_model('A0', num_classes=10, pretrained=reference)
  assert model.num_classes == 10
  assert jax.tree.all(jax.tree.map(np.array_equal, variables, source))
  # Another number of classes: the head is the model's own, and said so.
  with pytest.warns(UserWarning, match="classifier 'linear' keeps its own initialisation") as w:
    _, five = repvgg_jax.create_model('A0', num_classes=5, pretrained=reference)
  assert [record.filename for record in w] == [__file__]  # The caller's line, not ours.
  assert five['params']['linear']['kernel'].shape == (1280, 5) and all_arrays(five)
  # The deploy model gets the fused weights; convert import reads the same reference.
  deploy, fused = repvgg_jax.create_model('A0', num_classes=10, deploy=True, pretrained=reference)
  x = jax.random.normal(jax.random.key(0), IMAGES)
  expected = repvgg_jax.create_model('A0', num_classes=10).apply(source, x)
  assert relative_error(deploy.apply(fused, x), expected) <= 1e-5
  meta = convert.import_weights(reference, tmp_path / 'imported', verify=False)
  assert meta['source'] == reference and meta['key_style'] == 'timm'
  # A revision names its own snapshot (here one whose classifier is zero).
  other = '89abcdef0123456789abcdef0123456789abcdef'
  zero_head = jax.tree.map(np.zeros_like, source['params']['linear'])
  changed = {**source, 'params': {**source['params'], 'linear': zero_head}}
  hub_cache(tmp_path / 'hub', torch_layout.to_torch(changed, style='timm'), commit=other)
  _, at_revision = repvgg_jax.create_model('A0', num_classes=10, pretrained=f'{reference}@{other}')
  assert not np.any(at_revision['params']['linear']['kernel'])


def test_a_hub_reference_not_cached_offline_says_what_to_download(tmp_path, monkeypatch):
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'empty'))
  with pytest.raises(ConversionError, match='not in the Hugging Face cache') as error:
    repvgg_jax.create_model('A0', pretrained=f'hf-hub:{HUB_REPO}')
  message = str(error.value)
  assert '\n' not in message
  assert f'hf download {HUB_REPO} model.safetensors' in message
  assert 'models--timm--repvgg_a0.rvgg_in1k' in message and str(tmp_path / 'empty') in message
  for malformed in ('hf-hub:repvgg_a0', f'hf-hub:{HUB_REPO}@', 'hf-hub:timm/repvgg a0'):
    with pytest.raises(ConversionError, match='write hf-hub:ORG/NAME'):
      repvgg_jax.create_model('A0', pretrained=malformed)
  with pytest.raises(ConversionError, match='model.safetensors --revision v2`'):
    repvgg_jax.create_model('A0', pretrained=f'hf-hub:{HUB_REPO}@v2')


def test_a_hub_reference_to_another_model_names_what_it_found(tmp_path, monkeypatch):
  resnet = {'conv1.weight': np.zeros((8, 3, 7, 7), np.float32), 'fc.bias': np.zeros(4, np.float32)}
  hub_cache(tmp_path / 'hub', resnet, repo='timm/resnet18.a1_in1k')
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'hub'))
  with pytest.raises(ConversionError, match=r"No RepVGG parameters .*'conv1.weight', 'fc.bias'"):
    repvgg_jax.create_model('A0', pretrained='hf-hub:timm/resnet18.a1_in1k')
