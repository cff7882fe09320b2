"""QARepVGG-A0 on ImageNet, for the int8 comparison with RepVGG-A0 (configs/a0.py).

  python train.py --config configs/qarepvgg_a0.py --workdir /ckpt/qarepvgg_a0
  python -m repvgg_jax.convert quantize /ckpt/qarepvgg_a0 /ckpt/qarepvgg_a0_int8

and the same two commands with configs/a0.py: quantize.json then holds each
model's float32 and int8 top-1 on the 50,000 validation images. The recipe is
a0.py's (the paper's: 120 epochs, batch 256, SGD 0.1 cosine, weight decay
1e-4), with QARepVGG's block. Hardware: 8 GPUs with 32 images each, as a0.py.
Chu et al. (AAAI 2024) report ImageNet top-1 after standard int8 post-training
quantization: RepVGG-A0 72.4 -> 52.2, QARepVGG-A0 70.4 (docs/quantization.md).
"""

from configs import a0


def get_config():
  config = a0.get_config()
  config.model.name = 'QARepVGG-A0'
  return config
