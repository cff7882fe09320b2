"""RepVGG-B3 on ImageNet, the paper's 200-epoch recipe (Table 5): 80.52 top-1 in the paper.

  python train.py --config configs/b3_200ep.py --workdir DIR --config.model.dtype=bfloat16

On 8 GPUs with the paper's global batch of 256. `default.long_recipe` gives the
settings and where each comes from in github.com/DingXiaoH/RepVGG.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.name = 'RepVGG-B3'
  return default.long_recipe(config)
