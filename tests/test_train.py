"""Training end to end: mock ImageNet and CIFAR-10, digits, device counts,
resumption after SIGKILL and SIGTERM, several processes, and clear errors."""

import dataclasses
import errno
import functools
import json
import logging
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.error

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from helpers import (
  checkpoint_params,
  flat_leaves,
  intercepted_train_batches,
  random_variables,
  relative_error,
  restore_checkpoint,
  run_in_repo,
  tiny_config,
)
from tensorflow.core.util import event_pb2

from repvgg_jax import checkpointing, jsonfiles
from repvgg_jax.data import datasets as data
from repvgg_jax.model import shapes
from repvgg_jax.perf import xla_cpu
from repvgg_jax.train import (
  config_checks,
  durations,
  evaluation,
  preemption,
  reporting,
  resume,
  saving,
  steps,
  trainer,
  workdir_lock,
)

REPO = pathlib.Path(__file__).resolve().parent.parent
RUNNER = REPO / 'tests' / 'train_runner.py'


# A 40-step digits run: long enough to learn and to be interrupted. The tests that
# train it share its compiled programs (the session's compilation cache, conftest.py).
RESUME = {'num_train_steps': 40, 'checkpoint_every_steps': 5, 'log_every_steps': 5}


def train_in_process(data_dir, workdir, overrides):
  """`tiny_config` trained in this process, on its one CPU device; returns the summary."""
  summary = trainer.train_and_evaluate(tiny_config(data_dir, **overrides), workdir)
  assert summary['num_devices'] == 1  # The tests compare it with runs of a known device count.
  return summary


def intercept_batches(monkeypatch, change):
  """Passes the trainer's every batch through ``change(step, batch)`` (steps count from 1)."""
  monkeypatch.setattr(data, 'train_batches', intercepted_train_batches(change))


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, digits_dir):
  """The RESUME run trained without interruption: ``(workdir, summary)``."""
  workdir = tmp_path_factory.mktemp('uninterrupted')
  return workdir, train_in_process(digits_dir, workdir, RESUME)


@pytest.fixture(scope='module')
def two_steps(tmp_path_factory, digits_dir):
  """A finished two-step run on one device: ``(workdir, summary)``. Do not write to it."""
  workdir = tmp_path_factory.mktemp('two_steps')
  return workdir, train_in_process(digits_dir, workdir, {'num_train_steps': 2})


def start_runner(
  workdir, data_dir, overrides, devices=1, process=None, seconds_per_batch=0, env=None
):
  env = dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    REPVGG_TEST_SECONDS_PER_BATCH=str(seconds_per_batch),
    **(env or {}),
  )
  # The suite's -O1 (conftest) stays; the device count is the runner's own.
  flags = os.environ.get('XLA_FLAGS', '')
  env['XLA_FLAGS'] = f'{flags} --xla_force_host_platform_device_count={devices}'.strip()
  args = [sys.executable, str(RUNNER), str(workdir), data_dir, json.dumps(overrides)]
  args += [str(a) for a in process or ()]
  return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_runner(workdir, data_dir, overrides, devices=1):
  proc = start_runner(workdir, data_dir, overrides, devices)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  return json.loads(out.strip().splitlines()[-1])


def assert_trees_close(actual, expected, rtol, leaf_rtol=None):
  """The trees agree to ``rtol`` as a whole and every leaf to ``leaf_rtol`` (norm-relative).

  Two SGD steps are not smooth in the parameters: a ReLU input within rounding of zero
  turns its gradient on or off. Between programs that differ only in rounding (XLA:CPU's
  default and fast-compile presets, one device) an element of a BatchNorm bias ended 1% of
  its leaf's largest value apart, the leaf 0.3% apart (norm); float64 sided with one of
  them. A wrong step moves whole leaves; the per-leaf bound (default ``rtol``) catches that.
  """
  leaf_rtol = rtol if leaf_rtol is None else leaf_rtol
  assert relative_error(flat_leaves(actual), flat_leaves(expected)) <= rtol
  for (path, x), y in zip(
    jax.tree_util.tree_leaves_with_path(actual), jax.tree_util.tree_leaves(expected), strict=True
  ):
    assert relative_error(x, y) <= leaf_rtol, jax.tree_util.keystr(path)


MOCK_DATASETS = {
  'imagenet2012': {
    'dataset.num_classes': 1000,
    'dataset.train_split': 'train',
    'dataset.eval_split': 'validation',
    'dataset.train_augment': 'inception_crop',
    'dataset.flip': True,
    'dataset.eval_preprocess': 'resize_crop',
    'dataset.in_memory': False,  # Random-sized mock images: tf.data crops them.
  },
  'cifar10': {'dataset.num_classes': 10, 'dataset.eval_split': 'test', 'dataset.flip': True},
  # Greyscale, repeated to RGB. The third run in a process: the checkpoint due at the
  # evaluation must be written before it (saved in the background, it failed here).
  'mnist': {'dataset.num_classes': 10, 'dataset.eval_split': 'test', 'dataset.in_memory': False},
}


