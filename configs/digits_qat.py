"""Quantization-aware fine-tuning (int8) of a fused RepVGG-A0 on the embedded digits.

  python train.py --config configs/digits.py --workdir W
  python train.py --config configs/digits_qat.py --config.qat.init_from=W --workdir WQ
  python -m repvgg_jax.convert quantize WQ Q   # the int8 model; Q/quantize.json

Starts from W's fused model and trains that plain network with every
convolution and the classifier computed in fake int8 (Qwix: per-channel weight
scales, static activation ranges), with digits.py's data, at a tenth of its
learning rate for 3 epochs. Checkpoints, resume and SIGTERM are as for any
run; WQ/deploy holds the fine-tuned float weights, which `convert quantize WQ`
turns into int8 with the activation ranges the run learned. For QARepVGG-A0
add --config.model.name=QARepVGG-A0 (and init_from a digits_qarepvgg.py
workdir). Hardware: any CPU, about 90 s on 2 cores; the figures reached are in
docs/quantization.md.
"""

from configs import digits


def get_config():
  config = digits.get_config()
  config.qat.enabled = True
  config.model.conv_impl = 'xla'  # Qwix quantizes lax's convolutions.
  config.optimizer.learning_rate = 0.005  # Peak per 256 images: a tenth of digits.py's.
  config.num_epochs = 3.0
  config.eval_every_epochs = 1.0
  config.checkpoint_every_steps = 22  # Once per epoch (22 steps of 64 images).
  config.steps_per_call = 1  # XLA:CPU runs lax's convolutions slowly inside a multi-step loop.
  config.log_every_steps = 22
  return config
