"""Every task end to end on tiny checkpoints that `transformers` wrote; exports checked against it.

Round trips: HF checkpoint -> ftjax -> fine-tune a few steps -> export (adapters merged) ->
`transformers` loads the export and gives ftjax's logits. Generation: the KV-cache decode loop
gives the tokens of a plain full forward per step, and of transformers' own greedy search.
"""

import json
import logging
import re
import pathlib
import subprocess
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from ftjax import configs, data, generate, hub, tasks
from ftjax.errors import FtjaxError
from ftjax.peft import adapters, lora
from ftjax.train import restore_model, train_and_evaluate

ROOT = pathlib.Path(__file__).parent.parent
PROMPTS = [[1, 5, 9, 13, 7], [1, 22, 8], [1, 40, 41, 42, 43, 44, 45, 46]]


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


def _config(name: str, checkpoint, data_dir, *overrides):
  config = configs.load_config(str(ROOT / f'configs/{name}'))
  configs.apply_overrides(config, [f'model.checkpoint={checkpoint}', f'data.data_dir={data_dir}',
                                   'train.log_every=1', *overrides])
  return config


def _train_losses(workdir: pathlib.Path) -> list[float]:
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return [r['loss'] for r in records if r['split'] == 'train']


def _padded(prompts, pad=0):
  """Right-padded ids and mask, as the training batches are."""
  length = max(map(len, prompts))
  ids = np.full((len(prompts), length), pad, np.int32)
  mask = np.zeros_like(ids)
  for row, prompt in enumerate(prompts):
    ids[row, :len(prompt)], mask[row, :len(prompt)] = prompt, 1
  return ids, mask


def _assert_same_token_logits(model, reloaded):
  """ftjax's per-token logits equal those of the transformers model, on the real tokens."""
  ids, mask = _padded(PROMPTS)
  with torch.no_grad():
    expected = reloaded.eval()(torch.tensor(ids, dtype=torch.long),
                               attention_mask=torch.tensor(mask)).logits.numpy()
  got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
  real = mask.astype(bool)
  assert np.abs(got[real] - expected[real]).max() < 1e-4


# Data for supervised fine-tuning
# ------------------------------------------------------------------------------


def test_instruction_labels_cover_only_the_response(tiny_llama_dir):
  tokenizer = data.load_tokenizer(tiny_llama_dir, 24)
  eos = data.eos_id(tiny_llama_dir, tokenizer)
  assert eos == tokenizer.token_to_id('</s>')
  out = data.tokenizer.encode_instructions(
      tokenizer, ['What is the sentiment of "good"? Answer:'], [' positive'], eos_id=eos)
  ids, labels, mask = out['input_ids'][0], out['labels'][0], out['attention_mask'][0]
  prompt_len = sum(tokenizer.encode('What is the sentiment of "good"? Answer:').attention_mask)
  assert ids[0] == tokenizer.token_to_id('<s>')
  assert (labels[:prompt_len] == tasks.IGNORE).all()  # Prompt: no loss.
  response = [tokenizer.token_to_id('positive')]
  np.testing.assert_array_equal(labels[prompt_len:prompt_len + len(response) + 1],
                                response + [eos])
  assert (labels[mask == 0] == tasks.IGNORE).all() and mask.sum() == prompt_len + len(response) + 1


# Generation
# ------------------------------------------------------------------------------


def _greedy_without_cache(model, prompt, steps):
  """Full forward over the whole sequence for every new token (right-padded: one compile)."""
  forward = nnx.jit(lambda model, ids, mask: model(ids, mask))
  ids = list(prompt)
  for _ in range(steps):
    padded, mask = _padded([ids + [0] * (len(prompt) + steps - len(ids))])
    mask[0, len(ids):] = 0
    logits = forward(model, jnp.asarray(padded), jnp.asarray(mask))
    ids.append(int(jnp.argmax(logits[0, len(ids) - 1])))
  return ids[len(prompt):]


@pytest.mark.parametrize('fixture', ['tiny_llama_dir', 'tiny_gpt2_dir'])
def test_greedy_generation_with_cache_equals_without_and_transformers(fixture, request):
  directory = request.getfixturevalue(fixture)
  model, _, _ = hub.load_model(str(directory), task='causal_lm')
  cached = generate.generate(model, PROMPTS, max_new_tokens=8)  # One left-padded batch.
  reference = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
  for prompt, tokens in zip(PROMPTS, cached):
    assert tokens == _greedy_without_cache(model, prompt, 8)
    with torch.no_grad():
      hf = reference.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                              min_new_tokens=8, pad_token_id=0)
    assert tokens == hf[0, len(prompt):].tolist()


