"""Image-folder datasets: layout, decoding of any mode, determinism, sharding, bad input."""

import os
import pathlib

import numpy as np
import pytest
from helpers import CLASSES, make_folder, tiny_config, write_image

from repvgg_jax.data import datasets as data
from repvgg_jax.data import folder


def folder_config(root, **overrides):
  config = tiny_config(**{'dataset.name': 'folder', 'dataset.in_memory': False}, **overrides)
  config.dataset.data_dir = str(root)
  return config.dataset


def take(iterator, count):
  return [next(iterator) for _ in range(count)]


def test_scan_reads_classes_and_splits_in_order(tmp_path):
  dataset = folder.scan(folder_config(make_folder(tmp_path)))
  assert dataset.classes == CLASSES
  assert len(dataset.splits['train'].paths) == 21 and len(dataset.splits['val'].paths) == 9
  assert list(dataset.splits['val'].labels) == [0] * 3 + [1] * 3 + [2] * 3
  assert data.class_names(folder_config(tmp_path)) == CLASSES
  assert data.num_examples(folder_config(tmp_path), 'val') == 9


def test_decode_makes_grey_and_rgba_images_rgb(tmp_path):
  rgb = np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8)
  grey = write_image(tmp_path / 'grey.png', rgb[..., :1])
  rgba = write_image(tmp_path / 'rgba.png', np.concatenate([rgb, rgb[..., :1]], -1))
  np.testing.assert_array_equal(folder.decode(str(grey)).numpy(), np.repeat(rgb[..., :1], 3, -1))
  np.testing.assert_array_equal(folder.decode(str(rgba)).numpy(), rgb)


def test_batches_are_a_function_of_seed_and_step_and_resume(tmp_path):
  config = folder_config(make_folder(tmp_path))
  batches = lambda seed, start=0: data.train_batches(
    config, global_batch_size=4, seed=seed, start_step=start
  )
  first, again, other = take(batches(0), 12), take(batches(0), 12), take(batches(1), 1)
  for a, b in zip(first, again, strict=True):
    np.testing.assert_array_equal(a['image'], b['image'])
  assert not np.array_equal(first[0]['image'], other[0]['image'])
  assert first[0]['image'].shape == (4, 32, 32, 3) and first[0]['label'].dtype == np.int32
  # 21 images: 5 batches per epoch; resuming at 7 (in the second epoch) reads the same.
  for a, b in zip(first[7:], take(batches(0, start=7), 5), strict=True):
    np.testing.assert_array_equal(a['image'], b['image'])
  epoch = np.concatenate([b['label'] for b in first[:5]])
  assert sorted(np.bincount(epoch)) == [6, 7, 7]  # One permutation, 20 of the 21 images.


def test_processes_read_their_part_of_the_same_global_batch(tmp_path):
  config = folder_config(make_folder(tmp_path))
  whole = take(data.train_batches(config, global_batch_size=6, seed=0), 4)
  parts = [
    take(
      data.train_batches(config, global_batch_size=6, seed=0, process_index=p, process_count=2), 4
    )
    for p in range(2)
  ]
  for step, batch in enumerate(whole):
    joined = np.concatenate([parts[0][step]['image'], parts[1][step]['image']])
    np.testing.assert_array_equal(joined, batch['image'])


