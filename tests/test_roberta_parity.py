"""ftjax's RoBERTa against transformers' RobertaModel on a tiny random config."""

import json

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from ftjax import hub
from ftjax import models
from ftjax.errors import FtjaxError
from ftjax.models import roberta
from ftjax.peft import prompts
from conftest import perturb

PAD = 1
TOL = 1e-4


@pytest.fixture(scope='module')
def reference():
  torch.manual_seed(0)
  config = transformers.RobertaConfig(
      vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=37, max_position_embeddings=20, type_vocab_size=1, layer_norm_eps=1e-5,
      pad_token_id=PAD, bos_token_id=0, eos_token_id=2, attn_implementation='eager')
  return perturb(transformers.RobertaModel(config).eval())


@pytest.fixture(scope='module')
def checkpoint(reference, tmp_path_factory):
  directory = tmp_path_factory.mktemp('roberta')
  reference.save_pretrained(directory, safe_serialization=True)
  return directory


@pytest.fixture(scope='module')
def encoder(checkpoint):
  model, report, _ = hub.load_encoder(str(checkpoint))
  assert not report.missing and not report.fresh
  return model


def _batch():
  """Right and left padding in one batch: RoBERTa's positions follow the pad tokens."""
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 99, size=(3, 11)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[0, 7:] = 0
  mask[1, :4] = 0
  mask[2, 3:] = 0
  ids[mask == 0] = PAD
  return ids, mask


def _torch_hidden(model, ids, mask) -> np.ndarray:
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                attention_mask=torch.as_tensor(mask, dtype=torch.long))
  return out.last_hidden_state.numpy()


def _max_diff(a, b, mask) -> float:
  keep = np.asarray(mask, bool)
  return float(np.max(np.abs(np.asarray(a)[keep] - np.asarray(b)[keep])))


@pytest.mark.parametrize('jit', [False, True])
def test_matches_transformers_with_padding(reference, encoder, jit):
  ids, mask = _batch()
  expected = _torch_hidden(reference, ids, mask)
  if jit:
    graphdef, state = nnx.split(encoder)
    ours = jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, mask))(
        state, ids, mask)
  else:
    ours = encoder(ids, mask)
  assert ours.shape == expected.shape
  assert _max_diff(ours, expected, mask) <= TOL
  # The pooler is loaded too.
  with torch.no_grad():
    expected_pool = reference.pooler(torch.as_tensor(expected)).numpy()
  np.testing.assert_allclose(np.asarray(encoder.pool(jnp.asarray(ours))), expected_pool,
                             atol=TOL)


def test_position_ids_rule():
  ids = np.array([[5, 6, 7, PAD, PAD], [PAD, PAD, 5, 6, 7]])
  expected = transformers.models.roberta.modeling_roberta.RobertaEmbeddings \
      .create_position_ids_from_input_ids(torch.as_tensor(ids), PAD).numpy()
  np.testing.assert_array_equal(np.asarray(roberta.position_ids(jnp.asarray(ids), PAD)), expected)


def test_config_and_export_round_trip(reference, encoder, tmp_path):
  config = encoder.config
  assert isinstance(config, roberta.RobertaConfig)
  assert models.get_family('roberta').config_cls is roberta.RobertaConfig
  assert roberta.RobertaConfig.from_hf(config.to_hf()) == config
  assert config.with_dropout(0.3).hidden_dropout_prob == 0.3
  hub.export_encoder(encoder, config, tmp_path)
  written = json.loads((tmp_path / 'config.json').read_text())
  assert written['model_type'] == 'roberta' and written['architectures'] == ['RobertaModel']
  reloaded = transformers.RobertaModel.from_pretrained(tmp_path).eval()
  for name, tensor in reference.state_dict().items():
    np.testing.assert_array_equal(reloaded.state_dict()[name].numpy(), tensor.numpy(), name)


def test_defaults_are_roberta_base():
  config = roberta.RobertaConfig()
  assert (config.vocab_size, config.max_position_embeddings, config.type_vocab_size,
          config.layer_norm_eps, config.pad_token_id) == (50265, 514, 1, 1e-5, 1)


def test_errors(encoder):
  ids, mask = _batch()
  too_long = np.full((1, 19), 5, np.int32)  # 20 positions minus pad and its own slot: 18 fit.
  with pytest.raises(FtjaxError, match='18 positions'):
    encoder(too_long, np.ones_like(too_long))
  model = roberta.RobertaModel(encoder.config, rngs=nnx.Rngs(0))
  prompts.apply_prompt_tuning(model, num_virtual_tokens=2, rngs=nnx.Rngs(0))
  with pytest.raises(FtjaxError, match='prompt and prefix tuning'):
    model(ids, mask)
  with pytest.raises(FtjaxError, match='pad_token_id'):
    roberta.RobertaConfig.from_hf({'pad_token_id': None})