def test_sampling_is_seeded_and_top_p_narrows_to_greedy(tiny_llama_dir):
  model, _, _ = hub.load_model(str(tiny_llama_dir), task='causal_lm')
  greedy = generate.generate(model, PROMPTS, max_new_tokens=6)
  sample = lambda **kw: generate.generate(model, PROMPTS, max_new_tokens=6, temperature=1.5, **kw)
  assert sample(seed=3) == sample(seed=3)
  assert sample(seed=3) != sample(seed=4)
  # A nucleus this small holds only the most likely token: sampling becomes greedy.
  assert sample(seed=3, top_p=1e-6) == greedy
  # Stopping at EOS: everything after the first EOS is cut.
  eos = greedy[0][2]
  stopped = generate.generate(model, PROMPTS[:1], max_new_tokens=6, eos_id=eos)
  assert stopped[0] == greedy[0][:greedy[0].index(eos) + 1]


def test_generation_errors(tiny_llama_dir, tiny_vit_dir):
  model, _, _ = hub.load_model(str(tiny_llama_dir), task='causal_lm')
  with pytest.raises(FtjaxError, match='exceeds'):
    generate.generate(model, PROMPTS, max_new_tokens=500)
  with pytest.raises(FtjaxError, match='at least one token'):
    generate.generate(model, [[]], max_new_tokens=2)
  with pytest.raises(FtjaxError, match="task 'causal_lm' needs a decoder model.*vision"):
    hub.load_model(str(tiny_vit_dir), task='causal_lm')


# Fine-tune, export, reload in transformers
# ------------------------------------------------------------------------------


def test_lora_sft_then_export_matches_transformers(tiny_llama_dir, data_dir, tmp_path):
  workdir = tmp_path / 'sft'
  # LoRA on every projection: a random tiny decoder learns little through q/v alone.
  config = _config('llama_sft.py', tiny_llama_dir, data_dir, 'train.num_epochs=0.24',
                   'train.eval_every=12', 'optim.lr=2e-2', 'optim.warmup_fraction=0.0',
                   'peft.lora.targets=_proj$')
  results = train_and_evaluate(config, workdir)
  assert set(results['test']) >= {'loss', 'perplexity', 'accuracy'}
  losses = _train_losses(workdir)
  # The frozen random lm_head of a tiny model keeps its logits near uniform (loss ~ln(240)), so
  # the loss moves little even when the argmax is learnt: the response accuracy shows it.
  assert len(losses) == 24 and np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.15
  assert results['validation']['accuracy'] > 0.2, results

  # The generate command line runs on the workdir.
  run = subprocess.run([sys.executable, str(ROOT / 'scripts/generate.py'), f'--workdir={workdir}',
                        '--prompt=What is the sentiment of "good"? Answer:',
                        '--max_new_tokens=3'], capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr
  assert run.stdout.startswith('What is the sentiment of "good"? Answer:')

  model, _, _ = restore_model(workdir)
  assert nnx.state(model, lora.lora_filter)  # Unmerged LoRA factors: export merges them.
  hub.export_model(model, tmp_path / 'export')
  assert json.loads((tmp_path / 'export/config.json').read_text())['architectures'] == [
      'LlamaForCausalLM']
  _assert_same_token_logits(
      model, transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'export'))


def test_vit_fine_tune_on_digits_then_export_matches_transformers(tiny_vit_dir, data_dir,
                                                                  tmp_path):
  workdir = tmp_path / 'vit'
  config = _config('vit_digits.py', tiny_vit_dir, data_dir, 'train.num_epochs=0.2',
                   'train.eval_every=9', 'optim.lr=1e-3', 'optim.warmup_fraction=0.0')
  results = train_and_evaluate(config, workdir)
  assert results['test']['num_examples'] + results['validation']['num_examples'] > 250
  losses = _train_losses(workdir)
  assert np.mean(losses[-3:]) < np.mean(losses[:3])
  model, _, _ = restore_model(workdir)
  names = [str(d) for d in range(10)]
  hub.export_model(model, tmp_path / 'export', label_names=names)
  reloaded = transformers.ViTForImageClassification.from_pretrained(tmp_path / 'export').eval()
  assert reloaded.config.id2label[3] == '3'
  pixels = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    expected = reloaded(torch.tensor(pixels.transpose(0, 3, 1, 2))).logits.numpy()
  assert np.abs(np.asarray(model(jnp.asarray(pixels))) - expected).max() < 1e-4


