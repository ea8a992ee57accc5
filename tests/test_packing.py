"""Packed batches (`data.pack_length`): the same logits, losses and gradients as padded ones.

Packing puts several examples in one token row; the models must then attend within an example,
number positions from its start and pool its own tokens. The references are transformers'
BertModel on the padded batch, and ftjax's own padded batch.
"""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from ftjax import configs, hub, tasks
from ftjax.data import packing
from ftjax.errors import FtjaxError
from ftjax.models import layers
from conftest import perturb

TOL = 1e-5


def _padded_batch(num: int, max_length: int, vocab: int, seed: int = 0, lo: int = 2):
  """Right-padded token arrays of random lengths in [lo, max_length], labels, token types."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(lo, max_length + 1, num)
  mask = (np.arange(max_length)[None] < lengths[:, None]).astype(np.int32)
  ids = rng.integers(5, vocab, (num, max_length)).astype(np.int32) * mask
  types = (rng.integers(0, 2, (num, max_length)) * mask).astype(np.int32)
  return {'input_ids': ids, 'attention_mask': mask, 'token_type_ids': types,
          'label': rng.integers(0, 3, num).astype(np.int32)}


def test_first_fit_places_every_item_once_within_capacity():
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 9, 200)
  row, offset, rows = packing.first_fit(lengths, 16)
  assert rows >= -(-lengths.sum() // 16)
  assert rows <= np.ceil(11 / 9 * -(-lengths.sum() // 16)) + 1  # First fit decreasing's bound.
  filled = np.zeros((rows, 16), int)
  for r, at, n in zip(row, offset, lengths):
    filled[r, at:at + n] += 1
  assert filled.max() == 1 and filled.sum() == lengths.sum()  # No overlaps, nothing spills.
  with pytest.raises(FtjaxError, match='does not fit a packed row of 4'):
    packing.first_fit(np.array([3, 5]), 4)


def test_pack_keeps_every_token_and_example_array():
  batch = _padded_batch(32, 8, 100)
  lengths = batch['attention_mask'].sum(1)
  rows = packing.rows_for(lengths, 32, 16)
  out = packing.pack(batch, 16, rows)
  assert out['input_ids'].shape == out['example_ids'].shape == (rows, 16)
  assert rows < 32 * 8 / 16 * 1.0  # Fewer positions than the padded batch (32 x 8).
  np.testing.assert_array_equal(out['label'], batch['label'])
  np.testing.assert_array_equal(out['weight'], np.ones(32, np.float32))
  for i, n in enumerate(lengths):
    where = out['example_ids'] == i
    assert where.sum() == n
    for key in ('input_ids', 'token_type_ids'):
      np.testing.assert_array_equal(out[key][where], batch[key][i, :n])
    np.testing.assert_array_equal(out['positions'][where], np.arange(n))
  np.testing.assert_array_equal(out['attention_mask'], out['example_ids'] >= 0)
  assert not out['input_ids'][out['example_ids'] < 0].any()  # Padding keeps the pad id, 0.


def test_pack_falls_back_to_rows_that_hold_any_batch():
  batch = _padded_batch(8, 8, 100, lo=8)  # 64 tokens cannot fit 2 rows of 16.
  out = packing.pack(batch, 16, 2)
  assert out['input_ids'].shape == (4, 16)  # Two examples of 8 per row of 16.
  assert sorted((out['example_ids'] >= 0).sum(1)) == [16] * 4
  assert packing.pack(batch, 16, 2, multiple=8)['input_ids'].shape == (8, 16)
  # First fit never needs more than ceil(B / (pack_length // width)) rows.
  rng = np.random.default_rng(0)
  for pack_length, width in ((16, 8), (20, 8), (24, 8), (8, 8), (40, 12)):
    fallback = packing.fallback_rows(32, width, pack_length)
    assert fallback == min(32, -(-32 // (pack_length // width)))
    for _ in range(200):
      lengths = rng.integers(1, width + 1, 32)
      if rng.random() < 0.5:
        lengths = np.maximum(lengths, width - 1)  # Long examples: the worst case.
      assert packing.first_fit(lengths, pack_length)[2] <= fallback


def test_rows_for_minimises_the_expected_positions_and_rounds_to_the_devices():
  lengths = np.random.default_rng(1).integers(3, 7, 5000)
  rows = packing.rows_for(lengths, 32, 16, multiple=4)
  assert rows % 4 == 0 and rows < 32
  rng = np.random.default_rng(2)
  needs = [packing.first_fit(lengths[rng.choice(5000, 32)], 16)[2] for _ in range(200)]
  assert np.mean(np.array(needs) <= rows) > 0.9
  assert packing.rows_for(np.full(100, 16), 32, 16) == 32  # Nothing shares a row: B rows.
  # Examples of 4 tokens (8 rows of 16 hold 32 of them) and a tail of 8-token ones (a batch
  # with one needs 9 rows; fallback: 16 rows). A rare tail is cheaper to take the fallback for.
  for share, expected in ((0.01, 9), (0.001, 8)):
    tail = np.random.default_rng(3).random(20_000) < share
    assert packing.rows_for(np.where(tail, 8, 4), 32, 16, width=8) == expected, share
  # An evaluation's batches in order, the last one filled up with padding (no tokens).
  ordered = np.array([8, 8, 8, 8, 1, 1, 1, 1, 16, 4])
  assert packing.rows_for(ordered, 4, 16, in_order=True) == 2  # [4 x 8], [4 x 1], [16, 4].
  assert packing.rows_for(ordered, 4, 16, in_order=True, multiple=4) == 4
  assert packing.rows_for(ordered[:9], 4, 16, in_order=True) == 2  # [16, pad, pad, pad].


def test_evaluation_padding_takes_no_tokens():
  batch = _padded_batch(8, 8, 100, lo=8)
  batch['weight'] = np.array([1, 1, 1, 0, 0, 0, 0, 0], np.float32)
  out = packing.pack(batch, 16, 2)  # Three real examples of 8 tokens: 2 rows, no fallback.
  assert out['input_ids'].shape == (2, 16)
  assert set(np.unique(out['example_ids'])) == {-1, 0, 1, 2}
  np.testing.assert_array_equal(out['weight'], batch['weight'])


@pytest.mark.parametrize('bad', [4, -2, 'x'])
def test_pack_length_is_checked(bad):
  with pytest.raises(FtjaxError, match=r'must be 0 \(no packing\), -1 \(auto\) or at least '
                     'data.max_length=8'):
    packing.check_pack_length(bad, 8)
  assert [packing.check_pack_length(n, 8) for n in (0, -1, 8)] == [0, -1, 8]


@pytest.fixture(scope='module')
def reference():
  torch.manual_seed(0)
  config = transformers.BertConfig(
      vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=37, max_position_embeddings=24, type_vocab_size=2,
      attn_implementation='eager')
  return perturb(transformers.BertModel(config).eval())


@pytest.fixture(scope='module')
def checkpoint(reference, tmp_path_factory):
  directory = tmp_path_factory.mktemp('bert')
  reference.save_pretrained(directory, safe_serialization=True)
  return directory


def _torch_pooled(reference, batch, pooling):
  with torch.no_grad():
    out = reference(**{k: torch.as_tensor(batch[k]).long() for k in
                       ('input_ids', 'attention_mask', 'token_type_ids')})
  hidden = out.last_hidden_state.numpy()
  mask = batch['attention_mask'][..., None]
  if pooling == 'mean':
    return (hidden * mask).sum(1) / mask.sum(1)
  if pooling == 'cls':
    return hidden[:, 0]
  return out.pooler_output.numpy()


@pytest.mark.parametrize('pooling', ['mean', 'cls', 'pooler'])
def test_packed_logits_match_transformers_on_the_padded_batch(reference, checkpoint, pooling):
  model, _, _ = hub.load_model(str(checkpoint), task='classification', num_labels=3,
                               pooling=pooling, seed=0)
  batch = _padded_batch(24, 10, 99)
  packed = packing.pack(batch, 20, packing.rows_for(batch['attention_mask'].sum(1), 24, 20))
  assert packed['input_ids'].shape[0] < 24
  task = tasks.get_task('classification')
  logits = task.forward(model, {k: jnp.asarray(v) for k, v in packed.items()}, deterministic=True)
  head = model.classifier
  expected = _torch_pooled(reference, batch, pooling) @ np.asarray(head.kernel[...]) + np.asarray(
      head.bias[...])
  np.testing.assert_allclose(np.asarray(logits), expected, atol=TOL, rtol=TOL)


def test_packed_roberta_matches_its_padded_batch(tmp_path):
  torch.manual_seed(0)
  config = transformers.RobertaConfig(
      vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=37, max_position_embeddings=40, type_vocab_size=1, pad_token_id=1)
  transformers.RobertaModel(config).save_pretrained(tmp_path, safe_serialization=True)
  model, _, _ = hub.load_model(str(tmp_path), task='regression', num_labels=1, pooling='mean',
                               seed=0)
  batch = _padded_batch(16, 12, 99)
  batch['input_ids'] = np.where(batch['attention_mask'] > 0, batch['input_ids'], 1)  # pad id 1.
  batch['token_type_ids'] = np.zeros_like(batch['input_ids'])
  packed = packing.pack(batch, 36, 6)
  assert packed['input_ids'].shape == (6, 36)
  task = tasks.get_task('regression')
  as_jax = lambda b: {k: jnp.asarray(v) for k, v in b.items()}
  padded = task.forward(model, as_jax(batch), deterministic=True)
  np.testing.assert_allclose(task.forward(model, as_jax(packed), deterministic=True), padded,
                             atol=TOL, rtol=TOL)


def test_packed_loss_and_gradients_match_the_padded_batch(checkpoint):
  model, _, _ = hub.load_model(str(checkpoint), task='classification', num_labels=3,
                               pooling='mean', seed=0)
  graphdef, params = nnx.split(model)
  task = tasks.get_task('classification')
  batch = _padded_batch(24, 10, 99, seed=3)
  packed = packing.pack(batch, 20, 12)

  def loss(params, batch):
    logits = task.forward(nnx.merge(graphdef, params), batch, deterministic=True)
    losses, weights, _ = task.losses(logits, batch)
    return jnp.sum(losses * weights) / jnp.sum(weights)

  grad = jax.jit(jax.value_and_grad(loss))
  value, grads = grad(params, {k: jnp.asarray(v) for k, v in batch.items()})
  packed_value, packed_grads = grad(params, {k: jnp.asarray(v) for k, v in packed.items()})
  np.testing.assert_allclose(packed_value, value, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(packed_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)


def test_packed_token_classification_matches_the_padded_batch(checkpoint):
  model, _, _ = hub.load_model(str(checkpoint), task='token_classification', num_labels=3, seed=0)
  task = tasks.get_task('token_classification')
  batch = _padded_batch(24, 10, 99, seed=4)
  labels = np.random.default_rng(5).integers(-1, 3, batch['input_ids'].shape)  # -1: no loss.
  batch['labels'] = np.where(batch['attention_mask'] > 0, labels, -1).astype(np.int32)
  del batch['label']
  packed = packing.pack(batch, 20, 12)
  as_jax = lambda b: {k: jnp.asarray(v) for k, v in b.items()}
  padded_logits = task.forward(model, as_jax(batch), deterministic=True)
  packed_logits = task.forward(model, as_jax(packed), deterministic=True)
  real = packed['example_ids'] >= 0
  np.testing.assert_allclose(np.asarray(packed_logits)[real],
                             np.asarray(padded_logits)[batch['attention_mask'] > 0][
                                 _padded_order(packed)], atol=TOL, rtol=TOL)

  def mean_loss(logits, b):
    losses, weights, _ = task.losses(logits, as_jax(b))
    return jnp.sum(losses * weights) / jnp.sum(weights)

  np.testing.assert_allclose(mean_loss(packed_logits, packed), mean_loss(padded_logits, batch),
                             rtol=1e-6)


def _padded_order(packed):
  """For the real tokens of a packed batch in row order, their index among the padded batch's
  real tokens in row order (example by example)."""
  ids, positions = packed['example_ids'], packed['positions']
  real = ids >= 0
  lengths = np.bincount(ids[real], minlength=ids.max() + 1)
  starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
  return starts[ids[real]] + positions[real]


def test_attention_stays_within_an_example():
  ids = jnp.array([[0, 0, 1, 1, 1, -1]])
  pack = layers.Packing(ids, jnp.array([[0, 1, 0, 1, 2, 0]]), num_examples=2)
  visible = np.asarray(pack.attention_bias()[0, 0] == 0)
  expected = (ids[0][:, None] == ids[0][None, :]) & (ids[0][None, :] >= 0)
  np.testing.assert_array_equal(visible, expected)
  np.testing.assert_array_equal(pack.membership(), [[1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 0]])


def test_packing_refuses_what_it_cannot_pack(tiny_bert_dir, tmp_path):
  from ftjax.train import train_and_evaluate  # pylint: disable=g-import-not-at-top
  base = [f'model.checkpoint={tiny_bert_dir}', f'data.data_dir={tmp_path / "tfds"}',
          'data.pack_length=16']
  for extra, match in [
      (['peft.method=prompt', 'policy.preset=peft'], 'does not work with prompt tuning'),
      (['train.grad_accum_steps=2'], 'does not work with train.grad_accum_steps=2'),
      (['data.length_buckets=(4, 8)'], 'does not work with data.length_buckets'),
      (['data.max_length=32'], 'or at least data.max_length=32')]:
    run = configs.load_config('configs/minilm_vader.py:runlocal')
    configs.apply_overrides(run, base + extra)
    with pytest.raises(FtjaxError, match=match):
      train_and_evaluate(run, tmp_path / 'run')
    assert not (tmp_path / 'run' / 'results.json').exists()


def test_auto_packs_where_it_can_and_says_why_not(tiny_bert_dir, tmp_path, caplog):
  from ftjax.train import train_and_evaluate  # pylint: disable=g-import-not-at-top
  base = [f'model.checkpoint={tiny_bert_dir}', f'data.data_dir={tmp_path / "tfds"}']
  runs = {'auto': [], 'prompt': ['peft.method=prompt', 'policy.preset=peft']}
  for name, extra in runs.items():
    run = configs.load_config('configs/minilm_vader.py:runlocal')
    configs.apply_overrides(run, base + extra)
    assert run.data.pack_length == -1  # The default.
    caplog.clear()
    with caplog.at_level('INFO'):
      train_and_evaluate(run, tmp_path / name)
    assert (tmp_path / name / 'results.json').exists()
    runs[name] = caplog.text
  assert ('packing train batches: 32 examples into 9 rows of 16 tokens (56% of the padded '
          'batch\'s positions); a batch that needs more takes 16 rows') in runs['auto']
  assert 'packing evaluation batches: 256 examples into' in runs['auto']
  assert 'not packed (data.pack_length=-1, auto): prompt tuning' in runs['prompt']
  assert 'packing train batches' not in runs['prompt']
