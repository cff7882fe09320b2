"""Every config loads, names a real variant, documents itself and follows the recipe."""

import importlib
import pathlib
import re

import pytest

import repvgg_jax
from configs import default

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / 'configs'
VARIANT_CONFIGS = sorted(
  p.stem for p in CONFIG_DIR.glob('*.py') if re.fullmatch(r'[ab]\d(g\d)?', p.stem)
)
LONG = ('b2g4_200ep', 'b3g4_200ep', 'b3_200ep')  # The paper's 200-epoch models (Table 5).


def load(name):
  return importlib.import_module(f'configs.{name}').get_config()


def test_one_config_per_variant():
  expected = {n.removeprefix('RepVGG-').lower() for n in repvgg_jax.list_models('repvgg')}
  assert set(VARIANT_CONFIGS) == expected


@pytest.mark.parametrize('name', VARIANT_CONFIGS)
def test_variant_configs_follow_the_paper(name):
  config = load(name)
  assert repvgg_jax.get_variant(config.model.name).name.lower() == f'repvgg-{name}'
  assert config.batch_size == 256 and config.optimizer.learning_rate == 0.1
  assert config.optimizer.momentum == 0.9 and config.optimizer.weight_decay == 1e-4
  assert config.dataset.name == 'imagenet2012' and config.model.bn_group_size == 32
  assert config.num_epochs == 120 and config.optimizer.label_smoothing == 0
  assert config.optimizer.mixup_alpha == 0 and config.dataset.randaugment_layers == 0
  # The reference's train.py: plain momentum, biases at twice the rate.
  assert not config.optimizer.nesterov and config.optimizer.bias_lr_multiplier == 2
  doc = importlib.import_module(f'configs.{name}').__doc__
  assert f'python train.py --config configs/{name}.py' in doc
  assert 'top-1' in doc and 'GPU' in doc


@pytest.mark.parametrize('name', LONG)
def test_200_epoch_configs_follow_the_official_recipe(name):
  config = load(name)
  assert repvgg_jax.get_variant(config.model.name).name.lower() == 'repvgg-' + name.split('_')[0]
  assert config.num_epochs == 200 and config.optimizer.warmup_epochs == 5
  assert config.optimizer.label_smoothing == 0.1 and config.optimizer.mixup_alpha == 0.2
  assert config.optimizer.cutmix_alpha == 0 and config.ema_decay == 0
  assert (config.dataset.randaugment_layers, config.dataset.randaugment_magnitude) == (2, 15)
  assert config.batch_size == 256 and config.optimizer.learning_rate == 0.1
  # Its Swin-based trainer: Nesterov SGD, one rate for all, timm's cosine over the whole run.
  assert config.optimizer.nesterov and config.optimizer.bias_lr_multiplier == 1
  assert not config.optimizer.warmup_prefix
  doc = importlib.import_module(f'configs.{name}').__doc__
  assert f'python train.py --config configs/{name}.py' in doc and 'DingXiaoH/RepVGG' in doc


@pytest.mark.parametrize(
  'name', ['default', 'digits', 'digits_qarepvgg', 'digits_qat', 'cifar10', 'qarepvgg_a0']
)
def test_other_configs_load(name):
  config = load(name)
  assert config.dataset.num_classes in (10, 1000)
  assert 'python train.py --config configs/' in importlib.import_module(f'configs.{name}').__doc__


def test_finetune_folder_presets():
  module = importlib.import_module('configs.finetune_folder')
  small, photos = module.get_config(), module.get_config('photos')
  assert small.dataset.name == photos.dataset.name == 'folder'
  assert small.dataset.num_classes is None  # The folder's number of classes.
  assert (small.dataset.image_size, photos.dataset.image_size) == (32, 224)
  assert photos.dataset.train_augment == 'inception_crop' and photos.dataset.flip
  assert 'python train.py --config configs/finetune_folder.py' in module.__doc__
  with pytest.raises(ValueError, match="Unknown preset 'big'"):
    module.get_config('big')


def test_every_default_field_is_documented():
  source = pathlib.Path(default.__file__).read_text()
  lines = source[source.index('def get_config') : source.index('def long_recipe')].splitlines()
  fields = [
    line for line in lines if re.match(r'\s+config\.\w+(\.\w+)* = (?!ml_collections)', line)
  ]
  assert len(fields) > 30
  undocumented = [line.strip() for line in fields if '#' not in line]
  assert not undocumented
