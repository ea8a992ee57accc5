"""ftjax's GPT-2 against transformers' GPT2LMHeadModel on a tiny random config: hidden states,
tied logits, padding on either side, the KV cache, export and config errors."""

import json

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from ftjax import hub
from ftjax.errors import FtjaxError
from ftjax.models import gpt2
from ftjax.models import heads
from conftest import perturb

VOCAB = 97
TOL = 1e-4


def _reference(**overrides) -> transformers.GPT2LMHeadModel:
  torch.manual_seed(0)
  config = transformers.GPT2Config(
      vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4, n_inner=48,
      bos_token_id=0, eos_token_id=0, attn_implementation='eager', **overrides)
  # Biases too: GPT-2's are zero at init, so a dropped one would not show either.
  return perturb(transformers.GPT2LMHeadModel(config).eval(),
                 lambda name: 'ln_' in name or name.endswith('.bias'))


@pytest.fixture(scope='module')
def reference():
  return _reference()


@pytest.fixture(scope='module')
def checkpoint(reference, tmp_path_factory):
  directory = tmp_path_factory.mktemp('gpt2')
  reference.save_pretrained(directory, safe_serialization=True)
  return directory


@pytest.fixture(scope='module')
def lm(checkpoint):
  encoder, report, _ = hub.load_encoder(str(checkpoint))
  assert not report.missing and not report.fresh
  return heads.CausalLM(encoder, tie_word_embeddings=True, rngs=nnx.Rngs(0))


def _batch(side: str):
  """Token ids, mask and (for left padding) position ids of a padded batch of 3."""
  rng = np.random.default_rng(0)
  ids = rng.integers(1, VOCAB, size=(3, 9)).astype(np.int32)
  lengths = np.array([9, 6, 2])
  mask = (np.arange(9)[None] < lengths[:, None]).astype(np.int32)
  if side == 'left':
    mask = mask[:, ::-1].copy()
  ids[mask == 0] = 0
  positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None) if side == 'left' else None
  return ids, mask, positions


def _torch_forward(model, ids, mask, positions=None):
  as_long = lambda a: None if a is None else torch.as_tensor(np.asarray(a), dtype=torch.long)
  with torch.no_grad():
    out = model(input_ids=as_long(ids), attention_mask=as_long(mask),
                position_ids=as_long(positions), output_hidden_states=True)
  return out.hidden_states[-1].numpy(), out.logits.numpy()


def _ours(lm, ids, mask, positions, *, jit: bool):
  """(hidden, logits) of ftjax's model, eagerly or through one jax.jit."""

  def forward(model, ids, mask, positions):
    return model.encoder(ids, mask, positions=positions), model(ids, mask, positions=positions)

  if not jit:
    return forward(lm, ids, mask, positions)
  graphdef, state = nnx.split(lm)
  run = jax.jit(lambda state, *args: forward(nnx.merge(graphdef, state), *args))
  return run(state, ids, mask, positions)


def _max_diff(a, b, mask) -> float:
  keep = np.asarray(mask, bool)
  return float(np.max(np.abs(np.asarray(a)[keep] - np.asarray(b)[keep])))


@pytest.mark.parametrize('side', ['right', 'left'])
@pytest.mark.parametrize('jit', [False, True])
def test_matches_transformers_with_padding(reference, lm, side, jit):
  ids, mask, positions = _batch(side)
  expected_hidden, expected_logits = _torch_forward(reference, ids, mask, positions)
  hidden, logits = _ours(lm, ids, mask, positions, jit=jit)
  assert hidden.shape == (3, 9, 32) and logits.shape == (3, 9, VOCAB)
  assert logits.dtype == jnp.float32
  assert _max_diff(hidden, expected_hidden, mask) <= TOL
  assert _max_diff(logits, expected_logits, mask) <= TOL


