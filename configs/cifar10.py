"""RepVGG-A0 on CIFAR-10 at 32x32, the paper's optimizer for 200 epochs.

  python train.py --config configs/cifar10.py --config.dataset.download=True

tfds downloads CIFAR-10 (160 MB) once when asked to (`dataset.download`);
without it a missing dataset fails at once with the command to fetch it.
Hardware: one GPU. The paper reports no CIFAR figure for RepVGG.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.name = 'RepVGG-A0'

  config.dataset.name = 'cifar10'
  config.dataset.num_classes = 10
  config.dataset.image_size = 32
  config.dataset.train_split = 'train'
  config.dataset.eval_split = 'test'
  config.dataset.train_augment = 'pad_crop'
  config.dataset.pad_pixels = 4
  config.dataset.eval_preprocess = 'resize'
  config.dataset.in_memory = True  # 150 MB of uint8 images per process.

  config.batch_size = 128
  config.eval_batch_size = 500
  config.num_epochs = 200.0
  config.optimizer.weight_decay = 5e-4  # The usual CIFAR weight decay.
  config.log_every_steps = 100
  config.eval_every_epochs = 5.0
  return config
