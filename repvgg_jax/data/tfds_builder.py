"""The tfds builder of a dataset config, prepared, or an error that says how to get
the data: the embedded digits are built offline, ImageNet from archives the user
downloads, other datasets downloaded where the config allows; processes that share a
data dir prepare it once, in turn."""

from __future__ import annotations

import contextlib
import fcntl
import logging as std_logging
import os

import tensorflow_datasets as tfds
from absl import logging

from repvgg_jax.data import digits as digits_dataset

# Built offline from scikit-learn on first use; importing the module registered it with tfds.
OFFLINE_DATASETS = (digits_dataset.SklearnDigits.name,)
IMAGENET_ARCHIVES = ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')


class DatasetNotFoundError(FileNotFoundError):
  """The dataset is not prepared and cannot be prepared without the user's help."""


def _tfds_is_mocked() -> bool:
  """Whether ``tfds.testing.mock_data`` is active.

  It fakes ``as_dataset`` and makes ``download_and_prepare`` a no-op, so an unprepared dataset
  is no error there. It leaves ``is_prepared`` alone, hence this check on what it patches.
  """
  prepare = tfds.core.DatasetBuilder.download_and_prepare
  return getattr(prepare, '__module__', '') == 'tensorflow_datasets.testing.mocking'


def _imagenet_manual_dir(builder: tfds.core.DatasetBuilder, manual_dir: str | None) -> str:
  """The folder that holds the ImageNet archives, or an error saying where to put them.

  tfds cannot download ImageNet (its licence needs a sign-up), so this fails at once, before
  any network access, when the archives are missing.
  """
  manual_dir = manual_dir or os.path.join(builder.data_dir_root, 'downloads', 'manual')
  manual_dir = os.path.expanduser(manual_dir)
  missing = [
    name for name in IMAGENET_ARCHIVES if not os.path.isfile(os.path.join(manual_dir, name))
  ]
  if missing:
    raise DatasetNotFoundError(
      f'ImageNet (imagenet2012) is not prepared in {builder.data_dir_root} and cannot be '
      f'downloaded automatically. Download {" and ".join(IMAGENET_ARCHIVES)} from '
      f'https://image-net.org/download-images (free sign-up) and put them in {manual_dir} '
      f'(missing now: {", ".join(missing)}), or point --config.dataset.manual_dir at the '
      'folder that holds them. The next run then converts them once into tfds records under '
      f'{builder.data_dir} (a few hours, about 150 GB); later runs read those records.'
    )
  return manual_dir


def get_builder(config) -> tfds.core.DatasetBuilder:
  """The tfds builder of ``config.name``, prepared, or a clear error when it cannot be.

  Args:
    config: the dataset config; reads ``name``, ``data_dir``, ``download`` and, for
      imagenet2012, ``manual_dir``.

  Returns:
    A builder whose ``as_dataset`` reads prepared records (or fakes them under
    ``tfds.testing.mock_data``).

  Raises:
    DatasetNotFoundError: the name is unknown, or the dataset is not prepared and either
      downloads are off or, for ImageNet, the manually downloaded archives are missing.
  """
  data_dir = os.path.expanduser(config.data_dir) if config.data_dir else None
  try:
    builder = tfds.builder(config.name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise DatasetNotFoundError(
      f'Unknown dataset {config.name!r}: use a tfds name such as imagenet2012, cifar10 or '
      f'mnist (`tfds.list_builders()` lists them all), or the embedded {OFFLINE_DATASETS[0]!r}.'
    ) from None
  except (ValueError, AssertionError) as error:  # A malformed name, or no such config or version.
    reason = str(error).splitlines()[0].split('": ')[-1] if str(error) else type(error).__name__
    reason = reason.split(' Here are ')[0].rstrip('.')  # tfds's close names: on other lines.
    raise DatasetNotFoundError(
      f'Cannot build dataset {config.name!r}: {reason}. Give a tfds name, or name/config or '
      'name:version as `tfds.builder` takes them (e.g. cifar10, or imagenet2012:5.1.0).'
    ) from None
  if _is_prepared(builder) or _tfds_is_mocked():
    return builder
  download_config = _download_config(builder, config)  # Fails before anything is written.
  with _preparing(builder):  # Processes sharing the data dir prepare it once, in turn.
    builder = tfds.builder(config.name, data_dir=data_dir)
    if not _is_prepared(builder):
      _prepare(builder, download_config)
  return builder


class _NoUnpreparedWarning(std_logging.Filter):
  """Drops tfds's warning that a dataset's version folder has no dataset_info.json."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not str(record.msg).startswith('Variant folder %s has no')


def _is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
  """``builder.is_prepared()``, without the warning tfds logs (twice on a first run)
  when the version folder exists but holds no dataset_info.json yet: that is what
  "not prepared" means, and preparing it follows."""
  quiet = _NoUnpreparedWarning()
  absl_logger = std_logging.getLogger('absl')
  absl_logger.addFilter(quiet)
  try:
    return builder.is_prepared()
  finally:
    absl_logger.removeFilter(quiet)


def _download_config(builder: tfds.core.DatasetBuilder, config):
  """How tfds prepares ``builder``'s dataset here (None: its defaults, downloading);
  a DatasetNotFoundError saying why where it cannot."""
  if builder.name in OFFLINE_DATASETS:
    return tfds.download.DownloadConfig(try_download_gcs=False)
  if builder.name == 'imagenet2012':
    manual_dir = _imagenet_manual_dir(builder, config.manual_dir)
    return tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False)
  if config.download:
    return None
  raise DatasetNotFoundError(
    f'Dataset {config.name!r} is not prepared in {builder.data_dir_root} and downloads are '
    'off. Let this run download and prepare it with --config.dataset.download=True, or '
    f'prepare it beforehand with `tfds build {config.name} --data_dir={builder.data_dir_root}`.'
  )


@contextlib.contextmanager
def _preparing(builder: tfds.core.DatasetBuilder):
  """Holds an exclusive lock on preparing ``builder``'s dataset in its data dir (a
  local, writable one: tfds prepares a remote one, ``gs://...``, unguarded). Two processes
  preparing at once (the local processes of a multi-process run, two runs started
  together) would collide renaming their records into place."""
  root, lock = str(builder.data_dir_root), None
  if '://' not in root:
    with contextlib.suppress(OSError):  # Preparing it there fails, if it does, on its own.
      os.makedirs(root, exist_ok=True)
      lock = open(os.path.join(root, f'.{builder.name}.prepare.lock'), 'w')  # noqa: SIM115
  if lock is None:
    yield
    return
  with lock:
    try:
      _lock_exclusively(lock, f'preparing {builder.name} in {root}')
    except OSError as error:  # A file system without locks (some NFS, Lustre mounts).
      logging.warning('Preparing %s unguarded: %s (%s).', builder.name, lock.name, error)
    yield  # Closing the file releases the lock.


def _lock_exclusively(file, what: str) -> None:
  """Takes an exclusive lock on ``file``, saying so when another process holds it."""
  try:
    fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    logging.warning('Waiting for another process %s.', what)
    fcntl.flock(file, fcntl.LOCK_EX)


def _prepare(builder: tfds.core.DatasetBuilder, download_config) -> None:
  """Downloads and prepares ``builder``'s dataset as `_download_config` says."""
  if download_config is not None and download_config.manual_dir:  # ImageNet's archives.
    logging.info(
      'Preparing %s from %s; this takes a few hours, once.',
      builder.name,
      download_config.manual_dir,
    )
  builder.download_and_prepare(download_config=download_config)
