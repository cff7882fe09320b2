"""What feeding a GPU costs: JPEG decoding, the random-resized crop and the flip, per core.

    python -m repvgg_jax.bench input [--images 512] [--size 224]

Makes ImageNet-like JPEGs (400-640 x 300-480 pixels, smooth random content,
quality 90), then runs them through tf.data as training does: decode, an
Inception-style random crop (`input_pipeline.inception_window`)
resized to the square, a random flip and normalization. Four forms are timed:
the pipeline's (decode the whole image, crop, antialiased bilinear resize as
PIL does), decode and crop fused (`tf.image.decode_and_crop_jpeg` decodes only
the window), the fused form with plain bilinear resizing, and the pipeline's
with the long recipe's RandAugment (2 operations, levels below 15). Each runs on one
thread (images/s per core) and on every core; the last column says how many
such cores one GPU training B0 at ``--gpu-rate`` images/s needs.
"""

from __future__ import annotations

import os
import statistics

import ml_collections
import numpy as np
import tensorflow as tf

from repvgg_jax.bench import timing
from repvgg_jax.data import input_pipeline

# Form -> (decode only the crop window, antialiased resize, RandAugment 2 x 15). The
# pipeline's is the first; the last is the pipeline with the long recipe's RandAugment.
FORMS = {
  'decode_then_crop': (False, True, False),
  'decode_and_crop': (True, True, False),
  'decode_and_crop_no_antialias': (True, False, False),
  'decode_then_crop_randaugment': (False, True, True),
}


def make_jpegs(count: int, seed: int = 0, quality: int = 90) -> list[bytes]:
  """``count`` JPEGs of ImageNet-like sizes: smooth colour fields with fine noise."""
  rng = np.random.default_rng(seed)
  jpegs = []
  for _ in range(count):
    width, height = int(rng.integers(400, 641)), int(rng.integers(300, 481))
    coarse = rng.uniform(0, 255, (height // 16 + 1, width // 16 + 1, 3)).astype(np.float32)
    image = tf.image.resize(coarse, (height, width), method='bicubic').numpy()
    image += rng.normal(0, 12, image.shape).astype(np.float32)
    pixels = np.clip(image, 0, 255).astype(np.uint8)
    jpegs.append(tf.io.encode_jpeg(pixels, quality=quality).numpy())
  return jpegs


def _preprocess(form: str, image_size: int):
  """The map function of ``form``: the training pipeline's own, or a faster variant."""
  window_only, antialias, augment = FORMS[form]
  config = ml_collections.ConfigDict(
    {
      'train_augment': 'inception_crop',
      'crop_sampler': 'torchvision',
      'image_size': image_size,
      'flip': True,
      'randaugment_layers': 2 if augment else 0,
      'randaugment_magnitude': 15,
    }
  )

  def preprocess(jpeg, seed):
    if not window_only:  # The pipeline as training runs it.
      return input_pipeline.preprocess_for_train(tf.io.decode_jpeg(jpeg, channels=3), seed, config)
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    begin, size = input_pipeline.inception_window(tf.image.extract_jpeg_shape(jpeg), crop_seed)
    window = tf.stack([begin[0], begin[1], size[0], size[1]])
    image = tf.image.decode_and_crop_jpeg(jpeg, window, channels=3)
    image = tf.image.resize(
      tf.cast(image, tf.float32), (image_size, image_size), 'bilinear', antialias=antialias
    )
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    return input_pipeline.normalize_image(image)

  return preprocess


def one_pass(jpegs: list[bytes], form: str, threads: int, image_size: int):
  """A function running ``jpegs`` once through tf.data on ``threads`` threads."""
  seeds = np.stack([np.arange(len(jpegs)), np.zeros(len(jpegs), np.int64)], axis=1)
  dataset = tf.data.Dataset.from_tensor_slices((jpegs, seeds))
  dataset = dataset.map(_preprocess(form, image_size), num_parallel_calls=threads)
  options = tf.data.Options()
  options.threading.private_threadpool_size = threads
  options.threading.max_intra_op_parallelism = 1
  options.autotune.enabled = False
  dataset = dataset.with_options(options).batch(32).prefetch(1)

  def run():
    for _ in dataset:
      pass

  return run


def benchmark_input(
  count: int = 512, image_size: int = 224, repeats: int = 3, gpu_rate: float = timing.B0_GPU_RATE
) -> list[dict]:
  """Per form and thread count: median images/s of ``repeats`` passes, interleaved."""
  jpegs = make_jpegs(count)
  kilobytes = float(np.mean([len(j) for j in jpegs]) / 1e3)
  plans = [(form, threads) for form in FORMS for threads in sorted({1, os.cpu_count() or 1})]
  for form, threads in plans:  # Warm-up: tf.data traces each map function once.
    one_pass(jpegs[:32], form, threads, image_size)()
  passes = {plan: one_pass(jpegs, *plan, image_size) for plan in plans}
  medians = timing.interleaved_medians(passes, runs=repeats, warmup=0)
  rates = {
    plan: [count / seconds for seconds in all_seconds] for plan, (_, all_seconds) in medians.items()
  }
  rows = []
  for (form, threads), values in rates.items():
    rate = statistics.median(values)
    rows.append(
      {
        'form': form,
        'threads': threads,
        'images_per_sec': rate,
        'images_per_sec_per_core': rate / threads,
        'all_images_per_sec': values,
        'cores_per_gpu': gpu_rate / (rate / threads),
        'gpu_rate': gpu_rate,
        'images': count,
        'mean_jpeg_kb': kilobytes,
        'image_size': image_size,
        'tensorflow': tf.__version__,
      }
    )
  return rows


def format_input(rows: list[dict]) -> str:
  first = rows[0]
  lines = [
    f'{first["images"]} JPEGs (mean {first["mean_jpeg_kb"]:.0f} KB) -> {first["image_size"]}x'
    f'{first["image_size"]} crops, flipped, normalized; median of interleaved passes',
    '',
    f'| form | threads | images/s | per core | cores for one GPU at {first["gpu_rate"]:,.0f}/s |',
    '|---|---|---|---|---|',
  ]
  for row in rows:
    lines.append(
      f'| {row["form"]} | {row["threads"]} | {row["images_per_sec"]:,.0f} | '
      f'{row["images_per_sec_per_core"]:,.0f} | {row["cores_per_gpu"]:.1f} |'
    )
  return '\n'.join(lines)
