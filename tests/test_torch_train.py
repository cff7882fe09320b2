"""The PyTorch loop that times a config's training beside train.py."""

import pathlib

import numpy as np
import pytest

torch = pytest.importorskip('torch')

import repvgg_jax  # noqa: E402
from repvgg_jax.bench import torch_train  # noqa: E402
from repvgg_jax.data import datasets as data  # noqa: E402
from repvgg_jax.interop import torch_layout  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def digits_config(tmp_path_factory):
  """The digits config, shortened to 4 steps of 16 on a data dir prepared for the module."""
  config = torch_train.load_config(str(REPO / 'configs' / 'digits.py'))
  config.dataset.data_dir = str(tmp_path_factory.mktemp('tfds'))
  data.get_builder(config.dataset)
  config.batch_size = 16
  config.num_train_steps = 4
  config.eval_every_epochs = 0.0  # At the end only.
  config.checkpoint_every_steps = 2
  return config


def test_trains_evaluates_and_checkpoints_on_the_configs_cadence(digits_config, tmp_path):
  lines = []
  result = torch_train.train(digits_config, tmp_path, layout='nchw', log=lines.append)
  assert result['steps'] == 4 and result['loop_seconds'] > 0
  assert result['images_per_sec'] == pytest.approx(64 / result['loop_seconds'])
  assert 0.0 <= result['eval_top1'] <= 1.0
  assert len(lines) == 1 and lines[0].startswith('step 4: eval top-1 ')
  assert sorted(path.name for path in tmp_path.iterdir()) == ['2.pt', '4.pt']
  saved = torch.load(tmp_path / '4.pt')
  momentum = [state['momentum_buffer'] for state in saved['optimizer']['state'].values()]
  assert momentum and all(bool(buffer.abs().sum() > 0) for buffer in momentum)
  # The top-1 it reports is that of the weights it saved, evaluated here by the JAX model.
  state = {key: value.numpy() for key, value in saved['model'].items()}
  variables, info = torch_layout.from_torch(state, digits_config.model.name)
  model = repvgg_jax.create_model(info['model'], num_classes=info['num_classes'])
  correct = count = 0
  config = digits_config.dataset
  for batch in data.eval_batches(config, global_batch_size=digits_config.eval_batch_size):
    hits = np.asarray(model.apply(variables, batch['image'])).argmax(-1) == batch['label']
    correct += int((hits & batch['mask']).sum())
    count += int(batch['mask'].sum())
  assert abs(result['eval_top1'] - correct / count) <= 1 / count


def test_weight_decay_and_bias_rate_follow_the_reference_rules(digits_config):
  from repvgg_jax.interop import torch_reference

  model = torch_reference.RepVGG('RepVGG-A0', num_classes=10)
  config = digits_config.copy_and_resolve_references()
  config.optimizer.bias_lr_multiplier = 2.0  # The reference's train.py.
  decay, no_decay, biases = torch_train._optimizer(model, config, torch).param_groups
  names = {id(p): name for name, p in model.named_parameters()}
  decayed = {names[id(p)] for p in decay['params']}
  assert decay['weight_decay'] == 1e-4 and no_decay['weight_decay'] == 0.0
  assert 'stage1.0.rbr_dense.conv.weight' in decayed and 'linear.weight' in decayed
  assert 'stage1.1.rbr_identity.weight' in decayed  # The identity BN's scale, as the reference.
  assert not any('bias' in name or '.bn.' in name for name in decayed)
  biased = {names[id(p)] for p in biases['params']}
  assert biases['weight_decay'] == 0.0 and biases['lr_scale'] == 2.0
  assert biased == {name for name in names.values() if 'bias' in name}
  assert decay['lr_scale'] == no_decay['lr_scale'] == 1.0
  assert len(decayed) + len(no_decay['params']) + len(biased) == len(names)


@pytest.mark.parametrize(
  'field, value, message',
  [
    ('optimizer.mixup_alpha', 0.2, 'mixup_alpha'),
    ('model.bn_group_size', 8, 'bn_group_size'),
    ('model.dtype', 'bfloat16', 'dtype'),
    ('optimizer.custom_l2', True, 'custom_l2'),
    ('optimizer.backbone_lr_multiplier', 0.1, 'backbone_lr_multiplier'),
  ],
)
def test_what_the_loop_does_not_do_is_refused(field, value, message):
  config = torch_train.load_config(str(REPO / 'configs' / 'digits.py'))
  section, leaf = field.split('.')
  config[section][leaf] = value
  with pytest.raises(ValueError, match=message):
    torch_train.check_supported(config)
