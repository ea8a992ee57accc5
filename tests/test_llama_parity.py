"""ftjax's Llama/Mistral/Qwen2 decoder against transformers on tiny random checkpoints."""

import json
import pathlib
import re

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from ftjax import hub
from ftjax.errors import FtjaxError
from ftjax.models import heads
from ftjax.models import layers
from ftjax.models import llama

TOL = 1e-4
VOCAB = 100
BATCH, LENGTH = 3, 10
REAL = (10, 7, 4)  # Real tokens per row; the rest is padding.

_TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
             initializer_range=0.1, attn_implementation='eager')

# name -> (transformers class prefix, config overrides). head_dim is 8: with theta 1e4 the
# rotary wavelengths are ~6, 63, 628 and 6283, so original_max_position_embeddings=64 puts the
# llama3 frequencies in all three of its bands (kept, blended, interpolated).
CASES = {
    'llama_gqa': ('Llama', dict(tie_word_embeddings=False)),
    'llama_tied_mha': ('Llama', dict(tie_word_embeddings=True, num_key_value_heads=4)),
    'llama3_rope': ('Llama', dict(rope_parameters=dict(
        rope_type='llama3', rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=64))),
    'linear_rope': ('Llama', dict(rope_parameters=dict(rope_type='linear', rope_theta=500.0,
                                                       factor=2.0))),
    'llama_biases': ('Llama', dict(attention_bias=True, mlp_bias=True)),
    'mistral_window': ('Mistral', dict(sliding_window=3)),
    # Biased q/k/v; layer 1 slides (max_window_layers=1), layer 0 attends fully.
    'qwen2_window': ('Qwen2', dict(use_sliding_window=True, sliding_window=3,
                                   max_window_layers=1)),
}


def _hf_config(case: str):
  prefix, overrides = CASES[case]
  return getattr(transformers, f'{prefix}Config')(**{**_TINY, **overrides})


def _randomize(model: torch.nn.Module) -> None:
  # transformers initialises biases to 0 and norms to 1, which would hide a bad weight map.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('bias'):
        p.normal_(0.0, 0.1)
      elif 'norm' in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))


def _save(model: torch.nn.Module, directory: pathlib.Path) -> pathlib.Path:
  model.save_pretrained(directory)  # safetensors
  return directory


def _hf_model(case: str, kind: str, seed: int = 0):
  torch.manual_seed(seed)
  prefix, _ = CASES[case]
  model = getattr(transformers, f'{prefix}{kind}')(_hf_config(case)).eval()
  _randomize(model)
  return model


def _batch(left: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """ids, mask and position ids (cumsum(mask) - 1, clipped at 0) of a padded batch."""
  ids = np.random.RandomState(1).randint(1, VOCAB, (BATCH, LENGTH)).astype(np.int32)
  mask = np.array([[1] * n + [0] * (LENGTH - n) for n in REAL], np.int32)
  if left:
    mask = mask[:, ::-1].copy()
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  return ids, mask, positions


def _torch_out(model, ids, mask, positions):
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                attention_mask=torch.as_tensor(mask, dtype=torch.long),
                position_ids=torch.as_tensor(positions, dtype=torch.long))
  return (out.logits if hasattr(out, 'logits') else out.last_hidden_state).numpy()


def _jitted(model):
  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, ids, mask, positions):
    return nnx.merge(graphdef, state)(ids, mask, positions=positions)

  return lambda ids, mask, positions: forward(state, ids, mask, positions)


def _max_diff(a, b, mask) -> float:
  keep = np.asarray(mask, bool)
  return float(np.max(np.abs(np.asarray(a, np.float32)[keep] - np.asarray(b, np.float32)[keep])))


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory) -> dict[str, tuple[torch.nn.Module, pathlib.Path]]:
  """Per case, a random transformers base model and the directory it was saved to."""
  return {case: (model := _hf_model(case, 'Model'),
                 _save(model, tmp_path_factory.mktemp(case)))
          for case in CASES}


