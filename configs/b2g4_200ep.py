"""RepVGG-B2g4 on ImageNet: the paper's 200-epoch recipe (`default.long_recipe`).

  python train.py --config configs/b2g4_200ep.py --workdir /path/to/workdir \
    --config.model.dtype=bfloat16

The paper trained its three heaviest models (B2g4, B3g4, B3) for 200 epochs
with label smoothing, mixup and AutoAugment (Ding et al. 2021, Sec. 4.2 and
Table 5); `default.long_recipe` lists the settings and where each comes from
in the official repository (github.com/DingXiaoH/RepVGG). Hardware: 8 GPUs
with the global batch of 256 (32 per GPU), as in the paper.
Paper ImageNet top-1: 79.38.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.name = 'RepVGG-B2g4'
  return default.long_recipe(config)
