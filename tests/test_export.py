"""python -m repvgg_jax.convert export: jax.export, TF SavedModel and ONNX artifacts
that reload and compute what the trained model computes."""

import json
import os
import shutil

import jax
import numpy as np
import onnxruntime
import pytest
from helpers import random_variables, relative_error, run_in_repo, tiny_config

import repvgg_jax
from repvgg_jax import run_files
from repvgg_jax.interop import checkpoint_export, checkpoint_io, convert, export
from repvgg_jax.model import model_from_config
from repvgg_jax.train import trainer


@pytest.fixture(scope='module')
def training_checkpoint(tmp_path_factory):
  """A training-time A0 checkpoint (10 classes, 32x32), random non-trivial BN state."""
  model = repvgg_jax.create_model('A0', num_classes=10)
  variables = random_variables(model, (1, 32, 32, 3), seed=3)
  path = tmp_path_factory.mktemp('ckpt') / 'a0'
  convert._save(
    path, variables, {'model': 'RepVGG-A0', 'deploy': False, 'num_classes': 10, 'image_size': 32}
  )
  return path, model, variables


def test_export_reloads_in_jax_tensorflow_and_onnxruntime(tmp_path, training_checkpoint, capsys):
  path, model, variables = training_checkpoint
  out = tmp_path / 'serving'
  assert convert.main(['export', str(path), str(out)]) == 0
  printed = capsys.readouterr().out
  assert 'model.jax_export, saved_model, model.onnx of the deploy RepVGG-A0 (10 classes, 32x32' in (
    printed
  )
  meta = json.loads((out / 'export.json').read_text())
  assert meta['model'] == 'RepVGG-A0' and meta['image_size'] == 32
  assert meta['fused_from_training_checkpoint']
  assert set(meta['verify']) == {'jax', 'tf', 'onnx', 'fused_vs_training'}
  assert max(meta['verify'].values()) <= 1e-5
  assert meta['onnx'] == {'opset': 17, 'ir_version': 8, 'input': 'images', 'checker': 'passed'}
  assert meta['preprocess'] == {
    'scale': '1/255',
    'mean': [0.485, 0.456, 0.406],
    'std': [0.229, 0.224, 0.225],
  }

  # Reloaded independently of the converter, at batch sizes other than the verification's.
  serve_jax = export.load_jax_export(out / 'model.jax_export')
  serve_tf = export.load_saved_model(out / 'saved_model')
  onnx_file = str(out / 'model.onnx')
  session = onnxruntime.InferenceSession(onnx_file, providers=['CPUExecutionProvider'])
  images = np.random.default_rng(5).standard_normal((5, 32, 32, 3), np.float32)
  expected = jax.jit(model.apply)(variables, images)  # Inference: each image on its own.
  for batch in (1, 5):
    assert relative_error(serve_jax(images[:batch]), expected[:batch]) <= 1e-5
    assert relative_error(serve_tf(images[:batch]), expected[:batch]) <= 1e-5
    (logits,) = session.run(['logits'], {'images': images[:batch]})
    assert relative_error(logits, expected[:batch]) <= 1e-5


def test_an_export_to_jax_and_onnx_does_not_load_tensorflow(tmp_path, training_checkpoint):
  """Only the SavedModel needs TensorFlow: an export without it skips its import (seconds,
  and hundreds of MiB), preprocessing and verification included."""
  out = tmp_path / 'serving'
  command = ['export', str(training_checkpoint[0]), str(out), '--formats', 'jax,onnx']
  proc = run_in_repo('-X', 'importtime', '-m', 'repvgg_jax.convert', *command)
  assert proc.returncode == 0, proc.stderr[-2000:]
  imported = [line.rsplit('|', 1)[-1].strip() for line in proc.stderr.splitlines()]
  assert 'onnx' in imported and 'tensorflow' not in imported
  meta = json.loads((out / 'export.json').read_text())
  assert set(meta['verify']) == {'jax', 'onnx', 'fused_vs_training'}
  assert meta['preprocess']['mean'] == [0.485, 0.456, 0.406]


