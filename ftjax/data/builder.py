"""TFDS builds of the VADER task and of user files, written once as ArrayRecord and reused.

Each dataset gets its own builder config and so its own directory,
`<data_dir>/ftjax_text_classification/<config>/<version>/`. A user dataset's config name holds a
hash of its files and of the config fields that shape it, so editing a file (or e.g. the label
names) builds anew instead of silently reading stale data. Reading goes through TFDS data
sources (random access, no TensorFlow), which grain consumes directly.
"""

import contextlib
import dataclasses
import logging
import os
import pathlib
import re
import time

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from ftjax.data import files as files_lib
from ftjax.data import splits as splits_lib
from ftjax.data import vader
from ftjax.errors import FtjaxError

logger = logging.getLogger(__name__)

DEFAULT_DATA_DIR = '~/.cache/ftjax/tfds'


# What a record holds, per kind of text dataset (the task decides the kind).
KINDS = ('classification', 'regression', 'tagging', 'instruction')


def _features(kind: str, names: tuple[str, ...] | None) -> dict:
  labels = lambda: tfds.features.ClassLabel(names=list(names) if names else None)
  if kind == 'classification':
    return {'text': tfds.features.Text(), 'label': labels()}
  if kind == 'regression':
    return {'text': tfds.features.Text(), 'target': tfds.features.Scalar(dtype=np.float32)}
  if kind == 'tagging':
    return {'tokens': tfds.features.Sequence(tfds.features.Text()),
            'tags': tfds.features.Sequence(labels())}
  if kind == 'instruction':
    return {'prompt': tfds.features.Text(), 'response': tfds.features.Text()}
  raise ValueError(f'unknown dataset kind {kind!r}')


@dataclasses.dataclass(eq=False)
class TextClassificationConfig(tfds.core.BuilderConfig):
  """One dataset: its kind, label names and, only when it must be built, its examples.

  The names and examples stay None when the build already exists: TFDS then restores the label
  names from disk, and the source files need not be parsed again.
  """

  kind: str = 'classification'
  label_names: tuple[str, ...] | None = None
  # Split -> examples: `splits.Example`s for classification, feature dicts for the other kinds.
  examples: dict[str, list] | None = dataclasses.field(default=None, repr=False)


class TextClassification(tfds.core.GeneratorBasedBuilder):
  """Text datasets with train/validation/test splits; one builder config per dataset.

  Classification (text + class), regression (text + real target), tagging (words + a class per
  word) and instruction (prompt + response) records, chosen by the config's `kind`.
  """

  # Not the class name's default 'text_classification', which a TFDS catalogue entry could take.
  name = 'ftjax_text_classification'
  # Bump on any change to parsing, dedup or splitting so existing builds are not reused.
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'VADER lexicon task and user .jsonl/.csv files.'}

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        description=config.description,
        features=tfds.features.FeaturesDict(_features(config.kind, config.label_names)),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Everything is local.
    examples = self.builder_config.examples
    if examples is None:
      raise ValueError('TextClassification needs config.examples to build; use build_dataset')
    return {split: self._generate_examples(examples[split]) for split in splits_lib.SPLITS}

  def _generate_examples(self, examples: list[splits_lib.Example]):
    # Keys only need to be unique: TFDS orders the written records by a hash of them.
    for index, example in enumerate(examples):
      yield index, example._asdict() if isinstance(example, splits_lib.Example) else example


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A built dataset, ready for `pipeline.train_iterator` and `pipeline.eval_batches`.

  Attributes:
    name: The builder config name, e.g. 'vader-1a2b3c4d5e' or 'reviews-0123456789ab'.
    label_names: Class names; a label is an index into this list.
    num_examples: Examples per split ('train', 'validation', 'test').
    path: The directory holding the ArrayRecord files and dataset_info.json.
  """

  name: str
  label_names: list[str]
  num_examples: dict[str, int]
  path: pathlib.Path
  builder: tfds.core.GeneratorBasedBuilder = dataclasses.field(repr=False)
  kind: str = 'classification'  # 'classification', 'regression', 'tagging', 'instruction', 'image'

  def source(self, split: str):
    """Returns the split as a random-access TFDS data source of feature dicts."""
    if split not in splits_lib.SPLITS:
      raise ValueError(f'unknown split {split!r}; expected one of {splits_lib.SPLITS}')
    return self.builder.as_data_source(split=split)


def resolve_data_dir(data_dir: str) -> pathlib.Path:
  """`config.data.data_dir`, else $FTJAX_DATA_DIR, else ~/.cache/ftjax/tfds."""
  return pathlib.Path(data_dir or os.environ.get('FTJAX_DATA_DIR') or DEFAULT_DATA_DIR
                      ).expanduser()


DIGITS = 'sklearn_digits'  # Image source name: scikit-learn's 1797 digits as a PNG folder.

# Which kind of records each task trains on.
TASK_KINDS = {'classification': 'classification', 'regression': 'regression',
              'token_classification': 'tagging', 'causal_lm': 'instruction',
              'image_classification': 'image'}


def build_dataset(data_cfg: ml_collections.ConfigDict, task: str = 'classification') -> Dataset:
  """Builds (first time only) and opens the dataset that `config.data` describes for `task`.

  Args:
    data_cfg: `config.data`: source, text_column, label_column, label_names, split_fractions,
      data_dir (see configs/minilm_vader.py).
    task: `config.task`; it decides what a record holds.

  Returns:
    The opened dataset.

  Raises:
    FtjaxError: for any problem with the source files or label names (one line).
  """
  data_dir = resolve_data_dir(data_cfg.data_dir)
  kind = TASK_KINDS.get(task)
  if kind == 'image':
    from ftjax.data import images  # pylint: disable=g-import-not-at-top
    source = data_cfg.source
    if source == DIGITS:  # scikit-learn's digits, written once as a folder of PNGs.
      source = str(images.write_digits_folder(data_dir / 'sklearn_digits_png',
                                              size=data_cfg.get('digits_size', 32)))
    return images.build_image_dataset(source, data_dir=str(data_dir),
                                      split_fractions=tuple(data_cfg.split_fractions))
  if data_cfg.source == 'vader':
    config, load = _vader_config(data_cfg, kind)
  else:
    config, load = _user_config(data_cfg, kind)
  def full_config():
    label_names, examples = load()
    return dataclasses.replace(config, label_names=tuple(label_names), examples=examples)

  builder = prepare_once(_open, config, full_config, data_dir)
  info = builder.info
  label_feature = {'classification': 'label', 'tagging': 'tags'}.get(kind)
  label_names = []
  if label_feature:
    feature = info.features[label_feature]
    label_names = list(getattr(feature, 'feature', feature).names)
  return Dataset(
      name=config.name,
      label_names=label_names,
      num_examples={split: info.splits[split].num_examples for split in splits_lib.SPLITS},
      path=pathlib.Path(os.fspath(builder.data_path)),
      builder=builder,
      kind=kind,
  )


def prepare_once(open_builder, config: tfds.core.BuilderConfig, full_config,
                 data_dir: pathlib.Path) -> tfds.core.GeneratorBasedBuilder:
  """Opens the dataset `config` names, building it first if it is not on disk yet.

  Args:
    open_builder: (builder config, data_dir) -> builder.
    config: the config without its examples (what a prepared build is opened with).
    full_config: () -> the same config with the examples; only called to build.
    data_dir: where TFDS builds live.

  Raises:
    FtjaxError: if the build cannot be written.
  """
  builder = open_builder(config, data_dir)
  if builder.is_prepared():
    return builder
  start = time.time()
  full = full_config()
  tfds.disable_progress_bar()  # Progress bars would flood logs; ftjax logs the outcome.
  try:
    open_builder(full, data_dir).download_and_prepare(file_format='array_record')
  except OSError as e:
    raise FtjaxError(f'cannot write the dataset under {data_dir} ({e}); set '
                     'config.data.data_dir or $FTJAX_DATA_DIR to a writable directory') from e
  # Reopened without the examples: data sources pickle their builder (and its config) to grain
  # workers.
  builder = open_builder(config, data_dir)
  logger.info('built dataset %s in %.1fs at %s', config.name, time.time() - start,
              builder.data_path)
  return builder


def _open(config: TextClassificationConfig, data_dir: pathlib.Path) -> TextClassification:
  with _quiet_tfds():
    return TextClassification(config=config, data_dir=data_dir, file_format='array_record')


@contextlib.contextmanager
def _quiet_tfds():
  """Silences TFDS's warnings that every config is 'custom' (ours always are by design)."""
  absl_logger = logging.getLogger('absl')
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    absl_logger.setLevel(level)


