"""The deploy model as an ONNX graph, built from the fused parameters with ``onnx``.

The deploy RepVGG is a plain chain: per block a 3x3 convolution with bias and
a ReLU, then global average pooling and a dense layer. The graph says exactly
that (``Conv``, ``Relu``, ..., ``GlobalAveragePool``, ``Flatten``, ``Gemm``), so
onnxruntime, TensorRT, OpenVINO and the mobile runtimes each run it with their
own conv+bias+ReLU kernels. No tracing of JAX is involved.

The input ``images`` is float32 NHWC ``[batch, size, size, channels]``,
normalized as in training, like the other artifacts (a ``Transpose`` to NCHW
opens the graph). The
batch is dynamic. The file has IR version 8, the oldest opset 17 allows, so
that older runtimes read it too. The output is ``logits`` ``[batch, classes]``, or for a
backbone (``num_classes=0``) ``stage0``, ``stage1``, ... in NHWC, one for each
stage the tree holds.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from repvgg_jax.interop import torch_layout
from repvgg_jax.model import fusion, shapes, trees

OPSET = 17
# The oldest IR that opset 17 allows, not the installed onnx's newest: a runtime
# refuses a file of a newer IR than it knows (onnxruntime 1.20 reads up to 10).
IR_VERSION = 8
INPUT = 'images'
FILE = 'model.onnx'  # Its name in an export directory.


def deploy_graph(variables: Mapping[str, Any], image_size: int, name: str = 'repvgg'):
  """The `onnx.ModelProto` of the deploy model with ``variables`` (a fused tree)."""
  import onnx
  from onnx import TensorProto, helper

  params = variables['params']
  keys = trees.block_keys(params)
  if not keys or any(fusion.FUSED_KEY not in params[key] for key in keys):
    raise fusion.FusionError('An ONNX graph needs fused variables: fuse_params(variables) first.')
  blocks = shapes.architecture(params)
  nodes, weights = _block_nodes(params, keys, blocks)
  if 'linear' in params:
    head_nodes, head_weights, outputs = _classifier(params['linear'], keys[-1])
  else:
    head_nodes, head_weights, outputs = _stage_outputs(params, keys, image_size)
  images = helper.make_tensor_value_info(
    INPUT, TensorProto.FLOAT, ['batch', image_size, image_size, blocks[0].in_channels]
  )
  graph = helper.make_graph(
    nodes + head_nodes, name, [images], outputs, initializer=weights + head_weights
  )
  model = helper.make_model(
    graph,
    opset_imports=[helper.make_opsetid('', OPSET)],
    producer_name='repvgg_jax',
    ir_version=IR_VERSION,
  )
  onnx.checker.check_model(model, full_check=True)
  return model


def _block_nodes(params, keys, blocks):
  """The NHWC -> NCHW transpose, then per block its 3x3 ``Conv`` (bias, stride, groups)
  and ``Relu``, whose output is named after the block."""
  from onnx import helper, numpy_helper

  nodes = [helper.make_node('Transpose', [INPUT], ['nchw'], perm=[0, 3, 1, 2])]
  weights, x = [], 'nchw'
  for key, block in zip(keys, blocks, strict=True):
    conv = params[key][fusion.FUSED_KEY]
    kernel = torch_layout.conv_kernel_to_torch(np.asarray(conv['kernel']))  # OIHW.
    weights += [
      numpy_helper.from_array(_f32(kernel), f'{key}.w'),
      numpy_helper.from_array(_f32(conv['bias']), f'{key}.b'),
    ]
    conv_node = helper.make_node(
      'Conv',
      [x, f'{key}.w', f'{key}.b'],
      [f'{key}.conv'],
      kernel_shape=[3, 3],
      pads=[1, 1, 1, 1],
      strides=[block.stride, block.stride],
      group=block.groups,
    )
    nodes += [conv_node, helper.make_node('Relu', [f'{key}.conv'], [key])]
    x = key
  return nodes, weights


def _classifier(linear, last_block: str):
  """Global average pooling, ``Flatten`` and ``Gemm`` to ``logits``."""
  from onnx import TensorProto, helper, numpy_helper

  kernel, bias = _f32(linear['kernel']), _f32(linear['bias'])  # Kernel (in, out): no transB.
  weights = [numpy_helper.from_array(kernel, 'linear.w'), numpy_helper.from_array(bias, 'linear.b')]
  nodes = [
    helper.make_node('GlobalAveragePool', [last_block], ['pooled']),
    helper.make_node('Flatten', ['pooled'], ['features'], axis=1),
    helper.make_node('Gemm', ['features', 'linear.w', 'linear.b'], ['logits']),
  ]
  logits = helper.make_tensor_value_info('logits', TensorProto.FLOAT, ['batch', bias.size])
  return nodes, weights, [logits]


def _stage_outputs(params, keys, image_size: int):
  """A backbone's outputs: each stage's last block, back in NHWC, as ``stage{s}``."""
  from onnx import TensorProto, helper

  last = {}
  for key, (side, block) in zip(keys, shapes.block_layers(params, image_size), strict=True):
    last[block.stage] = (key, (side - 1) // block.stride + 1, block)  # Its output's side.
  nodes, outputs = [], []
  for stage, (key, side, block) in sorted(last.items()):
    output = f'stage{stage}'
    nodes.append(helper.make_node('Transpose', [key], [output], perm=[0, 2, 3, 1]))
    shape = ['batch', side, side, block.out_channels]
    outputs.append(helper.make_tensor_value_info(output, TensorProto.FLOAT, shape))
  return nodes, [], outputs


def _f32(array) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(array, np.float32))


def write_onnx(path: str | os.PathLike, variables: Mapping[str, Any], image_size: int) -> None:
  """Writes `deploy_graph` to ``path`` (checked by ``onnx.checker`` on the way)."""
  import onnx

  onnx.save(deploy_graph(variables, image_size), str(path))


def load_onnx(path: str | os.PathLike) -> Callable[[Any], Any]:
  """A function running the ONNX file (or export directory) in onnxruntime on the CPU:
  images -> logits, or the tuple of stage outputs of a backbone."""
  import onnxruntime

  path = pathlib.Path(path)
  if path.is_dir():
    path = path / FILE
  session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])

  def call(images):
    outputs = session.run(None, {INPUT: np.asarray(images, np.float32)})
    return outputs[0] if len(outputs) == 1 else tuple(outputs)

  return call
