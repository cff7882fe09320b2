"""Fine-tuning on your own images: a folder of class subdirectories.

  python train.py --config configs/finetune_folder.py \
    --config.dataset.data_dir=DIR --config.init_from=WEIGHTS --workdir W

DIR holds ``train/<class>/*`` and ``val/<class>/*`` (JPEG or PNG, any size,
grey and RGBA become RGB), or only ``<class>/*`` folders with
``--config.dataset.val_fraction=0.1``. WEIGHTS is a workdir or checkpoint of
this package, a .pth/.safetensors/.npz file (the reference's or timm's keys) or
a hub reference such as ``hf-hub:timm/repvgg_a0.rvgg_in1k``; the backbone must
match ``model.name`` exactly, and the classifier is re-initialised when the
classes differ in number, or in names where the source recorded them (one log
line says which). The number of classes is
that of the folder. Then ``python -m repvgg_jax.predict W IMAGE...`` names the
classes of new images with the fused model.

Two presets, chosen after the file name:
- ``configs/finetune_folder.py`` (``small``): 32x32 inputs, pad-and-crop, no
  flips, for small images such as the digits. From a digits workdir
  (``python train.py --config configs/digits.py``) on the digits written as
  PNG files of 32-48 px, it reaches 95% and more in 3 epochs, in about a
  minute on 2 CPU cores (tests/test_finetune.py runs it).
- ``configs/finetune_folder.py:photos``: 224x224 photos from ImageNet weights,
  the ImageNet augmentation (random-resized crop, flip; resize 256 and centre
  crop 224 to evaluate), 10 epochs; a GPU is advised.
"""

import ml_collections
from ml_collections import config_dict

from configs import default


def get_config(preset: str = 'small') -> ml_collections.ConfigDict:
  if preset not in ('small', 'photos'):
    raise ValueError(f"Unknown preset {preset!r} of finetune_folder.py: 'small' or 'photos'.")
  config = default.get_config()
  config.model.name = 'RepVGG-A0'
  config.model.bn_group_size = 0  # Small batches: statistics over the whole batch.

  config.dataset.name = 'folder'
  config.dataset.num_classes = config_dict.placeholder(int)  # None: the folder's class count.

  config.batch_size = 64
  config.eval_batch_size = 100
  config.optimizer.learning_rate = 0.02  # Per 256 images; a fifth of training from scratch.
  config.optimizer.bias_lr_multiplier = 1.0  # One rate for every parameter when fine-tuning.
  config.log_every_steps = 20
  config.eval_every_epochs = 1.0
  config.checkpoint_every_steps = 200

  if preset == 'small':
    config.dataset.image_size = 32
    config.dataset.train_augment = 'pad_crop'
    config.dataset.pad_pixels = 2
    config.dataset.flip = False  # A mirrored digit or letter is another glyph.
    config.dataset.eval_preprocess = 'resize'
    config.num_epochs = 3.0
  else:
    config.num_epochs = 10.0
  return config