def test_export_refuses_bad_requests(tmp_path, training_checkpoint, capsys):
  path, _, _ = training_checkpoint
  (tmp_path / 'full').mkdir()
  (tmp_path / 'full' / 'keep.txt').write_text('user data')
  assert convert.main(['export', str(path), str(tmp_path / 'full')]) == 1
  assert 'is not empty' in capsys.readouterr().err
  assert (tmp_path / 'full' / 'keep.txt').read_text() == 'user data'

  assert convert.main(['export', str(path), str(tmp_path / 'a'), '--formats', 'onnx,tflite']) == 1
  assert "Unknown export formats ['tflite']; choose from ('jax', 'tf', 'onnx')" in (
    capsys.readouterr().err
  )

  assert convert.main(['export', str(path), str(tmp_path / 'b'), '--model', 'B0']) == 1
  assert 'RepVGG-B0' in capsys.readouterr().err

  assert convert.main(['export', str(tmp_path / 'nothing'), str(tmp_path / 'c')]) == 1
  assert 'No checkpoint at' in capsys.readouterr().err

  for size in ('0', '-8'):  # 0 was taken for "the checkpoint's"; -8 failed at verification.
    assert convert.main(['export', str(path), str(tmp_path / 'd'), '--image-size', size]) == 1
    assert capsys.readouterr().err == (
      f'error: The image size must be a positive int, got {size}: leave --image-size out for '
      "the checkpoint's.\n"
    )
  assert not any((tmp_path / name).exists() for name in 'abcd')


def test_an_export_that_fails_its_check_leaves_nothing(
  tmp_path, training_checkpoint, monkeypatch, capsys
):
  """As onnxruntime refusing the file: the directory, checked before it is renamed
  into place, never appears half-verified."""

  def refuse(path):
    raise RuntimeError('Unsupported model IR version')

  monkeypatch.setattr(checkpoint_export.onnx_export, 'load_onnx', refuse)
  out = tmp_path / 'out'
  assert convert.main(['export', str(training_checkpoint[0]), str(out), '--formats', 'onnx']) == 1
  assert capsys.readouterr().err == (
    'error: The onnx artifact does not run here (Unsupported model IR version); nothing was '
    'written. Update that runtime, or pass --no-verify to write it unchecked.\n'
  )
  assert list(tmp_path.iterdir()) == []


def test_an_output_in_a_folder_that_cannot_be_written_is_refused(
  tmp_path, training_checkpoint, monkeypatch
):
  locked = tmp_path / 'locked'
  locked.mkdir(mode=0o555)
  access = os.access  # Root writes into 0o555 folders; a read-only mount refuses even root.
  monkeypatch.setattr(os, 'access', lambda path, mode: path != locked and access(path, mode))
  with pytest.raises(convert.ConversionError, match=f'{locked} is not writable: choose'):
    checkpoint_export.export_checkpoint(training_checkpoint[0], locked / 'new' / 'out')
  assert list(locked.iterdir()) == []


def test_an_artifact_for_another_image_size_says_so(tmp_path, training_checkpoint):
  path, _, _ = training_checkpoint
  meta = checkpoint_export.export_checkpoint(path, tmp_path / 'out', formats=('jax',), verify=False)
  assert meta['artifacts'] == {'jax': 'model.jax_export'}
  serve = export.load_jax_export(tmp_path / 'out')
  with pytest.raises(ValueError, match='32'):
    serve(np.zeros((2, 64, 64, 3), np.float32))


