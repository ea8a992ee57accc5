"""A user's own classification data: a .jsonl/.csv file, or a directory of per-split files.

One file is deduplicated and split by `splits.split_of`, like the VADER task. A directory's
splits are the user's choice and are used as given. Labels are names or integer ids; every
problem with the input is an `FtjaxError` that names the file and line.
"""

import collections
import csv
from collections.abc import Iterator, Sequence
import dataclasses
import hashlib
import io
import json
import logging
import math
import pathlib
import re

from ftjax.data import splits as splits_lib
from ftjax.errors import FtjaxError

logger = logging.getLogger(__name__)

EXTENSIONS = ('.jsonl', '.csv')
# Accepted file stems per split in a directory source, in order of preference.
SPLIT_STEMS = {'train': ('train',), 'validation': ('validation', 'valid', 'dev', 'val'),
               'test': ('test',)}
_INTEGER = re.compile(r'\d+')


@dataclasses.dataclass(frozen=True)
class Row:
  """One parsed record before labels are resolved to ids."""

  text: str
  label: str  # The raw label as text: a name, or digits for an integer id.
  where: str  # 'reviews.csv line 7', for error messages.


@dataclasses.dataclass(frozen=True)
class UserData:
  """Labelled splits ready for the TFDS build."""

  splits: dict[str, list[splits_lib.Example]]
  label_names: list[str]


def source_files(source: str) -> dict[str, pathlib.Path]:
  """Resolves `config.data.source` to its files: {'all': file} or {split: file} for a directory.

  Raises:
    FtjaxError: if the path does not exist, has an unsupported extension, or a directory lacks
      (or has two candidates for) a split file.
  """
  path = pathlib.Path(source).expanduser()
  if not path.exists():
    raise FtjaxError(f"config.data.source '{source}' does not exist; give 'vader', a .jsonl or "
                     '.csv file, or a directory with train/validation/test files')
  if path.is_file():
    _check_extension(path)
    return {'all': path}
  found = {}
  for split, stems in SPLIT_STEMS.items():
    candidates = [path / (stem + ext) for stem in stems for ext in EXTENSIONS]
    existing = [c for c in candidates if c.is_file()]
    if len(existing) > 1:
      raise FtjaxError(f'{path} has several {split} files ({", ".join(c.name for c in existing)})'
                       '; keep one')
    if not existing:
      names = ', '.join(f'{s}{e}' for s in stems for e in EXTENSIONS)
      present = ', '.join(sorted(p.name for p in path.iterdir())) or 'nothing'
      raise FtjaxError(f'{path} has no {split} file (expected one of: {names}; found: {present})')
    found[split] = existing[0]
  return found


def fingerprint(files: dict[str, pathlib.Path], *fields: object) -> str:
  """Returns a hash of the files' contents and the config fields that shape the build."""
  digest = hashlib.sha1(repr(fields).encode('utf-8'))
  for role, path in sorted(files.items()):
    digest.update(f'{role}:{path.suffix}:'.encode('utf-8'))
    with path.open('rb') as f:
      for chunk in iter(lambda: f.read(1 << 20), b''):
        digest.update(chunk)
  return digest.hexdigest()[:12]