def test_kv_cache_decoding_matches_full_forward(reference, lm):
  ids, mask, _ = _batch('left')
  prompt_len, steps = ids.shape[1], 5
  new = np.random.default_rng(1).integers(1, VOCAB, size=(3, steps)).astype(np.int32)
  full_ids = np.concatenate([ids, new], axis=1)
  full_mask = np.concatenate([mask, np.ones_like(new)], axis=1)
  full_positions = np.clip(np.cumsum(full_mask, axis=1) - 1, 0, None)
  full_logits = np.asarray(lm(full_ids, full_mask, positions=full_positions))
  _, torch_logits = _torch_forward(reference, full_ids, full_mask, full_positions)
  assert _max_diff(full_logits, torch_logits, full_mask) <= TOL

  graphdef, state = nnx.split(lm)

  @jax.jit
  def step(state, ids, mask, positions, cache):
    return nnx.merge(graphdef, state)(ids, mask, positions=positions, cache=cache)

  cache = lm.init_cache(batch_size=3, max_length=16)
  logits, cache = step(state, ids, mask, full_positions[:, :prompt_len], cache)
  assert _max_diff(logits, full_logits[:, :prompt_len], mask) <= TOL
  diffs = []
  for t in range(steps):
    at = prompt_len + t
    logits, cache = step(state, new[:, t:t + 1], np.ones((3, 1), np.int32),
                         full_positions[:, at:at + 1], cache)
    assert logits.shape == (3, 1, VOCAB)
    diffs.append(float(np.max(np.abs(np.asarray(logits[:, 0]) - full_logits[:, at]))))
  assert int(cache.index) == prompt_len + steps
  assert max(diffs) <= TOL, diffs


def test_inverse_layer_idx_scaling_matches(tmp_path):
  reference = _reference(scale_attn_by_inverse_layer_idx=True, activation_function='gelu')
  reference.save_pretrained(tmp_path, safe_serialization=True)
  encoder, _, _ = hub.load_encoder(str(tmp_path))
  ids, mask, _ = _batch('right')
  expected_hidden, _ = _torch_forward(reference, ids, mask)
  assert _max_diff(encoder(ids, mask), expected_hidden, mask) <= TOL


def test_export_round_trip(reference, checkpoint, lm, tmp_path):
  encoder = lm.encoder
  hub.export_encoder(encoder, encoder.config, tmp_path)
  assert json.loads((tmp_path / 'config.json').read_text())['model_type'] == 'gpt2'
  reloaded = transformers.GPT2Model.from_pretrained(tmp_path).eval()
  for name, tensor in reference.transformer.state_dict().items():
    if not name.endswith(('attn.bias', 'attn.masked_bias')):
      np.testing.assert_array_equal(reloaded.state_dict()[name].numpy(), tensor.numpy(), name)
  assert gpt2.GPT2Config.from_hf(encoder.config.to_hf()) == encoder.config


def test_parameter_paths_and_axes(lm):
  params = dict(nnx.to_flat_state(nnx.state(lm.encoder, nnx.Param)))
  axes = {'/'.join(map(str, path)): var.get_metadata().get('out_sharding')
          for path, var in params.items()}
  assert axes['wte/embedding'] == ('vocab', 'embed')
  assert axes['wpe/embedding'] == (None, 'embed')
  assert axes['layers/1/attn/c_attn/kernel'] == ('embed', 'heads')
  assert axes['layers/1/attn/c_proj/kernel'] == ('heads', 'embed')
  assert axes['layers/0/mlp/c_fc/kernel'] == ('embed', 'mlp')
  assert axes['layers/0/mlp/c_proj/kernel'] == ('mlp', 'embed')
  assert axes['ln_f/scale'] == ('embed',)
  assert all(a is not None for a in axes.values()), axes


def test_errors():
  with pytest.raises(FtjaxError, match='activation_function'):
    gpt2.GPT2Config.from_hf({'activation_function': 'mish'})
  with pytest.raises(FtjaxError, match='add_cross_attention'):
    gpt2.GPT2Config.from_hf({'add_cross_attention': True})
  with pytest.raises(FtjaxError, match='divisible'):
    gpt2.GPT2Config.from_hf({'n_embd': 30, 'n_head': 4})
  config = gpt2.GPT2Config(vocab_size=11, n_positions=4, n_embd=8, n_layer=1, n_head=2)
  model = gpt2.GPT2Model(config, rngs=nnx.Rngs(0))
  with pytest.raises(FtjaxError, match='n_positions'):
    model(jnp.zeros((1, 5), jnp.int32))
  with pytest.raises(FtjaxError, match='n_positions'):
    model.init_cache(1, 8)


def test_dropout_runs_and_changes_outputs(lm):
  ids, mask, _ = _batch('right')
  config = lm.encoder.config.with_dropout(0.5)
  assert (config.resid_pdrop, config.embd_pdrop, config.attn_pdrop) == (0.5, 0.5, 0.5)
  model = heads.CausalLM(gpt2.GPT2Model(config, rngs=nnx.Rngs(0)), tie_word_embeddings=True,
                         rngs=nnx.Rngs(0))
  train = model(ids, mask, deterministic=False, rngs=nnx.Rngs(dropout=1))
  assert np.all(np.isfinite(np.asarray(train)))
  assert not np.allclose(np.asarray(train), np.asarray(model(ids, mask)))