def _vader_config(data_cfg: ml_collections.ConfigDict, kind: str):
  given = [name.strip() for name in data_cfg.label_names.split(',') if name.strip()]
  if given and given != list(vader.LABEL_NAMES):
    raise FtjaxError(f"config.data.label_names='{data_cfg.label_names}' does not fit the vader "
                     f"task, whose labels are fixed ({','.join(vader.LABEL_NAMES)}); clear it")
  if kind == 'instruction':
    raise FtjaxError("data.source='vader' has no instruction data: give a .jsonl file of "
                     'prompt/response records (e.g. the shipped ftjax/data/assets/'
                     'word_sentiment_sft.jsonl)')
  what = {'classification': '3 classes by mean rating',
          'regression': 'the mean rating (-4..4) as the target',
          'tagging': 'runs of 6 entries, each tagged with its class'}[kind]
  suffix = '' if kind == 'classification' else f'-{kind}'
  config = TextClassificationConfig(
      name=f'vader{suffix}-{vader.fingerprint()}', kind=kind,
      description=f'VADER lexicon entries, {what}, fixed 80/10/10 splits.')
  load = {'classification': vader.load_splits, 'regression': vader.load_rating_splits,
          'tagging': vader.load_tagging_splits}[kind]
  return config, lambda: (vader.LABEL_NAMES, load())


def _user_config(data_cfg: ml_collections.ConfigDict, kind: str):
  source_files = files_lib.source_files(data_cfg.source)
  single = 'all' in source_files
  fractions = tuple(data_cfg.split_fractions) if single else None
  fields = (kind, data_cfg.text_column, data_cfg.label_column, data_cfg.label_names, fractions)
  if kind == 'classification':  # Earlier builds hashed no kind: keep their names valid.
    fields = fields[1:]
  path = pathlib.Path(data_cfg.source).expanduser()
  # A readable stem in front of the hash helps a user find their build on disk.
  stem = re.sub(r'[^a-z0-9]+', '_', (path.stem if single else path.resolve().name).lower())
  config = TextClassificationConfig(
      name=f"{stem.strip('_')[:40] or 'data'}-{files_lib.fingerprint(source_files, *fields)}",
      kind=kind, description=f'User data from {path.resolve()}.')

  def load():
    data = files_lib.load_user_data(source_files, data_cfg.text_column, data_cfg.label_column,
                                    data_cfg.label_names, data_cfg.split_fractions, kind=kind)
    return data.label_names, data.splits

  return config, load
