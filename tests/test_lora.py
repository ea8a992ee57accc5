"""LoRA surgery: unchanged outputs at init, merge/unmerge, gradients, named adapters, errors."""

import functools
import re

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import hub, kernels
from ftjax.errors import FtjaxError
from ftjax.models import bert, heads, layers
from ftjax.peft import lora

TINY = bert.BertConfig(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
)
QV = r'attention/(query|value)$'


def _tiny_model(dtype=jnp.float32) -> heads.SequenceClassifier:
  encoder = bert.BertModel(TINY, dtype=dtype, rngs=nnx.Rngs(0))
  return heads.SequenceClassifier(encoder, 3, rngs=nnx.Rngs(1))


def _batch(vocab_size: int = TINY.vocab_size) -> tuple[jax.Array, jax.Array]:
  ids = jax.random.randint(jax.random.key(0), (2, 7), 0, vocab_size)
  mask = jnp.array([[1] * 7, [1] * 4 + [0] * 3], jnp.int32)
  return ids, mask


def _randomise_b(model: nnx.Module, seed: int = 0, suffix: str = '') -> None:
  """Gives every LoRA B factor (of one adapter) random values, so that the adapters matter."""
  key = jax.random.key(seed)
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
    if path[-1] == f'lora_b{suffix}':
      key, sub = jax.random.split(key)
      variable[...] = 0.1 * jax.random.normal(sub, variable.shape)


def _path(p: tuple) -> str:
  return '/'.join(map(str, p))


def test_zero_b_leaves_outputs_unchanged():
  model = _tiny_model()
  ids, mask = _batch()
  base = model(ids, mask)
  base_jit = nnx.jit(lambda m: m(ids, mask))(model)
  adapted = lora.apply_lora(model, targets=QV, rank=4, alpha=8, rngs=nnx.Rngs(2))
  expected = [f'encoder/layers/{i}/attention/{n}' for i in (0, 1) for n in ('query', 'value')]
  assert adapted == expected
  np.testing.assert_array_equal(model(ids, mask), base)
  np.testing.assert_allclose(nnx.jit(lambda m: m(ids, mask))(model), base_jit, atol=1e-6)


def test_surgery_keeps_base_params_and_names_factors():
  model = _tiny_model()
  params_before = nnx.to_flat_state(nnx.state(model, nnx.Param))
  kernel = model.encoder.layers[0].attention.query.kernel
  lora.apply_lora(model, targets=QV, rank=4, alpha=8, rngs=nnx.Rngs(2))
  query = model.encoder.layers[0].attention.query
  assert isinstance(query, lora.LoRALinear) and isinstance(query, nnx.Linear)
  assert query.kernel is kernel  # The same Param, not a copy.

  # Base params keep their paths (the HF key map relies on them); LoRAParam is a Param too.
  base_filter = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
  base_after = nnx.to_flat_state(nnx.state(model, base_filter))
  assert [p for p, _ in base_after] == [p for p, _ in params_before]
  lora_paths = [_path(p) for p, _ in nnx.to_flat_state(nnx.state(model, lora.lora_filter))]
  assert 'encoder/layers/0/attention/query/lora_a' in lora_paths
  assert 'encoder/layers/0/attention/query/lora_b' in lora_paths
  assert len(lora_paths) == 2 * 2 * TINY.num_hidden_layers

  # Factors: A ~ U(-1/sqrt(in), 1/sqrt(in)) as PEFT, B = 0, laid out like the base kernel.
  a, b = query.lora_a, query.lora_b
  assert a.shape == (32, 4) and b.shape == (4, 32)
  bound = 1 / np.sqrt(32)
  assert np.all(np.abs(a[...]) <= bound) and np.abs(a[...]).max() > 0.5 * bound
  np.testing.assert_array_equal(b[...], 0)
  assert a.get_metadata()['out_sharding'] == ('embed', None)
  assert b.get_metadata()['out_sharding'] == (None, 'heads')
  out = model.encoder.layers[0].attention.out
  assert not isinstance(out, lora.LoRALinear)


