"""Tests for ftjax.data.images: image folders -> TFDS ArrayRecord -> normalised pixel batches."""

import collections
import hashlib
import json
import pathlib
import pickle
import subprocess
import sys

import grain
import numpy as np
from PIL import Image
import pytest

from ftjax.data import images
from ftjax.data import splits as splits_lib
from ftjax.errors import FtjaxError

SIZE = 16
ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def digits_dir(tmp_path_factory) -> pathlib.Path:
  return images.write_digits_folder(tmp_path_factory.mktemp('src') / 'digits', size=SIZE)


@pytest.fixture(scope='module')
def digits(digits_dir, tmp_path_factory):
  return images.build_image_dataset(str(digits_dir),
                                    data_dir=str(tmp_path_factory.mktemp('tfds')))


def _records(dataset, split: str) -> list[dict]:
  source = dataset.source(split)
  return source.__getitems__(list(range(len(source))))


def _write(path: pathlib.Path, pixels: np.ndarray, mode: str | None = None,
           fmt: str = 'PNG') -> np.ndarray:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(pixels, mode).save(path, format=fmt)
  return pixels


def _random_rgb(seed: int, size: int = 10) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _split_folder(root: pathlib.Path, counts=None) -> pathlib.Path:
  """root/{train,validation,test}/{cat,dog}/*.png with `counts` images per split and class."""
  counts = counts or {'train': 3, 'validation': 2, 'test': 1}
  seed = 0
  for split, count in counts.items():
    for name in ('cat', 'dog'):
      for i in range(count):
        seed += 1
        _write(root / split / name / f'{i}.png', _random_rgb(seed))
  return root


def _one_line_error(match: str, fn, *args, **kwargs) -> str:
  with pytest.raises(FtjaxError, match=match) as error:
    fn(*args, **kwargs)
  assert '\n' not in str(error.value)
  return str(error.value)


# The digits folder and its build
# ------------------------------------------------------------------------------


def test_digits_folder_holds_every_digit(digits_dir):
  pngs = sorted(digits_dir.glob('*/*.png'))
  assert len(pngs) == images.NUM_DIGITS
  assert sorted(p.name for p in digits_dir.iterdir() if p.is_dir()) == [str(i) for i in range(10)]
  with Image.open(pngs[0]) as image:
    assert image.size == (SIZE, SIZE) and image.mode == 'RGB'


def test_digits_folder_is_written_once(digits_dir):
  before = {p: p.stat().st_mtime_ns for p in digits_dir.glob('*/*.png')}
  images.write_digits_folder(digits_dir, size=SIZE)
  assert {p: p.stat().st_mtime_ns for p in digits_dir.glob('*/*.png')} == before


def test_split_sizes_and_labels(digits):
  assert digits.kind == 'image' and digits.name.startswith('digits-')
  assert digits.label_names == [str(i) for i in range(10)]
  assert sum(digits.num_examples.values()) == images.NUM_DIGITS
  for split, fraction in zip(splits_lib.SPLITS, (0.8, 0.1, 0.1)):
    assert abs(digits.num_examples[split] / images.NUM_DIGITS - fraction) < 0.03, split
  for split in splits_lib.SPLITS:
    labels = {int(r['label']) for r in _records(digits, split)}
    assert labels == set(range(10)), split


def test_splits_follow_the_content_hash(digits, digits_dir):
  expected = collections.Counter(
      splits_lib.split_of(hashlib.sha1(p.read_bytes()).hexdigest(), (0.8, 0.1, 0.1))
      for p in digits_dir.glob('*/*.png'))
  assert dict(expected) == digits.num_examples


def test_records_round_trip_the_written_pngs(digits, digits_dir):
  written = collections.Counter()
  for path in digits_dir.glob('*/*.png'):
    with Image.open(path) as image:
      written[(int(path.parent.name), np.asarray(image).tobytes())] += 1
  stored = collections.Counter()
  for split in splits_lib.SPLITS:
    for record in _records(digits, split):
      assert record['image'].shape == (SIZE, SIZE, 3) and record['image'].dtype == np.uint8
      stored[(int(record['label']), record['image'].tobytes())] += 1
  assert stored == written