def test_decoder_classification_then_export_matches_transformers(tiny_gpt2_dir, data_dir,
                                                                 tmp_path):
  workdir = tmp_path / 'gpt2_cls'
  config = _config('minilm_vader.py', tiny_gpt2_dir, data_dir, 'train.num_epochs=0.02',
                   'train.eval_every=4', 'model.pooling=last', 'policy.preset=full',
                   'train.eval_batch_size=512')
  train_and_evaluate(config, workdir)
  model, _, _ = restore_model(workdir)
  hub.export_model(model, tmp_path / 'export')
  reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(
      tmp_path / 'export').eval()
  assert type(reloaded).__name__ == 'GPT2ForSequenceClassification'
  ids, mask = _padded(PROMPTS)  # transformers finds the last token by pad_token_id (0).
  with torch.no_grad():
    expected = reloaded(torch.tensor(ids, dtype=torch.long),
                        attention_mask=torch.tensor(mask)).logits.numpy()
  got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
  assert np.abs(got - expected).max() < 1e-4


def test_token_classifier_exports_as_transformers_token_classification(tiny_llama_dir, tmp_path):
  model, _, _ = hub.load_model(str(tiny_llama_dir), task='token_classification', num_labels=3)
  model.classifier.kernel[...] = jax.random.normal(jax.random.key(1), model.classifier.kernel.shape)
  hub.export_model(model, tmp_path)
  _assert_same_token_logits(
      model, transformers.AutoModelForTokenClassification.from_pretrained(tmp_path))


def test_export_refuses_what_transformers_cannot_hold(tiny_vit_dir, tmp_path):
  model, _, _ = hub.load_model(str(tiny_vit_dir), task='image_classification', num_labels=4)
  adapters.apply_adapters(model, kind='pfeiffer', reduction_factor=4, non_linearity='relu',
                          rngs=nnx.Rngs(0))
  with pytest.raises(FtjaxError, match='no Hugging Face name: .*adapter_down'):
    hub.export_model(model, tmp_path)


# bfloat16 compute, float32 master weights
# ------------------------------------------------------------------------------


@pytest.mark.parametrize('fixture,task', [('tiny_llama_dir', 'causal_lm'),
                                          ('tiny_gpt2_dir', 'causal_lm'),
                                          ('tiny_vit_dir', 'image_classification')])
def test_bfloat16_compute_stays_close_to_float32(fixture, task, request):
  directory = str(request.getfixturevalue(fixture))
  f32, _, _ = hub.load_model(directory, task=task, num_labels=5)
  bf16, _, _ = hub.load_model(directory, task=task, num_labels=5, dtype='bfloat16')
  # Master weights stay float32 whatever the compute dtype.
  assert {str(x.dtype) for x in jax.tree.leaves(nnx.state(bf16, nnx.Param))} == {'float32'}
  if task == 'causal_lm':
    ids, mask = _padded(PROMPTS)
    inputs = (jnp.asarray(ids), jnp.asarray(mask))
  else:
    inputs = (jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32),)
  expected, got = np.asarray(f32(*inputs)), np.asarray(bf16(*inputs))
  assert got.dtype == np.float32  # Logits (and the losses on them) are float32.
  deviation = np.abs(got - expected).max() / np.abs(expected).max()
  assert 0 < deviation < 0.05, deviation


def test_bfloat16_switch_trains(tiny_llama_dir, data_dir, tmp_path, caplog):
  config = _config('llama_sft.py', tiny_llama_dir, data_dir, 'train.num_epochs=0.03',
                   'model.dtype=bfloat16', 'train.eval_every=3')
  with caplog.at_level(logging.INFO, logger='ftjax'):
    results = train_and_evaluate(config, tmp_path)
  assert np.isfinite(results['test']['loss'])
  # LoRA's frozen base weights trained in bfloat16 (params.hold_frozen_in_compute_dtype) ...
  assert 'frozen weights held in bfloat16' in caplog.text
  # ... while a restored model, e.g. for export, has its float32 master weights.
  model, _, _ = restore_model(tmp_path)
  assert model.encoder.layers[0].self_attn.q_proj.kernel[...].dtype == jnp.float32


# Every PEFT method on every new family, from the family's default targets
# ------------------------------------------------------------------------------


@pytest.mark.parametrize('method', ['lora', 'ia3', 'houlsby', 'pfeiffer'])
@pytest.mark.parametrize('fixture,task', [('tiny_llama_dir', 'causal_lm'),
                                          ('tiny_gpt2_dir', 'classification'),
                                          ('tiny_vit_dir', 'image_classification')])
