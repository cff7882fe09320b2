"""QARepVGG-A0 on the embedded digits: configs/digits.py with QARepVGG's blocks.

  python train.py --config configs/digits_qarepvgg.py --workdir W
  python -m repvgg_jax.convert quantize W Q   # int8; Q/quantize.json has both top-1s

QARepVGG's block (Chu et al., AAAI 2024) keeps the BatchNorm only on the 3x3
branch and adds one after the sum; it fuses into the same plain network as
RepVGG-A0. Same data, schedule and seed as digits.py. Hardware: any CPU; see
docs/quantization.md for the accuracy reached on 2 cores, fused and in int8.
"""

from configs import digits


def get_config():
  config = digits.get_config()
  config.model.name = 'QARepVGG-A0'
  return config
