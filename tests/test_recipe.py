"""The long recipe's parts: cutmix, mixup-or-cutmix, the moving average of the weights
(trained, resumed, evaluated and fused), and RandAugment against PIL's operations."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow as tf
from helpers import checkpoint_params, restore_checkpoint, tiny_config

from repvgg_jax import fuse_params, jsonfiles
from repvgg_jax.data import datasets as data
from repvgg_jax.data import randaugment
from repvgg_jax.model.variants import Variant
from repvgg_jax.train import config_checks, steps, trainer


def constant_batch(size=8, side=16):
  """Image ``i`` is the constant ``i``: every pixel says which image it came from."""
  images = jnp.broadcast_to(
    jnp.arange(size, dtype=jnp.float32)[:, None, None, None], (size, side, side, 3)
  )
  return images, jnp.arange(size) % 5


@pytest.mark.parametrize('seed', range(4))
def test_cutmix_pastes_one_box_and_weighs_targets_by_its_area(seed):
  images, labels = constant_batch()
  mixed, targets = steps.cutmix(jax.random.key(seed), images, labels, 5, alpha=1.0)
  source = np.asarray(mixed[..., 0])
  reversed_share = (source == np.arange(8)[::-1, None, None]).mean(axis=(1, 2))
  kept = 1 - reversed_share[0]  # One box for the whole batch: the same share everywhere.
  np.testing.assert_allclose(reversed_share, 1 - kept)
  expected = kept * jax.nn.one_hot(labels, 5) + (1 - kept) * jax.nn.one_hot(labels[::-1], 5)
  np.testing.assert_allclose(targets, expected, atol=1e-6)
  box = source[0] != 0
  rows, cols = np.nonzero(box)
  if rows.size:  # A rectangle: its bounding box is full.
    assert box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()


def test_mixup_and_cutmix_share_the_batches():
  images, labels = constant_batch()
  kinds = set()
  for seed in range(12):
    mixed, _ = steps.mix_batch(jax.random.key(seed), images, labels, 5, 0.2, 1.0)
    values = np.unique(np.asarray(mixed))
    kinds.add('cutmix' if np.all(np.isin(values, np.arange(8))) else 'mixup')
  assert kinds == {'cutmix', 'mixup'}


@pytest.mark.parametrize('seed', range(4))
def test_the_mix_of_a_batch_is_the_chosen_one_exactly(seed):
  images, labels = constant_batch()
  choice_rng, mix_rng = jax.random.split(jax.random.key(seed))
  use_cutmix = bool(jax.random.bernoulli(choice_rng, steps.CUTMIX_SHARE))
  chosen = (steps.cutmix if use_cutmix else steps.mixup)(
    mix_rng, images, labels, 5, 1.0 if use_cutmix else 0.2
  )
  mixed = jax.jit(steps.mix_batch, static_argnums=(3, 4, 5))(
    jax.random.key(seed), images, labels, 5, 0.2, 1.0
  )
  for actual, expected in zip(mixed, chosen, strict=True):
    # Within float32 rounding: under jit XLA may fuse mixup's blend into fused
    # multiply-adds, which round once where the eager ops round twice (seen on AMD EPYC).
    # Another branch or key would differ by far more.
    np.testing.assert_allclose(actual, expected, rtol=2e-6, atol=0)
  # Either mix keeps the images' dtype, so that both branches agree for any of them.
  half = steps.mix_batch(jax.random.key(seed), images.astype(jnp.bfloat16), labels, 5, 0.2, 1.0)
  assert half[0].dtype == jnp.bfloat16 and half[1].dtype == jnp.float32


def test_train_step_updates_the_moving_average():
  config = tiny_config()
  model = trainer.build_model(config, train=True)
  tx = steps.optax.sgd(0.1)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  state = steps.TrainState.create(
    apply_fn=model.apply,
    params=variables['params'],
    tx=tx,
    batch_stats=variables['batch_stats'],
    ema=jax.tree.map(lambda x: x + 1.0, variables),
  )
  images = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  batch = {'image': images, 'label': jnp.arange(4)}
  step = jax.jit(lambda *args: steps.train_step(*args, model=model, num_classes=10, ema_decay=0.75))
  new, _ = step(state, batch, jax.random.key(2))
  current = {'params': new.params, 'batch_stats': new.batch_stats}
  expected = jax.tree.map(lambda e, v: 0.75 * e + 0.25 * v, state.ema, current)
  for a, b in zip(jax.tree.leaves(new.ema), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


EMA = {'ema_decay': 0.5, 'num_train_steps': 4, 'optimizer.cutmix_alpha': 1.0}


def test_the_average_is_checkpointed_resumed_evaluated_and_fused(digits_dir, tmp_path):
  straight = trainer.train_and_evaluate(tiny_config(digits_dir, **EMA), tmp_path / 'straight')
  assert 0 <= straight['eval_ema_top1'] <= 1 and 0 <= straight['eval_ema_top1_fused'] <= 1
  resumed_dir = tmp_path / 'resumed'
  shutil.copytree(tmp_path / 'straight', resumed_dir)
  for done in ('checkpoints/4', 'deploy', 'deploy_ema'):  # As if killed after step 2's save.
    shutil.rmtree(resumed_dir / done)
  (resumed_dir / 'summary.json').unlink()
  trainer.train_and_evaluate(tiny_config(digits_dir, **EMA), resumed_dir)
  a, b = (
    restore_checkpoint(tmp_path / 'straight' / 'checkpoints')[0],
    restore_checkpoint(resumed_dir / 'checkpoints')[0],
  )
  for x, y in zip(jax.tree.leaves(a['ema']), jax.tree.leaves(b['ema']), strict=True):
    np.testing.assert_array_equal(x, y)
  assert any(  # Half-way between the start and the trained weights: not the weights themselves.
    not np.array_equal(x, y)
    for x, y in zip(jax.tree.leaves(a['ema']['params']), jax.tree.leaves(a['params']), strict=True)
  )
  deploy, meta = restore_checkpoint(tmp_path / 'straight' / 'deploy_ema')
  assert meta['ema'] and sorted(deploy['params']['stage1_block0']) == ['reparam']
  # deploy_ema/ is the average fused, not the weights fused.
  average = {'params': a['ema']['params'], 'batch_stats': a['ema']['batch_stats']}
  for x, y in zip(jax.tree.leaves(deploy), jax.tree.leaves(fuse_params(average)), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  plain = fuse_params({'params': a['params'], 'batch_stats': a['batch_stats']})
  pairs = zip(jax.tree.leaves(deploy), jax.tree.leaves(plain), strict=True)
  assert not all(np.allclose(x, y, rtol=1e-3) for x, y in pairs)
  # The logged eval/ema_loss is the average's, computed here on the eval split.
  config = tiny_config(digits_dir, **EMA)
  model = trainer.build_model(config)
  losses, count = 0.0, 0
  for batch in data.eval_batches(config.dataset, global_batch_size=config.eval_batch_size):
    logits = model.apply(average, batch['image'], train=False)
    per_image = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
    losses += float(jnp.where(batch['mask'], per_image, 0).sum())
    count += int(batch['mask'].sum())
  records = jsonfiles.read_jsonl(tmp_path / 'straight' / 'metrics.jsonl')
  logged = [record for record in records if 'eval/ema_loss' in record]
  assert logged[-1]['step'] == 4
  assert logged[-1]['eval/ema_loss'] == pytest.approx(losses / count, rel=1e-4)
  assert logged[-1]['eval/loss'] != pytest.approx(losses / count, rel=1e-4)


def test_turning_the_average_on_for_an_old_run_is_refused_and_keeps_it(digits_dir, tmp_path):
  trainer.train_and_evaluate(tiny_config(digits_dir, num_train_steps=2), tmp_path)
  before = checkpoint_params(tmp_path)[1]['step']
  message = 'has no moving average of the weights but the config has ema_decay=0.5'
  with pytest.raises(trainer.ConfigError, match=message):
    trainer.train_and_evaluate(tiny_config(digits_dir, **EMA), tmp_path)
  assert checkpoint_params(tmp_path)[1]['step'] == before  # Not moved aside as corrupt.


@pytest.mark.parametrize(
  'overrides, message',
  [
    ({'optimizer.cutmix_alpha': -1.0}, 'optimizer.cutmix_alpha must be >= 0'),
    ({'optimizer.mixup_alpha': -0.2}, 'optimizer.mixup_alpha must be >= 0'),
    ({'dataset.randaugment_layers': 2, 'dataset.randaugment_magnitude': 0}, 'randaugment_mag'),
    ({'dataset.randaugment_layers': -1}, 'randaugment_layers must be >= 0'),
    ({'ema_decay': 1.0}, r'ema_decay must be in \[0, 1\)'),
  ],
)
def test_bad_recipe_settings_fail_in_one_line(overrides, message):
  with pytest.raises(trainer.ConfigError, match=message):
    config_checks.check_config(tiny_config(**overrides))


# RandAugment against PIL, the reference's image library.
PIL = pytest.importorskip('PIL')
from PIL import Image, ImageEnhance, ImageOps  # noqa: E402


def noise(seed=0, shape=(20, 24, 3)):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def smooth(shape=(40, 48)):
  rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
  return np.stack([cols * 5, rows * 6, (rows + cols) * 2], -1).clip(0, 255).astype(np.uint8)


POINT_OPERATIONS = [
  ('auto_contrast', lambda t: randaugment.auto_contrast(t), ImageOps.autocontrast),
  ('equalize', lambda t: randaugment.equalize(t), ImageOps.equalize),
  (
    'posterize',
    lambda t: randaugment.posterize(t, tf.constant(3.0)),
    lambda p: ImageOps.posterize(p, 3),
  ),
  ('solarize', lambda t: randaugment.solarize(t, 100.0), lambda p: ImageOps.solarize(p, 100)),
  ('color', lambda t: randaugment.color(t, 1.7), lambda p: ImageEnhance.Color(p).enhance(1.7)),
  (
    'contrast',
    lambda t: randaugment.contrast(t, 0.4),
    lambda p: ImageEnhance.Contrast(p).enhance(0.4),
  ),
  (
    'brightness',
    lambda t: randaugment.brightness(t, 1.3),
    lambda p: ImageEnhance.Brightness(p).enhance(1.3),
  ),
  (
    'sharpness',
    lambda t: randaugment.sharpness(t, 1.9),
    lambda p: ImageEnhance.Sharpness(p).enhance(1.9),
  ),
]


@pytest.mark.parametrize(
  'name, ours, theirs', POINT_OPERATIONS, ids=[o[0] for o in POINT_OPERATIONS]
)
def test_pixel_operations_match_pil_within_rounding(name, ours, theirs):
  pixels = noise()
  got = np.round(ours(tf.constant(pixels, tf.float32)).numpy())
  expected = np.asarray(theirs(Image.fromarray(pixels)), np.float32)
  # PIL rounds and truncates as it goes; float32 lands on the other side of an
  # integer for a few pixels at most (rounding only at the end: 16-61% off by 1).
  assert np.abs(got - expected).max() <= 1 and (got != expected).mean() < 0.02, name


@pytest.mark.parametrize(
  'name, ours, matrix',
  [
    ('rotate', lambda t: randaugment.rotate(t, tf.constant(-25.0)), None),
    (
      'shear_x',
      lambda t: randaugment._affine(t, [1.0, 0.2, 0.0, 0.0, 1.0, 0.0]),
      (1, 0.2, 0, 0, 1, 0),
    ),
    (
      'shear_y',
      lambda t: randaugment._affine(t, [1.0, 0.0, 0.0, -0.25, 1.0, 0.0]),
      (1, 0, 0, -0.25, 1, 0),
    ),
    (
      'translate_y',
      lambda t: randaugment._affine(t, [1.0, 0.0, 0.0, 0.0, 1.0, -7.0]),
      (1, 0, 0, 0, 1, -7),
    ),
  ],
)
def test_geometric_operations_match_pil_away_from_the_fill_border(name, ours, matrix):
  pixels = smooth()
  image = Image.fromarray(pixels)
  options = {'resample': Image.BILINEAR, 'fillcolor': (128, 128, 128)}
  expected = (
    image.rotate(-25.0, **options)
    if matrix is None
    else image.transform(image.size, Image.AFFINE, matrix, **options)
  )
  difference = np.abs(
    np.round(ours(tf.constant(pixels, tf.float32)).numpy()) - np.asarray(expected, np.float32)
  )
  # Off only at the fill border (pixel centres as PIL's; half a pixel off: 9-31% differ by > 1).
  assert np.median(difference) == 0 and (difference > 1).mean() < 0.05, name


def test_every_operation_runs_at_every_level_and_keeps_the_range():
  image = tf.constant(noise(1, (24, 24, 3)), tf.float32)
  for index in range(len(randaugment.OPERATIONS)):
    for level in (0.0, 9.0, 14.0):
      out = randaugment._operation(
        image, tf.constant(index), tf.constant(level), -1.0, tf.constant([3, 4])
      )
      assert out.shape == image.shape
      assert 0 <= float(tf.reduce_min(out)) and float(tf.reduce_max(out)) <= 255


def test_rand_augment_is_a_function_of_its_seed():
  image = tf.constant(smooth(), tf.float32)
  a = randaugment.rand_augment(image, tf.constant([1, 2], tf.int64), 2, 15)
  b = randaugment.rand_augment(image, tf.constant([1, 2], tf.int64), 2, 15)
  outputs = [
    randaugment.rand_augment(image, tf.constant([s, 9], tf.int64), 2, 15) for s in range(6)
  ]
  np.testing.assert_array_equal(a, b)
  assert len({o.numpy().tobytes() for o in outputs}) > 1


def test_the_pipeline_applies_it_on_top_of_the_same_crops(digits_dir):
  config = tiny_config(digits_dir).dataset
  config.in_memory = False
  plain = next(data.train_batches(config, global_batch_size=16, seed=0))
  config.randaugment_layers = 2
  augmented = next(data.train_batches(config, global_batch_size=16, seed=0))
  np.testing.assert_array_equal(plain['label'], augmented['label'])
  changed = [not np.allclose(a, b) for a, b in zip(plain['image'], augmented['image'], strict=True)]
  assert sum(changed) >= 12  # Some operations can leave an image as it was (e.g. a low level).


# The reference's custom L2 on the equivalent kernel (optimizer.custom_l2).
# A0's blocks at a quarter of its widths: every kind of block, compiled in seconds.
SMALL_A0 = Variant('RepVGG-A0-small', (2, 2, 1, 1), (0.25, 0.25))


def reference_custom_l2(params, stats):
  """get_custom_L2 of the reference, block by block, in NumPy (OIHW as PyTorch's)."""
  total = 0.0
  for key, block in params.items():
    if not key.startswith('stage') or 'conv1x1' not in block:
      continue
    k3 = np.transpose(np.asarray(block['conv3x3']['conv']['kernel'], np.float64), (3, 2, 0, 1))
    k1 = np.transpose(np.asarray(block['conv1x1']['conv']['kernel'], np.float64), (3, 2, 0, 1))
    t = {
      name: (
        np.asarray(block[name]['bn']['scale'], np.float64)
        / np.sqrt(np.asarray(stats[key][name]['bn']['var'], np.float64) + 1e-5)
      ).reshape(-1, 1, 1, 1)
      for name in ('conv3x3', 'conv1x1')
    }
    ring = (k3**2).sum() - (k3[:, :, 1:2, 1:2] ** 2).sum()
    equivalent = k3[:, :, 1:2, 1:2] * t['conv3x3'] + k1 * t['conv1x1']
    total += ring + (equivalent**2 / (t['conv3x3'] ** 2 + t['conv1x1'] ** 2)).sum()
  return total


def test_custom_l2_is_the_references_and_holds_the_bn_factor_constant():
  from helpers import random_variables

  from repvgg_jax.model import create_model
  from repvgg_jax.train import optim

  model = create_model(SMALL_A0, num_classes=10)
  variables = random_variables(model, (1, 32, 32, 3))
  value = optim.equivalent_kernel_l2(variables['params'], variables['batch_stats'])
  expected = reference_custom_l2(variables['params'], variables['batch_stats'])
  np.testing.assert_allclose(float(value), expected, rtol=1e-5)
  grads = jax.grad(optim.equivalent_kernel_l2)(variables['params'], variables['batch_stats'])
  block = grads['stage1_block1']
  assert not np.any(block['conv3x3']['bn']['scale']) and not np.any(block['conv1x1']['bn']['scale'])
  assert np.any(block['conv3x3']['conv']['kernel']) and np.any(block['conv1x1']['conv']['kernel'])
  plain = optim.weight_decay_mask(variables['params'])
  custom = optim.weight_decay_mask(variables['params'], custom_l2=True)
  for key in ('conv3x3', 'conv1x1'):
    assert plain['stage1_block1'][key]['conv']['kernel']
    assert not custom['stage1_block1'][key]['conv']['kernel']
  assert custom['linear']['kernel'] and custom['stage1_block1']['identity']['scale']


def test_the_step_takes_custom_l2_on_the_running_statistics_its_forward_pass_updated():
  """As the reference's train.py: the model runs (updating BatchNorm's running
  variance), then ``get_custom_L2`` reads that variance."""
  import optax
  from helpers import random_variables

  from repvgg_jax.model import create_model
  from repvgg_jax.train import optim

  model = create_model(SMALL_A0, num_classes=10)
  variables = random_variables(model, (1, 32, 32, 3))
  state = steps.TrainState.create(
    apply_fn=model.apply,
    params=variables['params'],
    tx=optax.sgd(0.0),
    batch_stats=variables['batch_stats'],
  )
  images = jax.random.normal(jax.random.key(1), (8, 32, 32, 3)) * 3.0
  batch = {'image': images, 'label': jnp.arange(8) % 10}
  step = jax.jit(steps.train_step, static_argnames=('model', 'num_classes', 'custom_l2'))
  new, plain = step(state, batch, jax.random.key(2), model=model, num_classes=10)
  _, with_l2 = step(state, batch, jax.random.key(2), model=model, num_classes=10, custom_l2=0.5)
  after = optim.equivalent_kernel_l2(state.params, new.batch_stats)
  before = optim.equivalent_kernel_l2(state.params, state.batch_stats)
  added = float(with_l2['loss'] - plain['loss'])
  assert added == pytest.approx(0.5 * float(after), rel=1e-4)
  assert abs(float(after - before)) > 1e-3 * float(after)  # The two readings differ here.


def test_custom_l2_trains_otherwise_than_plain_decay(digits_dir, tmp_path):
  runs = {}
  for custom in (False, True):
    config = tiny_config(digits_dir, **{'optimizer.custom_l2': custom, 'num_train_steps': 1})
    summary = trainer.train_and_evaluate(config, tmp_path / str(custom))
    assert summary['steps'] == 1 and np.isfinite(summary['eval_loss'])
    runs[custom] = checkpoint_params(tmp_path / str(custom))[0]
  plain, custom = runs[False]['stage1_block0'], runs[True]['stage1_block0']
  assert not np.array_equal(plain['conv3x3']['conv']['kernel'], custom['conv3x3']['conv']['kernel'])
  # One step: the same forward pass, so the classifier's update is the same.
  np.testing.assert_array_equal(runs[False]['linear']['kernel'], runs[True]['linear']['kernel'])


def test_the_warm_up_starts_the_cosine_or_takes_its_first_steps():
  """`optimizer.warmup_prefix`: the cosine after the warm-up (True) or over the whole run,
  as timm's CosineLRScheduler with ``warmup_prefix=False`` (the reference's main.py)."""
  from configs import default
  from repvgg_jax.train import optim

  config = default.get_config()
  config.optimizer.warmup_epochs = 2.0
  peak, warmup, total = 0.1, 20, 100  # 10 steps per epoch.
  after = optim.learning_rate_schedule(config, 10, total)
  config.optimizer.warmup_prefix = False
  whole = optim.learning_rate_schedule(config, 10, total)
  for step in (0, 7, 19):
    assert float(after(step)) == pytest.approx(peak * step / warmup, rel=1e-6)
    assert float(whole(step)) == pytest.approx(peak * step / warmup, rel=1e-6)
  for step in (20, 47, 99, 100):
    cosine_after = 0.5 * peak * (1 + np.cos(np.pi * (step - warmup) / (total - warmup)))
    assert float(after(step)) == pytest.approx(cosine_after, rel=1e-5, abs=1e-7)
    cosine_whole = 0.5 * peak * (1 + np.cos(np.pi * step / total))
    assert float(whole(step)) == pytest.approx(cosine_whole, rel=1e-5, abs=1e-7)
  assert float(whole(60)) < float(after(60))  # Apart by 4% of the peak there.


def test_biases_move_at_their_multiple_of_the_rate():
  """`optimizer.bias_lr_multiplier`: every bias's update is that multiple of what it is
  without, over steps with momentum too; every other parameter's is the same."""
  from helpers import random_variables

  from configs import default
  from repvgg_jax.model import create_model
  from repvgg_jax.train import optim

  params = random_variables(create_model('A0', num_classes=10), (1, 32, 32, 3))['params']
  grads = [jax.tree.map(lambda p, k=k: jnp.full_like(p, 0.5 - k) * p, params) for k in range(3)]

  def updates(multiplier):
    config = default.get_config()
    config.optimizer.bias_lr_multiplier = multiplier
    optimizer = optim.make_optimizer(config, steps_per_epoch=10, total_steps=100)
    state, current = optimizer.init(params), params
    for grad in grads:
      update, state = optimizer.update(grad, state, current)
    return update

  plain, doubled = updates(1.0), updates(2.0)
  paths = jax.tree_util.tree_leaves_with_path(plain)
  biases = [jax.tree_util.keystr(path) for path, _ in paths if path[-1].key == 'bias']
  assert "['linear']['bias']" in biases and "['stage1_block1']['identity']['bias']" in biases
  for (path, one), two in zip(paths, jax.tree.leaves(doubled), strict=True):
    factor = 2.0 if path[-1].key == 'bias' else 1.0
    np.testing.assert_array_equal(two, factor * one, err_msg=jax.tree_util.keystr(path))