@pytest.mark.parametrize('case', list(CASES))
def test_hidden_state_matches_transformers(checkpoints, case):
  torch_model, directory = checkpoints[case]
  encoder, report, _ = hub.load_encoder(str(directory))
  assert not report.missing and not report.unexpected and not report.fresh, report.format()
  forward = _jitted(encoder)
  for left in (False, True):
    ids, mask, positions = _batch(left)
    # Right padding: the default positions (0..L-1) are what transformers uses, so pass none.
    ref = _torch_out(torch_model, ids, mask, positions if left else np.arange(LENGTH)[None])
    eager = encoder(jnp.asarray(ids), jnp.asarray(mask),
                    positions=jnp.asarray(positions) if left else None)
    jitted = forward(ids, mask, positions if left else np.broadcast_to(np.arange(LENGTH),
                                                                        ids.shape))
    diffs = _max_diff(ref, eager, mask), _max_diff(ref, jitted, mask)
    print(f'{case} {"left" if left else "right"} padding: max |diff| eager {diffs[0]:.2e}, '
          f'jit {diffs[1]:.2e}')
    assert max(diffs) <= TOL, (case, left, diffs)


def test_sliding_window_changes_the_output(checkpoints):
  # Guards the window tests against a window too wide to matter.
  _, directory = checkpoints['mistral_window']
  encoder, _, _ = hub.load_encoder(str(directory))
  ids, mask, _ = _batch(left=False)
  windowed = np.asarray(encoder(jnp.asarray(ids), jnp.asarray(mask)))
  encoder.config = llama.LlamaConfig(**{**vars(encoder.config), 'sliding_window': None})
  full = np.asarray(encoder(jnp.asarray(ids), jnp.asarray(mask)))
  assert _max_diff(windowed, full, mask) > 1e-2


@pytest.mark.parametrize('case', ['llama_gqa', 'llama_tied_mha', 'qwen2_window'])
def test_causal_lm_logits_match_transformers(tmp_path, case):
  torch_model = _hf_model(case, 'ForCausalLM')
  encoder, report, _ = hub.load_encoder(str(_save(torch_model, tmp_path)))
  tied = encoder.config.tie_word_embeddings
  assert report.unexpected == ([] if tied else ['lm_head.weight'])
  model = heads.CausalLM(encoder, tie_word_embeddings=tied, rngs=nnx.Rngs(0))
  if not tied:
    model.lm_head.kernel.set_value(jnp.asarray(torch_model.lm_head.weight.detach().numpy().T))
  ids, mask, positions = _batch(left=True)
  ref = _torch_out(torch_model, ids, mask, positions)
  logits = model(jnp.asarray(ids), jnp.asarray(mask), positions=jnp.asarray(positions))
  diff = _max_diff(ref, logits, mask)
  print(f'{case} CausalLM logits: max |diff| {diff:.2e}')
  assert diff <= TOL


@pytest.mark.parametrize('case', ['llama3_rope', 'mistral_window'])
def test_kv_cache_decoding_matches_a_full_forward(tmp_path, case):
  torch_model = _hf_model(case, 'ForCausalLM')
  encoder, _, _ = hub.load_encoder(str(_save(torch_model, tmp_path)))
  model = heads.CausalLM(encoder, tie_word_embeddings=False, rngs=nnx.Rngs(0))
  model.lm_head.kernel.set_value(jnp.asarray(torch_model.lm_head.weight.detach().numpy().T))
  steps = 5
  prompt, prompt_mask, prompt_positions = _batch(left=True)
  new = np.random.RandomState(2).randint(1, VOCAB, (BATCH, steps)).astype(np.int32)
  ids = np.concatenate([prompt, new], axis=1)
  mask = np.concatenate([prompt_mask, np.ones_like(new)], axis=1)
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  full = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask), positions=jnp.asarray(positions)))
  assert _max_diff(_torch_out(torch_model, ids, mask, positions), full, mask) <= TOL

  cache = model.init_cache(BATCH, LENGTH + steps)
  assert cache.keys[0].dtype == jnp.float32
  logits, cache = model(jnp.asarray(prompt), jnp.asarray(prompt_mask),
                        positions=jnp.asarray(prompt_positions), cache=cache)
  diffs = [_max_diff(full[:, :LENGTH], logits, prompt_mask)]
  graphdef, state = nnx.split(model)
  step = jax.jit(lambda state, cache, token, pos: nnx.merge(graphdef, state)(
      token, jnp.ones_like(token), positions=pos, cache=cache))
  for t in range(steps):
    at = LENGTH + t
    logits, cache = step(state, cache, jnp.asarray(ids[:, at:at + 1]),
                         jnp.asarray(positions[:, at:at + 1]))
    diffs.append(float(np.max(np.abs(np.asarray(logits)[:, 0] - full[:, at]))))
  assert int(cache.index) == LENGTH + steps
  print(f'{case} KV cache: max |diff| prefill then per step {["%.1e" % d for d in diffs]}')
  assert max(diffs) <= TOL