def test_merge_equals_unmerged_and_unmerge_restores_kernel():
  model = _tiny_model()
  ids, mask = _batch()
  base = model(ids, mask)
  lora.apply_lora(model, targets=r'(query|value|intermediate)$', rank=4, alpha=8,
                  rngs=nnx.Rngs(2))
  _randomise_b(model)
  unmerged = model(ids, mask)
  assert np.abs(unmerged - base).max() > 1e-3
  kernel = np.array(model.encoder.layers[1].intermediate.kernel[...])

  merged_paths = lora.merge_lora(model)
  assert len(merged_paths) == 3 * TINY.num_hidden_layers
  assert np.abs(model.encoder.layers[1].intermediate.kernel[...] - kernel).max() > 1e-4
  np.testing.assert_allclose(model(ids, mask), unmerged, atol=1e-5)

  lora.unmerge_lora(model)
  np.testing.assert_allclose(model.encoder.layers[1].intermediate.kernel[...], kernel, atol=1e-6)
  np.testing.assert_allclose(model(ids, mask), unmerged, atol=1e-5)


def test_jitted_grads_reach_only_lora_state():
  model = _tiny_model()
  ids, mask = _batch()
  labels = jnp.array([0, 2])
  lora.apply_lora(model, targets=QV, rank=4, alpha=8, rngs=nnx.Rngs(2))
  graphdef, lora_state, rest = nnx.split(model, lora.lora_filter, ...)

  @jax.jit
  def grad_fn(lora_state, rest):
    def loss_fn(lora_state):
      logits = nnx.merge(graphdef, lora_state, rest)(ids, mask)
      return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(2), labels])
    return jax.grad(loss_fn)(lora_state)

  grads = nnx.to_flat_state(grad_fn(lora_state, rest))
  assert {p[-1] for p, _ in grads} == {'lora_a', 'lora_b'}
  for path, g in grads:
    # B = 0 at init, so no gradient flows to A yet; B's gradient is x @ A times the upstream one.
    if path[-1] == 'lora_a':
      np.testing.assert_array_equal(g[...], 0)
    else:
      assert np.abs(g[...]).max() > 0, _path(path)


def test_rslora_scaling():
  x = jax.random.normal(jax.random.key(5), (3, 32))
  outputs = {}
  for use_rslora in (False, True):
    model = _tiny_model()
    base = model.encoder.layers[0].attention.query(x)
    lora.apply_lora(model, targets=r'query$', rank=4, alpha=8, use_rslora=use_rslora,
                    rngs=nnx.Rngs(2))
    query = model.encoder.layers[0].attention.query
    assert query.adapters == (('default', 8 / 2 if use_rslora else 8 / 4),)
    _randomise_b(model)
    outputs[use_rslora] = query(x) - base
  # Same factors: rsLoRA's alpha/sqrt(r) = 4 is twice plain LoRA's alpha/r = 2.
  assert np.abs(outputs[False]).max() > 1e-3
  np.testing.assert_allclose(outputs[True], 2 * outputs[False], rtol=1e-4, atol=1e-6)


def test_named_adapters_switch():
  model = _tiny_model()
  ids, mask = _batch()
  base = model(ids, mask)
  lora.apply_lora(model, targets=QV, rank=4, alpha=8, rngs=nnx.Rngs(2))
  lora.apply_lora(model, targets=QV, rank=2, alpha=4, rngs=nnx.Rngs(3), name='b')
  query = model.encoder.layers[0].attention.query
  assert query.lora_a.shape == (32, 4) and query.lora_a_b.shape == (32, 2)
  assert lora.adapter_names(model) == ['default', 'b']
  assert query.active == 'b'  # The adapter applied last is the one being trained.
  _randomise_b(model, seed=0)
  _randomise_b(model, seed=1, suffix='_b')

  out_b = model(ids, mask)
  lora.set_active_adapter(model, 'default')
  out_default = model(ids, mask)
  assert np.abs(out_b - out_default).max() > 1e-4
  lora.set_active_adapter(model, None)
  np.testing.assert_array_equal(model(ids, mask), base)
  lora.set_active_adapter(model, 'b')
  np.testing.assert_array_equal(model(ids, mask), out_b)

  # Only the active adapter contributes, so only it gets gradients.
  graphdef, lora_state, rest = nnx.split(model, lora.lora_filter, ...)
  loss = lambda s: nnx.merge(graphdef, s, rest)(ids, mask).sum()
  grads = nnx.to_flat_state(jax.jit(jax.grad(loss))(lora_state))
  for path, g in grads:
    active = path[-1].endswith('_b') and path[-1] != 'lora_b'
    assert (np.abs(g[...]).max() > 0) == active, _path(path)

  # Merging folds in the active adapter only.
  lora.merge_lora(model)
  np.testing.assert_allclose(model(ids, mask), out_b, atol=1e-5)
  lora.unmerge_lora(model)
  lora.set_active_adapter(model, 'default')
  np.testing.assert_allclose(model(ids, mask), out_default, atol=1e-6)


