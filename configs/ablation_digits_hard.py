"""The digits ablation at the paper's learning rate, where the branches a block
trains with decide how well it trains. Offline, CPU.

  python -m repvgg_jax.ablate --config configs/ablation_digits_hard.py [--workdir DIR]

configs/ablation_digits.py with one change: the peak learning rate is the
paper's, 0.1 per 256 images (0.025 at batch 64), instead of a quarter of it. Same
rows (Table 6's, the wider family, QARepVGG's block, the custom L2), 3 seeds,
5 epochs; it prints one progress line per run and the table at the end, and
writes DIR/ablation.md, DIR/ablation.csv and DIR/ablation.png (default DIR:
workdirs/ablation_digits_hard).

Hardware: any CPU; 23 minutes for the 27 runs on the 2-core development CPU
(2026-12-06). Expected fused top-1, mean of 3 seeds: none 43%, 1x1 82%,
identity 98%, paper 95%; the plain stacks vary most with the seed.
docs/ablations.md has the table, why this setting was picked, and the one
measured before it.
"""

from configs import ablation_digits


def get_config():
  config = ablation_digits.get_config()
  config.optimizer.learning_rate = 0.1  # The paper's rate per 256 images.
  return config
