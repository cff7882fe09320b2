"""Training end to end: mock ImageNet and CIFAR-10, digits, device counts,
resumption after SIGKILL and SIGTERM, several processes, and clear errors."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from helpers import checkpoint_params, tiny_config

from repvgg_jax import checkpointing, data, steps, trainer

REPO = pathlib.Path(__file__).resolve().parent.parent
RUNNER = REPO / 'tests' / 'train_runner.py'


@pytest.fixture(scope='module')
def digits_dir(tmp_path_factory):
  """A tfds data dir with the digits prepared once for the module."""
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  data.get_builder(tiny_config(data_dir).dataset)
  return data_dir


def start_runner(workdir, data_dir, overrides, devices=1, process=None):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  args = [sys.executable, str(RUNNER), str(workdir), data_dir, json.dumps(overrides)]
  args += [str(a) for a in process or ()]
  return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_runner(workdir, data_dir, overrides, devices=1):
  proc = start_runner(workdir, data_dir, overrides, devices)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  return json.loads(out.strip().splitlines()[-1])


def assert_trees_close(a, b, rtol):
  for (path, x), y in zip(
    jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b), strict=True
  ):
    scale = max(float(np.abs(y).max()), 1e-6)
    assert float(np.abs(x - y).max()) <= rtol * scale, jax.tree_util.keystr(path)


MOCK_DATASETS = {
  'imagenet2012': {
    'dataset.num_classes': 1000,
    'dataset.train_split': 'train',
    'dataset.eval_split': 'validation',
    'dataset.train_augment': 'inception_crop',
    'dataset.flip': True,
    'dataset.eval_preprocess': 'resize_crop',
  },
  'cifar10': {'dataset.num_classes': 10, 'dataset.eval_split': 'test', 'dataset.flip': True},
}


@pytest.mark.parametrize('name', list(MOCK_DATASETS))
def test_one_step_train_and_evaluate_under_mock_data(tmp_path, name):
  config = tiny_config(
    str(tmp_path / 'tfds'),
    **MOCK_DATASETS[name],
    **{'dataset.name': name, 'num_train_steps': 1, 'batch_size': 8, 'eval_batch_size': 8},
  )
  workdir = tmp_path / 'work'
  with tfds.testing.mock_data(num_examples=16):
    summary = trainer.train_and_evaluate(config, workdir)
  assert summary['steps'] == 1 and summary['dataset'] == name
  for key in ('eval_top1', 'eval_top1_fused', 'eval_top5', 'train_images_per_sec'):
    assert key in summary
  assert json.loads((workdir / 'summary.json').read_text())['steps'] == 1
  assert json.loads((workdir / 'config.json').read_text())['dataset']['name'] == name
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert {'train/loss', 'eval/top1', 'eval/top1_fused', 'eval/top5'} <= set().union(*records)
  assert all('step' in r for r in records)
  assert (workdir / 'checkpoints' / '1').is_dir() and (workdir / 'deploy' / '1').is_dir()
  assert list((workdir / 'tensorboard').iterdir())


def test_short_digits_run_learns_and_deploy_checkpoint_matches(tmp_path, digits_dir):
  config = tiny_config(digits_dir, num_train_steps=60, batch_size=32)
  summary = trainer.train_and_evaluate(config, tmp_path)
  assert summary['eval_top1'] >= 0.5  # Chance is 0.1.
  assert abs(summary['eval_top1'] - summary['eval_top1_fused']) <= 1 / 360

  # The deploy checkpoint gives the training-time model's predictions.
  model, deploy = trainer.build_model(config), trainer.build_model(config, deploy=True)
  state, _ = checkpointing.Checkpoints(tmp_path / 'checkpoints', read_only=True).restore()
  fused, meta = checkpointing.Checkpoints(tmp_path / 'deploy', read_only=True).restore()
  assert meta['deploy'] and meta['model'] == 'RepVGG-A0' and meta['num_classes'] == 10
  batch = next(data.eval_batches(config.dataset, global_batch_size=40))
  train_logits = model.apply(
    {'params': state['params'], 'batch_stats': state['batch_stats']}, batch['image']
  )
  deploy_logits = deploy.apply(fused, batch['image'])
  np.testing.assert_allclose(deploy_logits, train_logits, rtol=1e-4, atol=1e-4)


def test_one_and_eight_devices_agree(tmp_path, digits_dir):
  overrides = {'num_train_steps': 4, 'batch_size': 16}
  one = run_runner(tmp_path / 'one', digits_dir, overrides, devices=1)
  eight = run_runner(tmp_path / 'eight', digits_dir, overrides, devices=8)
  assert (one['num_devices'], eight['num_devices']) == (1, 8)
  params_one, _ = checkpoint_params(tmp_path / 'one')
  params_eight, _ = checkpoint_params(tmp_path / 'eight')
  assert_trees_close(params_eight, params_one, rtol=1e-4)


def _wait_for_checkpoint(workdir, proc, minimum):
  """Polls until a checkpoint >= ``minimum`` exists; returns its step."""
  directory = pathlib.Path(workdir) / 'checkpoints'
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    done = [int(p.name) for p in directory.glob('[0-9]*') if p.name.isdigit()]
    if done and max(done) >= minimum:
      return max(done)
    time.sleep(0.02)
  raise AssertionError(f'no checkpoint >= {minimum}; runner exited with {proc.poll()}')


RESUME = {'num_train_steps': 40, 'checkpoint_every_steps': 5, 'log_every_steps': 5}


def test_killed_run_resumes_to_the_same_parameters(tmp_path, digits_dir):
  run_runner(tmp_path / 'straight', digits_dir, RESUME)
  proc = start_runner(tmp_path / 'killed', digits_dir, RESUME)
  saved = _wait_for_checkpoint(tmp_path / 'killed', proc, 10)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  assert proc.returncode == -signal.SIGKILL
  assert saved < RESUME['num_train_steps']
  summary = run_runner(tmp_path / 'killed', digits_dir, RESUME)
  assert summary['steps'] == RESUME['num_train_steps']
  expected, _ = checkpoint_params(tmp_path / 'straight')
  actual, meta = checkpoint_params(tmp_path / 'killed')
  assert meta['step'] == RESUME['num_train_steps']
  assert_trees_close(actual, expected, rtol=1e-6)


def test_an_interrupted_save_is_removed_and_finished_steps_are_kept(tmp_path):
  ckpt = checkpointing.Checkpoints(tmp_path)
  ckpt.save(1, {'w': np.arange(3.0)}, {'step': 1})
  ckpt.close()
  # What a SIGKILL during the save of step 2 leaves behind.
  unfinished = tmp_path / '2.orbax-checkpoint-tmp-1763900000000000'
  (unfinished / 'state').mkdir(parents=True)
  (unfinished / 'state' / 'partial').write_bytes(b'\0' * 16)
  ckpt = checkpointing.Checkpoints(tmp_path)
  assert not unfinished.exists()
  assert ckpt.latest_step() == 1
  state, meta = ckpt.restore()
  np.testing.assert_array_equal(state['w'], np.arange(3.0))
  assert meta == {'step': 1}
  ckpt.close()


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path, digits_dir):
  proc = start_runner(tmp_path, digits_dir, {**RESUME, 'checkpoint_every_steps': 1000})
  # The first log (step 5) means training is under way.
  deadline = time.time() + 300
  metrics = tmp_path / 'metrics.jsonl'
  while not (metrics.exists() and metrics.read_text()) and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  summary = json.loads(out.strip().splitlines()[-1])
  assert summary['preempted'] and summary['steps'] < RESUME['num_train_steps']
  _, meta = checkpoint_params(tmp_path)
  assert meta['step'] == summary['steps']
  assert not (tmp_path / 'summary.json').exists()


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes(tmp_path, digits_dir):
  port = _free_port()
  overrides = {'num_train_steps': 3, 'batch_size': 16}
  procs = [
    start_runner(tmp_path, digits_dir, overrides, devices=2, process=(i, 2, port)) for i in (0, 1)
  ]
  outputs = [p.communicate(timeout=600) for p in procs]
  for proc, (_, err) in zip(procs, outputs, strict=True):
    assert proc.returncode == 0, err[-3000:]
  summary = json.loads((tmp_path / 'summary.json').read_text())
  assert summary['num_processes'] == 2 and summary['num_devices'] == 4
  assert summary['steps'] == 3
  assert 0 <= summary['eval_top1'] <= 1


def test_bn_groups_compute_statistics_per_group():
  config = tiny_config()
  model = trainer.build_model(config)
  images = jax.random.normal(jax.random.key(0), (8, 32, 32, 3))
  variables = model.init(jax.random.key(1), images)
  logits, updates = steps.apply_in_groups(model, variables, images, group_size=4)
  for half in (slice(0, 4), slice(4, 8)):
    alone, _ = model.apply(variables, images[half], train=True, mutable=['batch_stats'])
    np.testing.assert_allclose(alone, logits[half], rtol=1e-5, atol=1e-5)
  whole, whole_updates = model.apply(variables, images, train=True, mutable=['batch_stats'])
  assert not np.allclose(whole, logits, atol=1e-3)  # Grouping changes the statistics.
  firsts = [
    model.apply(variables, half, train=True, mutable=['batch_stats'])[1]
    for half in (images[:4], images[4:])
  ]
  expected = jax.tree.map(lambda a, b: (a + b) / 2, *firsts)
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert jax.tree.structure(updates) == jax.tree.structure(whole_updates)


def test_missing_imagenet_fails_at_once_with_instructions(tmp_path):
  start = time.time()
  proc = subprocess.run(
    [sys.executable, 'train.py', '--config', 'configs/b0.py', f'--workdir={tmp_path / "w"}']
    + [f'--config.dataset.data_dir={tmp_path / "tfds"}'],
    cwd=REPO,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert 'ILSVRC2012_img_train.tar' in proc.stderr
  assert str(tmp_path / 'tfds') in proc.stderr
  assert 'Traceback' not in proc.stderr
  assert time.time() - start < 120  # Imports only: no download attempt, no compilation.


def test_misspelled_config_field_fails(tmp_path):
  proc = subprocess.run(
    [sys.executable, 'train.py', '--config', 'configs/digits.py', '--config.batch_sise=3'],
    cwd=REPO,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode != 0
  assert 'batch_sise' in proc.stderr


@pytest.mark.parametrize(
  'overrides,message',
  [
    ({'model.name': 'RepVGG-Z9'}, 'Unknown model name'),
    ({'model.bn_group_size': 5}, 'does not split into BatchNorm groups of model.bn_group_size=5'),
    ({'model.dtype': 'float16'}, "model.dtype must be 'float32' or 'bfloat16'"),
  ],
)
def test_bad_config_values(tmp_path, digits_dir, overrides, message):
  with pytest.raises(trainer.ConfigError, match=message):
    trainer.train_and_evaluate(tiny_config(digits_dir, **overrides), tmp_path)


def test_workdir_of_another_model_is_refused(tmp_path, digits_dir):
  first = trainer.train_and_evaluate(tiny_config(digits_dir, num_train_steps=2), tmp_path)
  # Running a finished run again trains nothing and evaluates the last checkpoint.
  again = trainer.train_and_evaluate(tiny_config(digits_dir, num_train_steps=2), tmp_path)
  assert again['steps'] == 2 and again['eval_top1'] == first['eval_top1']
  other = tiny_config(digits_dir, num_train_steps=4, **{'model.name': 'RepVGG-B0'})
  with pytest.raises(trainer.ConfigError, match='checkpoint .* is of RepVGG-A0'):
    trainer.train_and_evaluate(other, tmp_path)


def test_nan_loss_stops_with_a_clear_message(tmp_path, digits_dir):
  config = tiny_config(digits_dir, **{'optimizer.learning_rate': 1e30})
  with pytest.raises(trainer.TrainingDivergedError, match='not finite|loss is nan|loss is inf'):
    trainer.train_and_evaluate(config, tmp_path)
  ckpt = checkpointing.Checkpoints(tmp_path / 'checkpoints', read_only=True)
  for step in ckpt.manager.all_steps():
    state, _ = ckpt.restore(step=step)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state['params']))