def test_bfloat16_compute():
  model = _tiny_model(dtype=jnp.bfloat16)
  ids, mask = _batch()
  lora.apply_lora(model, targets=QV, rank=4, alpha=8, rngs=nnx.Rngs(2))
  _randomise_b(model)
  assert model.encoder.layers[0].attention.query(jnp.ones((1, 32), jnp.bfloat16)).dtype == (
      jnp.bfloat16)
  assert model.encoder.layers[0].attention.query.lora_a.dtype == jnp.float32
  assert np.all(np.isfinite(model(ids, mask)))


def test_minilm_query_value_trainable_count():
  model, _, _ = hub.load_model('sentence-transformers/all-MiniLM-L6-v2', num_labels=3)
  ids, mask = _batch(vocab_size=1000)
  base = model(ids, mask)
  adapted = lora.apply_lora(model, targets=QV, rank=8, alpha=16, rngs=nnx.Rngs(0))
  assert len(adapted) == 12
  count = sum(x.size for x in jax.tree.leaves(nnx.state(model, lora.lora_filter)))
  assert count == 6 * 2 * (384 * 8 + 8 * 384)
  np.testing.assert_array_equal(model(ids, mask), base)


def test_merge_strip_export(tmp_path):
  model = _tiny_model()
  ids, mask = _batch()
  lora.apply_lora(model, targets=QV, rank=4, alpha=8, rngs=nnx.Rngs(2))
  _randomise_b(model)
  adapted = model(ids, mask)
  lora.merge_lora(model)
  assert len(lora.strip_lora(model)) == 2 * TINY.num_hidden_layers
  assert type(model.encoder.layers[0].attention.query) is layers.Linear
  assert not nnx.state(model, lora.lora_filter)
  np.testing.assert_allclose(model(ids, mask), adapted, atol=1e-5)

  # The merged encoder exports under Hugging Face names and loads back unchanged.
  hub.export_encoder(model.encoder, TINY, tmp_path)
  encoder, report, _ = hub.load_encoder(str(tmp_path))
  # The classifier head dropped the pooler, so the reloaded backbone has none either.
  assert encoder.pooler is None
  assert not report.missing and not report.unexpected
  np.testing.assert_array_equal(
      encoder.layers[0].attention.query.kernel[...],
      model.encoder.layers[0].attention.query.kernel[...],
  )


@pytest.mark.parametrize(
    'kwargs, message',
    [
        (dict(rank=0), 'rank must be a positive integer'),
        (dict(rank=-2), 'rank must be a positive integer'),
        (dict(alpha=0.0), 'alpha must be positive'),
        (dict(alpha=-1.0), 'alpha must be positive'),
        (dict(dropout=1.5), r'dropout must be in \[0, 1\)'),
        (dict(name='a/b'), 'adapter name'),
        (dict(targets='attention/(query'), 'not a valid regular expression'),
        (dict(targets=r'attention/qkv$'),
         r'match no module: linear layers are at .*encoder/layers/\*/attention/query'),
        (dict(targets=r'layers/0/attention$'),
         'match encoder/layers/0/attention, a BertSelfAttention and not a linear layer'),
        (dict(targets=r'layers/0/attention_norm$'), 'LayerNorm and not a linear layer'),
    ],
)
def test_apply_errors(kwargs, message):
  model = _tiny_model()
  args = dict(targets=QV, rank=4, alpha=8.0, rngs=nnx.Rngs(0)) | kwargs
  with pytest.raises(FtjaxError, match=message):
    lora.apply_lora(model, **args)
  # A refused call leaves the model untouched.
  assert not nnx.state(model, lora.lora_filter)


