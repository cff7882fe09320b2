"""Image folders as datasets: ``DIR/train/<class>/*`` and ``DIR/val/<class>/*``.

The layout of torchvision's ``ImageFolder`` and of timm's and the reference's
``train.py``: one subdirectory per class, JPEG or PNG files of any size and
mode (grey and RGBA become RGB); hidden files and folders are ignored. Without
``val/``, ``dataset.val_fraction`` holds out about that share of every class's
images, from ``train/`` or from class folders directly under ``DIR``. Each
image's side is decided by a hash of its path within its class folder, so the
held-out images are the same whatever the seed, and adding images or classes
never moves an image that was trained on into validation (but in a class
whose every image falls under the fraction: one of them is kept to train on,
the one with the highest hash, which an added image can take over).

Their batches: `repvgg_jax.data.folder_batches`.

The files are checked before training starts: a missing or empty directory, a
class folder without images, classes that differ between ``train/`` and
``val/``, and files that are not whole JPEGs or PNGs (wrong signature, or
truncated: no end marker) each fail in one line, or, with
``dataset.skip_bad_images``, the bad files are left out and counted (a class
left without readable images in a split still fails).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import os
import pathlib
import re

import numpy as np
import tensorflow as tf
from absl import logging

NAME = 'folder'  # config.dataset.name of an image folder.
SPLITS = ('train', 'val')
EXTENSIONS = ('.jpg', '.jpeg', '.png')
_TAIL_BYTES = 1024  # Where a whole file's end marker must be.


class FolderError(ValueError):
  """An image folder that cannot be read as a dataset; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class Split:
  """The files of one split, sorted by class then name, and their labels."""

  paths: np.ndarray  # str, (N,)
  labels: np.ndarray  # int32, (N,)


@dataclasses.dataclass(frozen=True)
class FolderDataset:
  """A scanned image folder: class names (sorted; a label is an index) and splits."""

  root: pathlib.Path
  classes: tuple[str, ...]
  splits: dict[str, Split]
  skipped: tuple[str, ...] = ()  # Files left out as unreadable (skip_bad_images).

  def split(self, name: str) -> Split:
    if name not in self.splits:
      raise FolderError(f'An image folder has the splits {SPLITS}, not {name!r}.')
    return self.splits[name]


def _is_image(path: pathlib.Path, folder: pathlib.Path) -> bool:
  """Whether ``path`` in the class ``folder`` is an image: its extension, and not hidden
  (nor in a hidden folder, as ``.ipynb_checkpoints/`` or a thumbnail cache)."""
  hidden = any(part.startswith('.') for part in path.relative_to(folder).parts)
  return path.suffix.lower() in EXTENSIONS and not hidden and path.is_file()


def _class_folders(directory: pathlib.Path) -> dict[str, list[pathlib.Path]]:
  """``{class: sorted image files}`` of the class subdirectories of ``directory``."""
  classes = {}
  for folder in sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith('.')):
    files = sorted(p for p in folder.rglob('*') if _is_image(p, folder))
    if not files:
      raise FolderError(
        f'The class folder {folder} holds no {"/".join(EXTENSIONS)} images: add some, or '
        'remove the folder.'
      )
    classes[folder.name] = files
  if not classes:
    raise FolderError(
      f'{directory} holds no class folders: put the images of each class in '
      f'{directory}/<class>/ (and those to validate on in val/<class>/).'
    )
  return classes


def _validation_share(class_name: str, relative_path: str) -> float:
  """Where a file falls in [0, 1): a hash of its class and path within the class folder,
  so that it does not depend on the other files, the seed or where the folder lies."""
  digest = hashlib.sha256(f'{class_name}/{relative_path}'.encode()).digest()
  return int.from_bytes(digest[:8], 'big') / 2**64


