"""Fine-tuning: init_from (strict backbone, new classifier), frozen stages, the backbone's
learning rate, resume, bad sources; class names in the workdir; and predict."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import CLASSES, checkpoint_params, make_folder, restore_checkpoint, tiny_config

from repvgg_jax import checkpointing, predict, run_files
from repvgg_jax.interop import export
from repvgg_jax.model import create_model
from repvgg_jax.model.variants import Variant
from repvgg_jax.train import finetune, trainer

STEPS = {'num_train_steps': 4, 'checkpoint_every_steps': 2}


@pytest.fixture(scope='module')
def source(tmp_path_factory, digits_dir):
  """A tiny RepVGG trained on the digits (10 classes) for 4 steps."""
  workdir = tmp_path_factory.mktemp('source')
  trainer.train_and_evaluate(tiny_config(digits_dir, **STEPS), workdir)
  return workdir


@pytest.fixture(scope='module')
def images(tmp_path_factory):
  return make_folder(tmp_path_factory.mktemp('images'))


def folder_run(images, **overrides):
  """The tiny model fine-tuned on the 3-class image folder."""
  config = tiny_config(**{'dataset.name': 'folder', 'dataset.in_memory': False}, **overrides)
  config.dataset.data_dir = str(images)
  config.dataset.num_classes = 3
  config.batch_size = 6
  config.eval_batch_size = 9
  return config


def blocks(params):
  return {key: value for key, value in params.items() if key != 'linear'}


def assert_trees_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    np.testing.assert_array_equal(a, b)


def changed(actual, expected) -> bool:
  return any(
    not np.array_equal(a, b)
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True)
  )


def test_init_from_loads_every_weight_of_the_same_model(source, digits_dir, tmp_path, capfd):
  config = tiny_config(
    digits_dir, init_from=str(source), **STEPS, **{'optimizer.learning_rate': 0.0}
  )
  trainer.train_and_evaluate(config, tmp_path)
  err = capfd.readouterr().err
  assert 'its classifier included' in err
  assert re.search(r'step 4: eval top-1 .*%\), top-5 [0-9.]+%, loss [0-9.]+\n', err), err
  assert_trees_equal(checkpoint_params(tmp_path, 2)[0], checkpoint_params(source)[0])


def test_another_number_of_classes_gets_a_new_classifier(source, images, tmp_path, capfd):
  config = folder_run(images, init_from=str(source), **{'optimizer.learning_rate': 0.0})
  summary = trainer.train_and_evaluate(config, tmp_path)
  err = capfd.readouterr().err
  assert 'the classifier starts from random weights: the source has 10 classes, the config 3' in err
  assert re.search(r'step 6: eval top-1 .*%\), loss [0-9.]+\n', err) and 'top-5' not in err, err
  params, meta = checkpoint_params(tmp_path)
  assert_trees_equal(blocks(params), blocks(checkpoint_params(source)[0]))
  assert params['linear']['kernel'].shape[-1] == 3 and summary['steps'] == 6
  assert meta['classes'] == list(CLASSES)
  assert json.loads((tmp_path / run_files.CLASSES_FILE).read_text()) == list(CLASSES)


def test_a_source_of_other_class_names_gets_a_new_classifier(fine_tuned, tmp_path, capfd):
  """The same count, other names: the source's outputs mean other classes. Its
  checkpoints copied out of their workdir still say so (their metadata)."""
  other = make_folder(tmp_path / 'other', classes=('ant', 'bee', 'cow'))
  alone = tmp_path / 'alone'
  shutil.copytree(fine_tuned / 'checkpoints', alone)
  config = folder_run(other, init_from=str(alone), **STEPS, **{'optimizer.learning_rate': 0.0})
  trainer.train_and_evaluate(config, tmp_path / 'run')
  assert (
    'the classifier starts from random weights: the source was trained on other classes '
    "(output 0 is 'cat' there, 'ant' here)."
  ) in capfd.readouterr().err
  params, source = checkpoint_params(tmp_path / 'run')[0], checkpoint_params(fine_tuned)[0]
  assert_trees_equal(blocks(params), blocks(source))
  assert changed(params['linear'], source['linear'])
  # The same names in the same order keep it.
  variables = {'params': params, 'batch_stats': _training_state(tmp_path / 'run')['batch_stats']}
  _, line = finetune.initial_variables(
    folder_run(other, init_from=str(fine_tuned)), variables, CLASSES
  )
  assert line.endswith('its classifier included.'), line


def test_frozen_stages_keep_weights_and_statistics(source, images, tmp_path):
  config = folder_run(images, init_from=str(source), freeze_stages=2)
  trainer.train_and_evaluate(config, tmp_path)
  start, ckpt = _training_state(source), _training_state(tmp_path / 'checkpoints')
  for part in ('params', 'batch_stats'):
    for key in start[part]:
      frozen = key.startswith(('stage0_', 'stage1_'))
      if key == 'linear':
        continue
      if frozen:
        assert_trees_equal(ckpt[part][key], start[part][key])
      else:
        assert changed(ckpt[part][key], start[part][key]), (part, key)


def test_frozen_stages_get_no_gradient_and_no_backward_pass():
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))

  # Stage 0 and stage 1's two blocks, frozen, as in A0; one block in each later stage.
  variant = Variant('RepVGG-A0-short', (2, 1, 1, 1), (0.25, 0.25))
  variables = jax.jit(create_model(variant, num_classes=10).init)(jax.random.key(1), images)
  params = variables['params']

  def gradient(frozen_stages):
    model = create_model(variant, num_classes=10, frozen_stages=frozen_stages)

    def loss(params):
      logits, _ = model.apply(
        {**variables, 'params': params}, images, train=True, mutable=['batch_stats']
      )
      return jnp.sum(logits**2)

    return jax.grad(loss)

  grad = gradient(2)
  for key, leaves in jax.jit(grad)(params).items():
    frozen = key.startswith(('stage0_', 'stage1_'))
    assert all(bool(jnp.all(leaf == 0)) == frozen for leaf in jax.tree.leaves(leaves)), key
  convolutions = lambda fn: str(jax.make_jaxpr(fn)(params)).count('conv_general_dilated')
  # Stages 0-1 hold 3 of the 6 blocks, a 3x3 and a 1x1 convolution each: the
  # backward pass drops their 6 weight gradients, the 4 input gradients of stage 1's
  # and the 2 of the first trained block (the first block's were never computed).
  assert convolutions(grad) == convolutions(gradient(0)) - 12


def _training_state(directory):
  path = directory / 'checkpoints' if (directory / 'checkpoints').is_dir() else directory
  return restore_checkpoint(path)[0]


def test_a_zero_backbone_learning_rate_trains_the_classifier_only(source, images, tmp_path):
  config = folder_run(images, init_from=str(source), **{'optimizer.backbone_lr_multiplier': 0.0})
  trainer.train_and_evaluate(config, tmp_path)
  params = checkpoint_params(tmp_path)[0]
  assert_trees_equal(blocks(params), blocks(checkpoint_params(source)[0]))
  assert changed(params['linear'], checkpoint_params(tmp_path, 2)[0]['linear'])


def test_a_resumed_run_keeps_its_own_weights(source, digits_dir, tmp_path, capfd, monkeypatch):
  config = tiny_config(digits_dir, init_from=str(source), freeze_stages=2, **STEPS)
  trainer.train_and_evaluate(config, tmp_path)
  first = checkpoint_params(tmp_path)[0]
  capfd.readouterr()

  def read_again(*args):
    raise AssertionError('a resumed run read init_from again')

  monkeypatch.setattr(finetune, 'initial_variables', read_again)
  config.num_train_steps = 6  # The same command, longer: init_from is not read again.
  trainer.train_and_evaluate(config, tmp_path)
  assert 'Initialised' not in capfd.readouterr().err
  assert changed(checkpoint_params(tmp_path)[0], first)
  assert checkpoint_params(tmp_path)[1]['step'] == 6
  config.num_train_steps, config.init_from = 8, None  # Not needed, even with frozen stages.
  trainer.train_and_evaluate(config, tmp_path)
  assert checkpoint_params(tmp_path)[1]['step'] == 8
  assert run_files.read_config(tmp_path)['init_from'] == str(source)  # The record keeps it.


@pytest.mark.parametrize(
  'overrides, message',
  [
    ({'init_from': 'nowhere'}, 'init_from: No weights at nowhere'),
    (
      {'model.width_multipliers': (0.5, 0.5)},
      r'init_from: The weights of .* do not fit the RepVGG at the top of the tree',
    ),
    ({'freeze_stages': 2, 'init_from': None}, 'freeze_stages=2 would keep randomly initialised'),
    ({'freeze_stages': 6}, 'freeze_stages must be from 0 to 5'),
    ({'optimizer.backbone_lr_multiplier': -1.0}, 'backbone_lr_multiplier must be >= 0'),
    ({'optimizer.bias_lr_multiplier': -2.0}, 'bias_lr_multiplier must be >= 0, got -2.0'),
  ],
  ids=[
    'missing',
    'other architecture',
    'frozen random',
    'too many stages',
    'negative rate',
    'negative bias rate',
  ],
)
def test_bad_fine_tuning_fails_before_training(source, images, tmp_path, overrides, message):
  config = folder_run(images, init_from=str(source))
  for key, value in overrides.items():
    *parents, leaf = key.split('.')
    target = config
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  with pytest.raises(trainer.ConfigError, match=message) as error:
    trainer.train_and_evaluate(config, tmp_path / 'runs' / 'run')
  assert '\n' not in str(error.value)
  # Refused before or after it was made: none left, nor the folder made for it.
  assert not (tmp_path / 'runs').exists()


def test_a_fused_model_is_refused_with_advice_for_a_run(source, images, tmp_path):
  config = folder_run(images, init_from=str(source / 'deploy'))
  message = (
    r"holds fused \(deploy\) weights, .*: give a run's workdir or checkpoints/ \(not deploy/\)"
  )
  with pytest.raises(trainer.ConfigError, match=message):
    trainer.train_and_evaluate(config, tmp_path)


def test_weights_of_another_variant_are_named(images, tmp_path):
  model = create_model('RepVGG-A0', num_classes=10)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  ckpt = checkpointing.Checkpoints(tmp_path / 'a0')
  ckpt.save(0, dict(variables), {'model': 'RepVGG-A0'})
  ckpt.wait()
  ckpt.close()
  config = folder_run(images, init_from=str(tmp_path / 'a0'))
  config.model.name, config.model.num_blocks, config.model.width_multipliers = 'A1', None, None
  message = 'holds RepVGG-A0, but the config trains RepVGG-A1: set --config.model.name=RepVGG-A0'
  with pytest.raises(trainer.ConfigError, match=message):
    trainer.train_and_evaluate(config, tmp_path / 'run')


def test_resuming_with_other_settings_or_classes_is_refused_and_keeps_the_run(
  source, images, tmp_path
):
  trainer.train_and_evaluate(folder_run(images, init_from=str(source), **STEPS), tmp_path)
  kept = sorted(p.name for p in (tmp_path / 'checkpoints').iterdir())
  changes = [
    ({'freeze_stages': 1}, 'was trained with freeze_stages=0, the config has 1'),
    ({'optimizer.backbone_lr_multiplier': 0.5}, 'backbone_lr_multiplier=1.0, the config has 0.5'),
    # Runs before the field existed had 1.0; the ImageNet configs now have 2.0.
    (
      {'optimizer.bias_lr_multiplier': 2.0},
      'bias_lr_multiplier=1.0, the config has 2.0: resume it with '
      '--config.optimizer.bias_lr_multiplier=1.0',
    ),
  ]
  for overrides, message in changes:
    with pytest.raises(trainer.ConfigError, match=message) as error:
      trainer.train_and_evaluate(folder_run(images, init_from=str(source), **overrides), tmp_path)
    assert str(error.value).endswith('--config.init_from=this workdir.')  # Its own fix alone.
  renamed = tmp_path / 'renamed'
  shutil.copytree(images, renamed)
  for split in ('train', 'val'):
    (renamed / split / 'fox').rename(renamed / split / 'wolf')
  with pytest.raises(trainer.ConfigError, match='other class names than the dataset has now'):
    trainer.train_and_evaluate(folder_run(renamed, init_from=str(source), **STEPS), tmp_path)
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == kept  # None moved aside.


@pytest.fixture(scope='module')
def fine_tuned(tmp_path_factory, source, images):
  workdir = tmp_path_factory.mktemp('fine_tuned')
  trainer.train_and_evaluate(folder_run(images, init_from=str(source)), workdir)
  return workdir


def _model_probabilities(workdir, config, paths):
  """The fused model's softmax on ``paths``, fed as the evaluation feeds them."""
  state, _ = checkpointing.Checkpoints(workdir / 'deploy', read_only=True).restore()
  model = trainer.build_model(config, deploy=True)
  pixels = predict.preprocess(paths, config.dataset.image_size, config.dataset.eval_preprocess)
  return np.asarray(jax.nn.softmax(model.apply({'params': state['params']}, pixels)))


