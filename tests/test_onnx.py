"""The ONNX graph of the deploy model: valid, dynamic in the batch, and equal to it."""

import jax
import numpy as np
import onnx
import onnxruntime
import pytest
from helpers import random_variables, relative_error

import repvgg_jax
from repvgg_jax.interop import checkpoint_export, convert, onnx_export


def run_onnx(path, images):
  session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
  return session.run(None, {'images': np.asarray(images, np.float32)})


@pytest.mark.parametrize('name,num_classes,size', [('A0', 10, 32), ('B1g4', 0, 40)])
def test_the_graph_computes_the_deploy_model(tmp_path, name, num_classes, size):
  model = repvgg_jax.create_model(name, num_classes=num_classes)
  variables = repvgg_jax.fuse_params(random_variables(model, (1, size, size, 3), seed=4))
  deploy = repvgg_jax.create_model(name, num_classes=num_classes, deploy=True)
  path = tmp_path / 'model.onnx'
  onnx_export.write_onnx(path, variables, size)
  graph = onnx.load(str(path))
  onnx.checker.check_model(graph, full_check=True)
  assert graph.opset_import[0].version >= 17
  assert graph.ir_version == 8  # Not the installed onnx's newest, which older runtimes refuse.
  (images,) = graph.graph.input
  dims = images.type.tensor_type.shape.dim
  assert images.name == 'images' and dims[0].dim_param == 'batch'
  assert [d.dim_value for d in dims[1:]] == [size, size, 3]
  ops = {node.op_type for node in graph.graph.node}
  assert ops <= {'Transpose', 'Conv', 'Relu', 'GlobalAveragePool', 'Flatten', 'Gemm'}
  x = np.random.default_rng(0).standard_normal((3, size, size, 3), np.float32)
  expected = jax.tree.leaves(deploy.apply(variables, x))
  for batch in (1, 3):
    actual = run_onnx(path, x[:batch])
    assert len(actual) == len(expected)  # Logits, or the five stage outputs.
    for got, want in zip(actual, expected, strict=True):
      assert got.shape == want[:batch].shape
      assert relative_error(got, want[:batch]) <= 1e-5
  loaded = onnx_export.load_onnx(tmp_path)
  assert relative_error(jax.tree.leaves(loaded(x))[0], expected[0]) <= 1e-5


def test_a_training_time_tree_is_refused(tmp_path):
  model = repvgg_jax.create_model('A0', num_classes=10)
  variables = random_variables(model, (1, 32, 32, 3))
  with pytest.raises(repvgg_jax.FusionError, match=r'needs fused variables: fuse_params'):
    onnx_export.write_onnx(tmp_path / 'model.onnx', variables, 32)
  assert not (tmp_path / 'model.onnx').exists()


def test_a_backbone_cut_short_exports_the_stages_it_holds(tmp_path):
  backbone = repvgg_jax.create_model('A0', num_classes=0, out_indices=(0, 2))
  variables = random_variables(backbone, (1, 32, 32, 3), seed=6)
  convert._save(tmp_path / 'ckpt', variables, {'model': 'RepVGG-A0', 'image_size': 32})
  meta = checkpoint_export.export_checkpoint(
    tmp_path / 'ckpt', tmp_path / 'out', formats=('jax', 'onnx')
  )
  assert max(meta['verify'].values()) <= 1e-5
  outputs = run_onnx(tmp_path / 'out' / 'model.onnx', np.zeros((2, 32, 32, 3), np.float32))
  assert [o.shape for o in outputs] == [(2, 16, 16, 48), (2, 8, 8, 48), (2, 4, 4, 96)]
