"""Image classification data: class folders of images -> TFDS ArrayRecord -> pixel batches.

A source is one folder of class folders, `root/<class>/*.png|jpg|jpeg`, split into
train/validation/test by `splits.split_of` of each file's content hash (so identical images
always share a split), or one such folder per split, `root/{train,validation,test}/<class>/*`,
used as given. Class names are the folder names, sorted (numerically when all are integers).

The build is written once per dataset under `<data_dir>/ftjax_image_folder/<config>/<version>/`;
the config name is the folder's name plus a hash of every image's path and bytes (and of the
split fractions), so adding, removing or editing an image builds anew. Every image is stored as
an RGB PNG, whatever its file's format and mode, so a record always decodes to [H, W, 3] uint8.

`ReadImages` turns a batch of record indices into resized, normalised channels-last pixels, the
image counterpart of the text pipeline's tokenizing step.
"""

from collections.abc import Sequence
import dataclasses
import hashlib
import io
import json
import logging
import os
import pathlib
import re

import numpy as np
import tensorflow_datasets as tfds

from ftjax.data import builder as builder_lib
from ftjax.data import files as files_lib
from ftjax.data import splits as splits_lib
from ftjax.errors import FtjaxError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
# ViTImageProcessor's defaults (IMAGENET_STANDARD_MEAN/STD) when a checkpoint ships none.
DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.5, 0.5, 0.5)
PREPROCESSOR_NAME = 'preprocessor_config.json'
NUM_DIGITS = 1797  # Images in scikit-learn's bundled digits set.
_DIGITS_MARKER = '.ftjax_digits.json'  # Hidden: the folder scan ignores it.
_INTEGER = re.compile(r'\d+')


def _pil():
  try:
    from PIL import Image  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise FtjaxError('image datasets need Pillow: pip install pillow') from e
  return Image


# Finding the images
# ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Image:
  """One source image: where it is, its class and the hash of its bytes."""

  path: pathlib.Path
  key: str  # Relative to the source root with '/' separators; unique, the TFDS record key.
  label: int
  digest: str


def _visible(path: pathlib.Path) -> list[pathlib.Path]:
  # Hidden entries (.DS_Store, .ipynb_checkpoints, our own markers) are never data.
  return sorted(p for p in path.iterdir() if not p.name.startswith('.'))


def _class_folders(folder: pathlib.Path) -> dict[str, list[pathlib.Path]]:
  """{class name: its image files} of one folder of class folders."""
  classes: dict[str, list[pathlib.Path]] = {}
  for entry in _visible(folder):
    if entry.is_file() and entry.suffix.lower() in IMAGE_EXTENSIONS:
      raise FtjaxError(f'{entry} has no class: put each image in a class folder, '
                       f'{folder}/<class>/{entry.name}')
    if not entry.is_dir():
      continue  # A README or labels file next to the class folders is not data.
    images = []
    for item in _visible(entry):
      if not item.is_file() or item.suffix.lower() not in IMAGE_EXTENSIONS:
        raise FtjaxError(f'{item} is not a {"/".join(IMAGE_EXTENSIONS)} image; remove it from '
                         f'the class folder {entry}')
      images.append(item)
    if not images:
      raise FtjaxError(f'class folder {entry} has no {"/".join(IMAGE_EXTENSIONS)} images; add '
                       'some or remove the folder')
    classes[entry.name] = images
  return classes


def _sorted_names(names) -> list[str]:
  # Folders '0'..'10' should mean labels 0..10, not lexical order ('10' before '2').
  if all(_INTEGER.fullmatch(name) for name in names):
    return sorted(names, key=int)
  return sorted(names)