def test_eval_covers_every_image_once_over_processes(tmp_path):
  config = folder_config(make_folder(tmp_path))

  def seen(processes: int) -> list[tuple[int, bytes]]:
    images = []
    for p in range(processes):
      batches = data.eval_batches(
        config, global_batch_size=4, process_index=p, process_count=processes
      )
      for batch in batches:
        assert batch['image'].shape == (4 // processes, 32, 32, 3)
        kept = zip(batch['label'][batch['mask']], batch['image'][batch['mask']], strict=True)
        images += [(int(label), image.tobytes()) for label, image in kept]
    return sorted(images)

  alone = seen(1)
  assert [label for label, _ in alone] == [0] * 3 + [1] * 3 + [2] * 3
  assert len({image for _, image in alone}) == 9  # Nine different images.
  assert seen(2) == alone  # The same images over two processes, each once.


def test_val_fraction_holds_out_the_same_images_whatever_the_seed(tmp_path):
  make_folder(tmp_path, per_class=(10,), splits=('',))
  config = folder_config(tmp_path, **{'dataset.val_fraction': 0.2, 'seed': 5})
  dataset = folder.scan(config)
  train, val = dataset.splits['train'], dataset.splits['val']
  assert len(val.paths) + len(train.paths) == 30 and dataset.classes == CLASSES
  assert not set(val.paths) & set(train.paths)
  assert all(1 <= count <= 9 for count in np.bincount(val.labels, minlength=3))
  folder._scan.cache_clear()
  assert list(
    folder.scan(folder_config(tmp_path, **{'dataset.val_fraction': 0.2})).splits['val'].paths
  ) == list(val.paths)


def held_out(names: dict[str, int], fraction=0.2, root=pathlib.Path('/data')):
  """``{split: set of 'class/file'}`` that `_held_out` makes of ``names`` files per class."""
  classes = {c: [root / c / f'{i:04d}.jpg' for i in range(n)] for c, n in names.items()}
  splits = folder._held_out(root, classes, fraction)
  return {k: {f'{c}/{f.name}' for c, fs in v.items() for f in fs} for k, v in splits.items()}


def test_adding_images_or_classes_never_moves_a_trained_image_into_val():
  before = held_out({'dog': 100, 'cat': 60})
  assert 25 <= len(before['val']) <= 40  # About 20% of 160 (32).
  for after in (
    held_out({'dog': 150, 'cat': 60}),
    held_out({'aardvark': 30, 'dog': 100, 'cat': 60}),
    held_out({'dog': 100, 'cat': 60}, root=pathlib.Path('/elsewhere')),
  ):
    assert not before['train'] & after['val']
    assert before['val'] <= after['val'] and before['train'] <= after['train']
  # A tiny class keeps one image on each side: the lowest and the highest share.
  assert len(held_out({'owl': 2}, fraction=0.01)['val']) == 1
  assert len(held_out({'owl': 3}, fraction=0.99)['train']) == 1


def truncate(path: pathlib.Path) -> None:
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
  'damage, message',
  [
    (lambda root: None, 'is not a directory'),
    (lambda root: root.mkdir(), 'holds no class folders'),
    (lambda root: (make_folder(root), (root / 'train' / 'emu').mkdir()), "'emu'|emu holds no"),
    (
      lambda root: (make_folder(root), (root / 'val' / 'fox').rename(root / 'val' / 'owl')),
      r"different classes \(only in train/: \['fox'\]; only in val/: \['owl'\]\)",
    ),
    (lambda root: make_folder(root, splits=('train',)), 'has no val/ folder.*val_fraction'),
    (
      lambda root: truncate(make_folder(root) / 'train/dog/01.png'),
      'dog/01.png is a truncated PNG',
    ),
    (
      lambda root: truncate(make_folder(root) / 'train/cat/03.jpg'),
      'cat/03.jpg is a truncated JPEG.*skip_bad_images=True',
    ),
    (
      lambda root: (make_folder(root) / 'train/fox/00.png').write_text('not an image'),
      '00.png is neither a JPEG nor a PNG',
    ),
    (  # A Latin-1 name, as an old zip archive leaves it.
      lambda root: (make_folder(root) / 'train/dog/01.png').rename(
        root / 'train/dog' / os.fsdecode(b'caf\xe9.png')
      ),
      'has a name that is not UTF-8',
    ),
    (  # Read as two classes, Train and Val, were they not refused.
      lambda root: make_folder(root, splits=('Train', 'Val')),
      r'has Train/, which would be read as a class: name the split folders train/ and val/',
    ),
    (
      lambda root: make_folder(root, splits=('train', 'validation')),
      'has validation/ beside train/, but the validation split is read from val/: rename it',
    ),
  ],
  ids=[
    *('missing', 'empty', 'empty class', 'other classes', 'no val', 'png', 'jpeg', 'text'),
    *('name', 'capitalised', 'validation'),
  ],
)
def test_bad_folders_fail_in_one_line_naming_the_problem(tmp_path, damage, message):
  root = tmp_path / 'images'
  damage(root)
  with pytest.raises(folder.FolderError, match=message) as error:
    folder.scan(folder_config(root))
  assert '\n' not in str(error.value)


def test_classes_named_like_splits_are_classes_without_train(tmp_path):
  root = make_folder(tmp_path, classes=('invalid', 'test', 'valid'), splits=('',))
  dataset = folder.scan(folder_config(root, **{'dataset.val_fraction': 0.3}))
  assert dataset.classes == ('invalid', 'test', 'valid')


def test_skip_bad_images_leaves_them_out_and_counts_them(tmp_path):
  root = make_folder(tmp_path)
  truncate(root / 'train/dog/01.png')
  (root / 'train/cat/notes.txt').write_text('ignored: not an image name')
  dataset = folder.scan(folder_config(root, **{'dataset.skip_bad_images': True}))
  assert dataset.skipped == (str(root / 'train/dog/01.png'),)
  assert len(dataset.splits['train'].paths) == 20
  assert str(root / 'train/dog/01.png') not in set(dataset.splits['train'].paths)


def test_hidden_files_and_folders_in_a_class_are_not_images(tmp_path):
  root = make_folder(tmp_path)
  for hidden in ('train/cat/.ipynb_checkpoints/00-checkpoint.png', 'train/cat/.00.png'):
    (root / hidden).parent.mkdir(exist_ok=True)
    (root / hidden).write_bytes((root / 'train/cat/00.png').read_bytes())
  (root / 'train/cat/sub').mkdir()
  (root / 'train/cat/sub/extra.png').write_bytes((root / 'train/cat/00.png').read_bytes())
  paths = folder.scan(folder_config(root)).splits['train'].paths
  assert len(paths) == 22 and str(root / 'train/cat/sub/extra.png') in set(paths)


@pytest.mark.parametrize('split', ['train', 'val'])
def test_skipping_every_image_of_a_class_fails_in_one_line(tmp_path, split):
  root = make_folder(tmp_path)
  for path in (root / split / 'dog').iterdir():
    truncate(path)
  config = folder_config(root, **{'dataset.skip_bad_images': True})
  with pytest.raises(folder.FolderError, match=f"class 'dog' has no readable {split} images"):
    folder.scan(config)


def test_a_file_that_fails_to_decode_is_named(tmp_path):
  root = make_folder(tmp_path)
  bad = root / 'val/cat/00.png'
  data_bytes = bytearray(bad.read_bytes())
  data_bytes[40:60] = b'\0' * 20  # Corrupt inside, whole at both ends: the scan passes it.
  bad.write_bytes(bytes(data_bytes))
  with pytest.raises(folder.FolderError, match='val/cat/00.png cannot be decoded'):
    list(data.eval_batches(folder_config(root), global_batch_size=4))


def test_data_after_the_end_marker_is_no_truncation(tmp_path):
  root = make_folder(tmp_path)
  photo = root / 'train/cat/03.jpg'  # As a phone's motion photo: a video after the JPEG.
  photo.write_bytes(photo.read_bytes() + bytes(range(256)) * 16)
  assert folder.check_file(photo) is None
  assert str(photo) in set(folder.scan(folder_config(root)).splits['train'].paths)
