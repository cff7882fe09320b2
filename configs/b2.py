"""RepVGG-B2 on ImageNet: 120 epochs, the paper's recipe in default.py.

  python train.py --config configs/b2.py --workdir /path/to/workdir

Hardware: 8 GPUs with the global batch of 256 (32 per GPU), as in the paper.
1, 2 or 4 devices give the same result: BatchNorm statistics are per group of
32 images whatever the device count.
Paper ImageNet top-1: 78.78.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.name = 'RepVGG-B2'
  return config