def _digest(path: pathlib.Path) -> str:
  digest = hashlib.sha1()
  with path.open('rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def _split_folders(root: pathlib.Path) -> dict[str, pathlib.Path] | None:
  """{split: folder} when `root` holds per-split folders, None for one folder of classes."""
  found = {}
  for split, stems in files_lib.SPLIT_STEMS.items():
    existing = [root / stem for stem in stems if (root / stem).is_dir()]
    if len(existing) > 1:
      raise FtjaxError(f'{root} has several {split} folders '
                       f'({", ".join(p.name for p in existing)}); keep one')
    if existing:
      found[split] = existing[0]
  if not found:
    return None
  for split in splits_lib.SPLITS:
    if split not in found:
      present = ', '.join(p.name for p in found.values())
      raise FtjaxError(f'{root} has {present} folders but no {split} folder (one of '
                       f'{", ".join(files_lib.SPLIT_STEMS[split])}); add it, or put the class '
                       'folders directly in the root to split automatically')
  return found


def _scan(root: pathlib.Path) -> tuple[list[str], dict[str, list[_Image]], bool]:
  """Lists the images of a source: (label names, {'all' or split: images}, per-split layout).

  Raises:
    FtjaxError: for a missing root, no class folders, an empty class folder, a stray file, or
      (per-split layout) a split whose classes differ from train's.
  """
  if not root.exists():
    raise FtjaxError(f"image folder '{root}' does not exist; give a folder of class folders "
                     '(root/<class>/*.png) or of train/validation/test folders of them')
  if not root.is_dir():
    raise FtjaxError(f"image source '{root}' is a file; give a folder of class folders "
                     '(root/<class>/*.png)')
  folders = _split_folders(root)
  groups = {'all': _class_folders(root)} if folders is None else {
      split: _class_folders(folder) for split, folder in folders.items()}
  first = 'all' if folders is None else 'train'
  where = root if folders is None else folders['train']
  if len(groups[first]) < 2:
    found = ', '.join(groups[first]) or 'none'
    raise FtjaxError(f'{where} needs at least two class folders of images (<class>/*.png); '
                     f'found: {found}')
  names = _sorted_names(groups[first])
  for split, classes in groups.items():
    missing = [name for name in names if name not in classes]
    extra = [name for name in classes if name not in names]
    if missing or extra:
      what = (f'no class folder {missing[0]!r}' if missing
              else f'class folder {extra[0]!r}, which train has not')
      raise FtjaxError(f'{folders[split]} has {what} (train classes: '
                       f'{", ".join(names)}); every split needs the same class folders')
  ids = {name: i for i, name in enumerate(names)}
  images = {
      split: [_Image(path, path.relative_to(root).as_posix(), ids[name], _digest(path))
              for name in names for path in classes[name]]
      for split, classes in groups.items()
  }
  return names, images, folders is not None


def _assign_splits(images: list[_Image], names: list[str], fractions: tuple[float, float, float],
                   root: pathlib.Path) -> dict[str, list[_Image]]:
  """Splits one folder's images by their content hash; every split must hold every class."""
  out: dict[str, list[_Image]] = {split: [] for split in splits_lib.SPLITS}
  for image in images:
    out[splits_lib.split_of(image.digest, fractions)].append(image)
  for split, members in out.items():
    present = {image.label for image in members}
    missing = [names[i] for i in range(len(names)) if i not in present]
    if missing:
      raise FtjaxError(f'{root}: the {split} split has no image of class {missing[0]!r} after '
                       f'splitting {len(images)} images by split_fractions={fractions}; add '
                       'images of it or change split_fractions')
  return out


# The TFDS build
# ------------------------------------------------------------------------------


def _rgb_png(path: pathlib.Path) -> bytes:
  """The image at `path` as RGB PNG bytes, whatever its format and mode (grey, palette, RGBA)."""
  image_lib = _pil()
  try:
    with image_lib.open(path) as image:
      rgb = image.convert('RGB')  # Decodes the whole file, so truncation shows up here.
  except (OSError, ValueError, SyntaxError, image_lib.DecompressionBombError) as e:
    raise FtjaxError(f'{path} is not a readable image ({type(e).__name__}: '
                     f'{" ".join(str(e).split())}); replace or remove it') from e
  buffer = io.BytesIO()
  rgb.save(buffer, format='PNG')
  return buffer.getvalue()


@dataclasses.dataclass(eq=False)
class ImageFolderConfig(tfds.core.BuilderConfig):
  """One image dataset: its class names and, only when it must be built, its images.

  Both stay None when the build already exists: TFDS restores the names from disk.
  """

  label_names: tuple[str, ...] | None = None
  images: dict[str, list[_Image]] | None = dataclasses.field(default=None, repr=False)


class ImageFolder(tfds.core.GeneratorBasedBuilder):
  """RGB image + class label, with train/validation/test splits; one config per dataset."""

  name = 'ftjax_image_folder'
  # Bump on any change to scanning, splitting or encoding so existing builds are not reused.
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Class folders of .png/.jpg images, stored as RGB PNG.'}

  def _info(self) -> tfds.core.DatasetInfo:
    names = self.builder_config.label_names
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.builder_config.description,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3), encoding_format='png'),
            'label': tfds.features.ClassLabel(names=list(names) if names else None),
        }),
        supervised_keys=('image', 'label'),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Everything is local.
    images = self.builder_config.images
    if images is None:
      raise ValueError('ImageFolder needs config.images to build; use build_image_dataset')
    return {split: self._generate_examples(images[split]) for split in splits_lib.SPLITS}

  def _generate_examples(self, images: list[_Image]):
    for image in images:
      # Bytes, not an array: TFDS would encode an array with TensorFlow, which is not installed.
      yield image.key, {'image': _rgb_png(image.path), 'label': image.label}