@pytest.mark.parametrize('name', list(MOCK_DATASETS))
def test_one_step_train_and_evaluate_under_mock_data(tmp_path, name):
  config = tiny_config(
    str(tmp_path / 'tfds'),
    **MOCK_DATASETS[name],
    **{'dataset.name': name, 'num_train_steps': 1},  # tiny_config's batch of 16.
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


def test_short_digits_run_learns_and_deploy_checkpoint_matches(uninterrupted, digits_dir):
  workdir, summary = uninterrupted
  config = tiny_config(digits_dir, **RESUME)
  assert summary['steps'] == RESUME['num_train_steps']
  assert summary['eval_top1'] >= 0.5  # Chance is 0.1; 640 training images give about 0.74.
  assert abs(summary['eval_top1'] - summary['eval_top1_fused']) <= 1 / 360

  # The deploy checkpoint gives the training-time model's predictions.
  model, deploy = trainer.build_model(config), trainer.build_model(config, deploy=True)
  state, _ = checkpointing.Checkpoints(workdir / 'checkpoints', read_only=True).restore()
  fused, meta = checkpointing.Checkpoints(workdir / 'deploy', read_only=True).restore()
  assert meta['deploy'] and meta['model'] == 'RepVGG-A0' and meta['num_classes'] == 10
  batch = next(data.eval_batches(config.dataset, global_batch_size=40))
  train_logits = model.apply(
    {'params': state['params'], 'batch_stats': state['batch_stats']}, batch['image']
  )
  deploy_logits = deploy.apply(fused, batch['image'])
  np.testing.assert_allclose(deploy_logits, train_logits, rtol=1e-4, atol=1e-4)


def test_several_steps_per_call_train_as_one_step_per_call(tmp_path, digits_dir):
  """Three steps per call, one where a log or checkpoint falls inside (every 5 steps)."""
  # im2col: XLA's CPU convolution is refused in a multi-step call (check_steps_per_call).
  run = {**RESUME, 'num_train_steps': 20, 'model.conv_impl': 'im2col'}
  for name, steps_per_call in (('one', 1), ('three', 3)):
    summary = train_in_process(
      digits_dir, tmp_path / name, {**run, 'steps_per_call': steps_per_call}
    )
    assert summary['steps'] == 20
  expected, _ = checkpoint_params(tmp_path / 'one')
  actual, meta = checkpoint_params(tmp_path / 'three')
  assert meta['step'] == 20
  # Another program (a scan of three steps) may round in its own order.
  assert_trees_close(actual, expected, rtol=1e-5)
  # The same logs at the same steps, means over the steps since the last one.
  losses = [
    [(r['step'], r['train/loss']) for r in map(json.loads, lines) if 'train/loss' in r]
    for lines in (
      (tmp_path / n / 'metrics.jsonl').read_text().splitlines() for n in ('three', 'one')
    )
  ]
  assert [step for step, _ in losses[0]] == [5, 10, 15, 20]
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


def test_xla_convolutions_in_a_multi_step_call_are_refused_on_cpus():
  from configs import digits

  config = digits.get_config()  # A0, 'auto', ten steps per call.
  params = jax.eval_shape(
    trainer.build_model(config).init, jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32)
  )['params']
  # 'auto' keeps XLA's convolution off 16x16 maps.
  config_checks.check_steps_per_call(config, params)
  config.dataset.image_size = 224  # Its 28x28 and 14x14 stride-1 blocks would use it.
  layers = shapes.block_layers(params, 224)
  assert xla_cpu.xla_convolutions_in_training('auto', layers)[0] == 'block 4 (28x28, 96->96)'
  with pytest.raises(trainer.ConfigError, match="steps_per_call=1, or model.conv_impl='im2col'"):
    config_checks.check_steps_per_call(config, params)
  config_checks.check_steps_per_call(config, params, backend='gpu')


def test_steps_in_call_stop_before_every_log_evaluation_and_checkpoint():
  schedule = durations.Schedule(
    total_steps=23,
    steps_per_epoch=10,
    log_every=5,
    eval_every=10,
    checkpoint_every=0,
    steps_per_call=4,
  )
  step, calls = 0, []
  while step < schedule.total_steps:
    calls.append(schedule.steps_in_call(step))
    step += calls[-1]
  # 4 steps at a time unless a log (5, 10, 15, 20) or the end (23) comes first.
  assert calls == [4, 1, 4, 1, 4, 1, 4, 1, 1, 1, 1]
  assert step == 23
  one = dataclasses.replace(schedule, steps_per_call=1)
  assert {one.steps_in_call(step) for step in range(23)} == {1}


def test_one_and_eight_devices_agree(tmp_path, digits_dir, two_steps):
  one_dir, one = two_steps  # Trained in this process, on one device.
  eight = run_runner(tmp_path, digits_dir, {'num_train_steps': 2}, devices=8)
  assert (one['num_devices'], eight['num_devices']) == (1, 8)
  assert one['steps'] == eight['steps'] == 2
  params_one, _ = checkpoint_params(one_dir)
  params_eight, _ = checkpoint_params(tmp_path)
  assert_trees_close(params_eight, params_one, rtol=1e-5, leaf_rtol=1e-2)


@pytest.mark.slow  # By default test_bn_groups_compute_statistics_per_group checks the groups.
def test_bn_groups_agree_on_one_and_four_devices(tmp_path, digits_dir, two_steps):
  """BatchNorm in groups of 2 consecutive images of the global 16: two groups on each of
  4 devices, all 8 on one (docs/scaling.md).

  Statistics of 2 images amplify rounding. Measured: 4 devices against 1 moved the
  parameters 1.5e-4 apart (relative norm; a BatchNorm bias leaf 1.8e-2) and the running
  statistics 1.1e-5 (a leaf 2.3e-4); on one device, XLA's convolutions against im2col's
  moved the parameters 2e-4. A grouping that followed the devices (statistics per device,
  here groups of 4, or over the whole batch) moves them 1e-2: ten times the bound.
  """
  run = {'num_train_steps': 2, 'model.bn_group_size': 2}
  one = train_in_process(digits_dir, tmp_path / 'one', run)
  four = run_runner(tmp_path / 'four', digits_dir, run, devices=4)
  assert (one['num_devices'], four['num_devices']) == (1, 4)
  params_one, _ = checkpoint_params(tmp_path / 'one')
  params_four, _ = checkpoint_params(tmp_path / 'four')
  assert_trees_close(params_four, params_one, rtol=1e-3, leaf_rtol=5e-2)
  stats_one, stats_four = (
    restore_checkpoint(tmp_path / name / 'checkpoints')[0]['batch_stats']
    for name in ('one', 'four')
  )
  assert_trees_close(stats_four, stats_one, rtol=1e-4, leaf_rtol=1e-3)
  train_in_process(digits_dir, tmp_path / 'by4', {**run, 'model.bn_group_size': 4})
  whole_batch = two_steps[0]  # The same two steps, bn_group_size=0.
  for other in (tmp_path / 'by4', whole_batch):
    params_other, _ = checkpoint_params(other)
    assert relative_error(flat_leaves(params_other), flat_leaves(params_one)) > 5e-3


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


def test_killed_run_resumes_to_the_same_parameters(tmp_path, digits_dir, uninterrupted):
  # A tenth of a second per batch: the kill lands seconds before the run could finish.
  proc = start_runner(tmp_path / 'killed', digits_dir, RESUME, seconds_per_batch=0.1)
  saved = _wait_for_checkpoint(tmp_path / 'killed', proc, 10)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  assert proc.returncode == -signal.SIGKILL
  assert saved < RESUME['num_train_steps']
  # Resumed here (the checkpoint, not the process, carries the run).
  summary = train_in_process(digits_dir, tmp_path / 'killed', RESUME)
  assert summary['steps'] == RESUME['num_train_steps']
  expected, _ = checkpoint_params(uninterrupted[0])
  actual, meta = checkpoint_params(tmp_path / 'killed')
  assert meta['step'] == RESUME['num_train_steps']
  jax.tree.map(np.testing.assert_array_equal, actual, expected)  # Bit for bit.
  # Each step is logged once, with the uninterrupted run's values (README: a rerun prints
  # the same lines): the killed process's records, then the resumed one's. Rates differ.
  logged = [
    [
      {k: v for k, v in r.items() if k != 'train/images_per_sec'}
      for r in jsonfiles.read_jsonl(workdir / 'metrics.jsonl')
    ]
    for workdir in (tmp_path / 'killed', uninterrupted[0])
  ]
  assert [r['step'] for r in logged[0] if 'train/loss' in r] == list(range(5, 41, 5))
  assert any('eval/top1' in r for r in logged[0])
  assert logged[0] == logged[1]