def _held_out(
  directory: pathlib.Path, classes: dict[str, list[pathlib.Path]], fraction: float
) -> dict[str, dict[str, list]]:
  """``classes`` (the class folders of ``directory``) split into train and val: a file
  is held out where its `_validation_share` is under ``fraction``. A class keeps at
  least one image on each side: the lowest share is held out where none is under
  ``fraction``, the highest trained on where all are."""
  train, val = {}, {}
  for name, files in classes.items():
    if len(files) < 2:
      raise FolderError(
        f'The class {name!r} has {len(files)} readable image, too few to hold some out for '
        'validation: add images, or give a val/ folder.'
      )
    shares = [_validation_share(name, f.relative_to(directory / name).as_posix()) for f in files]
    order = np.argsort(shares, kind='stable')
    count = sum(share < fraction for share in shares)
    held = set(order[: min(max(count, 1), len(files) - 1)].tolist())
    val[name] = [f for i, f in enumerate(files) if i in held]
    train[name] = [f for i, f in enumerate(files) if i not in held]
  return {'train': train, 'val': val}


# Folder names, in lower case, of a training and a validation split.
_TRAIN_FOLDERS, _VAL_FOLDERS = {'train', 'training'}, {'val', 'valid', 'validation'}


def _check_split_names(root: pathlib.Path, has_train: bool, has_val: bool) -> None:
  """Refuses split folders that would be read otherwise than meant: ``Train/`` (and
  ``Val/``) taken for classes, a ``validation/`` beside ``train/`` left unread. Where
  there is no ``train/``, folders named ``valid`` or ``test`` may well be classes."""
  if has_train and has_val:
    return  # Other folders beside them are not read.
  names = sorted(p.name for p in root.iterdir() if p.is_dir())
  if has_train:
    wrong = [name for name in names if name.lower() in _VAL_FOLDERS and name != 'val']
    if wrong:
      raise FolderError(
        f'{root} has {wrong[0]}/ beside train/, but the validation split is read from val/: '
        'rename it val/.'
      )
  else:
    wrong = [name for name in names if name.lower() in _TRAIN_FOLDERS]
    if wrong:
      raise FolderError(
        f'{root} has {wrong[0]}/, which would be read as a class: name the split folders '
        'train/ and val/ (lower case).'
      )


def _layout(root: pathlib.Path, val_fraction: float) -> tuple[pathlib.Path, dict]:
  """The directory of the training class folders and ``{split: {class: files}}`` of the
  folder at ``root``, before any file is read; without ``val/``, only ``train``."""
  if not root.is_dir():
    raise FolderError(
      f'dataset.data_dir {root} is not a directory: give the folder that holds train/<class>/ '
      'and val/<class>/ (or only class folders, with dataset.val_fraction).'
    )
  has_train, has_val = (root / 'train').is_dir(), (root / 'val').is_dir()
  _check_split_names(root, has_train, has_val)
  if has_val and not has_train:
    raise FolderError(f'{root} has val/ but no train/: add train/<class>/ folders.')
  directory = root / 'train' if has_train else root
  train = _class_folders(directory)
  if has_val and val_fraction:
    logging.warning('%s has val/: dataset.val_fraction=%s is not used.', root, val_fraction)
  if has_val:
    val = _class_folders(root / 'val')
    if set(val) != set(train):
      only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))
      raise FolderError(
        f'train/ and val/ of {root} have different classes (only in train/: {only_train}; '
        f'only in val/: {only_val}): give both the same class folders.'
      )
    return directory, {'train': train, 'val': val}
  if not 0 < val_fraction < 1:
    raise FolderError(
      f'{root} has no val/ folder: add val/<class>/ folders, or hold out a share of the '
      'images with --config.dataset.val_fraction=0.1 (between 0 and 1).'
    )
  return directory, {'train': train}


def check_file(path: pathlib.Path) -> str | None:
  """Why ``path`` is not a whole JPEG or PNG (signature, end marker), or None.

  Reads its first and last bytes; only a file whose end marker is not among its last
  bytes is decoded to tell: decoding every file would take hours on ImageNet.
  """
  try:
    str(path).encode('utf-8')  # TensorFlow takes paths as UTF-8 strings.
  except UnicodeEncodeError:
    return 'has a name that is not UTF-8 (from an old archive?): rename it'
  try:
    size = path.stat().st_size
    with open(path, 'rb') as file:
      head = file.read(8)
      file.seek(max(0, size - _TAIL_BYTES))
      tail = file.read()
  except OSError as error:
    return f'cannot be read ({error.strerror})'
  if head.startswith(b'\xff\xd8\xff'):
    end, problem = b'\xff\xd9', 'is a truncated JPEG (no end-of-image marker)'
  elif head.startswith(b'\x89PNG\r\n\x1a\n'):
    end, problem = b'IEND', 'is a truncated PNG (no IEND chunk)'
  else:
    return 'is neither a JPEG nor a PNG' if size else 'is empty'
  if end in tail or _decodes(path):  # Data after the end (phones' motion photos) is fine.
    return None
  return problem