def _open(config: ImageFolderConfig, data_dir: pathlib.Path) -> ImageFolder:
  with builder_lib._quiet_tfds():  # pylint: disable=protected-access
    return ImageFolder(config=config, data_dir=data_dir, file_format='array_record')


def build_image_dataset(root: str, *, data_dir: str,
                        split_fractions: Sequence[float] = (0.8, 0.1, 0.1)
                        ) -> builder_lib.Dataset:
  """Builds (first time only) and opens the image-folder dataset at `root`.

  Args:
    root: a folder of class folders (`root/<class>/*.png|jpg`), split by `split_fractions`, or
      of train/validation/test folders of class folders, used as given.
    data_dir: where TFDS builds live ('' for $FTJAX_DATA_DIR or the default cache).
    split_fractions: train/validation/test fractions, for a single folder only.

  Returns:
    The opened dataset (kind 'image'): records {'image': [H, W, 3] uint8, 'label': int}.

  Raises:
    FtjaxError: for any problem with the folder or an image (one line naming it).
  """
  path = pathlib.Path(root).expanduser()
  names, images, per_split = _scan(path)
  fractions = None if per_split else splits_lib.check_fractions(split_fractions)
  digest = hashlib.sha1(repr(('image_folder', per_split, fractions)).encode('utf-8'))
  for group in sorted(images):
    for image in images[group]:
      digest.update(f'{group}\0{image.key}\0{image.digest}\n'.encode('utf-8'))
  # A readable stem in front of the hash helps a user find their build on disk.
  stem = re.sub(r'[^a-z0-9]+', '_', path.resolve().name.lower()).strip('_')[:40] or 'images'
  config = ImageFolderConfig(name=f'{stem}-{digest.hexdigest()[:12]}',
                             description=f'Image folders from {path.resolve()}.')
  out_dir = builder_lib.resolve_data_dir(data_dir)
  def full_config():
    split_images = images if per_split else _assign_splits(images['all'], names, fractions, path)
    return dataclasses.replace(config, label_names=tuple(names), images=split_images)

  builder = builder_lib.prepare_once(_open, config, full_config, out_dir)
  info = builder.info
  return builder_lib.Dataset(
      name=config.name,
      label_names=list(info.features['label'].names),
      num_examples={split: info.splits[split].num_examples for split in splits_lib.SPLITS},
      path=pathlib.Path(os.fspath(builder.data_path)),
      builder=builder,
      kind='image',
  )