def test_predict_gives_the_fused_models_probabilities_by_class_name(fine_tuned, images, capsys):
  config = folder_run(images)
  paths = sorted(str(p) for p in (images / 'val').rglob('*.*'))
  expected = _model_probabilities(fine_tuned, config, paths)
  assert predict.main([str(fine_tuned), *paths, '--json', '--top', '3']) == 0
  results = json.loads(capsys.readouterr().out)
  assert [r['image'] for r in results] == paths
  for result, probabilities in zip(results, expected, strict=True):
    ranked = np.argsort(-probabilities, kind='stable')
    assert [c['class'] for c in result['top']] == [CLASSES[i] for i in ranked]
    got = [c['probability'] for c in result['top']]
    np.testing.assert_allclose(got, probabilities[ranked], rtol=1e-5, atol=1e-6)
  assert predict.main([str(fine_tuned), paths[0], '--top', '2']) == 0
  line = capsys.readouterr().out.strip()
  assert line.startswith(f'{paths[0]}: ') and line.count('%') == 2


def assert_same_predictions(results, reference):
  for result, expected in zip(results, reference, strict=True):
    assert [c['class'] for c in result['top']] == [c['class'] for c in expected['top']]
    np.testing.assert_allclose(
      [c['probability'] for c in result['top']],
      [c['probability'] for c in expected['top']],
      atol=1e-5,
    )