def test_bfloat16_compute_stays_close_to_float32(checkpoints):
  _, directory = checkpoints['qwen2_window']
  f32, _, _ = hub.load_encoder(str(directory))
  bf16, _, _ = hub.load_encoder(str(directory), dtype='bfloat16')
  assert bf16.layers[0].self_attn.q_proj.kernel.get_value().dtype == jnp.float32
  ids, mask, positions = _batch(left=True)
  args = jnp.asarray(ids), jnp.asarray(mask)
  ref = np.asarray(f32(*args, positions=jnp.asarray(positions)))
  out = bf16(*args, positions=jnp.asarray(positions))
  assert out.dtype == jnp.bfloat16
  scale = float(np.max(np.abs(ref[mask.astype(bool)])))
  rel = _max_diff(ref, out, mask) / scale
  print(f'bfloat16 compute: max |diff| / max |hidden| = {rel:.3f} (max |hidden| {scale:.2f})')
  assert rel < 0.1
  cache = bf16.init_cache(BATCH, LENGTH)
  assert cache.keys[0].dtype == jnp.bfloat16


@pytest.mark.parametrize('case', ['llama3_rope', 'llama_tied_mha', 'llama_biases', 'mistral_window',
                                  'qwen2_window'])
def test_export_loads_in_transformers(checkpoints, tmp_path, case):
  torch_model, directory = checkpoints[case]
  encoder, _, _ = hub.load_encoder(str(directory))
  out_dir = hub.export_encoder(encoder, encoder.config, tmp_path / 'export')
  reloaded = transformers.AutoModel.from_pretrained(out_dir, attn_implementation='eager').eval()
  assert type(reloaded) is type(torch_model)
  ids, mask, positions = _batch(left=True)
  diff = _max_diff(_torch_out(torch_model, ids, mask, positions),
                   _torch_out(reloaded, ids, mask, positions), mask)
  assert diff <= 1e-6
  # What transformers writes for the reloaded model reads back as the same config.
  assert llama.LlamaConfig.from_hf(reloaded.config.to_dict()) == encoder.config