def test_train_py_saves_and_exits_143_on_sigterm(tmp_path, digits_dir):
  """README: on SIGTERM train.py saves a checkpoint and exits with 143 (128 + 15)."""
  root = pathlib.Path(__file__).resolve().parents[1]
  command = [sys.executable, 'train.py', '--config', 'configs/digits.py', f'--workdir={tmp_path}']
  command += [f'--config.dataset.data_dir={digits_dir}', '--config.log_every_steps=1']
  command += ['--config.steps_per_call=1', '--config.num_train_steps=100000']
  command += ['--config.model.num_blocks=(1,1,1,1)', '--config.model.width_multipliers=(0.25,0.25)']
  command += ['--config.model.conv_impl=xla', '--config.batch_size=16']  # tiny_config's model.
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': str(root)}
  proc = subprocess.Popen(command, cwd=root, env=env, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while not (tmp_path / 'metrics.jsonl').exists():  # Training: the handler is in place.
    assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 143, err[-3000:]
  step = checkpoint_params(tmp_path)[1]['step']
  assert f'SIGTERM: saved the checkpoint of step {step} in' in err and 0 < step < 100000


def _tensorboard_scalars(workdir: pathlib.Path) -> list[tuple[int, float]]:
  """(step, value) of every scalar in the workdir's TensorBoard event files."""
  found = []
  for path in sorted((workdir / 'tensorboard').glob('events.out.tfevents.*')):
    for record in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
      event = event_pb2.Event.FromString(record)
      for value in event.summary.value:
        found.append((event.step, float(tf.make_ndarray(value.tensor))))
  return found


def test_a_resumed_run_forgets_the_logs_after_its_checkpoint(tmp_path):
  first = reporting.MetricsWriter(tmp_path)
  for step in (5, 10, 15):
    first.write(step, {'loss': step})
  first.close()
  # A crash while writing leaves the last record of an event file cut short.
  (events,) = (tmp_path / 'tensorboard').glob('events.out.tfevents.*')
  with open(events, 'ab') as f:
    f.write(b'\x07\x00\x00')
  resumed = reporting.MetricsWriter(tmp_path, start_step=10)
  resumed.write(15, {'loss': 0.5})
  resumed.close()
  records = jsonfiles.read_jsonl(tmp_path / 'metrics.jsonl')
  assert records == [{'step': 5, 'loss': 5}, {'step': 10, 'loss': 10}, {'step': 15, 'loss': 0.5}]
  assert sorted(_tensorboard_scalars(tmp_path)) == [(5, 5.0), (10, 10.0), (15, 0.5)]
  assert not list((tmp_path / 'tensorboard').glob('*.tmp'))


def test_closing_line_names_top5_where_it_informs(two_steps):
  """README's last line of train.py; top-5 left out where every label is in the top 5."""
  workdir, summary = two_steps
  assert summary['num_classes'] == 10
  line = reporting.closing_line(summary, workdir)
  assert line.startswith(f'Done after 2 steps: eval top-1 {summary["eval_top1"]:.2%}, fused ')
  assert f', top-5 {summary["eval_top5"]:.2%}' in line
  assert line.endswith(f'. Summary: {workdir}/summary.json')
  three = {**summary, 'num_classes': 3, 'train_images_per_sec': 1234.5}
  assert reporting.closing_line(three, 'w') == (
    f'Done after 2 steps: eval top-1 {summary["eval_top1"]:.2%}, fused '
    f'{summary["eval_top1_fused"]:.2%}; 1,234 images/s. Summary: w/summary.json'
  )


def test_a_busy_workdir_is_refused_and_a_stale_lock_taken_over(tmp_path, digits_dir):
  config = tiny_config(digits_dir, num_train_steps=2)
  with workdir_lock.workdir_lock(tmp_path):
    with pytest.raises(workdir_lock.WorkdirBusyError, match=f'in use by host .* pid {os.getpid()}'):
      trainer.train_and_evaluate(config, tmp_path)
  assert not (tmp_path / 'checkpoints').exists()  # Refused before any work.
  # A dead run's lock file holds no lock: the next run takes it over.
  (tmp_path / 'lock').write_text('host elsewhere pid 1\n')
  assert trainer.train_and_evaluate(config, tmp_path)['steps'] == 2


def test_a_refused_run_removes_only_the_folders_it_made(tmp_path):
  """Through '..' a path names folders that exist: they stay, the ones made go."""
  (tmp_path / 'mine').mkdir()
  workdir = tmp_path / 'new' / '..' / 'mine' / 'run'
  made = workdir_lock.make_workdir(workdir)
  assert made == [tmp_path / 'new', workdir] and workdir.is_dir()
  (workdir / 'checkpoints').mkdir()
  (workdir / workdir_lock.LOCK_FILE).write_text('')
  workdir_lock.remove_if_unused(workdir, made)
  assert [path.name for path in tmp_path.iterdir()] == ['mine']
  assert not any((tmp_path / 'mine').iterdir())
  (tmp_path / 'afile').write_text('user data')
  with pytest.raises(FileExistsError):
    workdir_lock.make_workdir(tmp_path / 'afile')


def _corrupt(step_dir: pathlib.Path) -> None:
  """Truncates every data file of a checkpoint's arrays, as a full disk or a crash might."""
  files = [p for p in (step_dir / 'state').rglob('*') if p.is_file() and p.stat().st_size > 64]
  assert files
  for path in files:
    with open(path, 'r+b') as f:
      f.truncate(path.stat().st_size // 2)


def test_an_unreadable_checkpoint_is_moved_aside_and_the_one_before_resumes(
  tmp_path, digits_dir, uninterrupted, capfd
):
  workdir = tmp_path / 'run'
  shutil.copytree(uninterrupted[0], workdir)
  steps_saved = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  latest = steps_saved[-1]
  assert latest == RESUME['num_train_steps'] and len(steps_saved) > 1
  _corrupt(workdir / 'checkpoints' / str(latest))
  summary = train_in_process(digits_dir, workdir, RESUME)
  assert summary['steps'] == RESUME['num_train_steps']
  (line,) = [x for x in capfd.readouterr().err.splitlines() if 'cannot be read' in x]
  assert f'Checkpoint {latest} in {workdir / "checkpoints"}' in line
  assert line.endswith(f'moved to {latest}.corrupt.')
  assert (workdir / 'checkpoints' / f'{latest}.corrupt' / 'state').is_dir()  # Kept, not deleted.
  # Resumed from the step before and retrained the rest: the uninterrupted run's parameters.
  expected, _ = checkpoint_params(uninterrupted[0])
  actual, meta = checkpoint_params(workdir)
  assert meta['step'] == latest
  jax.tree.map(np.testing.assert_array_equal, actual, expected)


def test_a_workdir_with_no_readable_checkpoint_stops_in_one_line(tmp_path, digits_dir, two_steps):
  shutil.copytree(two_steps[0], tmp_path, dirs_exist_ok=True)
  for step_dir in (tmp_path / 'checkpoints').iterdir():
    _corrupt(step_dir)
  files = lambda: {
    str(p.relative_to(tmp_path)).replace('.corrupt', '') for p in tmp_path.rglob('*')
  }
  before = files()
  for _ in range(2):  # The same command again (a scheduler's retry) must not start afresh.
    with pytest.raises(trainer.ConfigError, match='No checkpoint in .* can be read .*corrupt'):
      trainer.train_and_evaluate(tiny_config(digits_dir, num_train_steps=2), tmp_path)
  assert files() - before <= {'lock'}  # Nothing written but the lock; only renamed.


def test_a_failed_fused_model_save_names_the_kept_training_checkpoint(
  tmp_path, digits_dir, two_steps, monkeypatch
):
  shutil.copytree(two_steps[0], tmp_path, dirs_exist_ok=True)
  shutil.rmtree(tmp_path / 'deploy')
  save = ocp.CheckpointManager.save

  def full_disk(manager, *args, **kwargs):
    if pathlib.Path(manager.directory).name == 'deploy':
      raise OSError(errno.ENOSPC, 'No space left on device')
    return save(manager, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, 'save', full_disk)
  with pytest.raises(checkpointing.CheckpointWriteError) as error:
    trainer.train_and_evaluate(tiny_config(digits_dir, num_train_steps=2), tmp_path)
  assert str(error.value) == (
    f'Saving the fused model of step 2 to {tmp_path / "deploy"} failed: [Errno 28] No space '
    'left on device. The training checkpoint of step 2 is kept; fix the cause and run the '
    'same command to write the fused model.'
  )
  monkeypatch.undo()
  trainer.train_and_evaluate(tiny_config(digits_dir, num_train_steps=2), tmp_path)
  assert (tmp_path / 'deploy' / '2').is_dir()


def test_a_workdir_that_cannot_be_made_or_written_is_one_line(tmp_path, digits_dir, monkeypatch):
  (tmp_path / 'afile').write_text('user data')
  with pytest.raises(trainer.FileSystemError) as error:
    trainer.train_and_evaluate(tiny_config(digits_dir), tmp_path / 'afile')
  assert str(error.value) == (
    f'[Errno 17] File exists: {tmp_path / "afile"}: move the file that stands there, or use '
    'another --workdir.'
  )
  assert (tmp_path / 'afile').read_text() == 'user data'
  # A full disk at the first file the run writes (config.json): no temporary file is left.
  write_text = pathlib.Path.write_text

  def full_disk(path, text, *args, **kwargs):
    if path.name.endswith('.json.tmp'):
      write_text(path, text[:10])
      raise OSError(errno.ENOSPC, 'No space left on device')  # A write's own: no file named.
    return write_text(path, text, *args, **kwargs)

  monkeypatch.setattr(pathlib.Path, 'write_text', full_disk)
  with pytest.raises(trainer.FileSystemError) as error:
    trainer.train_and_evaluate(tiny_config(digits_dir), tmp_path / 'run')
  # The file named is the one the run writes, not its temporary file, which is gone.
  assert str(error.value) == (
    f'[Errno 28] No space left on device: {tmp_path / "run" / "config.json"}: free space on '
    'its disk, or use another --workdir.'
  )
  assert not list((tmp_path / 'run').glob('*.tmp'))


def test_an_oserror_of_a_url_keeps_its_own_message(tmp_path, monkeypatch):
  """A download's HTTP error is an OSError named by its URL: no file advice for it."""
  failure = urllib.error.HTTPError('https://example.org/d.zip', 503, 'unavailable', {}, None)

  def download_fails(config, resuming):
    raise failure

  monkeypatch.setattr(config_checks, 'validated', download_fails)
  with pytest.raises(urllib.error.HTTPError) as error:
    trainer.train_and_evaluate(tiny_config(), tmp_path / 'run')
  assert error.value is failure and not (tmp_path / 'run').exists()


def test_saved_steps_are_the_folders_orbax_names_by_steps(tmp_path):
  for name in ('0', '120', '007', '5.orbax-checkpoint-tmp-1', 'x3', '\u00b2'):
    (tmp_path / name).mkdir()
  (tmp_path / '9').write_text('a file')
  assert checkpointing.saved_steps(tmp_path) == [0, 120]
  assert checkpointing.saved_steps(tmp_path / 'none') == []


def test_a_file_outside_the_workdir_that_fails_is_one_line(tmp_path):
  """A data_dir that is a file: the error names it and the setting, no workdir is made."""
  (tmp_path / 'afile').write_text('user data')
  with pytest.raises(trainer.FileSystemError) as error:
    trainer.train_and_evaluate(tiny_config(str(tmp_path / 'afile')), tmp_path / 'run')
  assert str(error.value).startswith(f'[Errno 20] Not a directory: {tmp_path / "afile"}'), (
    error.value
  )
  assert str(error.value).endswith(
    'move the file that stands in its path, or change the setting that names it '
    '(dataset.data_dir, init_from, ...).'
  )
  assert (tmp_path / 'afile').read_text() == 'user data' and not (tmp_path / 'run').exists()


def test_a_failed_save_stops_the_run_in_one_line(tmp_path, digits_dir):
  """Files may not grow past 4 KB (as on a full disk): the first save of the resumed run
  fails, the run stops with one line naming the cause, the earlier checkpoints stay."""
  run = {'num_train_steps': 4, 'checkpoint_every_steps': 2}
  train_in_process(digits_dir, tmp_path, run)
  before = checkpoint_files(tmp_path)
  # No compilation cache: its files would hit the limit too.
  env = {'REPVGG_TEST_MAX_FILE_BYTES': '4096', 'JAX_ENABLE_COMPILATION_CACHE': 'false'}
  proc = start_runner(tmp_path, digits_dir, {**run, 'num_train_steps': 12}, env=env)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 1, stderr[-3000:]
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert len(lines) <= 10, stderr
  assert lines[-1].startswith('error: Saving checkpoint 6 to ')
  assert '[Errno 27] File too large' in lines[-1]
  assert 'The last good checkpoint is step 4' in lines[-1]
  after = checkpoint_files(tmp_path)
  assert all(after.get(path) == mtime for path, mtime in before.items())  # All kept as they were.
  _, meta = checkpoint_params(tmp_path)
  assert meta['step'] == 4


def test_what_a_failed_save_leaves_to_asyncio_is_not_printed(monkeypatch):
  """On a real full disk a write of the failed save may end in a task nobody awaits;
  asyncio logs it ("Future exception was never retrieved") after our one line."""
  full = OSError(errno.ENOSPC, 'No space left on device')
  record = lambda name, error: logging.LogRecord(
    name,
    logging.ERROR,
    'base_events.py',
    1,
    'Future exception was never retrieved',
    (),
    (type(error), error, None),
  )
  shown = checkpointing._not_a_failed_save  # The filter `Checkpoints` puts on asyncio's logger.
  monkeypatch.setattr(checkpointing, '_failed_saves', [])
  assert shown(record('asyncio', full))  # No save failed: someone else's, printed.
  monkeypatch.setattr(checkpointing, '_failed_saves', [4])
  assert not shown(record('asyncio', full))
  assert shown(record('asyncio', ValueError('a bug of ours'))) and shown(record('absl', full))


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


def test_a_checkpoint_opened_to_read_logs_no_warning(tmp_path, caplog):
  """Orbax warns about each option a reader does not use, and about the reading itself:
  noise in every command that fuses, exports or evaluates a checkpoint."""
  ckpt = checkpointing.Checkpoints(tmp_path)
  ckpt.save(1, {'w': np.arange(3.0)}, {'step': 1})
  ckpt.close()
  with caplog.at_level(logging.WARNING):
    reader = checkpointing.Checkpoints(tmp_path, keep=3, read_only=True)
    assert reader.latest_step() == 1
    reader.close()
  assert not [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]


@pytest.fixture
def ctrl_c_handled():
  """Python's own Ctrl-C handler for the test. A shell without job control starts
  background jobs (`pytest ... &` in a script) with SIGINT ignored, which the trainer
  rightly leaves ignored (test_an_ignored_ctrl_c_stays_ignored)."""
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  yield
  signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_saves_a_checkpoint_and_stops(
  tmp_path, digits_dir, monkeypatch, ctrl_c_handled, signum
):
  # The signal arrives while the batch of step 6 is read: that step finishes, then the run stops.
  def signal_at_step_6(step, batch):
    if step == 6:
      os.kill(os.getpid(), signum)
    return batch

  intercept_batches(monkeypatch, signal_at_step_6)
  previous_handlers = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)]
  summary = train_in_process(digits_dir, tmp_path, {**RESUME, 'checkpoint_every_steps': 1000})
  assert summary['preempted'] == signum.name and summary['steps'] == 6
  _, meta = checkpoint_params(tmp_path)
  assert meta['step'] == 6
  assert not (tmp_path / 'summary.json').exists()
  records = jsonfiles.read_jsonl(tmp_path / 'metrics.jsonl')
  assert [r['step'] for r in records if 'train/loss' in r] == [5, 6]  # Step 6's too.
  # The trainer's handlers are removed.
  assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)] == previous_handlers