def test_predict_reads_checkpoints_and_exports_alike(fine_tuned, images, tmp_path):
  paths = sorted(str(p) for p in (images / 'val').rglob('*.png'))[:4]
  reference = predict.predict(fine_tuned, paths)
  config = folder_run(images)
  deploy = _training_state(fine_tuned / 'deploy')  # convert export takes the 13 variants only.
  meta = {'model': 'tiny', 'num_classes': 3, 'classes': CLASSES, 'eval_preprocess': 'resize'}
  model = trainer.build_model(config, deploy=True)
  export.write_export(tmp_path / 'export', model, deploy, 32, meta, formats=('jax',))
  for source in (fine_tuned / 'deploy', fine_tuned / 'checkpoints', tmp_path / 'export'):
    results = predict.predict(source, paths)
    assert_same_predictions(results, reference)


def test_predict_feeds_a_checkpoint_moved_out_of_its_workdir_as_it_was_trained(
  fine_tuned, images, tmp_path, capsys, monkeypatch
):
  """A training checkpoint records its image size and preprocessing; one that records
  none (written before it did) is refused unless they are given, never fed at 224."""
  paths = sorted(str(p) for p in (images / 'val').rglob('*.png'))[:4]
  reference = predict.predict(fine_tuned, paths)
  # Without its config.json, the network is named by its shapes; the tiny one has no name.
  deploy_model = trainer.build_model(folder_run(images), deploy=True)
  monkeypatch.setattr(predict, '_deploy_model', lambda path, params, run: deploy_model)
  ckpt = checkpointing.Checkpoints(fine_tuned / 'checkpoints', read_only=True)
  step = ckpt.latest_step()
  state, meta = ckpt.restore()
  ckpt.close()
  config = folder_run(images)
  assert (meta['image_size'], meta['eval_preprocess']) == (32, config.dataset.eval_preprocess)
  moved = tmp_path / 'moved'
  shutil.copytree(fine_tuned / 'checkpoints' / str(step), moved / str(step))
  old = tmp_path / 'old'
  # As written before ebd9b3d, or before the run's length and order were recorded.
  newer = ('image_size', 'eval_preprocess', 'total_steps', 'batch_size', 'seed')
  unrecorded = {k: v for k, v in meta.items() if k not in newer}
  written = checkpointing.Checkpoints(old)
  written.save(step, state, unrecorded)
  written.close()
  feeding = ['--image-size', '32', '--eval-preprocess', config.dataset.eval_preprocess]
  for source, argv in ((moved, []), (old, feeding)):
    assert predict.main([str(source), *paths, '--json', *argv]) == 0
    results = json.loads(capsys.readouterr().out)
    assert_same_predictions(results, reference)
  wrong = 'resize_crop' if config.dataset.eval_preprocess != 'resize_crop' else 'resize'
  cases = [
    ([str(old), paths[0]], 'records no image size or eval preprocessing, and no config.json'),
    ([str(moved), paths[0], '--image-size', '224'], 'image_size 32, not 224: leave --image-size'),
    ([str(fine_tuned), paths[0], '--eval-preprocess', wrong], 'leave --eval-preprocess out'),
    ([str(old), paths[0], '--image-size', '0'], 'The image size must be positive, got 0.'),
    ([str(old), paths[0], '--eval-preprocess', 'crop'], "Unknown eval preprocessing 'crop'"),
  ]
  for argv, message in cases:
    assert predict.main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and err.count('\n') == 1, err


