"""Compilations over a whole run on variable-length text: once per shape, never again.

A jitted step traces once per input shape; a retrace is a recompilation. The steps are wrapped
to record the token length of every trace.
"""

import json
import pathlib

import numpy as np
import pytest

from ftjax import configs, steps
from ftjax.errors import FtjaxError
from ftjax.train import train_and_evaluate

ROOT = pathlib.Path(__file__).parent.parent
WORDS = ('good', 'bad', 'fine', 'movie', 'plot', 'actor', 'boring', 'great', 'awful', 'the',
         'was', 'and', 'not', 'really', 'quite', 'story', 'ending', 'loved', 'hated', 'it')


@pytest.fixture(scope='module')
def reviews(tmp_path_factory) -> pathlib.Path:
  """600 texts: most of 1 to 5 words, 40 of 6 to 60 (3 to 62 tokens); two labels."""
  rng = np.random.default_rng(0)
  path = tmp_path_factory.mktemp('reviews') / 'reviews.jsonl'
  lengths = np.concatenate([rng.integers(1, 6, 560), rng.integers(6, 61, 40)])
  with path.open('w') as f:
    for i, n in enumerate(rng.permutation(lengths)):
      text = ' '.join(rng.choice(WORDS, n))
      f.write(json.dumps({'text': text, 'label': ['neg', 'pos'][i % 2]}) + '\n')
  return path


def _run(tiny_bert_dir, reviews, workdir, monkeypatch, *overrides):
  traced = {'train': [], 'eval': []}
  train_step, eval_step = steps.train_step, steps.eval_step

  def counting_train(state, batch, *args, **kwargs):
    traced['train'].append(batch['input_ids'].shape)  # Runs at trace time only.
    return train_step(state, batch, *args, **kwargs)

  def counting_eval(params, rest, batch, **kwargs):
    traced['eval'].append(batch['input_ids'].shape)
    return eval_step(params, rest, batch, **kwargs)

  monkeypatch.setattr(steps, 'train_step', counting_train)
  monkeypatch.setattr(steps, 'eval_step', counting_eval)
  config = configs.load_config(str(ROOT / 'configs/minilm_vader.py'))
  configs.apply_overrides(config, [
      f'model.checkpoint={tiny_bert_dir}', f'data.source={reviews}',
      f'data.data_dir={workdir / "tfds"}', 'data.max_length=64', 'train.batch_size=16',
      'train.num_epochs=2.0', 'train.eval_every=10', 'train.checkpoint_every=1000',
      'train.eval_batch_size=32', 'policy.preset=full', *overrides])
  train_and_evaluate(config, workdir / 'run')
  summary = json.loads((workdir / 'run' / 'results.json').read_text())
  assert summary['total_steps'] >= 40  # 80% of the (deduplicated) texts, two epochs.
  return traced


def _lengths(traced):
  return {step: [shape[1] for shape in shapes] for step, shapes in traced.items()}


def test_fixed_length_compiles_each_step_once(tiny_bert_dir, reviews, tmp_path, monkeypatch):
  traced = _lengths(_run(tiny_bert_dir, reviews, tmp_path, monkeypatch, 'data.pack_length=0'))
  # ~50 train steps, 4 evaluations + the final validation and test: one compilation each.
  assert traced == {'train': [64], 'eval': [64]}


def test_length_buckets_compile_once_per_bucket(tiny_bert_dir, reviews, tmp_path, monkeypatch):
  traced = _lengths(_run(tiny_bert_dir, reviews, tmp_path, monkeypatch,
                         'data.length_buckets=(8, 16, 64)'))
  for step in ('train', 'eval'):
    assert len(traced[step]) == len(set(traced[step])), traced  # No shape compiled twice.
    assert set(traced[step]) <= {8, 16, 64}
  # Most batches are short, some hold a long text: more than one bucket is met.
  assert len(set(traced['train'])) >= 2, traced


def test_packed_batches_compile_once_per_row_count(tiny_bert_dir, reviews, tmp_path,
                                                    monkeypatch):
  traced = _run(tiny_bert_dir, reviews, tmp_path, monkeypatch, 'data.pack_length=64')
  for step, batch_size in (('train', 16), ('eval', 32)):
    assert len(traced[step]) == len(set(traced[step])), traced  # No shape compiled twice.
    # The sized row count, and at most once more the fallback of one example per row.
    assert len(traced[step]) <= 2 and all(length == 64 for _, length in traced[step]), traced
    assert min(rows for rows, _ in traced[step]) < batch_size / 2, traced  # Packing happened.
  # Evaluation batches are fixed and sized on themselves, one count for every split: one shape.
  assert len(traced['eval']) == 1, traced


def test_bad_buckets_are_one_line_errors(tiny_bert_dir, reviews, tmp_path, monkeypatch):
  with pytest.raises(FtjaxError, match=r'length_buckets=\(8, 128\) must hold token counts from 1 '
                     r'to data.max_length=64'):
    _run(tiny_bert_dir, reviews, tmp_path, monkeypatch, 'data.length_buckets=(8, 128)')


def test_cut_to_bucket_drops_only_padding_columns():
  from ftjax import data
  mask = np.zeros((3, 12), np.int32)
  mask[0, :3] = mask[1, :5] = mask[2, :2] = 1
  batch = {'input_ids': np.arange(36).reshape(3, 12) * mask, 'attention_mask': mask,
           'labels': np.where(mask, 1, -1), 'label': np.array([0, 1, 0])}
  cut = data.cut_to_bucket(batch, (4, 8))
  assert cut['input_ids'].shape == cut['labels'].shape == (3, 8)  # 5 tokens: bucket 8.
  np.testing.assert_array_equal(cut['input_ids'], batch['input_ids'][:, :8])
  np.testing.assert_array_equal(cut['label'], batch['label'])
  assert data.cut_to_bucket(batch, ())['input_ids'].shape == (3, 12)
  # An eval batch's padding row (weight 0) does not pick the bucket.
  weighted = {**batch, 'weight': np.array([1.0, 0.0, 1.0], np.float32)}
  assert data.cut_to_bucket(weighted, (4, 8))['input_ids'].shape == (3, 4)
  assert data.cut_to_bucket({**batch, 'attention_mask': np.ones((3, 12))},
                            (4, 8))['input_ids'].shape == (3, 12)  # Longer than every bucket.
