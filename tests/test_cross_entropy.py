"""The softmax cross-entropy kernel (kernels/cross_entropy.cc) and the causal LM loss on it."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import OTHER_CPUS, register_other_build
from ftjax import kernels, tasks


def _logits(n, v, dtype, seed=0):
  x = jax.random.normal(jax.random.key(seed), (n, v)) * 4.0
  x = x.at[0, 5].set(30.0).at[0, v - 1].set(30.0)  # a tie: the first index is the prediction
  x = x.at[1, v - 1].set(40.0)  # a maximum in the vector loop's tail (v % 16 != 0)
  return x.astype(dtype)


def _reference(x, labels, g):
  """float64: loss, log-sum-exp, first argmax, and the gradient g (softmax - onehot)."""
  x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  m = x.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[:, 0]
  onehot = np.eye(x.shape[1])[labels]
  grad = (np.exp(x - lse[:, None]) - onehot) * np.asarray(g, np.float64)[:, None]
  return lse - x[np.arange(len(labels)), labels], lse, x.argmax(-1), grad


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('n,v', [(37, 1000), (9, 4099), (5, 300)])
def test_cross_entropy_matches_float64(n, v, dtype):
  """The loss and log-sum-exp to float32 rounding, the first maximum's index (ties and a
  maximum in the tail included), and the gradient: float32 to rounding; bfloat16 the float64
  value rounded once; rows whose cotangent is 0 (ignored positions) all zeros."""
  x = _logits(n, v, dtype)
  labels = jax.random.randint(jax.random.key(1), (n,), 0, v).at[2].set(v - 1).at[3].set(0)
  g = jax.random.normal(jax.random.key(2), (n,)).at[4].set(0.0)
  loss, lse, predictions = jax.jit(kernels.cross_entropy)(x, labels)
  d = jax.jit(kernels.cross_entropy_grad)(x, labels, lse, g)
  want_loss, want_lse, want_pred, want_d = _reference(x, np.asarray(labels), g)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(lse, want_lse, rtol=1e-6)
  np.testing.assert_array_equal(predictions, want_pred)
  assert predictions[0] == 5 and predictions[1] == v - 1 and predictions.dtype == jnp.int32
  assert d.dtype == dtype and not np.asarray(d[4], np.float32).any()
  got = np.asarray(jnp.asarray(d, jnp.float32), np.float64)
  if dtype == jnp.float32:
    np.testing.assert_allclose(got, want_d, rtol=1e-5, atol=1e-7)
  else:
    want = np.asarray(jnp.asarray(want_d, jnp.float32).astype(jnp.bfloat16), np.float64)
    # Rounded once: off by one bfloat16 step only where float32's error crosses a boundary.
    assert (np.abs(got - want) <= np.abs(want) * 2.0**-7 + 1e-7).all()
    assert (got == want).mean() > 0.99


def test_a_label_out_of_range_gives_a_nan_loss():
  x = _logits(3, 300, jnp.float32)
  loss, _, _ = kernels.cross_entropy(x, jnp.asarray([0, 300, -1]))
  assert np.isfinite(loss[0]) and np.isnan(loss[1:]).all()


def test_the_loss_takes_the_kernel_with_optaxs_values(monkeypatch):
  """`tasks.softmax_cross_entropy` (the kernel, with its custom gradient) against optax's loss
  and autodiff of it, on [B, L, V] logits; small vocabularies (a classifier) and
  FTJAX_MATMUL=xla stay on XLA."""
  x = _logits(2 * 7, 512, jnp.float32).reshape(2, 7, 512)
  labels = jax.random.randint(jax.random.key(3), (2, 7), 0, 512)
  weights = jax.random.uniform(jax.random.key(4), (2, 7))
  assert kernels.cross_entropy_applies(x)
  assert not kernels.cross_entropy_applies(x[..., :3])

  def ours(x):
    loss, predictions = tasks.softmax_cross_entropy(x, labels)
    return jnp.sum(loss * weights), (loss, predictions)

  def plain(x):
    loss = optax.softmax_cross_entropy_with_integer_labels(x, labels)
    return jnp.sum(loss * weights), loss

  (_, (loss, predictions)), d = jax.jit(jax.value_and_grad(ours, has_aux=True))(x)
  (_, want_loss), want_d = jax.jit(jax.value_and_grad(plain, has_aux=True))(x)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(predictions, jnp.argmax(x, -1))
  np.testing.assert_allclose(d, want_d, rtol=1e-5, atol=1e-7)
  hlo = jax.jit(jax.grad(lambda x: ours(x)[0])).lower(x).compile().as_text()
  assert 'ftjax_cross_entropy_grad' in hlo and 'ftjax_cross_entropy"' in hlo
  monkeypatch.setenv('FTJAX_MATMUL', 'xla')
  assert not kernels.cross_entropy_applies(x)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_the_causal_lm_loss_is_the_same_on_the_kernel_and_on_xla(monkeypatch, dtype):
  """The causal LM task's losses, weights and correctness (position t predicting token t + 1,
  the prompt ignored, the last position dropped) and the logits' gradient: the kernel's against
  XLA's; the logits reach the kernel where they lie, in their own dtype."""
  b, length, v = 3, 9, 640
  logits = _logits(b * length, v, dtype).reshape(b, length, v)
  ids = jax.random.randint(jax.random.key(5), (b, length), 0, v)
  batch = {'input_ids': ids, 'labels': ids.at[:, :3].set(tasks.IGNORE),
           'weight': jnp.asarray([1.0, 0.5, 0.0])}
  task = tasks.get_task('causal_lm')
  assert task.logits_in_compute_dtype

  def run():
    def total(logits):
      loss, weight, correct = task.losses(logits, batch)
      return jnp.sum(loss * weight), (loss, weight, correct)
    return jax.jit(jax.value_and_grad(total, has_aux=True))(logits)

  (_, kernel_out), kernel_d = run()
  hlo = jax.jit(jax.grad(lambda x: jnp.sum(task.losses(x, batch)[0]))).lower(
      logits).compile().as_text()
  # No copy of the logits without their last position, nor (bfloat16) in float32.
  assert 'ftjax_cross_entropy' in hlo and f'[{b},{length - 1},{v}]' not in hlo
  assert dtype == jnp.float32 or f'f32[{b},{length},{v}]' not in hlo
  monkeypatch.setenv('FTJAX_MATMUL', 'xla')
  (_, xla_out), xla_d = run()
  for got, want in zip(kernel_out, xla_out):
    assert got.shape == (b, length - 1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert kernel_d.dtype == xla_d.dtype == dtype
  np.testing.assert_allclose(np.asarray(kernel_d, np.float32), np.asarray(xla_d, np.float32),
                             rtol=2**-7, atol=1e-6 if dtype == jnp.float32 else 2**-12)
  # Ignored positions (the prompt, the last position, a weight-0 example) have no gradient.
  assert not np.asarray(kernel_d[2], np.float32).any()
  assert not np.asarray(kernel_d[:, -1], np.float32).any()


@pytest.mark.parametrize('march,needs', OTHER_CPUS)
def test_builds_for_other_cpus_compute_the_same_cross_entropy(march, needs, kernels_built_for):
  """The portable loops (no AVX-512) and AVX-512 without its bfloat16 instructions: the same
  values as this machine's build, the predictions exactly."""
  suffix = march.replace('-', '_')
  forward, backward = f'ftjax_cross_entropy_{suffix}', f'ftjax_cross_entropy_grad_{suffix}'
  register_other_build(march, needs, kernels_built_for,
                       {forward: 'FtjaxCrossEntropy', backward: 'FtjaxCrossEntropyGrad'})
  for dtype in (jnp.float32, jnp.bfloat16):
    x = _logits(11, 1000, dtype)
    labels = jax.random.randint(jax.random.key(6), (11,), 0, 1000)
    g = jax.random.normal(jax.random.key(7), (11,))
    shapes = (jax.ShapeDtypeStruct((11,), jnp.float32), jax.ShapeDtypeStruct((11,), jnp.float32),
              jax.ShapeDtypeStruct((11,), jnp.int32))
    loss, lse, predictions = jax.ffi.ffi_call(forward, shapes)(x, labels)
    d = jax.ffi.ffi_call(backward, jax.ShapeDtypeStruct(x.shape, dtype))(x, labels, lse, g)
    want_loss, want_lse, want_pred = kernels.cross_entropy(x, labels)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-6)
    np.testing.assert_array_equal(predictions, want_pred)
    np.testing.assert_allclose(np.asarray(d, np.float32),
                               np.asarray(kernels.cross_entropy_grad(x, labels, want_lse, g),
                                          np.float32), rtol=2**-7, atol=1e-7)


def test_the_causal_lm_task_keeps_bfloat16_logits():
  """The causal LM task asks its head for logits in the compute dtype (no float32 copy of
  [tokens, vocabulary] before the loss); the head's default stays float32, and other tasks'
  logits are float32."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from ftjax.models import heads, llama  # pylint: disable=g-import-not-at-top
  config = llama.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=1, num_attention_heads=4)
  model = heads.CausalLM(llama.LlamaModel(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)),
                         tie_word_embeddings=False, dtype=jnp.bfloat16, rngs=nnx.Rngs(1))
  ids = jax.random.randint(jax.random.key(8), (2, 6), 0, 300)
  batch = {'input_ids': ids, 'attention_mask': jnp.ones_like(ids), 'labels': ids}
  assert model(ids).dtype == jnp.float32
  task = tasks.get_task('causal_lm')
  logits = task.forward(model, batch, deterministic=True)
  assert logits.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(logits, np.float32), model(ids))
  assert not tasks.get_task('classification').logits_in_compute_dtype
