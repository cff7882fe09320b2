"""Quantization-aware fine-tuning through train.py: from a fused model, with the
trainer's checkpoints and resume, into the int8 model; and its bad configs."""

import copy
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from helpers import checkpoint_params, restore_checkpoint, tiny_config

from repvgg_jax import run_files
from repvgg_jax.interop import checkpoint_io, convert, quantize
from repvgg_jax.model import create_model
from repvgg_jax.train import trainer

QAT = {'qat.enabled': True, 'num_train_steps': 4, 'checkpoint_every_steps': 2}


@pytest.fixture(scope='module')
def trained(tmp_path_factory, digits_dir):
  """A tiny RepVGG trained for 4 steps: the fused model that QAT starts from."""
  workdir = tmp_path_factory.mktemp('trained')
  trainer.train_and_evaluate(tiny_config(digits_dir, num_train_steps=4), workdir)
  return workdir


@pytest.fixture(scope='module')
def fine_tuned(tmp_path_factory, digits_dir, trained):
  workdir = tmp_path_factory.mktemp('qat')
  config = tiny_config(digits_dir, **QAT, **{'qat.init_from': str(trained)})
  summary = trainer.train_and_evaluate(config, workdir)
  return workdir, config, summary


def test_qat_starts_from_the_fused_model_and_trains_it(fine_tuned, trained):
  workdir, _, summary = fine_tuned
  assert summary['steps'] == 4 and 0 <= summary['eval_top1'] <= 1
  start = restore_checkpoint(trained / 'deploy')[0]['params']
  deploy, meta = restore_checkpoint(workdir / 'deploy')
  assert meta['deploy'] and sorted(deploy['params']['stage1_block0']) == ['reparam']
  assert jax.tree.map(np.shape, deploy['params']) == jax.tree.map(np.shape, start)
  pairs = list(zip(jax.tree.leaves(deploy['params']), jax.tree.leaves(start), strict=True))
  assert min(float(np.abs(a - b).max()) for a, b in pairs) > 0  # Every layer was fine-tuned,
  change = max(float(np.linalg.norm(a - b) / np.linalg.norm(b)) for a, b in pairs)
  assert change < 0.1  # from the fused model, not from scratch.
  state, _ = restore_checkpoint(workdir / 'checkpoints')
  assert set(state['batch_stats']['stage1_block0']['reparam']) == {'conv_general_dilated0_lhs'}


@pytest.mark.parametrize('source', ['kept', 'left out'])
def test_qat_resumes_bit_exactly(fine_tuned, digits_dir, tmp_path, source):
  workdir, config, _ = fine_tuned
  interrupted = tmp_path / 'interrupted'
  shutil.copytree(workdir, interrupted)
  shutil.rmtree(interrupted / 'checkpoints' / '4')  # As if killed after step 2's checkpoint.
  shutil.rmtree(interrupted / 'deploy')
  (interrupted / 'summary.json').unlink()
  resumed = copy.deepcopy(config)
  if source == 'left out':
    resumed.qat.init_from = None  # Not needed to resume.
  trainer.train_and_evaluate(resumed, interrupted)
  expected, _ = checkpoint_params(workdir)
  actual, _ = checkpoint_params(interrupted)
  jax.tree.map(np.testing.assert_array_equal, actual, expected)
  assert run_files.read_config(interrupted)['qat']['init_from'] == config.qat.init_from


def test_the_fake_int8_forward_is_the_int8_models(fine_tuned):
  """QAT trains what PTQ deploys: with its learned ranges, the int8 model computes
  the fake-quantized forward."""
  workdir, config, _ = fine_tuned
  model = trainer.build_model(config)
  state, _ = restore_checkpoint(workdir / 'checkpoints')
  variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
  images = np.random.default_rng(0).standard_normal((4, 32, 32, 3)).astype(np.float32)
  fake = model.apply(variables, images)
  qmodel = quantize.int8_model(model.deploy_model, 'static')
  abstract = jax.eval_shape(qmodel.init, jax.random.key(0), images[:1])['params']
  int8 = qwix.quantize_params(state['params'], abstract, state['batch_stats'])
  np.testing.assert_allclose(qmodel.apply({'params': int8}, images), fake, rtol=1e-5, atol=1e-5)