def test_every_process_stops_with_the_signal_another_received(monkeypatch):
  """Process 1 of 2 got a Ctrl-C: process 0, which got none, stops as it does (exit 130)."""
  from jax.experimental import multihost_utils

  monkeypatch.setattr(trainer.jax, 'process_count', lambda: 2)
  gathered = []
  monkeypatch.setattr(
    multihost_utils, 'process_allgather', lambda x: gathered.append(int(x)) or np.array([0, 2])
  )
  stop_request = preemption.Preemption()
  try:
    assert stop_request.agreed() and stop_request.received == 'SIGINT' and gathered == [0]
  finally:
    stop_request.restore()


def test_an_ignored_ctrl_c_stays_ignored():
  """A background job's SIGINT is ignored: the trainer does not take it over."""
  previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
  try:
    stop_request = preemption.Preemption()
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    stop_request.restore()
  finally:
    signal.signal(signal.SIGINT, previous)


def test_a_second_ctrl_c_interrupts_at_once(tmp_path, digits_dir, monkeypatch, ctrl_c_handled):
  """The first Ctrl-C asks for a checkpoint after the step; a second one does not wait."""

  def two_ctrl_c_at_step_6(step, batch):
    if step == 6:
      os.kill(os.getpid(), signal.SIGINT)
      os.kill(os.getpid(), signal.SIGINT)
    return batch

  intercept_batches(monkeypatch, two_ctrl_c_at_step_6)
  previous_handler = signal.getsignal(signal.SIGINT)
  with pytest.raises(KeyboardInterrupt):
    train_in_process(digits_dir, tmp_path, {**RESUME, 'checkpoint_every_steps': 4})
  assert checkpoint_params(tmp_path)[1]['step'] == 4  # Nothing after the last periodic one.
  assert signal.getsignal(signal.SIGINT) == previous_handler


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_resume_a_one_process_run(tmp_path, digits_dir):
  """Three steps on this process's one device, then a fourth in two processes of two
  devices each. Step 3, where the second run resumes, is due an evaluation that the
  first process finds logged: both processes skip it (the second, which reads no
  metrics, follows the first); a process evaluating alone would wait forever."""
  train_in_process(digits_dir, tmp_path, {'num_train_steps': 3})
  per_epoch = data.steps_per_epoch(tiny_config(digits_dir).dataset, 16)
  overrides = {'num_train_steps': 4, 'eval_every_epochs': 3 / per_epoch}

  def start_both():
    port = _free_port()
    return [
      start_runner(tmp_path, digits_dir, overrides, devices=2, process=(i, 2, port)) for i in (0, 1)
    ]

  # A busy workdir stops both processes at once, not the first alone.
  with workdir_lock.workdir_lock(tmp_path):
    procs = start_both()
    outputs = [p.communicate(timeout=120) for p in procs]
  for proc, (_, err) in zip(procs, outputs, strict=True):
    assert proc.returncode != 0 and 'WorkdirBusyError' in err, err[-3000:]
  procs = start_both()
  outputs = [p.communicate(timeout=300) for p in procs]
  for proc, (_, err) in zip(procs, outputs, strict=True):
    assert proc.returncode == 0, err[-3000:]
  summary = json.loads((tmp_path / 'summary.json').read_text())
  assert summary['num_processes'] == 2 and summary['num_devices'] == 4
  assert summary['steps'] == 4
  assert 0 <= summary['eval_top1'] <= 1
  records = jsonfiles.read_jsonl(tmp_path / 'metrics.jsonl')
  assert [r['step'] for r in records if 'eval/top1' in r] == [3, 4]