def test_state_errors():
  model = _tiny_model()
  with pytest.raises(FtjaxError, match='no active LoRA adapter to merge'):
    lora.merge_lora(model)
  with pytest.raises(FtjaxError, match='no LoRA adapter named'):
    lora.set_active_adapter(model, 'default')
  lora.apply_lora(model, targets=QV, rank=4, alpha=8, rngs=nnx.Rngs(0))
  with pytest.raises(FtjaxError, match="already has a LoRA adapter named 'default'"):
    lora.apply_lora(model, targets=r'query$', rank=4, alpha=8, rngs=nnx.Rngs(0))
  with pytest.raises(FtjaxError, match="no LoRA adapter named 'x': use one of 'default'"):
    lora.set_active_adapter(model, 'x')
  with pytest.raises(FtjaxError, match='nothing to unmerge'):
    lora.unmerge_lora(model)
  lora.merge_lora(model)
  with pytest.raises(FtjaxError, match='merged already'):
    lora.merge_lora(model)
  with pytest.raises(FtjaxError, match='unmerge_lora before switching'):
    lora.set_active_adapter(model, None)
  with pytest.raises(FtjaxError, match='unmerge_lora before apply_lora'):
    lora.apply_lora(model, targets=r'key$', rank=4, alpha=8, rngs=nnx.Rngs(0), name='k')


def test_dropout_acts_only_in_training_and_on_the_lora_branch():
  model = _tiny_model()
  lora.apply_lora(model, targets=QV, rank=4, alpha=8.0, dropout=0.5, rngs=nnx.Rngs(0))
  for _, variable in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
    variable[...] = jnp.ones(variable.shape)  # A non-zero update, so dropout shows.
  ids = jnp.arange(12).reshape(2, 6) % TINY.vocab_size
  mask = jnp.ones((2, 6), jnp.int32)
  # Only the LoRA branch may be stochastic: silence every other dropout in the model.
  for path, module in nnx.iter_graph(model):
    if isinstance(module, nnx.Dropout) and 'query' not in map(str, path) and \
        'value' not in map(str, path):
      module.rate = 0.0
  eval_a = model(ids, mask)
  np.testing.assert_array_equal(eval_a, model(ids, mask))
  train = lambda seed: model(ids, mask, deterministic=False, rngs=nnx.Rngs(dropout=seed))
  assert not np.allclose(train(0), eval_a)
  assert not np.allclose(train(0), train(1))
  np.testing.assert_array_equal(train(2), train(2))
  # Under jit, the train step's way: the key is an argument.
  graphdef, state = nnx.split(model)
  step = jax.jit(lambda s, k: nnx.merge(graphdef, s)(ids, mask, deterministic=False,
                                                     rngs=nnx.Rngs(dropout=k)))
  assert not np.allclose(step(state, jax.random.key(0)), step(state, jax.random.key(1)))


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_lora_gradients_match_autodiff_of_the_plain_product(dtype):
  """The LoRA branch's custom gradient (`lora._down`) gives autodiff's values, and in float32
  computes A's gradient as an [r, in] product (the form XLA:CPU runs fast), not [in, r]."""
  base = layers.Linear(32, 24, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  layer = lora.LoRALinear(base)
  layer.add_adapter('default', rank=4, scaling=2.0, rngs=nnx.Rngs(1))
  layer.active = 'default'
  layer.lora_b[...] = 0.1 * jax.random.normal(jax.random.key(2), layer.lora_b.shape)
  x = jax.random.normal(jax.random.key(3), (3, 5, 32)).astype(dtype)
  cotangent = jax.random.normal(jax.random.key(4), (3, 5, 24)).astype(dtype)
  kernel, bias = layer.kernel[...].astype(dtype), layer.bias[...].astype(dtype)

  graphdef, factors, rest = nnx.split(layer, lora.lora_filter, ...)

  def ours(factors, x):
    return jnp.sum(nnx.merge(graphdef, factors, rest)(x).astype(jnp.float32) * cotangent)

  def plain(a, b, x):
    a, b = a.astype(dtype), b.astype(dtype)
    y = x @ kernel + bias + ((x @ a @ b) * 2.0).astype(dtype)
    return jnp.sum(y.astype(jnp.float32) * cotangent)

  d_factors, d_x = jax.jit(jax.grad(ours, argnums=(0, 1)))(factors, x)
  grads = (d_factors['lora_a'][...], d_factors['lora_b'][...], d_x)
  want = jax.jit(jax.grad(plain, argnums=(0, 1, 2)))(
      factors['lora_a'][...], factors['lora_b'][...], x)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  for g, w in zip(grads, want):
    assert g.dtype == w.dtype and g.shape == w.shape
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                               rtol=tol, atol=tol * float(np.abs(np.asarray(w, np.float32)).max()))
  hlo = jax.jit(jax.grad(ours)).lower(factors, x).as_text()
  if dtype == jnp.float32:
    assert re.search(r'dot_general[^\n]*-> tensor<4x32xf32>', hlo)
    assert not re.search(r'dot_general[^\n]*-> tensor<32x4xf32>', hlo)