def test_a_scaled_variant_exports_as_its_run_built_it(tmp_path, digits_dir):
  """The tiny test model (A0 with 1 block per stage, a quarter as wide) is no
  variant of the paper: its run's config.json says what it is."""
  workdir = tmp_path / 'run'
  config = tiny_config(digits_dir, num_train_steps=2, checkpoint_every_steps=2)
  trainer.train_and_evaluate(config, workdir)
  images = np.random.default_rng(7).standard_normal((3, 32, 32, 3), np.float32)
  deploy_model = model_from_config(config, deploy=True)
  for source, out in ((workdir, 'deploy'), (workdir / 'checkpoints', 'training')):
    meta = checkpoint_export.export_checkpoint(source, tmp_path / out, formats=('jax', 'onnx'))
    assert meta['model'] == 'RepVGG-A0-custom' and meta['image_size'] == 32
    assert meta['classes'] == [str(digit) for digit in range(10)]
    assert max(meta['verify'].values()) <= 1e-5, meta['verify']
    assert set(meta['verify']) == {'jax', 'onnx'} | (
      {'fused_vs_training'} if out == 'training' else set()
    )
  variables = checkpoint_io.fused_variables(workdir)[0]
  expected = deploy_model.apply(variables, images)
  assert relative_error(export.load_jax_export(tmp_path / 'deploy')(images), expected) <= 1e-5

  # A config.json that no longer describes the checkpoint is refused, before any artifact.
  config_file = workdir / run_files.CONFIG_FILE
  original = config_file.read_text()
  changes = [
    ('num_blocks', [2, 1, 1, 1], workdir, 'does not hold the RepVGG-A0-custom that'),
    # The same fused shapes: the training checkpoint's own shapes tell.
    ('branches', ['conv3x3'], workdir / 'checkpoints', 'does not hold the RepVGG-A0-custom'),
    ('name', 'QARepVGG-A0', workdir, 'holds a RepVGG-A0, but .* describes a QARepVGG-A0'),
  ]
  for index, (key, value, source, message) in enumerate(changes):
    changed = json.loads(original)
    changed['model'][key] = value
    config_file.write_text(json.dumps(changed))
    with pytest.raises(convert.ConversionError, match=message):
      checkpoint_export.export_checkpoint(source, tmp_path / f'changed{index}')
    assert not (tmp_path / f'changed{index}').exists()


def test_a_named_variant_still_takes_its_runs_image_size_and_classes(tmp_path, training_checkpoint):
  """``--model`` names the variant; the training run around the checkpoint still says
  what a checkpoint does not record (this one: the image size, preprocessing and classes).
  A run of another variant or number of classes says nothing."""
  _, model, variables = training_checkpoint
  run = tmp_path / 'run'
  convert._save(run / 'checkpoints', variables, {'model': 'RepVGG-A0', 'deploy': False})
  run_config = {
    'model': {'name': 'RepVGG-A0'},
    'dataset': {'image_size': 48, 'eval_preprocess': 'resize', 'num_classes': 10},
  }
  (run / run_files.CONFIG_FILE).write_text(json.dumps(run_config))
  classes = [f'class {index}' for index in range(10)]
  (run / run_files.CLASSES_FILE).write_text(json.dumps(classes))
  meta = checkpoint_export.export_checkpoint(
    run / 'checkpoints', tmp_path / 'out', model='A0', formats=('jax',), verify=False
  )
  assert (meta['model'], meta['image_size']) == ('RepVGG-A0', 48)
  assert meta['eval_preprocess'] == 'resize' and meta['classes'] == classes
  images = np.random.default_rng(9).standard_normal((2, 48, 48, 3), np.float32)
  expected = model.apply(variables, images)
  assert relative_error(export.load_jax_export(tmp_path / 'out')(images), expected) <= 1e-5

  for index, (key, value) in enumerate([('num_classes', 20), ('name', 'RepVGG-B0')]):
    other = json.loads(json.dumps(run_config))
    other['model' if key == 'name' else 'dataset'][key] = value
    (run / run_files.CONFIG_FILE).write_text(json.dumps(other))
    meta = checkpoint_export.export_checkpoint(
      run / 'checkpoints', tmp_path / f'other{index}', model='A0', formats=('jax',), verify=False
    )
    assert meta['image_size'] == 224 and 'classes' not in meta and 'eval_preprocess' not in meta


