"""Segmentation with a RepVGG backbone and a decoder of RepVGG blocks, fused in one call.

    python examples/segment_digits.py [--steps 300] [--out results.json]

The task is made here from the embedded handwritten digits: each 64x64 canvas
holds up to four digits (one per quadrant, shrunk to 24x24 and shifted at
random), and the mask labels each pixel with its digit (1-10) or background
(0). Training digits make the training canvases and test digits the test ones.

The network: RepVGG-A0 as ``backbone`` (stage outputs at strides 4, 8 and 16),
a decoder of standalone `repvgg_jax.RepVGGBlock`s (one with stride 2, one
grouped) and a 1x1 head, upsampled to the input. After training, one
`fuse_params` call on the whole network's variables gives the deploy network's;
the script reports both networks' mean IoU on the test canvases, how many
pixels their predictions disagree on, the relative logit difference, and the
inference speed of both (interleaved repeats, median).
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys
import time

from repvgg_jax.startup import quiet_startup

quiet_startup()  # Before TensorFlow (which the digits come through) and JAX start.

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import repvgg_jax  # noqa: E402
from repvgg_jax import jsonfiles  # noqa: E402
from repvgg_jax.bench.timing import interleaved_medians  # noqa: E402
from repvgg_jax.data import digits  # noqa: E402

CANVAS = 64
DIGIT = 24  # Side of a pasted digit.
CELL = CANVAS // 2  # One digit per quadrant, shifted by up to CELL - DIGIT pixels.
NUM_CLASSES = 11  # Background and the ten digits.
INK = 0.35  # A pixel is the digit's where its grey level exceeds this fraction of white.
TINY = repvgg_jax.Variant('RepVGG-A0-tiny', (1, 1, 1, 1), (0.25, 0.25))


class DigitSegmenter(nn.Module):
  """RepVGG backbone, RepVGG-block decoder, 1x1 head; ``deploy=True`` is the fused network."""

  variant: str | repvgg_jax.Variant = 'RepVGG-A0'
  width: int = 64  # Decoder channels.
  num_classes: int = NUM_CLASSES
  deploy: bool = False

  @nn.compact
  def __call__(self, images, train: bool = False):
    backbone = repvgg_jax.create_model(
      self.variant, num_classes=0, out_indices=(1, 2, 3), deploy=self.deploy, name='backbone'
    )
    c1, c2, c3 = backbone(images, train=train)  # Strides 4, 8, 16.
    block = functools.partial(repvgg_jax.RepVGGBlock, deploy=self.deploy)
    down = block(self.width, strides=2, name='down')(c1, train=train)  # Stride 4 -> 8.
    up = jax.image.resize(c3, c2.shape[:3] + c3.shape[3:], 'bilinear')
    y = jnp.concatenate([down, c2, up], axis=-1)
    y = block(2 * self.width, groups=4, name='mix')(y, train=train)
    y = block(self.width, name='refine')(y, train=train)
    logits = nn.Conv(self.num_classes, (1, 1), name='head')(y)
    return jax.image.resize(logits, images.shape[:3] + logits.shape[3:], 'bilinear')


def make_canvases(
  images: np.ndarray, labels: np.ndarray, count: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
  """``count`` canvases (float32 NHWC, grey as RGB, in [0, 1]) and their int32 masks."""
  rng = np.random.default_rng(seed)
  small = jax.image.resize(images[..., :1] / 255.0, (len(images), DIGIT, DIGIT, 1), 'bilinear')
  small = np.clip(np.asarray(small, np.float32), 0, 1)[..., 0]
  canvases = np.zeros((count, CANVAS, CANVAS), np.float32)
  masks = np.zeros((count, CANVAS, CANVAS), np.int32)
  for n in range(count):
    for row in range(2):
      for col in range(2):
        if rng.random() < 0.3:
          continue  # An empty quadrant.
        index = rng.integers(len(small))
        top = row * CELL + rng.integers(CELL - DIGIT + 1)
        left = col * CELL + rng.integers(CELL - DIGIT + 1)
        window = np.s_[n, top : top + DIGIT, left : left + DIGIT]
        canvases[window] = small[index]
        masks[window] = np.where(small[index] > INK, labels[index] + 1, 0)
  return np.repeat(canvases[..., None], 3, axis=-1), masks


def normalize(images):
  return (images - 0.5) / 0.25


def mean_iou(predictions: np.ndarray, masks: np.ndarray) -> float:
  """Mean over classes present in either of intersection over union."""
  ious = []
  for c in range(NUM_CLASSES):
    predicted, actual = predictions == c, masks == c
    union = np.logical_or(predicted, actual).sum()
    if union:
      ious.append(np.logical_and(predicted, actual).sum() / union)
  return float(np.mean(ious))


def train(model, images, masks, steps: int, batch_size: int, seed: int):
  """Adam with a cosine schedule on pixel-wise cross-entropy; returns the variables."""
  variables = model.init(jax.random.key(seed), jnp.zeros((1, CANVAS, CANVAS, 3)))
  optimizer = optax.adam(optax.cosine_decay_schedule(2e-3, steps))
  params, batch_stats = variables['params'], variables['batch_stats']
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, batch_stats, opt_state, x, y):
    def loss_fn(params):
      logits, state = model.apply(
        {'params': params, 'batch_stats': batch_stats}, x, train=True, mutable=['batch_stats']
      )
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), state

    (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), state['batch_stats'], opt_state, loss

  rng = np.random.default_rng(seed)
  for i in range(steps):
    batch = rng.choice(len(images), batch_size, replace=False)
    params, batch_stats, opt_state, loss = step(
      params, batch_stats, opt_state, normalize(images[batch]), masks[batch]
    )
    if (i + 1) % max(1, steps // 5) == 0 or i + 1 == steps:
      print(f'step {i + 1}/{steps}: loss {float(loss):.4f}', file=sys.stderr)
  return {'params': params, 'batch_stats': batch_stats}


def predict(apply, variables, images, batch_size: int = 64) -> np.ndarray:
  """Logits of all ``images``, batch by batch."""
  return np.concatenate(
    [
      np.asarray(apply(variables, normalize(images[i : i + batch_size])))
      for i in range(0, len(images), batch_size)
    ]
  )


def images_per_second(applies, variables, images, repeats: int) -> list[float]:
  """Median images/s of each (apply, variables), timed in interleaved rounds."""
  x = normalize(images)
  fns = {
    k: (lambda fn=fn, v=v: fn(v, x).block_until_ready())
    for k, (fn, v) in enumerate(zip(applies, variables, strict=True))
  }
  medians = interleaved_medians(fns, runs=repeats, warmup=1)  # The warm-up compiles.
  return [len(images) / medians[k][0] for k in fns]


def run(args) -> dict:
  all_images, all_labels = digits.digits_images_and_labels()
  split = digits.split_indices(len(all_labels))
  train_x, train_y = make_canvases(
    all_images[split['train']], all_labels[split['train']], args.train_canvases, args.seed
  )
  test_x, test_y = make_canvases(
    all_images[split['test']], all_labels[split['test']], args.test_canvases, args.seed + 1
  )
  variant = TINY if args.tiny else args.model
  width = 16 if args.tiny else args.width
  model = DigitSegmenter(variant, width)
  deploy = DigitSegmenter(variant, width, deploy=True)
  start = time.perf_counter()
  variables = train(model, train_x, train_y, args.steps, args.batch_size, args.seed)
  train_seconds = time.perf_counter() - start
  fused = repvgg_jax.fuse_params(variables)  # The whole network, in one call.

  apply_train = jax.jit(functools.partial(model.apply, train=False))
  apply_deploy = jax.jit(deploy.apply)
  logits = predict(apply_train, variables, test_x)
  fused_logits = predict(apply_deploy, fused, test_x)
  predictions, fused_predictions = logits.argmax(-1), fused_logits.argmax(-1)
  speed = images_per_second(
    [apply_train, apply_deploy], [variables, fused], test_x[: args.speed_batch], args.repeats
  )
  count = lambda tree: sum(leaf.size for leaf in jax.tree.leaves(tree))
  return {
    'model': getattr(variant, 'name', variant),
    'steps': args.steps,
    'batch_size': args.batch_size,
    'train_canvases': args.train_canvases,
    'test_canvases': args.test_canvases,
    'train_seconds': round(train_seconds, 1),
    'params_training_time': count(variables['params']),
    'params_fused': count(fused['params']),
    'mean_iou': mean_iou(predictions, test_y),
    'mean_iou_fused': mean_iou(fused_predictions, test_y),
    'pixels_disagreeing': int((predictions != fused_predictions).sum()),
    'pixels': int(predictions.size),
    'relative_logit_difference': float(
      np.linalg.norm(fused_logits - logits) / np.linalg.norm(logits)
    ),
    'images_per_second': round(speed[0], 1),
    'images_per_second_fused': round(speed[1], 1),
    'speed_batch': args.speed_batch,
    'devices': str(jax.devices()[0].device_kind),
  }


def positive_int(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f'must be a positive int, got {value}')
  return value


def parse(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='RepVGG-A0', help='backbone variant')
  parser.add_argument('--width', type=positive_int, default=64, help='decoder channels')
  parser.add_argument('--steps', type=positive_int, default=300, help='training steps')
  parser.add_argument('--batch-size', type=positive_int, default=32, help='canvases per step')
  parser.add_argument('--train-canvases', type=positive_int, default=2000)
  parser.add_argument('--test-canvases', type=positive_int, default=256)
  parser.add_argument(
    '--speed-batch', type=positive_int, default=64, help='canvases per timed call'
  )
  parser.add_argument(
    '--repeats', type=positive_int, default=10, help='timed calls of each network'
  )
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--tiny', action='store_true', help='a narrow, shallow backbone (smoke test)')
  parser.add_argument('--out', type=pathlib.Path, help='also write the results here, as JSON')
  args = parser.parse_args(argv)
  # Checked before the run rather than found after it.
  if args.batch_size > args.train_canvases:
    parser.error(
      f'--batch-size {args.batch_size} is more than the {args.train_canvases} training '
      'canvases: lower it or raise --train-canvases'
    )
  if not args.tiny:
    try:
      repvgg_jax.get_variant(args.model)
    except ValueError as error:
      parser.error(f'--model: {error}')
  if args.out and (args.out.is_dir() or not args.out.absolute().parent.is_dir()):
    parser.error(f'--out {args.out}: name a file in an existing directory')
  return args


def main(argv=None) -> None:
  args = parse(argv)
  results = run(args)
  print(json.dumps(results, indent=2))
  if args.out:
    jsonfiles.write_json(args.out, results)


if __name__ == '__main__':
  main()