def test_fused_float32_lora_layer_matches_the_plain_product(monkeypatch):
  """On the matmul kernel, a float32 LoRA layer runs as one product with its adapter added in
  (`lora._lora_product`): autodiff's values of the plain x W + b + s (x A) B for the output and
  the gradients of x, A, B and (when asked) the kernel; with a frozen kernel, x^T g is never
  computed. The other settings take the unfused layer."""
  monkeypatch.setenv('FTJAX_MATMUL', 'kernel')
  base = layers.Linear(96, 80, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  layer = lora.LoRALinear(base)
  layer.add_adapter('default', rank=4, scaling=2.0, rngs=nnx.Rngs(1))
  layer.active = 'default'
  layer.lora_b[...] = 0.1 * jax.random.normal(jax.random.key(2), layer.lora_b.shape)
  layer.bias[...] = jax.random.normal(jax.random.key(5), layer.bias.shape)
  x = jax.random.normal(jax.random.key(3), (3, 50, 96))
  cotangent = jax.random.normal(jax.random.key(4), (3, 50, 80))
  graphdef, factors, rest = nnx.split(layer, lora.lora_filter, ...)
  assert layer._fused(x, None, True)

  def ours(factors, rest, x):
    return jnp.sum(nnx.merge(graphdef, factors, rest)(x) * cotangent)

  def plain(a, b, kernel, bias, x):
    y = x @ kernel + bias + (x @ a @ b) * 2.0
    return jnp.sum(y * cotangent)

  d_factors, d_rest, d_x = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(factors, rest, x)
  want = jax.jit(jax.grad(plain, argnums=(0, 1, 2, 3, 4)))(
      factors['lora_a'][...], factors['lora_b'][...], layer.kernel[...], layer.bias[...], x)
  got = (d_factors['lora_a'][...], d_factors['lora_b'][...], d_rest['kernel'][...],
         d_rest['bias'][...], d_x)
  for g, w in zip(got, want):
    assert g.shape == w.shape
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(np.abs(w).max()))
  np.testing.assert_allclose(nnx.merge(graphdef, factors, rest)(x),
                             x @ layer.kernel[...] + layer.bias[...]
                             + (x @ layer.lora_a[...] @ layer.lora_b[...]) * 2.0,
                             rtol=1e-5, atol=1e-5)
  # The loss and the gradients of the factors and x, the kernel frozen: the two fused products
  # (output, input gradient), and no [96, 80] dot (x^T g).
  hlo = jax.jit(jax.value_and_grad(ours, argnums=(0, 2))).lower(
      factors, rest, x).compile().as_text()
  assert hlo.count('custom_call_target="ftjax_matmul_plus"') == 2
  assert not re.search(r'f32\[96,80\]\{[01,]+\} dot\(', hlo)
  # The bias is the product's start: with B = 0 the output is the plain layer's, bit for bit.
  layer.lora_b[...] = jnp.zeros_like(layer.lora_b[...])
  plain_layer = kernels.matmul_bias(x.reshape(-1, 96), layer.kernel[...], layer.bias[...])
  np.testing.assert_array_equal(layer(x), plain_layer.reshape(3, 50, 80))
  # Unfused: dropout on the branch while training, DoRA, bfloat16, or XLA's dots chosen.
  layer.dropout = layers.Dropout(0.1)
  assert not layer._fused(x, None, False) and layer._fused(x, None, True)
  layer.dropout = layers.Dropout(0.0)
  assert not layer._fused(x.astype(jnp.bfloat16), None, True)
  monkeypatch.setenv('FTJAX_MATMUL', 'xla')
  assert not layer._fused(x, None, True)


