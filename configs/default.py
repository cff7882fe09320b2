"""Defaults: RepVGG-B0 on ImageNet with the paper's recipe.

The per-variant files (a0.py ... b3g4.py) override only the model and, for
the heavy models, the longer recipe. Run one with

  python train.py --config configs/b0.py --workdir /path/to/workdir

The recipe (paper and the reference trainer): SGD momentum 0.9, learning rate
0.1 per 256 images with per-step cosine decay and no warm-up (biases at twice
that rate), weight decay 1e-4 except on biases and the BatchNorms of the conv
branches, 120 epochs,
random-resized crop + flip at 224, evaluation at resize 256 / centre crop 224,
BatchNorm statistics per 32 images (the reference's per-GPU BatchNorm).
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0  # Seeds initialisation, data order, augmentation and mixup.

  config.model = ml_collections.ConfigDict()
  config.model.name = 'RepVGG-B0'  # Variant, see repvgg_jax.list_models() ('QARepVGG-B0' ...).
  # Branch kinds of every block or one set per stage (None: the variant's block kind's).
  config.model.branches = config_dict.placeholder(tuple)  # e.g. ('conv3x3', 'conv1x1').
  config.model.dtype = 'float32'  # Compute dtype: 'float32' or 'bfloat16' (params stay float32).
  config.model.bn_group_size = 32  # Images per BatchNorm statistics group; 0: the global batch.
  # 'auto': on CPUs the fastest kernel per layer and chunked inference (repvgg_jax.perf).
  config.model.conv_impl = 'auto'  # 'xla' (lax's always), 'auto', 'im2col', 'winograd', 'dense'.
  config.model.num_blocks = config_dict.placeholder(tuple)  # Stage 1-4 blocks (None: variant's).
  config.model.width_multipliers = config_dict.placeholder(tuple)  # (a, b) (None: variant's).

  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = 'imagenet2012'  # A tfds name, or 'folder': data_dir/train/<class>/*.
  config.dataset.data_dir = config_dict.placeholder(str)  # tfds data dir, or the image folder.
  config.dataset.manual_dir = config_dict.placeholder(str)  # ImageNet .tar dir (None: default).
  config.dataset.download = False  # Let tfds download the dataset if it is missing.
  config.dataset.num_classes = 1000  # Classifier outputs.
  config.dataset.image_size = 224  # Model input side in pixels.
  config.dataset.train_split = 'train'  # tfds split to train on.
  config.dataset.eval_split = 'validation'  # tfds split to evaluate on.
  config.dataset.train_augment = 'inception_crop'  # 'inception_crop', 'pad_crop' or 'none'.
  config.dataset.crop_sampler = 'torchvision'  # Inception crop's window: 'torchvision' or 'tf'.
  config.dataset.pad_pixels = 4  # Padding of 'pad_crop', in pixels.
  config.dataset.flip = True  # Random horizontal flips in training.
  config.dataset.randaugment_layers = 0  # RandAugment operations per training image; 0: none.
  config.dataset.randaugment_magnitude = 15  # Their levels: uniform in 0 ... magnitude - 1.
  config.dataset.eval_preprocess = 'resize_crop'  # 'resize_crop' (256 -> 224 centre) or 'resize'.
  config.dataset.shuffle_buffer = 16_384  # Examples in the shuffle buffer.
  config.dataset.val_fraction = 0.0  # Folder without val/: share of each class held out.
  config.dataset.skip_bad_images = False  # Folder: leave out (and count) unreadable files.
  config.dataset.in_memory = False  # Train split decoded once, cropped in NumPy (small, pad_crop).

  config.batch_size = 256  # Global training batch, over all devices and hosts.
  config.eval_batch_size = 256  # Global evaluation batch.
  config.num_epochs = 120.0  # Training length in epochs.
  config.num_train_steps = -1  # If > 0, the training length in steps instead of epochs.
  config.steps_per_call = 1  # Optimizer steps per call of the compiled step (logs etc. between).

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 0.1  # Peak learning rate per 256 images (scaled linearly).
  config.optimizer.warmup_epochs = 0.0  # Linear warm-up before the cosine decay, in epochs.
  # False: the cosine spans the whole run, the warm-up replacing its first steps (timm's
  # CosineLRScheduler with warmup_prefix=False, the reference's 200-epoch trainer).
  config.optimizer.warmup_prefix = True  # True: the cosine starts after the warm-up.
  config.optimizer.momentum = 0.9  # SGD momentum.
  config.optimizer.nesterov = False  # Nesterov momentum.
  config.optimizer.weight_decay = 1e-4  # L2 on kernels and the identity BN scale (see optim.py).
  # The reference's get_custom_L2: decay the blocks' equivalent 3x3+1x1 kernel instead.
  config.optimizer.custom_l2 = False  # True: weight_decay / 2 x equivalent_kernel_l2 in the loss.
  config.optimizer.label_smoothing = 0.0  # Label smoothing of the cross-entropy.
  config.optimizer.mixup_alpha = 0.0  # Mixup Beta(alpha, alpha); 0: no mixup.
  config.optimizer.cutmix_alpha = 0.0  # CutMix Beta(alpha, alpha); 0: none (both: half each).
  config.optimizer.backbone_lr_multiplier = 1.0  # Learning-rate factor of all but the classifier.
  # The reference's train.py gives biases (BatchNorm shifts, the classifier's) twice the
  # rate: "Just a Caffe-style common practice. Made no difference." in its words.
  config.optimizer.bias_lr_multiplier = 2.0  # Learning-rate factor of every bias.

  # Fine-tuning (repvgg_jax/train/finetune.py): weights to start from instead of random ones.
  config.init_from = config_dict.placeholder(str)  # Workdir, checkpoint, .pth, hf-hub:...
  config.freeze_stages = 0  # Leading stages (0-5) kept as loaded: no updates, BN in eval mode.

  # Moving average of the weights and BatchNorm statistics, updated every step, evaluated
  # and fused beside the trained model (eval/ema_*, deploy_ema/).
  config.ema_decay = 0.0  # Its decay per step, e.g. 0.9998; 0: no average.

  # Quantization-aware fine-tuning of a fused model (repvgg_jax/train/qat.py).
  config.qat = ml_collections.ConfigDict()
  config.qat.enabled = False  # Fine-tune the deploy model with fake int8 instead of training.
  config.qat.init_from = config_dict.placeholder(str)  # Workdir or checkpoint of the fused model.

  config.log_every_steps = 100  # Steps between training-metric logs.
  config.eval_every_epochs = 1.0  # Epochs between evaluations (and at the end).
  config.checkpoint_every_steps = 1000  # Steps between checkpoints (also at the end, on SIGTERM).
  config.keep_checkpoints = 3  # Training checkpoints kept.
  config.progress_bar = True  # Show a progress bar on the first process.
  return config


def long_recipe(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The 200-epoch recipe of the paper's heaviest models (Table 5: B2g4, B3g4, B3).

  The paper names its ingredients (label smoothing, mixup, AutoAugment) but not
  their settings; each comes from the official repository
  (github.com/DingXiaoH/RepVGG, its Swin-based trainer ``main.py``):
  - label smoothing 0.1 and mixup 0.2: ``MODEL.LABEL_SMOOTHING`` and
    ``AUG.MIXUP`` in ``train/config.py`` (no cutmix, ``AUG.CUTMIX`` 0);
  - RandAugment, 2 operations of level below 15: the ``raug15`` preset of
    ``data/build.py`` and ``train/randaug.py``, the repository's policy of the
    AutoAugment family (`repvgg_jax.data.randaugment`);
  - 5 warm-up epochs: ``TRAIN.WARMUP_EPOCHS 5`` of every training command in its
    README;
  - SGD, learning rate 0.1 per 256 images, weight decay 1e-4, cosine: as the
    120-epoch recipe (its README's command for the paper's models), but with
    that trainer's optimizer and schedule: Nesterov momentum
    (``train/optimizer.py``), the same rate for biases as for the rest, and
    timm's ``CosineLRScheduler`` over the whole run with the warm-up in place
    of its first steps (``train/lr_scheduler.py``).
  No moving average (``TRAIN.EMA_ALPHA`` 0).
  """
  config.num_epochs = 200.0
  config.optimizer.warmup_epochs = 5.0
  config.optimizer.warmup_prefix = False
  config.optimizer.nesterov = True
  config.optimizer.bias_lr_multiplier = 1.0
  config.optimizer.label_smoothing = 0.1
  config.optimizer.mixup_alpha = 0.2
  config.dataset.randaugment_layers = 2
  config.dataset.randaugment_magnitude = 15
  return config