def test_config_reads_both_rope_layouts():
  base = dict(model_type='llama', hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
              max_position_embeddings=256)
  legacy = llama.LlamaConfig.from_hf(
      {**base, 'rope_theta': 500000.0, 'rope_scaling': {'type': 'linear', 'factor': 2.0}})
  v5 = llama.LlamaConfig.from_hf({**base, 'rope_parameters': {
      'rope_type': 'linear', 'rope_theta': 500000.0, 'factor': 2.0}})
  assert legacy == v5
  assert v5.rope_theta == 500000.0 and dict(v5.rope_scaling) == {'rope_type': 'linear',
                                                                 'factor': 2.0}
  # transformers fills in llama3's original length from max_position_embeddings.
  l3 = llama.LlamaConfig.from_hf({**base, 'rope_scaling': {
      'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0}})
  assert l3.rope_scaling['original_max_position_embeddings'] == 256 and l3.rope_theta == 1e4
  assert llama.LlamaConfig.from_hf({**base, 'rope_parameters': {
      'rope_type': 'default', 'rope_theta': 1e6}}).rope_scaling is None
  hash(l3)  # The config is static module data: jit needs it hashable.


def test_config_reads_transformers_defaults_and_windows():
  qwen_off = llama.LlamaConfig.from_hf(transformers.Qwen2Config(**{
      k: v for k, v in _TINY.items() if k != 'attn_implementation'}).to_dict())
  assert qwen_off.sliding_window is None and qwen_off.qkv_bias and not qwen_off.o_bias
  qwen_on = llama.LlamaConfig.from_hf(_hf_config('qwen2_window').to_dict())
  assert qwen_on.layer_types == ('full_attention', 'sliding_attention')
  assert [qwen_on.uses_window(i) for i in range(2)] == [False, True]
  mistral = llama.LlamaConfig.from_hf(json.loads(_hf_config('mistral_window').to_json_string()))
  assert mistral.sliding_window == 3 and mistral.uses_window(0) and not mistral.qkv_bias
  assert mistral.head_dim == 8 and mistral.num_key_value_heads == 2
  llama_cfg = llama.LlamaConfig.from_hf({'model_type': 'llama', 'num_key_value_heads': None,
                                         'hidden_size': 64, 'num_attention_heads': 4})
  assert llama_cfg.num_key_value_heads == 4 and llama_cfg.head_dim == 16


@pytest.mark.parametrize('overrides, named', [
    ({'rope_parameters': {'rope_type': 'yarn', 'factor': 4.0,
                          'original_max_position_embeddings': 64}}, "'yarn'"),
    ({'rope_scaling': {'type': 'dynamic', 'factor': 2.0}}, "'dynamic'"),
    ({'rope_scaling': {'rope_type': 'llama3', 'factor': 8.0}}, 'low_freq_factor'),
    ({'partial_rotary_factor': 0.5}, 'partial_rotary_factor'),
    ({'hidden_act': 'swiglu_unknown'}, 'hidden_act'),
    ({'num_key_value_heads': 3}, 'num_key_value_heads'),
])
def test_unsupported_settings_raise_one_line_errors(overrides, named):
  d = {'model_type': 'llama', 'hidden_size': 32, 'num_attention_heads': 4, **overrides}
  with pytest.raises(FtjaxError, match=named) as info:
    llama.LlamaConfig.from_hf(d)
  assert '\n' not in str(info.value)


def test_parameter_names_and_logical_axes():
  config = llama.LlamaConfig(model_type='qwen2', vocab_size=VOCAB, hidden_size=32,
                             intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2)
  model = nnx.eval_shape(lambda: llama.LlamaModel(config, rngs=nnx.Rngs(0)))
  axes = {'/'.join(map(str, path)): var.get_metadata().get('out_sharding')
          for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  expected = {
      'embed_tokens/embedding': ('vocab', 'embed'),
      'layers/1/self_attn/q_proj/kernel': ('embed', 'heads'),
      'layers/1/self_attn/q_proj/bias': ('heads',),
      'layers/1/self_attn/k_proj/kernel': ('embed', 'kv_heads'),
      'layers/1/self_attn/v_proj/kernel': ('embed', 'kv_heads'),
      'layers/1/self_attn/o_proj/kernel': ('heads', 'embed'),
      'layers/1/mlp/gate_proj/kernel': ('embed', 'mlp'),
      'layers/1/mlp/up_proj/kernel': ('embed', 'mlp'),
      'layers/1/mlp/down_proj/kernel': ('mlp', 'embed'),
      'layers/1/input_layernorm/scale': ('embed',),
      'layers/1/post_attention_layernorm/scale': ('embed',),
      'norm/scale': ('embed',),
  }
  assert {k: axes[k] for k in expected} == expected
  assert 'layers/1/self_attn/o_proj/bias' not in axes  # Qwen2: o_proj has no bias.
  assert all(v is not None for v in axes.values()), axes
  # Every parameter has exactly one HF name.
  assert sorted(axes) == sorted('/'.join(map(str, m.path))
                                for m in llama.hf_key_map(config).values())
  assert set(llama.FAMILIES) == {'llama', 'mistral', 'qwen2'}
  for family in llama.FAMILIES.values():
    for name in family.architectures.values():
      assert hasattr(transformers, name), name


def test_attention_dropout_is_used_only_when_not_deterministic():
  config = llama.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=1, num_attention_heads=4).with_dropout(0.5)
  model = llama.LlamaModel(config, rngs=nnx.Rngs(0))
  ids = jnp.asarray(_batch(left=False)[0])
  quiet = model(ids)
  assert np.array_equal(quiet, model(ids))
  noisy = model(ids, deterministic=False, rngs=nnx.Rngs(dropout=1))
  assert not np.allclose(quiet, noisy)
  assert isinstance(model.init_cache(2, 4), layers.KVCache)


def test_rotary_tables_are_computed_once_per_step():
  """XLA:CPU evaluates cos and sin once per training step, not in every layer's rotation of q
  and k (`llama._computed_once`), and the tables are exact."""
  config = llama.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
  graphdef, state = nnx.split(llama.LlamaModel(config, rngs=nnx.Rngs(0)))
  ids = jnp.asarray(_batch(left=False)[0])
  loss = lambda state: jnp.sum(nnx.merge(graphdef, state)(ids) ** 2)
  hlo = jax.jit(jax.grad(loss)).lower(state).compile().as_text()
  assert len(re.findall(r' cosine\(', hlo)) == 1 and len(re.findall(r' sine\(', hlo)) == 1
  positions = jnp.asarray([[0, 1, 2, 700, 70000]])
  cos, sin = llama._rotary(config, positions, jnp.float32)
  angles = np.asarray(positions, np.float32)[..., None] * llama.rope_inverse_frequencies(config)
  angles = np.concatenate([angles, angles], axis=-1)
  np.testing.assert_array_equal(cos, jnp.cos(angles))
  np.testing.assert_array_equal(sin, jnp.sin(angles))