@pytest.mark.parametrize('variant', ['fma', 'dot', 'amx'])
def test_fused_bfloat16_lora_layer_is_the_exact_product_rounded_once(monkeypatch, variant):
  """A bfloat16 LoRA layer on the matmul kernel runs as one product with its adapter added to
  each float32 row before the row's one rounding (`lora._lora_product`), in each variant (`dot`
  and `amx` run as the next one down where the CPU lacks them): the output and the input
  gradient are the float64 values of x W + b + s (x A) B (W, b, A and B as bfloat16) rounded
  once; A's, B's and (when asked) the kernel's gradients are float32 sums of bfloat16 products,
  within float32 error of float64. With the kernel frozen, the step holds the two fused
  products and no XLA dot at all (XLA's had been float32 dots on converted copies of x and g)."""
  monkeypatch.setenv('FTJAX_MATMUL', 'kernel')
  monkeypatch.setattr(kernels, 'bf16_matmul_plan', lambda: {'use_kernel': True,
                                                             'variant': variant})
  base = layers.Linear(96, 80, dtype=jnp.bfloat16, param_dtype=jnp.float32,
                       dot_general=layers.dot_general, rngs=nnx.Rngs(0))
  layer = lora.LoRALinear(base)
  layer.add_adapter('default', rank=4, scaling=2.0, rngs=nnx.Rngs(1))
  layer.active = 'default'
  layer.lora_b[...] = 0.3 * jax.random.normal(jax.random.key(2), layer.lora_b.shape)
  layer.bias[...] = jax.random.normal(jax.random.key(5), layer.bias.shape)
  x = jax.random.normal(jax.random.key(3), (3, 50, 96)).astype(jnp.bfloat16)
  cotangent = jax.random.normal(jax.random.key(4), (3, 50, 80)).astype(jnp.bfloat16)
  graphdef, factors, rest = nnx.split(layer, lora.lora_filter, ...)
  assert layer._fused(x, None, True)

  def ours(factors, rest, x):
    return jnp.sum(nnx.merge(graphdef, factors, rest)(x).astype(jnp.float32)
                   * cotangent.astype(jnp.float32))

  y = jax.jit(lambda f, r, x: nnx.merge(graphdef, f, r)(x))(factors, rest, x)
  d_factors, d_rest, d_x = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(factors, rest, x)
  f64 = lambda t: np.asarray(jnp.asarray(t, jnp.float32), np.float64)
  bf = lambda t: f64(jnp.asarray(t).astype(jnp.bfloat16))  # a parameter as the layer uses it
  x64, g64 = f64(x).reshape(-1, 96), f64(cotangent).reshape(-1, 80)
  w, b, a, bb = bf(layer.kernel[...]), bf(layer.bias[...]), bf(layer.lora_a[...]), \
      bf(layer.lora_b[...])
  eps = np.finfo(np.float32).eps

  def rounded_once(got, exact, scale, k):
    got, want = f64(got).reshape(exact.shape), bf(exact)
    # float32 accumulation's error, at most; beyond it, only a tie's other side, one step away.
    slack = 4 * eps * np.sqrt(k) * scale
    assert (np.abs(got - want) <= np.abs(want) * 2.0**-7 + slack).all()
    clear = np.abs(want) * 2.0**-8 > 100 * slack
    assert clear.mean() > 0.1 and (got == want)[clear].mean() > 0.99

  u = x64 @ a  # s (x A) B, the low-rank term, with x A in float32 (not rounded)
  rounded_once(y, x64 @ w + b + 2.0 * u @ bb,
               np.abs(x64) @ np.abs(w) + np.abs(b) + 2.0 * (np.abs(x64) @ np.abs(a)) @ np.abs(bb),
               96 + 4)
  v = 2.0 * g64 @ bb.T  # the gradient of x A
  rounded_once(d_x, g64 @ w.T + v @ a.T, np.abs(g64) @ np.abs(w.T) + np.abs(v) @ np.abs(a.T),
               80 + 4)
  # A's and B's gradients from bfloat16 copies of v and x A (as the unfused layer rounds them).
  v_bf, u_bf = bf(v), bf(u)
  for got, want, scale in [
      (d_factors['lora_a'][...], x64.T @ v_bf, np.abs(x64.T) @ np.abs(v_bf)),
      (d_factors['lora_b'][...], 2.0 * u_bf.T @ g64, 2.0 * np.abs(u_bf.T) @ np.abs(g64)),
      (d_rest['kernel'][...], x64.T @ g64, np.abs(x64.T) @ np.abs(g64)),
      (d_rest['bias'][...], g64.sum(0), np.abs(g64).sum(0))]:
    assert got.dtype == jnp.float32
    # The kernel's gradient is rounded to bfloat16 (the layer's compute dtype), as XLA's was.
    tol = 4 * eps * np.sqrt(150) * scale + (np.abs(want) * 2.0**-8 if got.shape == w.shape
                                            or got.shape == b.shape else 0)
    assert (np.abs(f64(got) - want) <= tol).all(), got.shape
  # The kernel and bias frozen: two fused products, the rank-r ones on the kernel too, no dot.
  hlo = jax.jit(jax.value_and_grad(ours, argnums=(0, 2))).lower(
      factors, rest, x).compile().as_text()
  assert hlo.count('custom_call_target="ftjax_matmul_plus"') == 2
  assert ' dot(' not in hlo
  # With B = 0 the output is the plain bfloat16 layer's, bit for bit.
  layer.lora_b[...] = jnp.zeros_like(layer.lora_b[...])
  np.testing.assert_array_equal(layer(x), base(x))
  # Unfused: float32 inputs to the bfloat16 layer, a dot_general of the user's, or XLA's dots
  # chosen.
  assert not layer._fused(x.astype(jnp.float32), None, True)
  layer.dot_general = functools.partial(jax.lax.dot_general, preferred_element_type=jnp.float32)
  assert not layer._fused(x, None, True)
  layer.dot_general = layers.dot_general
  monkeypatch.setenv('FTJAX_MATMUL', 'xla')
  assert not layer._fused(x, None, True)