def test_convert_quantize_keeps_the_ranges_qat_learned(fine_tuned, tmp_path):
  workdir, _, summary = fine_tuned
  assert convert.main(['quantize', str(workdir), str(tmp_path / 'q')]) == 0
  meta = json.loads((tmp_path / 'q' / 'quantize.json').read_text())
  assert (
    meta['calibration_batches'] == 0
    and 'learned by quantization-aware training' in (meta['activations'])
  )
  # The int8 model computes the fake-int8 forward that the run evaluated last.
  assert meta['int8_top1'] == summary['eval_top1']
  assert convert.main(['quantize', str(workdir), str(tmp_path / 'r'), '--recalibrate']) == 0
  meta = json.loads((tmp_path / 'r' / 'quantize.json').read_text())
  assert meta['calibration_batches'] == 8 and 'calibrated on 8' in meta['activations']
  # The same ranges from the run's training checkpoint (it is fused already), and
  # with the run's config given as a file.
  config_file = tmp_path / 'run_config.py'
  run_config = str(workdir / 'config.json')
  config_file.write_text(
    'import json, ml_collections\n'
    'def get_config():\n'
    f'  return ml_collections.ConfigDict(json.load(open({run_config!r})))\n'
  )
  sources = {
    's': [str(workdir / 'checkpoints' / '4')],
    'c': [str(workdir), '--config', str(config_file)],
  }
  for name, args in sources.items():
    assert convert.main(['quantize', args[0], str(tmp_path / name), *args[1:]]) == 0
    meta = json.loads((tmp_path / name / 'quantize.json').read_text())
    assert meta['calibration_batches'] == 0 and meta['int8_top1'] == summary['eval_top1']


def test_a_qat_training_checkpoint_reads_as_a_deploy_one(fine_tuned):
  """Its params are fused and its batch_stats are activation ranges: nothing to fuse."""
  workdir, _, _ = fine_tuned
  variables, training, saved = checkpoint_io.fused_variables(workdir / 'checkpoints')
  deploy, _ = restore_checkpoint(workdir / 'deploy')
  assert training is None and sorted(variables) == ['params'] and saved['step'] == 4
  jax.tree.map(np.testing.assert_array_equal, variables['params'], deploy['params'])


@pytest.mark.parametrize(
  'saved, held',
  [
    ({'model': 'QARepVGG-A0'}, 'QARepVGG-A0'),  # Fused, its shapes are RepVGG-A0's.
    ({'model': 'RepVGG-A0'}, 'RepVGG-A0'),
    ({'model': 'RepVGG-A1'}, 'RepVGG-A0'),  # A name its shapes are not: they tell.
    ({'model': 'RepVGG-Z9'}, 'RepVGG-A0'),
    ({}, 'RepVGG-A0'),
  ],
)
def test_the_variant_a_checkpoint_holds_is_its_own_where_its_shapes_agree(saved, held):
  deploy = create_model('QARepVGG-A0', num_classes=10, deploy=True)
  shapes = jax.eval_shape(deploy.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert checkpoint_io.variant_held(shapes['params'], saved) == held


@pytest.mark.parametrize(
  'overrides, message',
  [
    ({'qat.init_from': None}, 'qat.enabled needs qat.init_from'),
    ({'model.bn_group_size': 8}, 'set model.bn_group_size=0'),
    ({'model.name': 'RepVGG-B1g2'}, 'QAT of grouped variants'),
    ({'freeze_stages': 2}, 'QAT fine-tunes the whole fused model, no stage frozen'),
    ({'ema_decay': 0.5}, 'QAT keeps no moving average of the weights'),
    # QAT's quantized convolutions are XLA's: another conv_impl is refused, not ignored.
    ({'steps_per_call': 2}, r'steps_per_call=1 \(QAT convolves'),
    ({'model.conv_impl': 'im2col'}, "QAT computes XLA's convolutions .* not 'im2col'"),
    (
      {'dataset.num_classes': 10, 'model.width_multipliers': (0.5, 0.5)},
      'holds another architecture, not the deploy form',
    ),
  ],
)
def test_bad_qat_configs_fail_in_one_line(overrides, message, digits_dir, trained, tmp_path):
  config = tiny_config(digits_dir, **{**QAT, 'qat.init_from': str(trained), **overrides})
  with pytest.raises(trainer.ConfigError, match=message) as error:
    trainer.train_and_evaluate(config, tmp_path / 'w')
  assert '\n' not in str(error.value)
  assert not (tmp_path / 'w' / 'checkpoints').exists() or not any(
    (tmp_path / 'w' / 'checkpoints').iterdir()
  )