def test_bn_groups_compute_statistics_per_group():
  config = tiny_config()
  model = trainer.build_model(config)
  images = np.random.default_rng(0).standard_normal((8, 32, 32, 3), np.float32)
  variables = random_variables(model, images.shape, seed=1)  # No compiled init: seconds less.
  train_mode = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))
  in_groups = jax.jit(functools.partial(steps.apply_in_groups, model, group_size=4))
  logits, updates = in_groups(variables, images)
  halves = [train_mode(variables, images[:4]), train_mode(variables, images[4:])]
  for part, (alone, _) in zip((slice(0, 4), slice(4, 8)), halves, strict=True):
    np.testing.assert_allclose(alone, logits[part], rtol=1e-5, atol=1e-5)
  whole, whole_updates = train_mode(variables, images)
  assert not np.allclose(whole, logits, atol=1e-3)  # Grouping changes the statistics.
  expected = jax.tree.map(lambda a, b: (a + b) / 2, *(half_updates for _, half_updates in halves))
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert jax.tree.structure(updates) == jax.tree.structure(whole_updates)


def test_missing_imagenet_fails_at_once_with_instructions(tmp_path):
  start = time.time()
  proc = run_in_repo(
    'train.py',
    '--config',
    'configs/b0.py',
    f'--workdir={tmp_path / "w"}',
    f'--config.dataset.data_dir={tmp_path / "tfds"}',
  )
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert 'ILSVRC2012_img_train.tar' in proc.stderr
  assert str(tmp_path / 'tfds') in proc.stderr
  assert 'Traceback' not in proc.stderr
  assert time.time() - start < 120  # Imports only: no download attempt, no compilation.