def load_user_data(files: dict[str, pathlib.Path], text_column: str, label_column: str,
                   label_names: str, split_fractions: Sequence[float], *,
                   kind: str = 'classification') -> UserData:
  """Reads, splits and labels a user's data (the files from `source_files`).

  `kind` other than 'classification' reads records of that kind (see `_load_records`).

  Args:
    files: {'all': file} (deduplicated, then split by `split_fractions`) or {split: file}.
    text_column: Column or JSON key holding the text.
    label_column: Column or JSON key holding the label: a name or an integer id.
    label_names: Comma-separated names that fix the label ids; '' infers them from the train
      split (sorted names, or '0'..'K-1' when every train label is an integer id).
    split_fractions: train/validation/test fractions, used for a single file only.

  Raises:
    FtjaxError: for any problem with the files or labels, naming the file and line.
  """
  if kind != 'classification':
    return _load_records(files, kind, text_column, label_column, label_names, split_fractions)
  if 'all' in files:
    fractions = splits_lib.check_fractions(split_fractions)
    rows = _dedup(_read(files['all'], text_column, label_column))
    split_rows = {split: [] for split in splits_lib.SPLITS}
    for row in rows:
      split_rows[splits_lib.split_of(splits_lib.dedup_key(row.text), fractions)].append(row)
    for split, rows_in_split in split_rows.items():
      if not rows_in_split:
        raise FtjaxError(f'{files["all"]}: the {split} split is empty after splitting '
                         f'{len(rows)} distinct texts by split_fractions={fractions}; add more '
                         'data or change config.data.split_fractions')
  else:
    split_rows = {split: _read(files[split], text_column, label_column)
                  for split in splits_lib.SPLITS}
    for split, rows_in_split in split_rows.items():
      if not rows_in_split:
        raise FtjaxError(f'{files[split]} ({split} split) has no rows; add data to it')
    _warn_overlap(split_rows)

  names = _label_names(label_names, split_rows['train'])
  ids = {name: i for i, name in enumerate(names)}
  origin = ('config.data.label_names' if label_names.strip() else 'the train split')
  splits = {}
  for split, rows_in_split in split_rows.items():
    examples = []
    for row in rows_in_split:
      label = ids.get(row.label)
      if (label is None and label_names.strip() and _INTEGER.fullmatch(row.label)
          and int(row.label) < len(names)):
        label = int(row.label)  # Given names still accept integer ids (e.g. a 0/1 column).
      if label is None:
        raise FtjaxError(f"{row.where}: unknown label '{row.label}' in the {split} split (labels "
                         f'from {origin}: {_preview(names)}); fix the label or set '
                         'config.data.label_names')
      examples.append(splits_lib.Example(row.text, label))
    splits[split] = examples
  return UserData(splits=splits, label_names=names)


def _load_records(files: dict[str, pathlib.Path], kind: str, text_column: str, label_column: str,
                  label_names: str, split_fractions: Sequence[float]) -> UserData:
  """Regression (text + number), tagging (word list + tag list) or instruction records.

  The columns are `text_column` (text / word list / prompt) and `label_column` (target / tag
  list / response). A single file is deduplicated on the text (first record kept) and split like
  classification data.
  """
  per_split: dict[str, list[tuple[str, dict]]] = {}
  for role, path in files.items():
    _check_extension(path)
    if kind == 'tagging' and path.suffix.lower() != '.jsonl':
      raise FtjaxError(f'{path}: tagging data must be .jsonl (lists of words and tags per line)')
    content = _read_text(path)
    records = _jsonl_records if path.suffix.lower() == '.jsonl' else _csv_records
    per_split[role] = [(where, _record(where, kind, record, text_column, label_column))
                       for where, record in records(path, content, (text_column, label_column))]
  if 'all' in files:
    fractions = splits_lib.check_fractions(split_fractions)
    seen, split_records = set(), {split: [] for split in splits_lib.SPLITS}
    for where, record in per_split['all']:
      key = splits_lib.dedup_key(_identity(kind, record))
      if key not in seen:
        seen.add(key)
        split_records[splits_lib.split_of(key, fractions)].append((where, record))
  else:
    split_records = per_split
  for split, records_in_split in split_records.items():
    if not records_in_split:
      raise FtjaxError(f'the {split} split of {", ".join(map(str, files.values()))} is empty; add '
                       'data or change config.data.split_fractions')
  names: list[str] = []
  if kind == 'tagging':
    train_tags = [Row('', tag, where) for where, r in split_records['train'] for tag in r['tags']]
    names = _label_names(label_names, train_tags)
    ids = {name: i for i, name in enumerate(names)}
    for split, records_in_split in split_records.items():
      for where, record in records_in_split:
        unknown = [tag for tag in record['tags'] if tag not in ids]
        if unknown:
          raise FtjaxError(f"{where}: unknown tag '{unknown[0]}' in the {split} split (tags: "
                           f'{_preview(names)}); fix it or set config.data.label_names')
        record['tags'] = [ids[tag] for tag in record['tags']]
  return UserData(splits={split: [r for _, r in records_in_split]
                          for split, records_in_split in split_records.items()},
                  label_names=names)


