"""Equivalence through the real input path: tfds images, eval preprocessing, jitted models."""

import jax
import numpy as np
import tensorflow_datasets as tfds
from helpers import calibrated_variables, relative_error

import repvgg_jax
from repvgg_jax.data import MEAN_RGB, STDDEV_RGB, input_pipeline

IMAGE_SIZE = 64


def _preprocess(example):
  return input_pipeline.preprocess_for_eval(example['image'], IMAGE_SIZE), example['label']


def test_mock_imagenet_through_eval_preprocessing():
  with tfds.testing.mock_data(num_examples=8):
    dataset = tfds.load('imagenet2012', split='validation')
    raw_sizes = {tuple(ex['image'].shape) for ex in dataset.take(8)}
    batches = dataset.map(_preprocess).batch(8)
    images, labels = next(iter(tfds.as_numpy(batches)))
  assert len(raw_sizes) > 1  # The mock images come in random sizes.
  assert images.shape == (8, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.float32
  assert labels.shape == (8,)

  model = repvgg_jax.create_model('A0', precision='highest')
  deploy = repvgg_jax.create_model('A0', deploy=True, precision='highest')
  variables = calibrated_variables(model, images)
  fused = jax.jit(repvgg_jax.fuse_params)(variables)
  train_logits = jax.jit(model.apply)(variables, images)
  deploy_logits = jax.jit(deploy.apply)(fused, images)
  assert np.std(np.asarray(train_logits), axis=0).mean() > 1e-2 * np.std(train_logits)
  assert relative_error(deploy_logits, train_logits) <= 1e-5
  np.testing.assert_array_equal(np.argmax(deploy_logits, axis=-1), np.argmax(train_logits, axis=-1))


def test_eval_preprocessing_resizes_then_crops_the_centre():
  image = np.zeros((100, 200, 3), np.uint8)
  image[:, 50:150] = 255  # A white centre band; the crop must see only it.
  out = np.asarray(input_pipeline.preprocess_for_eval(image, image_size=56))
  assert out.shape == (56, 56, 3)
  white = (1.0 - np.array(MEAN_RGB)) / np.array(STDDEV_RGB)
  np.testing.assert_allclose(out, np.broadcast_to(white, out.shape), rtol=1e-5)