def test_peft_methods_apply_to_every_family_unchanged_at_init(fixture, task, method, request):
  from ftjax import params, peft  # pylint: disable=g-import-not-at-top
  directory = str(request.getfixturevalue(fixture))
  pooling = {'classification': 'last'}.get(task, 'mean')
  model, _, _ = hub.load_model(directory, task=task, num_labels=3, pooling=pooling)
  if task == 'image_classification':
    inputs = (jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32),)
  else:
    inputs = tuple(map(jnp.asarray, _padded(PROMPTS)))
  before = np.asarray(model(*inputs))
  config = configs.load_config(str(ROOT / 'configs/minilm_vader.py'))
  configs.apply_overrides(config, [f'peft.method={method}', 'policy.preset=peft'])
  new = peft.apply(model, config.peft, seed=0)
  # Identity at init: LoRA's B = 0, (IA)^3 vectors of ones, adapters' up projection = 0.
  np.testing.assert_allclose(np.asarray(model(*inputs)), before, atol=1e-6)
  groups = params.build_policy(config.policy, model, new)
  trainable = params.trainable_paths(groups, 0)
  assert trainable and all(re.search(new, p) or p.startswith('classifier/') for p in trainable)
  assert len(trainable) < len(params.param_paths(model)) / 2


# The VADER regression and tagging configs run (on a tiny BERT with MiniLM's tokenizer)
# ------------------------------------------------------------------------------


@pytest.mark.parametrize('name,metrics', [
    ('minilm_vader_rating.py', {'loss', 'rmse', 'pearson', 'spearman'}),
    ('minilm_vader_tagging.py', {'loss', 'accuracy', 'macro_f1'})])
def test_vader_task_configs_train(name, metrics, tiny_bert_dir, data_dir, tmp_path):
  config = configs.load_config(str(ROOT / f'configs/{name}:runlocal'))
  configs.apply_overrides(config, [f'model.checkpoint={tiny_bert_dir}',
                                   f'data.data_dir={data_dir}', 'optim.lr=1e-3'])
  results = train_and_evaluate(config, tmp_path)
  assert set(results['test']) >= metrics
  if name == 'minilm_vader_tagging.py':
    # Items are tagged words: the test split's 757 entries, each scored once.
    assert results['test']['num_examples'] == 757


@pytest.mark.parametrize('size', [3, 2000, 4096, 32000])
def test_argmax_gives_jnp_argmax_indices(size):
  """`tasks.argmax` (a block search on large axes) picks what jnp.argmax picks: the first
  maximum among ties."""
  rng = np.random.default_rng(size)
  x = rng.integers(-3, 4, size=(4, 6, size)).astype(np.float32)  # Many ties at the maximum.
  x[0, 0] = 0.0  # A row of one value: index 0.
  x[1, 1, size // 2] = 9.0  # A unique maximum.
  x[1, 2, -1] = 9.0  # The maximum in the last block.
  x[2, 3, [size // 3, size - 1]] = np.nan  # NaNs: the first one.
  x[3, 4] = -np.inf
  for dtype in (jnp.float32, jnp.bfloat16):
    got = np.asarray(jax.jit(tasks.argmax)(jnp.asarray(x, dtype)))
    want = np.asarray(jnp.argmax(jnp.asarray(x, dtype), axis=-1))
    nan_row = np.isnan(x).any(-1)
    np.testing.assert_array_equal(got[~nan_row], want[~nan_row])
    # A NaN row (its loss is NaN too): a NaN's index, or where the maximum skips NaNs, the
    # largest other value's.
    picked = x[nan_row][np.arange(nan_row.sum()), got[nan_row]]
    assert (np.isnan(picked) | (picked == np.nanmax(x[nan_row], -1))).all()


def test_greedy_decoding_takes_the_first_maximum_token():
  """Greedy generation picks its token with `tasks.argmax` (the block search, at a 32000-token
  vocabulary): the first maximum, as jnp.argmax and transformers' greedy search do."""
  rng = np.random.default_rng(0)
  logits = rng.integers(-3, 4, size=(3, 32000)).astype(np.float32)
  logits[1, [70, 31999]] = 9.0  # Tied maxima: the first.
  sample = lambda x: generate._sample(x, jax.random.key(0), 0.0, 1.0)  # pylint: disable=protected-access
  got = jax.jit(sample)(jnp.asarray(logits))
  assert got.dtype == jnp.int32 and got[1] == 70
  assert '3,250,128' in str(jax.make_jaxpr(sample)(logits))  # The blocks of the search.
  np.testing.assert_array_equal(got, np.argmax(logits, axis=-1))