def test_second_build_reuses_the_first(digits, digits_dir, monkeypatch):
  def no_rebuild(*args, **kwargs):
    raise AssertionError('the dataset was built again')

  monkeypatch.setattr(images.ImageFolder, '_split_generators', no_rebuild)
  again = images.build_image_dataset(str(digits_dir), data_dir=str(digits.path.parents[2]))
  assert (again.name, again.num_examples, again.path) == (digits.name, digits.num_examples,
                                                          digits.path)


def test_script_writes_the_folder(tmp_path):
  result = subprocess.run(
      [sys.executable, str(ROOT / 'scripts' / 'make_digits_folder.py'), f'--out={tmp_path}',
       '--size=8'], capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr
  assert len(list(tmp_path.glob('*/*.png'))) == images.NUM_DIGITS


# Reading batches
# ------------------------------------------------------------------------------


def test_read_images_without_resizing_only_normalises(digits):
  source = digits.source('validation')
  read = images.ReadImages(source, image_size=SIZE, mean=(0.5, 0.4, 0.3), std=(0.5, 0.25, 0.2))
  batch = read(np.array([0, 3, 1]))
  assert set(batch) == {'pixel_values', 'label'}
  assert batch['pixel_values'].shape == (3, SIZE, SIZE, 3)
  assert batch['pixel_values'].dtype == np.float32 and batch['label'].dtype == np.int32
  raw = source[3]
  expected = (raw['image'] / 255.0 - np.array([0.5, 0.4, 0.3])) / np.array([0.5, 0.25, 0.2])
  np.testing.assert_allclose(batch['pixel_values'][1], expected, atol=1e-6)
  assert batch['label'][1] == raw['label']


def test_read_images_resizes_bilinear(digits):
  source = digits.source('test')
  batch = images.ReadImages(source, image_size=24, mean=0.5, std=0.5)(np.arange(2))
  assert batch['pixel_values'].shape == (2, 24, 24, 3)
  resized = np.asarray(
      Image.fromarray(source[1]['image']).resize((24, 24), Image.Resampling.BILINEAR))
  np.testing.assert_allclose(batch['pixel_values'][1], (resized / 255.0 - 0.5) / 0.5, atol=1e-6)
  assert -1.0 <= batch['pixel_values'].min() and batch['pixel_values'].max() <= 1.0


def test_read_images_pads_a_short_batch(digits):
  read = images.ReadImages(digits.source('test'), image_size=SIZE, mean=0.5, std=0.5, pad_to=8)
  full = images.ReadImages(digits.source('test'), image_size=SIZE, mean=0.5, std=0.5)
  batch, unpadded = read(np.arange(5)), full(np.arange(5))
  assert batch['pixel_values'].shape == (8, SIZE, SIZE, 3) and batch['label'].shape == (8,)
  np.testing.assert_array_equal(batch['weight'], [1, 1, 1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(batch['pixel_values'][:5], unpadded['pixel_values'])
  np.testing.assert_array_equal(batch['label'][:5], unpadded['label'])
  assert not batch['pixel_values'][5:].any() and not batch['label'][5:].any()
  np.testing.assert_array_equal(read(np.arange(8))['weight'], np.ones(8))


def test_read_images_pickles_and_runs_in_grain(digits):
  read = images.ReadImages(digits.source('validation'), image_size=SIZE, mean=0.5, std=0.5,
                           pad_to=64)
  copy = pickle.loads(pickle.dumps(read))
  np.testing.assert_array_equal(copy(np.arange(4))['pixel_values'],
                                read(np.arange(4))['pixel_values'])
  num = digits.num_examples['validation']
  batches = list(grain.MapDataset.range(num).batch(64, drop_remainder=False).map(read))
  assert len(batches) == -(-num // 64)
  assert sum(b['weight'].sum() for b in batches) == num
  assert {b['pixel_values'].shape for b in batches} == {(64, SIZE, SIZE, 3)}


def test_read_images_rejects_bad_settings(digits):
  source = digits.source('test')
  _one_line_error('image_size', images.ReadImages, source, image_size=0, mean=0.5, std=0.5)
  _one_line_error('three', images.ReadImages, source, image_size=8, mean=(0.5, 0.5), std=0.5)
  _one_line_error('positive', images.ReadImages, source, image_size=8, mean=0.5, std=(1, 0, 1))


# Other layouts and inputs
# ------------------------------------------------------------------------------


def test_split_folders_are_used_as_given(tmp_path):
  root = _split_folder(tmp_path / 'pets')
  # Grey, palette, RGBA and JPEG files all come back as [H, W, 3].
  _write(root / 'train' / 'cat' / 'grey.png', np.full((6, 9), 200, np.uint8), 'L')
  _write(root / 'train' / 'dog' / 'rgba.png', np.full((5, 5, 4), 90, np.uint8), 'RGBA')
  Image.fromarray(_random_rgb(99)).convert('P').save(root / 'train' / 'dog' / 'palette.png')
  _write(root / 'train' / 'cat' / 'photo.JPG', _random_rgb(7, 12), fmt='JPEG')
  dataset = images.build_image_dataset(str(root), data_dir=str(tmp_path / 'tfds'),
                                       split_fractions=(1.0, 0.0, 0.0))  # Ignored here.
  assert dataset.label_names == ['cat', 'dog']
  assert dataset.num_examples == {'train': 10, 'validation': 4, 'test': 2}
  shapes = {r['image'].shape for r in _records(dataset, 'train')}
  assert (6, 9, 3) in shapes and (5, 5, 3) in shapes and (12, 12, 3) in shapes
  grey = [r['image'] for r in _records(dataset, 'train') if r['image'].shape == (6, 9, 3)]
  assert (grey[0] == 200).all()


def test_integer_class_names_sort_numerically(tmp_path):
  for name in ('2', '10', '1'):
    for split in splits_lib.SPLITS:
      _write(tmp_path / 'src' / split / name / 'a.png', _random_rgb(int(name)))
  dataset = images.build_image_dataset(str(tmp_path / 'src'), data_dir=str(tmp_path / 'tfds'))
  assert dataset.label_names == ['1', '2', '10']


def test_editing_an_image_builds_anew(tmp_path):
  root = _split_folder(tmp_path / 'pets')
  first = images.build_image_dataset(str(root), data_dir=str(tmp_path / 'tfds'))
  _write(root / 'test' / 'dog' / '0.png', _random_rgb(1234))
  second = images.build_image_dataset(str(root), data_dir=str(tmp_path / 'tfds'))
  assert first.name != second.name and second.name.startswith('pets-')


def test_image_processor_settings(tmp_path):
  (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'vit', 'image_size': 32}))
  assert images.image_processor_settings(tmp_path) == (32, (0.5,) * 3, (0.5,) * 3)
  processor = {'size': {'height': 32, 'width': 32}, 'image_mean': [0.485, 0.456, 0.406],
               'image_std': [0.229, 0.224, 0.225], 'do_normalize': True}
  (tmp_path / 'preprocessor_config.json').write_text(json.dumps(processor))
  size, mean, std = images.image_processor_settings(str(tmp_path))
  assert size == 32
  np.testing.assert_allclose(mean, processor['image_mean'], rtol=1e-6)
  np.testing.assert_allclose(std, processor['image_std'], rtol=1e-6)
  (tmp_path / 'preprocessor_config.json').write_text(json.dumps({'do_normalize': False}))
  assert images.image_processor_settings(tmp_path) == (32, (0.0,) * 3, (1.0,) * 3)
  (tmp_path / 'config.json').unlink()
  (tmp_path / 'preprocessor_config.json').write_text(json.dumps({'size': 48}))
  assert images.image_processor_settings(tmp_path)[0] == 48
  (tmp_path / 'preprocessor_config.json').unlink()
  _one_line_error('no image size', images.image_processor_settings, tmp_path)


# Bad input: one line naming the file
# ------------------------------------------------------------------------------


def test_missing_and_empty_folders(tmp_path):
  build = lambda root, **kw: images.build_image_dataset(str(root), data_dir=str(tmp_path / 'd'),
                                                        **kw)
  _one_line_error('does not exist', build, tmp_path / 'nope')
  (tmp_path / 'empty').mkdir()
  _one_line_error('at least two class folders.*found: none', build, tmp_path / 'empty')
  (tmp_path / 'a_file.png').write_bytes(b'x')
  _one_line_error('is a file', build, tmp_path / 'a_file.png')
  one = tmp_path / 'one'
  _write(one / 'cat' / 'a.png', _random_rgb(1))
  (one / 'dog').mkdir()
  message = _one_line_error('has no .png/.jpg/.jpeg images', build, one)
  assert str(one / 'dog') in message


def test_stray_files(tmp_path):
  build = lambda root: images.build_image_dataset(str(root), data_dir=str(tmp_path / 'd'))
  root = tmp_path / 'src'
  for name in ('cat', 'dog'):
    _write(root / name / 'a.png', _random_rgb(len(name)))
  (root / 'README.txt').write_text('ignored: not in a class folder')
  (root / 'cat' / '.DS_Store').write_bytes(b'ignored: hidden')
  (root / 'cat' / 'notes.txt').write_text('?')
  assert str(root / 'cat' / 'notes.txt') in _one_line_error('is not a .png', build, root)
  (root / 'cat' / 'notes.txt').unlink()
  _write(root / 'loose.png', _random_rgb(3))
  assert str(root / 'loose.png') in _one_line_error('has no class', build, root)


def test_unreadable_image_names_the_file(tmp_path):
  root = _split_folder(tmp_path / 'src')
  bad = root / 'validation' / 'dog' / 'broken.png'
  bad.write_bytes(b'\x89PNG\r\n\x1a\n truncated')
  message = _one_line_error('is not a readable image', images.build_image_dataset, str(root),
                            data_dir=str(tmp_path / 'd'))
  assert str(bad) in message
  assert not list((tmp_path / 'd').rglob('dataset_info.json'))  # Nothing half-built is kept.


def test_a_split_missing_a_class(tmp_path):
  root = _split_folder(tmp_path / 'src')
  for path in (root / 'test' / 'dog').iterdir():
    path.unlink()
  (root / 'test' / 'dog').rmdir()
  message = _one_line_error("no class folder 'dog'", images.build_image_dataset, str(root),
                            data_dir=str(tmp_path / 'd'))
  assert str(root / 'test') in message
  _write(root / 'test' / 'dog' / 'a.png', _random_rgb(5))
  _write(root / 'test' / 'bird' / 'a.png', _random_rgb(6))
  _one_line_error("class folder 'bird', which train has not", images.build_image_dataset,
                  str(root), data_dir=str(tmp_path / 'd'))


def test_split_layout_needs_every_split(tmp_path):
  root = _split_folder(tmp_path / 'src', counts={'train': 1, 'validation': 1})
  _one_line_error('no test folder', images.build_image_dataset, str(root),
                  data_dir=str(tmp_path / 'd'))


def test_single_folder_split_missing_a_class(digits_dir, tmp_path):
  _one_line_error("the test split has no image of class '0'", images.build_image_dataset,
                  str(digits_dir), data_dir=str(tmp_path / 'd'), split_fractions=(0.5, 0.5, 0.0))
  _one_line_error('split_fractions', images.build_image_dataset, str(digits_dir),
                  data_dir=str(tmp_path / 'd'), split_fractions=(0.5, 0.2))