def _identity(kind: str, record: dict) -> str:
  if kind == 'tagging':
    return ' '.join(record['tokens'])
  return record['prompt' if kind == 'instruction' else 'text']


def _record(where: str, kind: str, record: dict, text_column: str, label_column: str) -> dict:
  """One record of `kind` as stored in the TFDS build, every field checked."""
  if kind == 'regression':
    value = record[label_column]
    try:
      target = float(value)
      if isinstance(value, bool) or not math.isfinite(target):
        raise ValueError
    except (TypeError, ValueError):
      raise FtjaxError(f"{where}: column '{label_column}' holds {value!r}; a regression target "
                       'must be a finite number') from None
    return {'text': _text(where, record[text_column], text_column), 'target': target}
  if kind == 'instruction':
    return {'prompt': _text(where, record[text_column], text_column),
            'response': _text(where, record[label_column], label_column)}
  tokens, tags = record[text_column], record[label_column]
  if (not isinstance(tokens, list) or not tokens
      or not all(isinstance(t, str) and t.strip() for t in tokens)):
    raise FtjaxError(f"{where}: column '{text_column}' must be a non-empty list of words")
  if not isinstance(tags, list) or len(tags) != len(tokens):
    raise FtjaxError(f"{where}: column '{label_column}' must be a list of one tag per word "
                     f'({len(tokens)} words)')
  return {'tokens': [t.strip() for t in tokens],
          'tags': [_label(where, tag, label_column) for tag in tags]}


def _read_text(path: pathlib.Path) -> str:
  try:
    return path.read_text(encoding='utf-8-sig')  # -sig: spreadsheets prepend a BOM.
  except UnicodeDecodeError as e:
    raise FtjaxError(f'{path} is not UTF-8 text ({e.reason} at byte {e.start}); re-save it as '
                     'UTF-8') from e


def _check_extension(path: pathlib.Path) -> None:
  if path.suffix.lower() not in EXTENSIONS:
    raise FtjaxError(f"{path} has unsupported extension '{path.suffix}'; use a .jsonl file (one "
                     'JSON object per line) or a .csv file with a header row')


def _read(path: pathlib.Path, text_column: str, label_column: str) -> list[Row]:
  """Parses one file into rows, checking columns, text and labels as it goes."""
  _check_extension(path)
  content = _read_text(path)
  records = _jsonl_records if path.suffix.lower() == '.jsonl' else _csv_records
  rows = []
  for where, record in records(path, content, (text_column, label_column)):
    text = _text(where, record[text_column], text_column)
    rows.append(Row(text, _label(where, record[label_column], label_column), where))
  return rows


def _jsonl_records(path: pathlib.Path, content: str,
                   columns: tuple[str, str]) -> Iterator[tuple[str, dict]]:
  # split('\n'), not splitlines(): JSON text may hold raw U+2028 and friends.
  for number, line in enumerate(content.split('\n'), start=1):
    if not line.strip():
      continue
    where = f'{path} line {number}'
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise FtjaxError(f'{where} is not valid JSON ({e.msg}, column {e.colno}); each line must '
                       'be one JSON object') from e
    if not isinstance(record, dict):
      raise FtjaxError(f'{where} is a JSON {type(record).__name__}, not an object; each line '
                       'must be one JSON object like {"text": ..., "label": ...}')
    _check_columns(where, record.keys(), columns)
    yield where, record