# Reading batches
# ------------------------------------------------------------------------------


def _three(name: str, values) -> np.ndarray:
  array = np.asarray(values, np.float32).reshape(-1)
  if array.size == 1:
    array = np.repeat(array, 3)
  if array.size != 3 or not np.all(np.isfinite(array)):
    raise FtjaxError(f'image {name} must be one number or three (R, G, B), got {values!r}')
  return array


class ReadImages:
  """Turns a batch of record indices into {'pixel_values', 'label'} arrays.

  Pixels are resized to image_size x image_size with PIL's bilinear filter (as ViTImageProcessor
  does), rescaled to [0, 1] and normalised per channel: [B, S, S, 3] float32, channels last. A
  class, not a closure, so grain can pickle it to worker processes.
  """

  def __init__(self, source, *, image_size: int, mean, std, pad_to: int | None = None):
    """Sets up the reader.

    Args:
      source: a split's random-access data source (`Dataset.source(split)`).
      image_size: the side of the square images the model takes.
      mean: per-channel mean (three numbers or one), subtracted after rescaling to [0, 1].
      std: per-channel standard deviation (three numbers or one), divided by after that.
      pad_to: eval only: pads a short batch with zeros to this size and adds 'weight' [B]
        float32, 1 for real examples and 0 for padding.

    Raises:
      FtjaxError: for a non-positive image_size or pad_to, or a bad mean/std.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) \
        or image_size < 1:
      raise FtjaxError(f'image_size must be a positive integer, got {image_size!r}')
    if pad_to is not None and pad_to < 1:
      raise FtjaxError(f'pad_to must be a positive batch size, got {pad_to}')
    self.source = source
    self.image_size = int(image_size)
    self.mean = _three('mean', mean)
    self.std = _three('std', std)
    if np.any(self.std <= 0):
      raise FtjaxError(f'image std must be positive, got {std!r}')
    self.pad_to = pad_to

  def _pixels(self, image_HxWx3: np.ndarray) -> np.ndarray:
    size = self.image_size
    if image_HxWx3.shape[:2] != (size, size):
      image_lib = _pil()
      resized = image_lib.fromarray(image_HxWx3).resize((size, size), image_lib.Resampling.BILINEAR)
      image_HxWx3 = np.asarray(resized)
    return (image_HxWx3.astype(np.float32) / 255.0 - self.mean) / self.std

  def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    records = self.source.__getitems__([int(i) for i in indices])  # One batched read.
    size = self.image_size
    pixels = np.zeros((len(records), size, size, 3), np.float32)
    for i, record in enumerate(records):
      pixels[i] = self._pixels(record['image'])
    labels = np.asarray([record['label'] for record in records], np.int32)
    out = {}
    if self.pad_to is not None:
      missing = self.pad_to - len(records)
      if missing < 0:
        raise ValueError(f'a batch of {len(records)} indices is larger than pad_to={self.pad_to}')
      out['weight'] = np.concatenate([np.ones(len(records), np.float32),
                                      np.zeros(missing, np.float32)])
      pixels = np.concatenate([pixels, np.zeros((missing, size, size, 3), np.float32)])
      labels = np.concatenate([labels, np.zeros(missing, np.int32)])
    out['pixel_values'] = pixels
    out['label'] = labels
    return out


def _side(value, where: str) -> int | None:
  """A square side from an HF size field: an int, [h, w], or {'height', 'width'}."""
  if isinstance(value, dict):
    if 'height' in value and 'width' in value:
      value = (value['height'], value['width'])
    elif 'shortest_edge' in value:
      value = value['shortest_edge']
    else:
      return None
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise FtjaxError(f'{where} asks for non-square {list(value)} images; ftjax supports '
                       'square images only')
    value = value[0]
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    return None
  return value


def image_processor_settings(checkpoint_dir: str | os.PathLike[str]
                             ) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
  """(image_size, mean, std) for a vision checkpoint, as its Hugging Face image processor has them.

  The size comes from preprocessor_config.json (its crop size when it center-crops), else from
  the model's config.json `image_size`; mean/std from the preprocessor (0.5 each by default, and
  0/1 when it does not normalise). When the two sizes disagree the model's wins: it is the only
  size the model accepts. Pixels are always rescaled by 1/255 (`ReadImages`), as every ViT
  processor does; a processor's `rescale_factor` is not read.

  Raises:
    FtjaxError: if neither file gives a usable image size, or a file is unreadable.
  """
  directory = pathlib.Path(checkpoint_dir).expanduser()

  def read(name: str) -> dict | None:
    path = directory / name
    if not path.is_file():
      return None
    try:
      content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise FtjaxError(f'cannot read {path}: {e}') from e
    if not isinstance(content, dict):
      raise FtjaxError(f'{path} is not a JSON object')
    return content

  processor = read(PREPROCESSOR_NAME) or {}
  model_config = read('config.json') or {}
  where = directory / PREPROCESSOR_NAME
  size = None
  if processor.get('do_center_crop') and processor.get('crop_size') is not None:
    size = _side(processor['crop_size'], str(where))
  if size is None and processor.get('size') is not None:
    size = _side(processor['size'], str(where))
  model_size = (None if model_config.get('image_size') is None
                else _side(model_config['image_size'], str(directory / 'config.json')))
  if model_size is not None and size is not None and size != model_size:
    logger.warning('%s resizes to %d but the model takes %d; using %d', where, size, model_size,
                   model_size)
  size = model_size or size
  if size is None:
    raise FtjaxError(f'{directory} gives no image size: neither {PREPROCESSOR_NAME} (size) nor '
                     "config.json (image_size) has one; is it a vision checkpoint?")
  if processor.get('do_normalize', True):
    mean = tuple(_three('mean', processor.get('image_mean', DEFAULT_MEAN)).tolist())
    std = tuple(_three('std', processor.get('image_std', DEFAULT_STD)).tolist())
  else:
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
  return size, mean, std


# The bundled digits
# ------------------------------------------------------------------------------


def write_digits_folder(out_dir: str | os.PathLike[str], size: int = 32) -> pathlib.Path:
  """Writes scikit-learn's bundled 8x8 digits as `out_dir/<digit>/<index>.png` RGB images.

  1797 real handwritten digits, upsampled (bilinear) to size x size: a small image
  classification task that needs no download. A complete folder of the same size is left as it
  is, so the files (and the dataset hash) stay the same between runs.

  Raises:
    FtjaxError: if scikit-learn is not installed or `size` is not a positive integer.
  """
  if isinstance(size, bool) or not isinstance(size, int) or size < 1:
    raise FtjaxError(f'digits size must be a positive integer, got {size!r}')
  try:
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise FtjaxError('the digits folder needs scikit-learn: pip install scikit-learn') from e
  out = pathlib.Path(out_dir).expanduser()
  marker = out / _DIGITS_MARKER
  expected = json.dumps({'size': size, 'count': NUM_DIGITS})
  digits = datasets.load_digits()
  paths = [out / str(int(label)) / f'{index:04d}.png' for index, label in enumerate(digits.target)]
  if marker.is_file() and marker.read_text() == expected and all(p.is_file() for p in paths):
    return out
  image_lib = _pil()
  for path, image_8x8 in zip(paths, digits.images):
    path.parent.mkdir(parents=True, exist_ok=True)
    grey = np.round(image_8x8 * (255.0 / 16.0)).astype(np.uint8)  # Values are 0..16.
    image = image_lib.fromarray(grey).resize((size, size), image_lib.Resampling.BILINEAR)
    # Via a temporary name, so an interrupted run never leaves a truncated PNG behind.
    tmp = path.with_name(f'.{path.name}.tmp')
    image.convert('RGB').save(tmp, format='PNG')
    os.replace(tmp, path)
  marker.write_text(expected)
  return out