@pytest.mark.parametrize(
  'name, message',
  [
    ('imagenet_typo', "Unknown dataset 'imagenet_typo'.*sklearn"),
    ('cifar-10', "Cannot build dataset 'cifar-10': Parsing builder name string cifar-10 failed"),
    ('mnist/foo', "Cannot build dataset 'mnist/foo': BuilderConfig foo not found"),
    ('mnist:99.0.0', "Cannot build dataset 'mnist:99.0.0': .*99.0.0"),
  ],
)
def test_unknown_dataset_is_one_line(tmp_path, name, message):
  config = tiny_config(str(tmp_path), **{'dataset.name': name})
  with pytest.raises(data.DatasetNotFoundError, match=message) as error:
    trainer.train_and_evaluate(config, tmp_path / 'w')
  assert '\n' not in str(error.value)
  assert not (tmp_path / 'w').exists()  # A mistyped name leaves no workdir behind.


@pytest.mark.parametrize(
  'args, line',
  [
    (
      ['--config', 'configs/digits.py', '--config.optimizer.lr=0.1'],
      "error: --config.optimizer.lr: optimizer has no field 'lr'; the closest is "
      "'optimizer.learning_rate'.",
    ),
    (
      ['--config', 'configs/digits.py', '--config.optimiser.learning_rate=0.1'],
      "error: --config.optimiser.learning_rate: the config has no field 'optimiser'; the "
      "closest is 'optimizer'.",
    ),
    (
      ['--config', 'configs/nope.py'],
      "error: cannot load the config file 'configs/nope.py': [Errno 2] No such file or "
      'directory; check the path.',
    ),
  ],
)
def test_command_line_mistakes_are_one_line(args, line):
  proc = run_in_repo('train.py', *args, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [line]


@pytest.mark.parametrize(
  'source, line',
  [
    ('x = (\n', "the config file '{path}' does not load: '(' was never closed"),
    ('A = 1\n', "the config file '{path}' has no get_config(), which returns the config."),
    (
      'def get_config(preset):\n  raise ValueError(f"Unknown preset {preset!r}: a or b.")\n',
      "the config file '{path}:c' failed in get_config: ValueError: Unknown preset 'c': a or b.",
    ),
    ('def get_config():\n  pass\n', "the config file '{path}' takes no preset after ':'"),
    (  # A mistake inside get_config is not the preset's.
      'def get_config(preset):\n  return len(preset, 2)\n',
      "the config file '{path}:c' failed in get_config: TypeError: len() takes",
    ),
  ],
)
@pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')  # ml_collections'.
def test_a_config_file_that_does_not_load_is_one_line(tmp_path, source, line):
  """What `parse_flags` prints for a config file whose module or get_config fails."""
  from absl import flags
  from ml_collections import config_flags

  from repvgg_jax import startup

  path = tmp_path / 'my_config.py'
  path.write_text(source)
  argument = f'{path}:c' if 'def get_config(' in source else str(path)
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'a config', flag_values=flag_values)
  with pytest.raises(Exception) as error:  # noqa: PT011 - each case fails its own way.
    flag_values(['train.py', '--config', argument])
    flag_values['config'].value.to_dict()
  message = startup.flag_error_line(error.value, ['train.py', '--config', argument])
  assert message.startswith(line.format(path=path)), message
  assert '\n' not in message and 'Traceback' not in message