def test_predict_names_a_damaged_export_or_classes_file(fine_tuned, images, tmp_path, capsys):
  config = folder_run(images)
  model = trainer.build_model(config, deploy=True)
  deploy = _training_state(fine_tuned / 'deploy')
  good = tmp_path / 'export'
  meta = {'model': 'tiny', 'num_classes': 3, 'classes': CLASSES, 'eval_preprocess': 'resize'}
  export.write_export(good, model, deploy, 32, meta, formats=('jax',))
  image = str(next((images / 'val').rglob('*.png')))
  damages = {
    'empty artifact': (export.JAX_FILE, b''),
    'cut artifact': (export.JAX_FILE, (good / export.JAX_FILE).read_bytes()[:1000]),
    'record not JSON': (export.META_FILE, b'{'),
    'record a list': (export.META_FILE, b'[]'),
  }
  messages = {
    'empty artifact': f'{export.JAX_FILE} cannot be read',
    'cut artifact': f'{export.JAX_FILE} cannot be read',
    'record not JSON': f'{export.META_FILE} is not JSON',
    'record a list': f"{export.META_FILE} is not an export's record",
  }
  for name, (file, content) in damages.items():
    damaged = tmp_path / name.replace(' ', '_')
    shutil.copytree(good, damaged)
    (damaged / file).write_bytes(content)
    assert predict.main([str(damaged), image]) == 1
    err = capsys.readouterr().err
    assert messages[name] in err and 'export again' in err and err.count('\n') == 1, err
  # The artifact's own input size wins over a record that says another.
  resized = tmp_path / 'resized'
  shutil.copytree(good, resized)
  record = json.loads((resized / export.META_FILE).read_text())
  (resized / export.META_FILE).write_text(json.dumps({**record, 'image_size': 224}))
  assert predict.load(resized).image_size == 32
  # A damaged classes.json: unused where the checkpoint records the names, else named.
  workdir = tmp_path / 'workdir'
  shutil.copytree(fine_tuned, workdir)
  (workdir / run_files.CLASSES_FILE).write_text('{')
  assert predict.load(workdir).classes == tuple(CLASSES)
  run = run_files.training_run(workdir)
  with pytest.raises(run_files.RunFileError) as error:
    run_files.feeding({}, run)
  assert str(error.value) == (
    f'{workdir / run_files.CLASSES_FILE} is not a list of class names (not JSON: Expecting '
    'property name enclosed in double quotes: line 1 column 2 (char 1)): restore it, or delete '
    'it to name the classes by index.'
  )
  (workdir / run_files.CLASSES_FILE).write_text('{"0": "cat"}')
  with pytest.raises(run_files.RunFileError, match=r'\(a JSON dict\): restore it'):
    run_files.feeding({}, run)


