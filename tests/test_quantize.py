"""int8 post-training quantization with Qwix: the API, the saved int8 model, the
`convert quantize` command on a trained workdir, its export, and bad input."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_variables, relative_error, tiny_config

import repvgg_jax
from repvgg_jax import predict
from repvgg_jax.interop import convert, export
from repvgg_jax.interop import quantize as quant
from repvgg_jax.train import trainer


def images(seed, batch=8, size=32, channels=3):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((batch, size, size, channels)))


@pytest.fixture(scope='module')
def fused():
  """A fused QARepVGG-A0 (10 classes) with random non-trivial statistics."""
  model = repvgg_jax.create_model('QARepVGG-A0', num_classes=10)
  variables = repvgg_jax.fuse_params(random_variables(model, (1, 32, 32, 3), seed=4))
  return repvgg_jax.create_model('QARepVGG-A0', num_classes=10, deploy=True), variables


@pytest.mark.parametrize('mode', quant.MODES)
def test_int8_model_runs_int8_convolutions_close_to_float(fused, mode):
  model, variables = fused
  qmodel, qvariables = quant.quantize(model, variables, [images(s) for s in range(3)], mode)
  kernel = qvariables['params']['stage1_block1']['reparam']['kernel'].array
  assert kernel.qvalue.dtype == jnp.int8 and kernel.scale.shape == (1, 1, 1, 48)  # Per channel.
  x = images(10)
  expected = model.apply(variables, x)
  actual = jax.jit(qmodel.apply)(qvariables, x)
  assert 0 < relative_error(actual, expected) <= 0.2
  # Every convolution and the classifier multiply int8 by int8.
  hlo = jax.jit(qmodel.apply).lower(qvariables, x).as_text()
  int8_ops = re.findall(
    r'stablehlo\.(convolution|dot_general).*\(tensor<[^>]*xi8>, tensor<[^>]*xi8>', hlo
  )
  assert len(int8_ops) == 22 + 1


def test_saved_int8_model_reloads_without_float_weights(fused, tmp_path):
  model, variables = fused
  qmodel, qvariables = quant.quantize(model, variables, [images(1)])
  meta = {'model': 'QARepVGG-A0', 'num_classes': 10, 'in_channels': 3, 'mode': 'static'}
  quant.save_int8(tmp_path / 'q', qvariables, meta)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['q']  # No staging directory left.
  loaded_model, loaded, loaded_meta = quant.load_int8(tmp_path / 'q')
  assert loaded_meta == meta
  x = images(2)
  np.testing.assert_array_equal(loaded_model.apply(loaded, x), qmodel.apply(qvariables, x))


@pytest.mark.parametrize('size', [32, 64])
def test_int8_jax_export_computes_what_quantize_evaluated(fused, size):
  """Its variables embedded, the int8 scale arithmetic is not folded at compile time
  (folded, it rounds otherwise: logits 6e-8 apart at 64x64): bitwise the jitted model."""
  model, variables = fused
  qmodel, qvariables = quant.quantize(model, variables, [images(s, 4, size) for s in range(2)])
  artifact = export.export_jax(qmodel, qvariables, size, fold_variables=False)
  x = images(10, 4, size)
  served = jax.export.deserialize(bytearray(artifact)).call(x)
  np.testing.assert_array_equal(served, jax.jit(qmodel.apply)(qvariables, x))


def test_bad_input_is_refused_in_one_line(fused):
  model, variables = fused
  training = random_variables(repvgg_jax.create_model('A0', num_classes=10), (1, 32, 32, 3))
  cases = [
    (lambda: quant.quantize(model, training, [images(0)]), 'fuse them first'),
    (
      lambda: quant.quantize(model, variables, [images(0)], 'int4'),
      "Unknown quantization mode 'int4'",
    ),
    (lambda: quant.quantize(model, variables, [images(0, channels=1)]), 'with 3 channels'),
    (
      lambda: quant.quantize(model, variables, [images(0, size=40)], image_size=32),
      'has 40x40 images; the model was trained at 32x32',
    ),
    (lambda: quant.quantize(model, variables, []), 'No calibration batch'),
  ]
  for call, message in cases:
    with pytest.raises(quant.QuantizationError, match=message) as error:
      call()
    assert '\n' not in str(error.value)


@pytest.fixture(scope='module')
def workdir(tmp_path_factory, digits_dir):
  """A tiny QARepVGG trained for a few steps on the digits."""
  path = tmp_path_factory.mktemp('qa')
  config = tiny_config(digits_dir, **{'model.name': 'QARepVGG-A0', 'num_train_steps': 4})
  trainer.train_and_evaluate(config, path)
  return path


def test_convert_quantize_a_workdir_then_export_it(workdir, tmp_path, capsys):
  out = tmp_path / 'int8'
  argv = ['quantize', str(workdir), str(out), '--calibration-batches', '2']
  assert convert.main(argv) == 0
  assert re.search(
    r'Wrote the int8 QARepVGG-A0 \(static ranges\) to .*: top-1', capsys.readouterr().out
  )
  meta = json.loads((out / 'quantize.json').read_text())
  assert meta['calibration_batches'] == 2 and meta['eval_examples'] == 360
  assert 0 <= meta['int8_top1'] <= 1 and 0 <= meta['fp32_top1'] <= 1
  assert meta['top1_drop'] == pytest.approx(meta['fp32_top1'] - meta['int8_top1'])
  assert 0 < meta['logit_relative_error'] < 1

  with pytest.raises(predict.PredictError, match=r'holds an int8 model: export it \(python -m'):
    predict.load(out)
  served = tmp_path / 'served'
  assert convert.main(['export', str(out), str(served), '--formats', 'onnx']) == 1
  assert 'int8 model exports with --formats jax only' in capsys.readouterr().err
  assert convert.main(['export', str(out), str(served)]) == 0
  exported = json.loads((served / 'export.json').read_text())
  # The artifact computes exactly what `quantize` evaluated (the jitted int8 model).
  assert exported['artifacts'] == {'jax': 'model.jax_export'} and exported['verify']['jax'] == 0
  # What predict needs to feed it and name its outputs, as the float export has.
  assert exported['eval_preprocess'] == 'resize' and exported['classes'] == [
    str(i) for i in range(10)
  ]
  qmodel, qvariables, _ = quant.load_int8(out)
  x = images(3)
  expected = jax.jit(qmodel.apply)(qvariables, x)
  np.testing.assert_array_equal(export.load_jax_export(served)(x), expected)


def test_convert_quantize_bad_input(workdir, tmp_path, capsys):
  (tmp_path / 'no_get_config.py').write_text('import ml_collections\n')
  (tmp_path / 'broken.py').write_text('def get_config(:\n')
  (tmp_path / 'wider.py').write_text(
    'import json\nimport ml_collections\n\n\ndef get_config():\n'
    f'  config = json.loads({(workdir / "config.json").read_text()!r})\n'
    "  config['model']['width_multipliers'] = [0.5, 0.5]\n"
    '  return ml_collections.ConfigDict(config)\n'
  )
  cases = [
    (workdir, ['--mode', 'fast'], "Unknown quantization mode 'fast'"),
    (workdir, ['--config', str(tmp_path / 'none.py')], 'No config file'),
    (workdir, ['--config', str(tmp_path / 'no_get_config.py')], "has no attribute 'get_config'"),
    (workdir, ['--config', str(tmp_path / 'broken.py')], 'does not load: SyntaxError'),
    (tmp_path / 'typo', [], f'No checkpoint at {tmp_path / "typo"}'),
    (workdir, ['--config', str(tmp_path / 'wider.py')], 'holds another architecture, not the'),
  ]
  for source, extra, message in cases:
    assert convert.main(['quantize', str(source), str(tmp_path / 'q'), *extra]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
  assert not (tmp_path / 'q').exists()
  # A checkpoint outside a workdir needs the config that names its dataset.
  lonely = tmp_path / 'deploy'
  (workdir / 'deploy').rename(lonely)
  try:
    assert convert.main(['quantize', str(lonely), str(tmp_path / 'q')]) == 1
    assert (
      'give the training config that names its dataset with --config' in capsys.readouterr().err
    )
  finally:
    lonely.rename(workdir / 'deploy')
