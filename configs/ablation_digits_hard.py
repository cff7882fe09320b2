"""The digits ablation at the paper's learning rate, where the branches a block
trains with decide how well it trains. Offline, CPU.

  python -m repvgg_jax.ablate --config configs/ablation_digits_hard.py [--workdir DIR]

configs/ablation_digits.py with the peak learning rate of the paper, 0.1 per 256
images (0.025 at batch 64), instead of a quarter of it, and 5 seeds instead of 3
(with 3, only the widest gaps excluded zero). Same rows (Table 6's, the wider
family, QARepVGG's block, the custom L2), 5 epochs; it prints one progress line
per run and the table at the end, and writes DIR/ablation.md, DIR/ablation.csv
and DIR/ablation.png (default DIR: workdirs/ablation_digits_hard).

Hardware: any CPU; 38 minutes for the 45 runs on the 2-core development CPU
(2026-12-06). Expected fused top-1, mean of 5 seeds: none 40%, 1x1 79%,
identity 98%, paper 95%; the plain stacks vary most with the seed.
docs/ablations.md has the table, why this setting was picked, and the one
measured before it.
"""

from configs import ablation_digits


def get_config():
  config = ablation_digits.get_config()
  config.optimizer.learning_rate = 0.1  # The paper's rate per 256 images.
  config.ablation.seeds = 5
  return config
