"""Datasets: the offline digits builder, resumable training batches, padded multi-process eval."""

import itertools
import logging
import math
import os
import time

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from repvgg_jax.data import MEAN_RGB, STDDEV_RGB, in_memory, input_pipeline, tfds_builder
from repvgg_jax.data import datasets as data
from repvgg_jax.data import digits as digits_dataset

GLOBAL_BATCH = 64  # 1,437 digits // 64 = 22 steps per epoch.
STEPS_PER_EPOCH = 22
MEAN = np.array(MEAN_RGB, np.float32)
STD = np.array(STDDEV_RGB, np.float32)


def _config(**overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(
    {
      'name': 'sklearn_digits',
      'data_dir': None,
      'manual_dir': None,
      'download': False,
      'image_size': 32,
      'train_split': 'train',
      'eval_split': 'test',
      'num_classes': 10,
      'train_augment': 'pad_crop',
      'crop_sampler': 'torchvision',
      'pad_pixels': 4,
      'flip': True,
      'eval_preprocess': 'resize',
      'shuffle_buffer': 2048,
      'in_memory': False,
    }
  )
  config.update(overrides)
  return config


@pytest.fixture(scope='module')
def digits(tmp_path_factory) -> ml_collections.ConfigDict:
  """A digits config whose data dir is prepared once, offline, for the whole module."""
  config = _config(data_dir=str(tmp_path_factory.mktemp('tfds')))
  data.get_builder(config)
  return config


def test_runs_sharing_a_data_dir_prepare_it_once(tmp_path, monkeypatch):
  """Two preparations at once collided renaming their records into place (the local
  processes of one run, two runs started together): the second now waits, then reads
  what the first prepared. Threads stand for the processes: each opens the lock anew."""
  import threading

  prepare, prepared, inside, most_inside = tfds_builder._prepare, [], [], []

  def slow_prepare(builder, download_config):
    inside.append(builder.name)
    most_inside.append(len(inside))
    time.sleep(0.5)  # Time for the other to arrive.
    prepare(builder, download_config)
    prepared.append(builder.name)
    inside.pop()

  monkeypatch.setattr(tfds_builder, '_prepare', slow_prepare)
  config, errors = _config(data_dir=str(tmp_path)), []

  def run():
    try:
      assert data.get_builder(config).is_prepared()
    except Exception as error:  # noqa: BLE001 - reported below, not lost in the thread.
      errors.append(error)

  threads = [threading.Thread(target=run) for _ in range(2)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert not errors and prepared == ['sklearn_digits'] and max(most_inside) == 1


def test_a_data_dir_that_cannot_be_locked_is_prepared_unguarded(tmp_path, monkeypatch):
  """Some network file systems refuse locks: preparing goes on without one."""
  import errno

  def no_locks(file, operation):
    raise OSError(errno.ENOLCK, 'No locks available')

  monkeypatch.setattr(tfds_builder.fcntl, 'flock', no_locks)
  assert data.get_builder(_config(data_dir=str(tmp_path))).is_prepared()


def test_a_first_preparation_logs_no_warning_of_its_own(tmp_path, caplog):
  """Before it is prepared, tfds warns that the version folder lacks dataset_info.json:
  what a first run expects, not something to show a new user."""
  with caplog.at_level(logging.WARNING):
    builder = data.get_builder(_config(data_dir=str(tmp_path)))
  assert builder.is_prepared()
  assert not [r.getMessage() for r in caplog.records if 'dataset_info.json' in r.getMessage()]


def test_a_dataset_that_cannot_be_prepared_leaves_no_data_dir(tmp_path):
  config = _config(data_dir=str(tmp_path / 'typo'), name='mnist', download=False)
  with pytest.raises(data.DatasetNotFoundError, match='downloads are off'):
    data.get_builder(config)
  assert not (tmp_path / 'typo').exists()


def _take(iterator, count):
  return list(itertools.islice(iterator, count))


def _image_keys(batches) -> list[bytes]:
  return [image.tobytes() for batch in batches for image in batch['image']]


def test_digits_builder_prepares_offline_with_fixed_splits(digits):
  builder = data.get_builder(digits)
  assert builder.is_prepared()
  assert builder.info.splits['train'].num_examples == 1437
  assert builder.info.splits['test'].num_examples == 360
  assert builder.info.features['label'].num_classes == 10
  examples = list(tfds.as_numpy(builder.as_dataset(split='test')))
  images = np.stack([example['image'] for example in examples])
  assert images.shape == (360, 32, 32, 3) and images.dtype == np.uint8
  assert images.min() == 0 and images.max() == 255  # Scaled from 0..16, not left at 0..16.
  assert (images.reshape(360, -1).std(axis=1) > 20).all()  # No blank image.
  np.testing.assert_array_equal(images[..., 0], images[..., 2])  # Grey replicated to RGB.
  assert np.bincount([example['label'] for example in examples], minlength=10).min() >= 25
  indices = digits_dataset.split_indices(1797)
  assert not set(indices['train']) & set(indices['test'])
  assert len(set(indices['train']) | set(indices['test'])) == 1797


@pytest.mark.parametrize('in_memory', [False, True])
def test_train_batches_are_normalized_model_inputs(digits, in_memory):
  config = _config(data_dir=digits.data_dir, in_memory=in_memory)
  assert data.steps_per_epoch(config, GLOBAL_BATCH) == STEPS_PER_EPOCH
  batch = next(data.train_batches(config, global_batch_size=GLOBAL_BATCH, seed=0))
  assert set(batch) == {'image', 'label'}
  assert batch['image'].shape == (64, 32, 32, 3) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (64,) and batch['label'].dtype == np.int32
  assert 0 <= batch['label'].min() and batch['label'].max() < 10
  # Background (and zero padding) is black: exactly -mean / std; ink reaches at most white.
  np.testing.assert_allclose(batch['image'].min(axis=(0, 1, 2)), -MEAN / STD, rtol=1e-6)
  assert (batch['image'].max(axis=(0, 1, 2)) <= (1 - MEAN) / STD + 1e-5).all()


@pytest.mark.parametrize('in_memory', [False, True])
def test_train_batches_depend_only_on_the_seed(digits, in_memory):
  config = _config(data_dir=digits.data_dir, in_memory=in_memory)
  first = _take(data.train_batches(config, global_batch_size=GLOBAL_BATCH, seed=0), 3)
  again = _take(data.train_batches(config, global_batch_size=GLOBAL_BATCH, seed=0), 3)
  other = _take(data.train_batches(config, global_batch_size=GLOBAL_BATCH, seed=1), 3)
  for a, b, c in zip(first, again, other, strict=True):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
    assert not np.array_equal(a['label'], c['label'])


@pytest.mark.parametrize('in_memory', [False, True])
def test_resuming_yields_the_same_batches_across_an_epoch_boundary(digits, in_memory):
  config = _config(data_dir=digits.data_dir, in_memory=in_memory)
  reference = _take(data.train_batches(config, global_batch_size=GLOBAL_BATCH, seed=3), 25)
  start = STEPS_PER_EPOCH - 2
  resumed = _take(
    data.train_batches(config, global_batch_size=GLOBAL_BATCH, seed=3, start_step=start), 5
  )
  for step, batch in enumerate(resumed, start):
    np.testing.assert_array_equal(batch['image'], reference[step]['image'], err_msg=f'{step=}')
    np.testing.assert_array_equal(batch['label'], reference[step]['label'], err_msg=f'{step=}')
  # The next epoch is a different shuffle, not a replay.
  assert not np.array_equal(reference[0]['label'], reference[STEPS_PER_EPOCH]['label'])


def test_each_example_draws_its_own_augmentation(digits):
  plain = _config(data_dir=digits.data_dir, train_augment='none', flip=False)
  flipped = _config(data_dir=digits.data_dir, train_augment='none', flip=True)
  reference = next(data.train_batches(plain, global_batch_size=GLOBAL_BATCH, seed=0))
  batch = next(data.train_batches(flipped, global_batch_size=GLOBAL_BATCH, seed=0))
  flips = 0
  for image, original in zip(batch['image'], reference['image'], strict=True):
    flipped_here = np.array_equal(image, original[:, ::-1]) and not np.array_equal(image, original)
    assert flipped_here or np.array_equal(image, original)  # Flipped or untouched, nothing else.
    flips += flipped_here
  assert 16 <= flips <= 48  # About half: a coin per example, not one for the whole batch.


@pytest.mark.parametrize('in_memory', [False, True])
def test_an_epoch_reads_distinct_examples_and_processes_disjoint_halves(digits, in_memory):
  plain = _config(data_dir=digits.data_dir, train_augment='none', flip=False, in_memory=in_memory)
  split = {  # Normalized by tf.data's function: both paths must give the same pixels.
    input_pipeline.normalize_image(example['image']).numpy().tobytes()
    for example in data.get_builder(plain).as_dataset(split='train')
  }
  epoch = {}
  for process in range(2):
    batches = data.train_batches(
      plain, global_batch_size=GLOBAL_BATCH, seed=0, process_index=process, process_count=2
    )
    epoch[process] = _take(batches, STEPS_PER_EPOCH)
    assert epoch[process][0]['image'].shape == (32, 32, 32, 3)
    assert epoch[process][0]['label'].shape == (32,)
  keys = [_image_keys(epoch[process]) for process in range(2)]
  assert all(len(set(k)) == len(k) == STEPS_PER_EPOCH * 32 for k in keys)
  assert not set(keys[0]) & set(keys[1])
  assert set(keys[0]) | set(keys[1]) <= split
  assert not np.array_equal(epoch[0][0]['image'], epoch[1][0]['image'])
  with pytest.raises(ValueError, match='multiple of the 2 processes'):
    data.train_batches(plain, global_batch_size=63, seed=0, process_index=0, process_count=2)


def test_eval_batches_cover_every_example_once_over_processes(digits):
  config = _config(data_dir=digits.data_dir, eval_split='test[:355]')  # Uneven shares.
  builder = data.get_builder(config)
  expected = [
    input_pipeline.normalize_image(example['image']).numpy().tobytes()
    for example in builder.as_dataset(split='test[:355]')
  ]
  batches = [
    list(data.eval_batches(config, global_batch_size=50, process_index=p, process_count=2))
    for p in range(2)
  ]
  assert len(batches[0]) == len(batches[1]) == 8  # ceil(ceil(355 / 2) / 25).
  seen = []
  for batch in batches[0] + batches[1]:
    assert batch['image'].shape == (25, 32, 32, 3) and batch['mask'].dtype == bool
    assert not batch['image'][~batch['mask']].any()  # Padding is zeros.
    seen += [image.tobytes() for image in batch['image'][batch['mask']]]
  assert sum(int(batch['mask'].sum()) for batch in batches[0] + batches[1]) == 355
  assert sorted(seen) == sorted(expected)


def _torchvision_window(height, width, rng):
  """``(h, w)`` as torchvision's RandomResizedCrop.get_params draws it; None: fallback."""
  for _ in range(10):
    area = height * width * rng.uniform(0.08, 1.0)
    ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
    if 0 < w <= width and 0 < h <= height:
      return h, w
  return None


def test_the_inception_window_is_drawn_as_torchvisions():
  """Over 1,500 seeds, the share of the image the window takes has the mean and
  quartiles of torchvision's draws (TF's bounding-box sampler gives 0.36, not 0.43,
  on this shape); every window lies inside; one that cannot fit is the centre."""
  window = tf.function(lambda shape, seed: input_pipeline.inception_window(shape, seed))
  height, width = 375, 500
  shape = tf.constant([height, width, 3])
  shares = []
  for index in range(1500):
    begin, size = (t.numpy() for t in window(shape, tf.constant([index, 3])))
    assert begin.min() >= 0 and begin[0] + size[0] <= height and begin[1] + size[1] <= width
    shares.append(size[0] * size[1] / (height * width))
  rng = np.random.default_rng(0)
  draws = [_torchvision_window(height, width, rng) for _ in range(20000)]
  expected = [h * w / (height * width) for h, w in draws]  # This shape always fits.
  assert abs(np.mean(shares) - np.mean(expected)) < 0.015
  quartiles = [0.25, 0.5, 0.75]
  np.testing.assert_allclose(
    np.quantile(shares, quartiles), np.quantile(expected, quartiles), atol=0.03
  )
  begin, size = window(tf.constant([10, 1000, 3]), tf.constant([0, 0]))  # Nothing fits.
  assert begin.numpy().tolist() == [0, 493, 0] and size.numpy().tolist() == [10, 13, -1]


def test_the_tf_crop_sampler_draws_smaller_windows_and_falls_back_to_the_whole_image():
  """``crop_sampler='tf'``, as runs before torchvision's sampler drew: a mean share
  of 0.36 on this shape (torchvision's: 0.43), every window inside the image."""
  window = tf.function(lambda shape, seed: input_pipeline.inception_window(shape, seed, 'tf'))
  height, width = 375, 500
  shares = []
  for index in range(400):
    begin, size = (t.numpy() for t in window(tf.constant([height, width, 3]), [index, 3]))
    assert begin.min() >= 0 and begin[0] + size[0] <= height and begin[1] + size[1] <= width
    shares.append(size[0] * size[1] / (height * width))
  assert 0.32 < np.mean(shares) < 0.40
  begin, size = window(tf.constant([10, 1000, 3]), tf.constant([0, 0]))
  assert begin.numpy().tolist() == [0, 0, 0] and size.numpy().tolist() == [10, 1000, -1]
  with pytest.raises(ValueError, match="Unknown crop_sampler 'pil'"):
    input_pipeline.inception_window(tf.constant([10, 10, 3]), tf.constant([0, 0]), 'pil')


@pytest.mark.parametrize('field', ['train_split', 'eval_split'])
def test_splits_joined_with_plus_are_refused_over_several_processes(field):
  joined = _config(**{field: 'test[:5]+test[100:105]'})
  data.check_splits(joined, process_count=1)  # One process reads the whole of it.
  with pytest.raises(ValueError, match=rf'dataset.{field} .* joins splits with \+, which 4 '):
    data.check_splits(joined, process_count=4)
  data.check_splits(_config(**{field: 'test[:50%]'}), process_count=4)


def test_eval_resize_leaves_images_at_the_input_size_alone():
  image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  resized = input_pipeline.preprocess_for_eval(image, 32, method='resize')
  np.testing.assert_allclose(resized, input_pipeline.normalize_image(image), atol=1e-6)
  with pytest.raises(ValueError, match='resize_crop'):
    input_pipeline.preprocess_for_eval(image, 32, method='crop')


@pytest.mark.parametrize('shape', [(300, 451), (451, 300), (375, 500), (333, 333), (229, 1001)])
@pytest.mark.parametrize('size', [224, 320])
def test_eval_resize_and_crop_take_torchvision_sizes_and_offsets(shape, size):
  """As the reference: Resize(int(256 / 224 * size)) then CenterCrop(size), whose
  sizes and offsets torchvision computes with int() and Python's round()."""
  resize = int(256 / 224 * size)
  short, long = sorted(shape)
  expected = [resize if side == short else int(resize * long / short) for side in shape]
  image = tf.zeros((*shape, 3), tf.uint8)
  resized = input_pipeline.resize_shorter_side(image, resize)
  assert list(resized.shape[:2]) == expected
  rows, cols = np.meshgrid(np.arange(expected[0]), np.arange(expected[1]), indexing='ij')
  cropped = input_pipeline.center_crop(tf.constant(np.stack([rows, cols], -1)), size).numpy()
  offsets = [int(round((side - size) / 2.0)) for side in expected]
  assert cropped.shape == (size, size, 2) and list(cropped[0, 0]) == offsets


def test_eval_resizes_to_the_references_size(monkeypatch):
  """int(256 / 224 * size), as the reference's build.py (rounding gave 366 and 439)."""
  sizes, resize = [], input_pipeline.resize_shorter_side
  record = lambda image, size: sizes.append(size) or resize(image, size)
  monkeypatch.setattr(input_pipeline, 'resize_shorter_side', record)
  for size in (224, 320, 384):
    input_pipeline.preprocess_for_eval(np.zeros((400, 500, 3), np.uint8), size)
  assert sizes == [256, 365, 438]


def test_pad_crop_shifts_the_zero_padded_image():
  image = np.random.default_rng(0).integers(1, 256, (32, 32, 3), dtype=np.uint8)
  padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
  windows = [padded[y : y + 32, x : x + 32] for y in range(9) for x in range(9)]
  offsets = set()
  for seed in range(20):
    crop = input_pipeline.pad_and_random_crop(image, np.array([seed, 0]), 4).numpy()
    matches = [i for i, window in enumerate(windows) if np.array_equal(crop, window)]
    assert len(matches) == 1
    offsets.add(matches[0])
  assert len(offsets) > 5  # The offset is random, not fixed.


@pytest.mark.parametrize(
  'augment, flip, image_size',
  [('pad_crop', True, 32), ('inception_crop', True, 24), ('none', False, 16)],
)
def test_train_augmentations_produce_model_inputs(digits, augment, flip, image_size):
  config = _config(
    data_dir=digits.data_dir, train_augment=augment, flip=flip, image_size=image_size
  )
  batch = next(data.train_batches(config, global_batch_size=16, seed=0))
  assert batch['image'].shape == (16, image_size, image_size, 3)
  assert np.isfinite(batch['image']).all() and batch['image'].std() > 0.1
  plain = _config(data_dir=digits.data_dir, train_augment='none', flip=False, image_size=image_size)
  unaugmented = next(data.train_batches(plain, global_batch_size=16, seed=0))
  np.testing.assert_array_equal(batch['label'], unaugmented['label'])  # Same examples, ...
  if augment != 'none':
    assert not np.array_equal(batch['image'], unaugmented['image'])  # ... other pixels.


def test_in_memory_crops_and_flips_are_drawn_per_image(digits):
  plain = _config(data_dir=digits.data_dir, train_augment='none', flip=False, in_memory=True)
  augmented = _config(data_dir=digits.data_dir, pad_pixels=2, in_memory=True)
  reference = next(data.train_batches(plain, global_batch_size=GLOBAL_BATCH, seed=0))
  batch = next(data.train_batches(augmented, global_batch_size=GLOBAL_BATCH, seed=0))
  np.testing.assert_array_equal(batch['label'], reference['label'])  # Same examples.
  black = -MEAN / STD  # What the zero padding becomes.
  padded = np.pad(reference['image'], ((0, 0), (2, 2), (2, 2), (0, 0)))
  padded[:, :2], padded[:, -2:], padded[:, :, :2], padded[:, :, -2:] = black, black, black, black
  draws = set()
  for image, source in zip(batch['image'], padded, strict=True):
    windows = {
      (y, x, flip): source[y : y + 32, x : x + 32][:, ::-1]
      if flip
      else source[y : y + 32, x : x + 32]
      for y in range(5)
      for x in range(5)
      for flip in (False, True)
    }
    matches = [key for key, window in windows.items() if np.allclose(image, window, atol=1e-6)]
    assert matches, 'not a padded crop, flipped or not, of its own example'
    draws.add(matches[0])
  assert len(draws) > 10  # Offsets and flips vary from image to image.


def test_pad_and_crop_takes_each_image_at_its_own_offset():
  images = np.random.default_rng(0).integers(1, 256, (3, 8, 8, 2), dtype=np.uint8)
  offsets = np.array([[3, 3], [0, 6], [5, 1]])
  crops = in_memory.pad_and_crop(images, offsets, 3)
  padded = np.pad(images, ((0, 0), (3, 3), (3, 3), (0, 0)))
  np.testing.assert_array_equal(crops[0], images[0])  # (pad, pad) is the image itself.
  for crop, source, (y, x) in zip(crops, padded, offsets, strict=True):
    np.testing.assert_array_equal(crop, source[y : y + 8, x : x + 8])


@pytest.mark.parametrize(
  'overrides, message',
  [
    ({'train_augment': 'inception_crop'}, "not 'inception_crop'"),
    ({'image_size': 24}, r'stored at the input size \(24, 24, 3\)'),
  ],
)
def test_in_memory_refuses_what_it_cannot_do_with_the_fix(digits, overrides, message):
  config = _config(data_dir=digits.data_dir, in_memory=True, **overrides)
  with pytest.raises(ValueError, match=message) as error:
    data.train_batches(config, global_batch_size=GLOBAL_BATCH, seed=0)
  assert 'in_memory=False' in str(error.value)


def test_missing_cifar_fails_fast_with_the_fix(tmp_path):
  config = _config(name='cifar10', data_dir=str(tmp_path))
  start = time.monotonic()
  with pytest.raises(data.DatasetNotFoundError) as error:
    data.get_builder(config)
  assert time.monotonic() - start < 5
  message = str(error.value)
  assert 'cifar10' in message and str(tmp_path) in message
  assert '--config.dataset.download=True' in message
  assert f'tfds build cifar10 --data_dir={tmp_path}' in message
  assert isinstance(error.value, FileNotFoundError)


def test_missing_imagenet_fails_fast_naming_the_archives_and_where_they_go(tmp_path):
  config = _config(name='imagenet2012', data_dir=str(tmp_path), download=True)
  start = time.monotonic()
  with pytest.raises(data.DatasetNotFoundError) as error:
    data.get_builder(config)
  assert time.monotonic() - start < 5
  message = str(error.value)
  assert os.path.join(str(tmp_path), 'downloads', 'manual') in message
  assert 'ILSVRC2012_img_train.tar' in message and 'ILSVRC2012_img_val.tar' in message
  # With only one archive in a custom manual dir, the error names the one still missing.
  manual = tmp_path / 'archives'
  manual.mkdir()
  (manual / 'ILSVRC2012_img_train.tar').touch()
  config.manual_dir = str(manual)
  with pytest.raises(data.DatasetNotFoundError, match=r'missing now: ILSVRC2012_img_val\.tar\)'):
    data.get_builder(config)


@pytest.mark.parametrize(
  'name, augment, eval_preprocess, eval_split, in_memory',
  [
    ('imagenet2012', 'inception_crop', 'resize_crop', 'validation', False),
    ('cifar10', 'pad_crop', 'resize', 'test', False),
    ('cifar10', 'pad_crop', 'resize', 'test', True),
    ('mnist', 'pad_crop', 'resize', 'test', False),  # Greyscale, repeated to RGB.
  ],
)
def test_mock_data_datasets_train_and_evaluate(
  tmp_path, name, augment, eval_preprocess, eval_split, in_memory
):
  config = _config(
    name=name,
    in_memory=in_memory,
    data_dir=str(tmp_path),
    train_augment=augment,
    eval_preprocess=eval_preprocess,
    eval_split=eval_split,
    num_classes=1000 if name == 'imagenet2012' else 10,
  )
  with tfds.testing.mock_data(num_examples=12):
    assert data.num_examples(config, 'train') == 12
    train = _take(data.train_batches(config, global_batch_size=4, seed=0), 4)  # 3 per epoch.
    evaluation = list(data.eval_batches(config, global_batch_size=8))
  for batch in train:
    assert batch['image'].shape == (4, 32, 32, 3) and batch['image'].dtype == np.float32
    assert batch['label'].dtype == np.int32 and batch['label'].max() < config.num_classes
  assert len(evaluation) == 2
  assert sum(int(batch['mask'].sum()) for batch in evaluation) == 12
  assert evaluation[0]['image'].shape == (8, 32, 32, 3)