@pytest.mark.parametrize(
  'command, listed',
  [
    (['train.py'], '--config'),
    (['-m', 'repvgg_jax.ablate'], '--config'),
    (['-m', 'repvgg_jax.bench'], 'roofline'),
    (['-m', 'repvgg_jax.convert'], 'quantize'),
  ],
)
def test_help_exits_zero_without_loading_tensorflow(command, listed):
  """The commands parse their flags before TensorFlow loads (seconds): --help, and a
  mistyped flag, answer at once."""
  proc = run_in_repo('-X', 'importtime', *command, '--help', timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert listed in proc.stdout
  imported = [line.rsplit('|', 1)[-1].strip() for line in proc.stderr.splitlines()]
  assert 'jax' in imported and 'tensorflow' not in imported


def test_misspelled_config_field_fails(tmp_path):
  proc = run_in_repo('train.py', '--config', 'configs/digits.py', '--config.batch_sise=3')
  assert proc.returncode != 0
  assert 'batch_sise' in proc.stderr


@pytest.mark.parametrize(
  'overrides,message',
  [
    ({'model.name': 'RepVGG-Z9'}, 'Unknown model name'),
    ({'model.bn_group_size': 5}, 'does not split into BatchNorm groups of model.bn_group_size=5'),
    ({'model.dtype': 'float16'}, "model.dtype must be 'float32' or 'bfloat16'"),
    ({'model.conv_impl': 'foo'}, "model.conv_impl must be one of auto, xla, .* got 'foo'"),
    ({'dataset.train_augment': 'inception_crop'}, 'set --config.dataset.in_memory=False'),
    ({'steps_per_call': 0}, 'steps_per_call must be a positive number, got 0'),
    ({'batch_size': 0}, 'batch_size must be a positive number, got 0'),
    ({'batch_size': -64}, 'batch_size must be a positive number, got -64'),
    ({'eval_batch_size': 0}, 'eval_batch_size must be a positive number'),
    ({'num_train_steps': 0, 'num_epochs': 0.0}, 'num_epochs must be positive'),
    ({'dataset.num_classes': 5}, 'num_classes is 5 but sklearn_digits has 10 classes'),
    ({'steps_per_call': 2}, 'up to 35x slower inside the loop'),  # conv_impl 'xla'.
    ({'keep_checkpoints': 0}, 'keep_checkpoints must be at least 1'),
    ({'model.num_blocks': (1, 1, 1)}, 'model: RepVGG-A0-custom: num_blocks must be 4 positive'),
    ({'dataset.image_size': 0}, 'image_size must be at least 1 .* got 0 and 2'),
    ({'dataset.pad_pixels': -1}, 'pad_pixels at least 0, got 32 and -1'),
    ({'dataset.eval_preprocess': 'center_crop'}, "dataset.eval_preprocess is 'center_crop': ch"),
    ({'dataset.train_augment': 'random_crop'}, "dataset.train_augment is 'random_crop': choose"),
    ({'dataset.crop_sampler': 'pil'}, "dataset.crop_sampler is 'pil': choose one of torchvision"),
    ({'num_train_steps': 0, 'num_epochs': 0.005}, 'num_epochs=0.005 is 0 steps of 89 per epoch'),
    ({'batch_size': 2000}, "larger than the 1437 examples of 'train': lower batch_size"),
    ({'dataset.eval_split': 'validation'}, "dataset.eval_split: Unknown split 'validation'"),
    ({'seed': -1}, 'seed must be a non-negative integer, got -1'),
    ({'dataset.shuffle_buffer': 0}, 'dataset.shuffle_buffer must be at least 1'),
    ({'optimizer.learning_rate': -0.1}, r'learning_rate must be >= 0 \(the peak rate per'),
    ({'optimizer.learning_rate': float('nan')}, 'learning_rate must be >= 0 .* got nan'),
    ({'optimizer.momentum': 1.5}, r'optimizer.momentum must be in \[0, 1\), got 1.5'),
    ({'optimizer.weight_decay': -1e-4}, 'optimizer.weight_decay must be >= 0 .* got -0.0001'),
    ({'optimizer.warmup_epochs': -1.0}, 'optimizer.warmup_epochs must be >= 0 .* got -1.0'),
    ({'optimizer.label_smoothing': 1.0}, r'label_smoothing must be in \[0, 1\) .* got 1.0'),
  ],
)
def test_bad_config_values(tmp_path, digits_dir, overrides, message):
  workdir = tmp_path / 'run'
  with pytest.raises(trainer.ConfigError, match=message):
    trainer.train_and_evaluate(tiny_config(digits_dir, **overrides), workdir)
  assert not workdir.exists()  # Refused before it is made, or (steps_per_call) removed.


def checkpoint_files(workdir):
  """``{path: modification time}`` of every file under ``workdir/checkpoints``."""
  files = (workdir / 'checkpoints').rglob('*')
  return {path: path.stat().st_mtime_ns for path in files if path.is_file()}


def test_workdir_of_another_model_is_refused(tmp_path, digits_dir, two_steps, capsys):
  finished, first = two_steps
  shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
  before = checkpoint_files(tmp_path)
  metrics = tmp_path / 'metrics.jsonl'
  logged = jsonfiles.read_jsonl(metrics)
  with open(metrics, 'a') as f:  # The last line cut short, as by a full disk.
    f.write('{"step": 2, "train/lo')
  # Running a finished run again trains nothing and evaluates the last checkpoint,
  # logging nothing twice.
  again = trainer.train_and_evaluate(tiny_config(digits_dir, num_train_steps=2), tmp_path)
  assert again['steps'] == 2 and again['eval_top1'] == first['eval_top1']
  assert again['train_images_per_sec'] == first['train_images_per_sec']
  assert checkpoint_files(tmp_path) == before  # Nothing trained, nothing saved.
  assert jsonfiles.read_jsonl(metrics) == logged
  # Another batch size or seed resumes, with a warning for each.
  trainer.train_and_evaluate(
    tiny_config(digits_dir, num_train_steps=2, batch_size=8, seed=5), tmp_path
  )
  warnings = [line for line in capsys.readouterr().err.splitlines() if 'warning: resum' in line]
  assert warnings == [
    'warning: resuming a run trained with batch_size=16 with batch_size=8: the data order and '
    'the schedule of epochs change (--config.batch_size=16 resumes it exactly).',
    'warning: resuming a run trained with seed=0 with seed=5: the data order changes '
    '(--config.seed=0 resumes it exactly).',
  ]
  # Another length: the schedule changes (a longer run trains on, a shorter one stops).
  summary = trainer.train_and_evaluate(tiny_config(digits_dir, num_train_steps=1), tmp_path)
  assert summary['steps'] == 2
  (line,) = [line for line in capsys.readouterr().err.splitlines() if 'warning: resum' in line]
  assert line == (
    'warning: resuming a run of 2 steps as one of 1: the learning-rate schedule changes from '
    'here on; the run is at step 2 already, so nothing more is trained (num_train_steps or '
    'num_epochs as before resumes it exactly).'
  )
  longer = resume.order_changes(tiny_config(), {'total_steps': 2, 'step': 2}, 6)
  assert longer == [
    'warning: resuming a run of 2 steps as one of 6: the learning-rate schedule changes from '
    'here on (num_train_steps or num_epochs as before resumes it exactly).'
  ]
  other = tiny_config(digits_dir, num_train_steps=4, **{'model.name': 'RepVGG-B0'})
  with pytest.raises(trainer.ConfigError, match='checkpoint .* is of RepVGG-A0'):
    trainer.train_and_evaluate(other, tmp_path)


def test_a_failed_evaluation_keeps_its_checkpoint_and_is_redone_on_resume(
  tmp_path, digits_dir, monkeypatch
):
  """Evaluations at steps 2, 4 and 6. The first run fails at step 2's, after its
  checkpoint; the second redoes it and fails at step 6's, the last; the third
  evaluates step 6 and reports the training rate that the second one measured."""
  evaluate, calls = evaluation.evaluate, []

  def fail_after(successes):
    def evaluate_or_fail(*args):
      calls.append(None)
      if len(calls) > successes:
        raise RuntimeError('a damaged validation image')
      return evaluate(*args)

    return evaluate_or_fail

  per_epoch = data.steps_per_epoch(tiny_config(digits_dir).dataset, 16)
  config = tiny_config(digits_dir, num_train_steps=6, eval_every_epochs=2 / per_epoch)
  for successes, failed_at in ((0, 2), (2, 6)):
    calls.clear()
    with monkeypatch.context() as patched:
      patched.setattr(evaluation, 'evaluate', fail_after(successes))
      with pytest.raises(RuntimeError, match='damaged'):
        trainer.train_and_evaluate(config, tmp_path)
    ckpt = checkpointing.Checkpoints(tmp_path / 'checkpoints', read_only=True)
    assert ckpt.latest_step() == failed_at
    ckpt.close()
  summary = trainer.train_and_evaluate(config, tmp_path)
  records = jsonfiles.read_jsonl(tmp_path / 'metrics.jsonl')
  assert [r['step'] for r in records if 'eval/top1' in r] == [2, 4, 6]
  # The second run's intervals but its first (which compiled): steps 5 and 6.
  rates = {r['step']: r['train/images_per_sec'] for r in records if 'train/loss' in r}
  assert summary['train_images_per_sec'] == pytest.approx(rates[6], rel=1e-12)


def test_a_signal_during_an_evaluation_stops_it_and_the_resumed_run_redoes_it(
  tmp_path, digits_dir, monkeypatch, capfd
):
  """Evaluations at steps 2 and 4. A SIGTERM arrives during the evaluations marked
  below, after their first batch: the run saves and stops within a batch, logging no
  evaluation, and the next run redoes it. Each of the three places a run evaluates
  is cut short once: in the loop (step 2), redoing a missed one (step 2 again), at the
  last step (4) and redoing the last one after it (4 again)."""
  eval_batches, evaluations = data.eval_batches, []

  def signalled_after_one_batch(signalled):
    def batches(*args, **kwargs):
      evaluations.append(0)
      for batch in eval_batches(*args, **kwargs):
        if evaluations[-1] == 1 and len(evaluations) in signalled:
          os.kill(os.getpid(), signal.SIGTERM)
        evaluations[-1] += 1
        yield batch

    return batches

  per_epoch = data.steps_per_epoch(tiny_config(digits_dir).dataset, 16)
  config = tiny_config(digits_dir, num_train_steps=4, eval_every_epochs=2 / per_epoch)
  # (evaluations of a run that get a SIGTERM, the step it stops at, whether it saved it)
  for signalled, stopped_at, saved in (({1}, 2, 1), ({1}, 2, 0), ({2}, 4, 1), ({1}, 4, 0)):
    evaluations.clear()
    monkeypatch.setattr(data, 'eval_batches', signalled_after_one_batch(signalled))
    summary = trainer.train_and_evaluate(config, tmp_path)
    assert summary['preempted'] == 'SIGTERM' and summary['steps'] == stopped_at
    # Only the third run finished an evaluation (of step 2) before its cut one of step 4.
    assert summary['eval_step'] == (2 if signalled == {2} else None)
    assert evaluations[-1] == 2  # Of 9 batches: the one after the signal is not evaluated.
    checkpoint = f'the checkpoint of step {stopped_at}'
    where = f'saved {checkpoint} in' if saved else f'{checkpoint} is in'
    assert (
      f'SIGTERM: {where} {tmp_path / "checkpoints"}; '
      f'the resumed run evaluates step {stopped_at}; stopping.'
    ) in capfd.readouterr().err
    assert restore_checkpoint(tmp_path / 'checkpoints')[1]['step'] == stopped_at
  monkeypatch.setattr(data, 'eval_batches', eval_batches)
  summary = trainer.train_and_evaluate(config, tmp_path)
  assert 'preempted' not in summary and summary['steps'] == summary['eval_step'] == 4
  records = jsonfiles.read_jsonl(tmp_path / 'metrics.jsonl')
  assert [r['step'] for r in records if 'eval/top1' in r] == [2, 4]


def test_statistics_that_are_not_finite_are_not_checkpointed():
  state = types.SimpleNamespace(
    params={'kernel': jnp.ones(2)}, batch_stats={'var': jnp.array([1.0, jnp.inf])}
  )
  ckpt = types.SimpleNamespace(latest_step=lambda: 4)
  with pytest.raises(trainer.TrainingDivergedError, match='batch_stats are not finite after'):
    saving.save_checkpoint(ckpt, state, 6, {}, run=None)


def test_nan_loss_stops_with_a_clear_message(tmp_path, digits_dir, monkeypatch):
  """From step 8 on the batches are NaN, as a diverging run's activations would be.

  The RESUME config (whose compiled programs the runs above share) checkpoints
  at step 5, then at step 10 finds the loss or the parameters not finite.
  """
  nan_from_step_8 = lambda step, batch: (
    {**batch, 'image': np.full_like(batch['image'], np.nan)} if step >= 8 else batch
  )
  intercept_batches(monkeypatch, nan_from_step_8)
  with pytest.raises(trainer.TrainingDivergedError, match='not finite|loss is nan|loss is inf'):
    trainer.train_and_evaluate(tiny_config(digits_dir, **RESUME), tmp_path)
  ckpt = checkpointing.Checkpoints(tmp_path / 'checkpoints', read_only=True)
  assert list(ckpt.manager.all_steps()) == [5]  # Step 10, not finite, was not saved.
  state, _ = ckpt.restore(step=5)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state['params']))


def test_a_run_that_diverges_before_its_first_checkpoint_is_not_told_to_resume(
  tmp_path, digits_dir, monkeypatch
):
  intercept_batches(monkeypatch, lambda step, batch: {**batch, 'image': batch['image'] * np.nan})
  message = r'loss is nan at step 5: no checkpoint was saved yet\. .* and run again\.$'
  with pytest.raises(trainer.TrainingDivergedError, match=message):
    trainer.train_and_evaluate(tiny_config(digits_dir, **RESUME), tmp_path)
