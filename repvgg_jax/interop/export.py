"""The deploy model for serving outside this codebase: `jax.export`, TF SavedModel, ONNX.

Each artifact holds the weights and takes a batch of any size of float32 NHWC
images, normalized as in training (see ``export.json`` for the mean and std),
and returns float32 logits:

- ``model.jax_export``: `jax.export.Exported`, serialized. Load it with
  `load_jax_export` (or ``jax.export.deserialize``) and call it; no Flax, no
  repvgg_jax, only jax.
- ``saved_model/``: a TensorFlow SavedModel made with ``jax2tf``; signature
  ``serving_default`` with input ``images``; loads with
  ``tf.saved_model.load`` in TF Serving, TF Lite converters and the like. The
  weights are TF variables, not constants, so large variants stay far from
  protobuf's 2 GB limit.
- ``model.onnx``: an ONNX graph (opset 17) built from the fused parameters
  (`repvgg_jax.interop.onnx_export`), input ``images``, output ``logits``; for
  onnxruntime, TensorRT, OpenVINO and mobile runtimes.

The image size is fixed (the stride-2 arithmetic is compiled in); the batch
size is symbolic (dynamic in ONNX).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from repvgg_jax.interop import onnx_export

JAX_FILE = 'model.jax_export'
SAVED_MODEL_DIR = 'saved_model'
ONNX_FILE = onnx_export.FILE
META_FILE = 'export.json'
FORMATS = ('jax', 'tf', 'onnx')
ARTIFACTS = {'jax': JAX_FILE, 'tf': SAVED_MODEL_DIR, 'onnx': ONNX_FILE}


def _image_spec(image_size: int, in_channels: int = 3) -> str:
  return f'b, {image_size}, {image_size}, {in_channels}'


def export_jax(
  model,
  variables,
  image_size: int,
  platforms: Sequence[str] | None = None,
  *,
  fold_variables: bool = True,
) -> bytes:
  """The serialized `jax.export` artifact of ``model.apply(variables, images)``.

  Args:
    model: a deploy (or training-time, in inference mode) RepVGG.
    variables: its variables, embedded in the artifact.
    image_size: height and width of the images it takes.
    platforms: e.g. ``('cpu', 'cuda')``; default: the current backend.
    fold_variables: whether the compiler may compute what depends on the variables
      alone once, when it compiles the artifact (their layout, say). False keeps every
      operation as the model computes with its variables passed in: an int8 model's
      scale arithmetic, folded, rounds otherwise and moves activations across an int8
      step.
  """
  spec = jax.ShapeDtypeStruct(
    jax.export.symbolic_shape(_image_spec(image_size, model.in_channels)), jnp.float32
  )

  def serve(images):
    # An optimization barrier hides the embedded constants from constant folding.
    held = variables if fold_variables else jax.lax.optimization_barrier(variables)
    return model.apply(held, images)

  serve = jax.jit(serve)
  exported = jax.export.export(serve, platforms=platforms)(spec)
  return bytes(exported.serialize())


def runs_here(platforms: Sequence[str]) -> bool:
  """Whether a `jax.export` artifact lowered for ``platforms`` runs on this machine's
  backend. Exports before 070f24c recorded 'gpu' (JAX's backend name) for cuda and rocm."""
  here = jax.export.default_export_platform()  # cpu, cuda, rocm or tpu.
  return here in platforms or ('gpu' in platforms and here in ('cuda', 'rocm'))


def read_jax_export(path: str | os.PathLike) -> jax.export.Exported:
  """The `jax.export.Exported` stored by `export_jax` (a file, or an export directory):
  its ``call``, and its ``in_avals`` (the image shape it takes)."""
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / JAX_FILE
  return jax.export.deserialize(bytearray(path.read_bytes()))


def load_jax_export(path: str | os.PathLike) -> Callable[[Any], jax.Array]:
  """The function stored by `export_jax` (a file, or an export directory)."""
  return read_jax_export(path).call


def export_saved_model(
  model, variables, image_size: int, directory, platforms: Sequence[str] | None = None
) -> None:
  """Writes ``model.apply(variables, images)`` as a TF SavedModel through ``jax2tf``."""
  import tensorflow as tf
  from jax.experimental import jax2tf

  tf.config.set_visible_devices([], 'GPU')  # TF must not take the GPU memory from JAX.
  module = tf.Module()
  module.params = tf.nest.map_structure(
    lambda a: tf.Variable(np.asarray(a), trainable=False), variables
  )
  converted = jax2tf.convert(
    model.apply,
    polymorphic_shapes=[None, f'({_image_spec(image_size, model.in_channels)})'],
    with_gradient=False,
    native_serialization_platforms=tuple(platforms) if platforms else None,
  )
  signature = tf.TensorSpec([None, image_size, image_size, model.in_channels], tf.float32)

  @tf.function(autograph=False, input_signature=[signature])
  def serve(images):
    return converted(module.params, images)

  module.serve = serve
  tf.saved_model.save(module, str(directory), signatures={'serving_default': serve})


def load_saved_model(directory) -> Callable[[Any], np.ndarray | tuple[np.ndarray, ...]]:
  """The ``serving_default`` function of a SavedModel written by `export_saved_model`:
  the logits, or a backbone's stage outputs as a tuple in the model's order."""
  import tensorflow as tf

  tf.config.set_visible_devices([], 'GPU')
  directory = pathlib.Path(directory)
  if (directory / SAVED_MODEL_DIR).is_dir():
    directory = directory / SAVED_MODEL_DIR
  loaded = tf.saved_model.load(str(directory))
  serve = loaded.signatures['serving_default']

  def call(images):
    outputs = serve(images=tf.constant(np.asarray(images, np.float32)))
    # 'output_0', 'output_1', ...: the signature names them by position, in no order.
    ordered = sorted(outputs.items(), key=lambda item: int(item[0].rpartition('_')[2]))
    arrays = tuple(value.numpy() for _, value in ordered)
    return arrays[0] if len(arrays) == 1 else arrays

  call.loaded = loaded  # Keeps the variables alive as long as the function.
  return call


def write_export(
  output_dir,
  model,
  variables,
  image_size: int,
  meta: dict,
  formats: Sequence[str] = FORMATS,
  platforms: Sequence[str] | None = None,
  verify: Callable[[pathlib.Path], dict] | None = None,
  fold_variables: bool = True,
) -> pathlib.Path:
  """Writes the chosen artifacts and ``export.json`` into the new directory ``output_dir``.

  Everything is written into a temporary sibling directory that is renamed
  when complete, so an interrupted export leaves no half-written artifact.
  ``verify`` (optional) checks the artifacts there, before the rename: what it
  returns joins ``export.json``, and what it raises leaves nothing behind.
  ``fold_variables``: as for `export_jax`.

  Raises:
    ValueError: an unknown format, ``output_dir`` exists and is not empty, or
      ``image_size`` is not a positive int.
  """
  if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
    raise ValueError(
      f'The image size must be a positive int, got {image_size!r}: leave --image-size out '
      "for the checkpoint's."
    )
  unknown = set(formats) - set(FORMATS)
  if unknown or not formats:
    raise ValueError(f'Unknown export formats {sorted(unknown)}; choose from {FORMATS}.')
  output = pathlib.Path(output_dir).absolute()
  if output.exists() and any(output.iterdir()):
    raise ValueError(f'{output} is not empty: choose a new output directory.')
  with staged_directory(output) as staging:
    if 'jax' in formats:
      artifact = export_jax(model, variables, image_size, platforms, fold_variables=fold_variables)
      (staging / JAX_FILE).write_bytes(artifact)
    if 'tf' in formats:
      export_saved_model(model, variables, image_size, staging / SAVED_MODEL_DIR, platforms)
    if 'onnx' in formats:
      onnx_export.write_onnx(staging / ONNX_FILE, variables, image_size)
      meta = {
        **meta,
        'onnx': {
          'opset': onnx_export.OPSET,
          'ir_version': onnx_export.IR_VERSION,
          'input': onnx_export.INPUT,
          'checker': 'passed',
        },
      }
    meta = {
      **meta,
      'image_size': image_size,
      'input': f'float32 NHWC [batch, {image_size}, {image_size}, {model.in_channels}]',
      'artifacts': {fmt: ARTIFACTS[fmt] for fmt in formats},
      'platforms': list(platforms) if platforms else [jax.export.default_export_platform()],
    }
    if verify is not None:  # The artifacts alone: no loader reads export.json.
      meta.update(verify(staging))
    (staging / META_FILE).write_text(json.dumps(meta, indent=2) + '\n')
  return output


@contextlib.contextmanager
def staged_directory(output_dir) -> Iterator[pathlib.Path]:
  """A new temporary sibling of ``output_dir`` to write into, renamed onto it (a
  missing or empty directory) when the block ends, and removed if it raises:
  readers see the whole directory or nothing."""
  output = pathlib.Path(output_dir).absolute()
  output.parent.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(prefix=f'.{output.name}-', dir=output.parent))
  staging.chmod(0o755)  # mkdtemp's 0o700 would hide the files from a serving user.
  try:
    yield staging
    os.rename(staging, output)  # Onto a missing or empty directory, atomically.
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
