"""Branch-set ablation on the embedded digits: 7 branch sets of RepVGG-A0,
QARepVGG-A0's block and the reference's custom L2, 3 seeds each, offline.

  python -m repvgg_jax.ablate --config configs/ablation_digits.py [--workdir DIR]
  python -m repvgg_jax.ablate --config configs/ablation_digits.py --config.ablation.only=none,paper

Trains RepVGG-A0 once per row of ablation.branch_sets (the paper's Table 6 rows,
then ACNet's, the Diverse Branch Block's and MobileOne's sets, QARepVGG-A0 as row
'qarepvgg', the custom L2 as row 'custom_l2') and seed (0, 1, 2) with the same
schedule, in DIR/<row>/seed<s> (default DIR: workdirs/ablation_digits). It
prints one progress line per run (top-1 unfused, fused and int8, logit error)
and the table at the end (mean and 95% interval over the seeds, the paired
difference to row 'paper', speeds timed round robin), and writes
DIR/ablation.md, DIR/ablation.csv and DIR/ablation.png. A rerun skips finished
runs and continues an interrupted one from its checkpoint.

Hardware: any CPU. Measured from a clean workdir on the 2-core development CPU
(2026-12-06): the two-row subset above with three seeds in 4 min 2 s, 31-42 s a
run with its int8 evaluation. The nine rows make 27 runs; at the paper's
learning rate (configs/ablation_digits_hard.py, the same steps) they took 23
minutes. See docs/ablations.md.
"""

import ml_collections

from configs import digits


def get_config():
  config = digits.get_config()
  config.num_epochs = 5.0  # Shorter than digits.py (15), for 9 rows x 3 seeds on a CPU.
  config.eval_every_epochs = 0.0  # Evaluate at the end only.
  config.checkpoint_every_steps = 50  # An interrupted row resumes from here.
  # Peak learning rate per 256 images (0.00625 at batch 64), a quarter of the paper's: at
  # the paper's the plain stacks barely train in 5 epochs (configs/ablation_digits_hard.py).
  config.optimizer.learning_rate = 0.025

  config.ablation = ablation_settings(
    branch_sets(), seeds=3, bench_batch_size=64, bench_image_size=0, bench_runs=30, bench_warmup=3
  )
  return config


def ablation_settings(
  rows: dict,
  *,
  seeds: int,
  bench_batch_size: int,
  bench_image_size: int,
  bench_runs: int,
  bench_warmup: int,
) -> ml_collections.ConfigDict:
  """``config.ablation``: the rows (`branch_sets`) and how they are run and compared."""
  ablation = ml_collections.ConfigDict()
  # Row name (a directory name) -> branch kinds of every block, a block kind ('qarepvgg':
  # the variant with QARepVGG's blocks), or {'branches': ..., <settings the row changes>};
  # rows run in this order.
  ablation.branch_sets = ml_collections.ConfigDict(rows, sort_keys=False)
  ablation.only = ''  # Comma-separated row names to run and report; '': all rows.
  ablation.seeds = seeds  # Runs per row, with seeds config.seed, config.seed + 1, ...
  ablation.reference = 'paper'  # The row the others are compared with, seed by seed.
  # int8 post-training quantization of every fused model, static ranges calibrated on
  # this many training batches (the top-1 int8 column; 0: none).
  ablation.int8_calibration_batches = 8
  ablation.bench_batch_size = bench_batch_size  # Images per timed inference batch.
  ablation.bench_image_size = bench_image_size  # Timed image side in pixels; 0: the dataset's.
  ablation.bench_runs = bench_runs  # Rounds timing every row's two models (median, quartiles).
  ablation.bench_warmup = bench_warmup  # Untimed runs of each model after compiling.
  return ablation


def branch_sets(mobileone_k: int = 2) -> dict[str, tuple[str, ...] | str | dict]:
  """The rows: the paper's Table 6 (none, identity, 1x1, both), then the wider
  family, then QARepVGG's block, then RepVGG's block with the reference's custom L2.

  MobileOne's branch count K is 2 here, which keeps the CPU run short; the
  ImageNet config uses MobileOne-S0's K = 4.
  """
  return {
    'none': ('conv3x3',),
    'identity': ('conv3x3', 'identity'),
    '1x1': ('conv3x3', 'conv1x1'),
    'paper': ('conv3x3', 'conv1x1', 'identity'),  # Table 6's "both": RepVGG's block.
    'acnet': ('conv3x3', 'conv1x3', 'conv3x1'),
    'dbb': ('conv3x3', 'conv1x1', 'dbb_avg', 'dbb_1x1_3x3'),
    'mobileone': (f'parallel3x3_k{mobileone_k}', 'conv1x1', 'identity'),
    'qarepvgg': 'qarepvgg',  # 3x3 conv-BN + 1x1 + identity, BatchNorm of the sum.
    # RepVGG's block with the reference's custom L2 on the equivalent kernel instead of
    # plain weight decay on its 3x3 and 1x1 kernels (optimizer.custom_l2).
    'custom_l2': {'branches': ('conv3x3', 'conv1x1', 'identity'), 'optimizer': {'custom_l2': True}},
  }
