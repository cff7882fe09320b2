"""Branch-set ablation of RepVGG-B0 on ImageNet, the paper's protocol (Table 6 and more).

  python -m repvgg_jax.ablate --config configs/ablation_b0_imagenet.py --workdir /ckpt/ablation_b0

Each row of ablation.branch_sets (those of configs/ablation_digits.py) trains B0
for 120 epochs with the recipe of configs/b0.py (SGD 0.9, batch 256, lr 0.1
cosine, weight decay 1e-4, BatchNorm per 32 images), in DIR/<row>/seed<s>. It prints one
progress line per row and the table at the end, and writes DIR/ablation.md,
DIR/ablation.csv and DIR/ablation.png (DIR: the --workdir); speed is inference
on one device at batch 128, 224x224, in the model's dtype (float32 by default,
as the paper's Table 6). The rows run one after the other; a rerun skips
finished rows and resumes an interrupted one from its checkpoint. To spread the
rows over machines, give each one some rows (--config.ablation.only=none,paper),
then gather the row directories into one workdir and run without `only`: it
reuses them and writes the full table.

Hardware: 8 GPUs (global batch 256 = 8 x 32, as the paper); pass
--config.model.dtype=bfloat16 on recent GPUs. The paper reports (B0, top-1):
none 72.39, identity 74.79, 1x1 73.15, both 75.14.

Expected cost, estimated, not measured: 120 epochs are 153.7M training images
per row. Training costs about three forward passes of the training-time
structure, so a row trains at about a third of that structure's unfused
inference speed: from the paper's 1080Ti figures (none 1810/s, identity 1569/s,
1x1 1230/s, both 1061/s) that is 71, 82, 104 and 121 1080Ti-hours for the four
Table 6 rows. For acnet, dbb and mobileone (K=4) we scaled the paper row by the
ratio of unfused speeds measured in a digits ablation run with K=4 (CPU, 32x32:
810/721, 810/436 and 810/195 images/s; a GPU at 224x224 will differ), giving about 136,
225 and 500 1080Ti-hours. The qarepvgg row (QARepVGG-B0, the same convolutions
as the paper row) and the custom_l2 row (the paper's blocks) cost about the paper
row's 121 each. All nine: about 1,480 1080Ti-hours, i.e. roughly 185-300
GPU-hours on A100/H100-class GPUs in bfloat16 (assuming 5-8x a 1080Ti), or about
23-37 hours on 8 such GPUs, per seed, plus the one-off ImageNet preparation
(hours).
Measured since on one NVIDIA H200 (docs/performance.md, "Measured on a GPU"): B0 with both
branches trains at 9,259 images/s in bfloat16 at batch 256 per GPU, so that row's
steps take 4.6 GPU-hours, not the 15-24 estimated here; the other branch sets
and 32 images per GPU were not timed, and decoding JPEGs at that rate needs
many CPU cores per GPU.
"""

from configs import ablation_digits, b0


def get_config():
  config = b0.get_config()

  # One seed, as the paper (3 give intervals, at 3x the GPU-hours); the paper's batch of 128.
  config.ablation = ablation_digits.ablation_settings(
    ablation_digits.branch_sets(mobileone_k=4),
    seeds=1,
    bench_batch_size=128,
    bench_image_size=224,
    bench_runs=20,
    bench_warmup=5,
  )
  return config
