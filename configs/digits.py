"""The embedded default: RepVGG-A0 on scikit-learn's handwritten digits, offline.

  python train.py --config configs/digits.py

1,797 real 8x8 digit images ship with scikit-learn; they are prepared once
into the tfds data dir as 32x32 RGB (1,437 train, 360 test). Hardware: any
CPU; see README.md for the time and accuracy measured on 2 cores.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.name = 'RepVGG-A0'
  config.model.bn_group_size = 0  # Small batches: statistics over the whole batch.

  config.dataset.name = 'sklearn_digits'
  config.dataset.num_classes = 10
  config.dataset.image_size = 32
  config.dataset.train_split = 'train'
  config.dataset.eval_split = 'test'
  config.dataset.train_augment = 'pad_crop'
  config.dataset.pad_pixels = 2
  config.dataset.flip = False  # A mirrored digit is another glyph.
  config.dataset.eval_preprocess = 'resize'
  config.dataset.in_memory = True  # 4.4 MB of images: tf.data per epoch cost a fifth of the run.

  config.batch_size = 64
  # Half the paper's rate, which did better over three seeds (docs/training.md).
  config.optimizer.learning_rate = 0.05
  config.optimizer.bias_lr_multiplier = 1.0  # Every digits result was measured so.
  config.eval_batch_size = 120
  config.num_epochs = 15.0
  config.log_every_steps = 20
  config.eval_every_epochs = 5.0
  config.checkpoint_every_steps = 100
  # Ten steps per call (a scan): each call's temporaries are mapped in once, not per step
  # (docs/performance.md). Divides 20, 100, 110 and 330.
  config.steps_per_call = 10
  return config