def test_matmul_plus_adds_the_low_rank_product():
  """kernels.matmul_plus against float64, with both transposes and sizes off every block, with
  and without a bias; an empty contraction gives the bias plus the low-rank product."""
  rng = np.random.default_rng(0)
  for m, k, n, r, tb, tb2, with_bias in [
      (97, 385, 70, 8, False, False, True), (13, 17, 450, 3, True, True, False),
      (5, 7, 9, 1, True, False, True), (30, 4501, 33, 16, False, True, True),
      (4, 0, 6, 2, False, False, True)]:
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((n, k) if tb else (k, n)).astype(np.float32)
    a2 = rng.standard_normal((m, r)).astype(np.float32)
    b2 = rng.standard_normal((n, r) if tb2 else (r, n)).astype(np.float32)
    bias = (rng.standard_normal(n) * 10).astype(np.float32) if with_bias else None
    got = jax.jit(lambda *ops, tb=tb, tb2=tb2: kernels.matmul_plus(
        *ops, transpose_b=tb, transpose_b2=tb2))(a, b, a2, b2, bias)
    a64, a2_64 = a.astype(np.float64), a2.astype(np.float64)
    want = a64 @ (b.T if tb else b) + a2_64 @ (b2.T if tb2 else b2)
    scale = np.abs(a64) @ np.abs(b.T if tb else b) + np.abs(a2_64) @ np.abs(b2.T if tb2 else b2)
    if with_bias:
      want, scale = want + bias, scale + np.abs(bias)
    assert got.shape == (m, n) and got.dtype == jnp.float32
    assert (np.abs(got - want) <= 4 * np.finfo(np.float32).eps * np.sqrt(k + r + 1) * scale).all()
