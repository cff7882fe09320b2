"""Chunked inference: the large-map blocks run a few images at a time, with the
same variables and the same outputs as the whole batch at once."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_variables, relative_error

import repvgg_jax
from repvgg_jax import perf

A0_BLOCKS = list(repvgg_jax.get_variant('A0').blocks())
# Stages 0-1 (2 blocks) run at 64x64 and 32x32 on 128x128 images, so they are
# chunked, and the chunk loop ends after a stage boundary; stage 2 is at 16x16.
SMALL = dataclasses.replace(
  repvgg_jax.get_variant('B1g2'), num_blocks=(2, 2, 1, 1), width_multipliers=(0.25, 0.25)
)
SHAPE = (6, 128, 128, 3)


@pytest.mark.parametrize(
  'chunk_images, shape, train, backend, expected',
  [
    # A0 at 224: stage 0 (112x112), stage 1 (56x56, 2 blocks), stage 2 (28x28, 4 blocks).
    ('auto', (32, 224, 224, 3), False, 'cpu', (7, 4)),
    ('auto', (32, 224, 224, 3), True, 'cpu', (0, 0)),  # BatchNorm needs the whole batch.
    ('auto', (32, 224, 224, 3), False, 'gpu', (0, 0)),
    (2, (32, 224, 224, 3), False, 'gpu', (7, 2)),  # An explicit size applies everywhere.
    (0, (32, 224, 224, 3), False, 'cpu', (0, 0)),
    ('auto', (128, 32, 32, 3), False, 'cpu', (0, 0)),  # Stage 0 is at 16x16 already.
    ('auto', (32, 225, 225, 3), False, 'cpu', (7, 4)),  # 113, 57, 29.
    ('auto', (9, 224, 224, 3), False, 'cpu', (7, 3)),  # The largest divisor up to 4.
    ('auto', (7, 224, 224, 3), False, 'cpu', (7, 1)),
    ('auto', (4, 224, 224, 3), False, 'cpu', (0, 0)),  # One chunk: nothing to split.
    ('auto', (32, 56, 56, 3), False, 'cpu', (1, 4)),
  ],
)
def test_chunking_rule(chunk_images, shape, train, backend, expected):
  images = perf.images_per_chunk(chunk_images, backend)
  assert perf.chunking(images, A0_BLOCKS, shape, train) == expected


def test_symbolic_batch_is_not_chunked():
  # An export's batch is symbolic: it cannot be split into chunks at trace time.
  shape = jax.export.symbolic_shape('b, 224, 224, 3')
  assert perf.chunking(4, A0_BLOCKS, shape, False) == (0, 0)


@pytest.mark.parametrize('bad', [-1, 2.5, True, 'four', None])
def test_bad_chunk_images_raise(bad):
  with pytest.raises(ValueError, match='chunk_images'):
    perf.chunked(repvgg_jax.create_model('A0'), chunk_images=bad)


def test_chunked_only_where_asked():
  model = repvgg_jax.create_model('A0', num_classes=10)
  assert perf.chunked(model, 'auto', backend='gpu') is model
  assert perf.chunked(model, 0, backend='cpu') is model
  chunked = perf.chunked(model, 'auto', backend='cpu')
  assert isinstance(chunked, perf.ChunkedRepVGG) and chunked.chunk_images == 4
  assert chunked.clone(chunk_images=0).num_classes == 10


def _apply(model, variables, images):
  return jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)


@pytest.mark.parametrize('deploy', [False, True], ids=['training-time', 'fused'])
@pytest.mark.parametrize('num_classes', [10, 0], ids=['logits', 'stage outputs'])
def test_chunked_inference_equals_whole_batch(deploy, num_classes):
  whole = repvgg_jax.create_model(SMALL, num_classes=num_classes, deploy=deploy)
  chunked = perf.chunked(whole, 4)
  assert chunked.chunking(SHAPE, train=False) == (3, 3)
  images = jax.random.normal(jax.random.key(0), SHAPE)
  variables = random_variables(whole, SHAPE)  # Random BatchNorm statistics too.
  if deploy:
    training = repvgg_jax.create_model(SMALL, num_classes=num_classes)
    variables = repvgg_jax.fuse_params(random_variables(training, SHAPE), model=SMALL)
  # The chunked program really loops (so the comparison below can fail).
  hlo = jax.jit(lambda v, x: chunked.apply(v, x)).lower(variables, images).as_text()
  assert 'stablehlo.while' in hlo
  assert 'stablehlo.while' not in jax.jit(whole.apply).lower(variables, images).as_text()
  expected, actual = _apply(whole, variables, images), _apply(chunked, variables, images)
  expected, actual = jax.tree.leaves(expected), jax.tree.leaves(actual)
  assert len(actual) == len(expected) == (1 if num_classes else 5)
  for a, e in zip(actual, expected, strict=True):
    assert a.shape == e.shape
    assert relative_error(a, e) <= 1e-6
  assert np.std(np.asarray(expected[-1])) > 1e-3  # Not a constant output.


def test_chunked_gradients_match():
  whole = repvgg_jax.create_model(SMALL)
  chunked = perf.chunked(whole, 2)
  images = jax.random.normal(jax.random.key(0), SHAPE)
  variables = random_variables(whole, SHAPE)

  def saliency(model):
    # Weighted per image, so that images swapped between chunks would show.
    loss = lambda x: jnp.sum(model.apply(variables, x)[:, 0] * jnp.arange(len(x)))  # noqa: E731
    return jax.jit(jax.grad(loss))(images)

  assert relative_error(saliency(chunked), saliency(whole)) <= 1e-6


def test_initialising_and_recording_run_unchunked():
  # Variables cannot be created or recorded inside the chunk loop, so these
  # calls take the whole batch, and give what an unchunked model gives.
  whole = repvgg_jax.create_model(SMALL, num_classes=10)
  chunked = perf.chunked(whole, 2)
  images = jax.random.normal(jax.random.key(0), SHAPE)
  variables = whole.init(jax.random.key(1), images)
  chunked_init = chunked.init(jax.random.key(1), images)
  assert jax.tree.all(jax.tree.map(np.array_equal, variables, chunked_init))
  expected = whole.apply(variables, images, capture_intermediates=True)
  actual = chunked.apply(variables, images, capture_intermediates=True)
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  assert jax.tree.all(jax.tree.map(lambda a, e: relative_error(a, e) <= 1e-6, actual, expected))