def test_a_grey_backbone_cut_short_fuses_and_exports_its_stages(tmp_path, capsys):
  """A backbone of 1-channel images up to stage 2, outside any run: `convert fuse`
  with --model and `convert export` in every format; each artifact (the SavedModel's
  loader included) gives the three stage outputs in order. `predict` refuses it."""
  from repvgg_jax import predict

  backbone = repvgg_jax.create_model('A0', num_classes=0, in_channels=1, out_indices=(0, 1, 2))
  variables = random_variables(backbone, (1, 32, 32, 1), seed=4)
  convert._save(tmp_path / 'ckpt', variables, {'deploy': False, 'num_classes': 0})
  fused = ['fuse', str(tmp_path / 'ckpt'), str(tmp_path / 'fused'), '--model', 'A0']
  assert convert.main(fused) == 0, capsys.readouterr().err
  out = tmp_path / 'serving'
  assert convert.main(['export', str(tmp_path / 'fused'), str(out), '--image-size', '32']) == 0
  meta = json.loads((out / 'export.json').read_text())
  assert set(meta['verify']) == {'jax', 'tf', 'onnx'} and max(meta['verify'].values()) <= 1e-5
  images = np.random.default_rng(2).standard_normal((2, 32, 32, 1), np.float32)
  expected = backbone.apply(variables, images)
  outputs = export.load_saved_model(out)(images)
  assert [o.shape for o in outputs] == [(2, 16, 16, 48), (2, 8, 8, 48), (2, 4, 4, 96)]
  for got, want in zip(outputs, expected, strict=True):
    assert relative_error(got, want) <= 1e-5
  with pytest.raises(predict.PredictError, match='a backbone without a classifier'):
    predict.load(out)


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='cuda is this backend')
def test_an_artifact_for_another_backend_is_written_and_left_unverified(
  tmp_path, training_checkpoint, capsys
):
  path, _, _ = training_checkpoint
  out = tmp_path / 'cuda'
  command = ['export', str(path), str(out), '--formats', 'jax,onnx', '--platforms', 'cuda']
  assert convert.main(command) == 0, capsys.readouterr().err
  meta = json.loads((out / 'export.json').read_text())
  assert set(meta['verify']) == {'onnx', 'fused_vs_training'}
  assert max(meta['verify'].values()) <= 1e-5
  why = 'lowered for cuda; this machine runs it on cpu: load it where it runs'
  assert meta['not_verified'] == {'jax': why}
  assert 'Not verified, jax: lowered for cuda' in capsys.readouterr().out
  from repvgg_jax import predict

  with pytest.raises(predict.PredictError, match='exported for cuda, and this machine runs cpu'):
    predict.load(out)


def test_a_fused_model_older_than_the_training_is_said_to_be(tmp_path, training_checkpoint, capsys):
  """A run stopped after its last checkpoint but before fusing: deploy/ is read, and said
  to be older, with the fix."""
  path, _, variables = training_checkpoint
  workdir = tmp_path / 'run'
  shutil.copytree(path, workdir / 'checkpoints')
  fused = repvgg_jax.fuse_params(variables)
  convert._save(workdir / 'deploy', fused, {'model': 'RepVGG-A0', 'deploy': True})
  read, _ = checkpoint_io.restore(workdir)
  assert capsys.readouterr().err == ''  # Both of step 0.
  (workdir / 'checkpoints' / '0').rename(workdir / 'checkpoints' / '120')
  read, _ = checkpoint_io.restore(workdir)
  jax.tree.map(np.testing.assert_array_equal, read['params'], fused['params'])
  assert capsys.readouterr().err == (
    f'warning: {workdir / "deploy"} holds the fused model of step 0, but training went on to '
    'step 120: run its training command again to finish the run (and fuse it), or give '
    f'{workdir / "checkpoints"} for the newest weights.\n'
  )