def test_the_command_prints_one_line_and_no_tensorflow_log_for_a_corrupt_image(
  fine_tuned, images, tmp_path
):
  corrupt = tmp_path / 'corrupt.png'
  corrupt_bytes = bytearray(next((images / 'val').rglob('*.png')).read_bytes())
  corrupt_bytes[40:60] = b'\0' * 20
  corrupt.write_bytes(bytes(corrupt_bytes))
  env = {k: v for k, v in os.environ.items() if k != 'TF_CPP_MIN_LOG_LEVEL'}  # As a user's.
  command = [sys.executable, '-m', 'repvgg_jax.predict', str(fine_tuned), str(corrupt)]
  done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 1
  assert done.stderr == f'error: {corrupt} cannot be decoded ({done.stderr.split("(", 1)[1]}'
  assert done.stderr.count('\n') == 1 and done.stderr.endswith('): replace it.\n'), done.stderr


def test_predict_names_what_it_cannot_use(fine_tuned, images, tmp_path, capsys):
  text = tmp_path / 'notes.png'
  text.write_text('not an image')
  good = str(next((images / 'val').rglob('*.png')))
  corrupt = tmp_path / 'corrupt.png'
  corrupt_bytes = bytearray(pathlib.Path(good).read_bytes())
  corrupt_bytes[40:60] = b'\0' * 20  # Whole at both ends: only decoding tells.
  corrupt.write_bytes(bytes(corrupt_bytes))
  step = next((fine_tuned / 'deploy').iterdir())
  renamed = tmp_path / 'mymodel'
  shutil.copytree(step, renamed)
  cases = [
    ([str(fine_tuned), str(corrupt)], 'corrupt.png cannot be decoded ('),
    (
      [str(renamed), good],
      f'mymodel is one step of a checkpoint, but its folder is not named '
      f'by its step: rename it to {step.name}, its step',
    ),
    ([str(tmp_path / 'nothing'), good], 'No checkpoint, workdir or export at'),
    ([str(fine_tuned), str(tmp_path / 'missing.png')], 'missing.png does not exist'),
    ([str(fine_tuned), str(text)], 'notes.png is neither a JPEG nor a PNG'),
    ([str(fine_tuned), str(images / 'val')], 'val is a directory: give its images, e.g.'),
  ]
  for argv, message in cases:
    assert predict.main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and err.count('\n') == 1, err
    assert '{{' not in err and '[Op:' not in err, err  # TensorFlow's wrapping, stripped.