def _decodes(path: pathlib.Path) -> bool:
  """Whether TensorFlow decodes the whole file (it refuses truncated JPEGs and PNGs)."""
  try:
    decode(tf.constant(str(path)))
  except tf.errors.OpError:
    return False
  return True


def _bad_files(files: list[pathlib.Path]) -> list[tuple[pathlib.Path, str]]:
  """``(file, why)`` for each file that `check_file` refuses, read on several threads."""
  with concurrent.futures.ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 1) * 4)) as ex:
    reasons = list(ex.map(check_file, files, chunksize=256))
  return [(f, why) for f, why in zip(files, reasons, strict=True) if why]


@functools.lru_cache(maxsize=8)
def _scan(root: pathlib.Path, val_fraction: float, skip_bad_images: bool) -> FolderDataset:
  directory, layout = _layout(root, val_fraction)
  every_file = [f for split in layout.values() for files in split.values() for f in files]
  bad = _bad_files(every_file)
  if bad and not skip_bad_images:
    path, why = bad[0]
    more = f' ({len(bad) - 1} more files are bad too)' if len(bad) > 1 else ''
    raise FolderError(
      f'{path} {why}{more}: replace or remove it, or leave such files out with '
      '--config.dataset.skip_bad_images=True.'
    )
  excluded = {f for f, _ in bad}
  layout = {
    split: {cls: [f for f in files if f not in excluded] for cls, files in per_class.items()}
    for split, per_class in layout.items()
  }
  if 'val' not in layout:  # Held out from the readable images.
    layout = _held_out(directory, layout['train'], val_fraction)
  classes = tuple(sorted(layout['train']))
  splits = {}
  for name, per_class in layout.items():
    for cls in classes:
      if not per_class[cls]:
        raise FolderError(
          f'The class {cls!r} has no readable {name} images left in {root} (every one is '
          'unreadable): replace them, or remove the class.'
        )
    pairs = [(str(f), label) for label, cls in enumerate(classes) for f in per_class[cls]]
    paths, labels = zip(*pairs, strict=True)
    splits[name] = Split(np.array(paths), np.array(labels, np.int32))
  if bad:
    logging.warning('Skipped %d unreadable images in %s, e.g. %s.', len(bad), root, bad[0][0])
  return FolderDataset(root, classes, splits, tuple(str(f) for f, _ in bad))


def scan(config, *, fresh: bool = False) -> FolderDataset:
  """The image folder of a dataset config, checked (see the module docstring).

  Reads ``data_dir``, ``val_fraction`` and ``skip_bad_images``. Cached, so
  that a run's several readers scan once; ``fresh`` scans again (a run's first
  look, which sees files added since).

  Raises:
    FolderError: what is wrong with the folder, and how to fix it.
  """
  if not config.get('data_dir'):
    raise FolderError(
      'dataset.name=folder needs dataset.data_dir: the folder of train/<class>/ and '
      'val/<class>/ images (--config.dataset.data_dir=DIR).'
    )
  root = pathlib.Path(os.path.expanduser(config.data_dir)).absolute()
  if fresh:
    _scan.cache_clear()
  return _scan(root, float(config.get('val_fraction', 0.0)), bool(config.get('skip_bad_images')))


def decode(path: tf.Tensor) -> tf.Tensor:
  """The RGB uint8 ``(H, W, 3)`` pixels of a JPEG or PNG file (grey and RGBA converted)."""
  image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
  return tf.ensure_shape(image, (None, None, 3))


def decode_failure(error: tf.errors.OpError) -> str:
  """TensorFlow's reason, without the op and function names it wraps it in (an eager
  op's ``{{function_node __wrapped__DecodeImage_...}} ... [Op:DecodeImage] name:``)."""
  text = error.message.strip().splitlines()[0] if error.message.strip() else ''
  text = re.sub(r'\{\{function_node [^}]*\}\}\s*', '', text)
  text = re.sub(r'\s*\[Op:\w+\].*$', '', text)
  return text.strip().rstrip('.') or type(error).__name__