def _csv_records(path: pathlib.Path, content: str,
                 columns: tuple[str, str]) -> Iterator[tuple[str, dict]]:
  reader = csv.DictReader(io.StringIO(content, newline=''))
  if reader.fieldnames is None:
    raise FtjaxError(f'{path} is empty; a .csv file needs a header row naming its columns')
  _check_columns(f'{path} header (line 1)', reader.fieldnames, columns)
  for record in reader:
    # line_num is where the record ends, which is right even for quoted multi-line texts.
    where = f'{path} line {reader.line_num}'
    for column in columns:
      if record.get(column) is None:
        raise FtjaxError(f"{where} has too few fields: no value for column '{column}'")
    yield where, record


def _check_columns(where: str, present, columns: tuple[str, str]) -> None:
  present = list(present)
  for column, field in zip(columns, ('text_column', 'label_column')):
    if column not in present:
      raise FtjaxError(f"{where} has no column '{column}' (columns: {_preview(present)}); rename "
                       f'it or set config.data.{field}')


def _text(where: str, value: object, column: str) -> str:
  if not isinstance(value, str):
    raise FtjaxError(f"{where}: column '{column}' holds {type(value).__name__} {value!r}, not "
                     'text')
  text = value.strip()
  if not text:
    raise FtjaxError(f"{where}: empty text in column '{column}'; fill it in or remove the row")
  return text


def _label(where: str, value: object, column: str) -> str:
  """Normalises a label to text: names stay names, integer ids (also 3.0 in JSON) become digits."""
  if isinstance(value, float) and value.is_integer():
    value = int(value)
  if isinstance(value, bool) or not isinstance(value, (str, int)):
    raise FtjaxError(f"{where}: column '{column}' holds {value!r}; a label must be a name or "
                     'an integer id')
  label = str(value).strip()
  if not label:
    raise FtjaxError(f"{where}: empty label in column '{column}'; fill it in or remove the row")
  return label


def _dedup(rows: list[Row]) -> list[Row]:
  """Keeps one row per `dedup_key`; duplicates with different labels take the majority label."""
  groups = collections.defaultdict(list)
  for row in rows:
    groups[splits_lib.dedup_key(row.text)].append(row)
  out, conflicts = [], 0
  for group in groups.values():
    votes = collections.Counter(row.label for row in group)
    conflicts += len(votes) > 1
    label = votes.most_common(1)[0][0]  # Ties go to the label seen first.
    out.append(next(row for row in group if row.label == label))
  if len(out) < len(rows):
    logger.info('dropped %d duplicate texts (%d with conflicting labels, resolved by majority)',
                len(rows) - len(out), conflicts)
  return out


def _warn_overlap(split_rows: dict[str, list[Row]]) -> None:
  train = {splits_lib.dedup_key(row.text) for row in split_rows['train']}
  for split in ('validation', 'test'):
    shared = sum(splits_lib.dedup_key(row.text) in train for row in split_rows[split])
    if shared:
      logger.warning('%d of %d %s texts also appear in train; scores on %s will be optimistic',
                     shared, len(split_rows[split]), split, split)


def _label_names(label_names: str, train: list[Row]) -> list[str]:
  """Fixed names from the config, else sorted train names, else '0'..'K-1' for integer ids."""
  if label_names.strip():
    names = [name.strip() for name in label_names.split(',')]
    if any(not name for name in names) or len(set(names)) != len(names):
      raise FtjaxError(f"config.data.label_names='{label_names}' must be distinct, non-empty, "
                       "comma-separated names like 'negative,positive'")
    return names
  labels = {row.label for row in train}
  if all(_INTEGER.fullmatch(label) for label in labels):
    return [str(i) for i in range(max(int(label) for label in labels) + 1)]
  return sorted(labels)


def _preview(items: Sequence[str], limit: int = 20) -> str:
  shown = ', '.join(str(item) for item in items[:limit])
  return shown + (f', ... ({len(items)} in all)' if len(items) > limit else '')
