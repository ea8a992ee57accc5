"""The layer kernels against XLA's ops and exact values: bias + exact GELU (gelu.cc), LayerNorm
(layer_norm.cc) and SwiGLU's silu(gate) * up (swiglu.cc), in float32 and in bfloat16 (computed
in float32, rounded once)."""

import math
import re

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import kernels
from ftjax.models import layers
from conftest import OTHER_CPUS, register_other_build


def _exact_gelu(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """gelu(z) and its derivative in float64."""
  erf = np.vectorize(math.erf)(z / math.sqrt(2))
  cdf = 0.5 * (1 + erf)
  return z * cdf, cdf + z * np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def _operands(m, n, seed=0):
  rng = np.random.default_rng(seed)
  # Wide enough to reach erf's clamp (|z| / sqrt 2 > 3.83) and the exp's underflow.
  y = jnp.asarray(rng.normal(size=(m, n)) * 3, jnp.float32).at[0, :4].set(
      jnp.array([-40.0, 40.0, 0.0, -6.0]))
  b = jnp.asarray(rng.normal(size=(n,)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(m, n)), jnp.float32)
  return y, b, g


def _reference(y, b):
  return layers.gelu(layers.add_bias(y, b))


def _bf16(x) -> jax.Array:
  return jnp.asarray(x, jnp.bfloat16)


def _to_bf16_f64(x: np.ndarray) -> np.ndarray:
  """float64 values rounded to bfloat16 (via float32; exact for the magnitudes used here)."""
  return np.asarray(jnp.asarray(np.asarray(x, np.float32), jnp.bfloat16), np.float64)


def _assert_rounded_once(got, exact, what: str, atol=0.0):
  """A bfloat16 result is the exact value rounded once: equal to the rounded exact value except
  where float32 arithmetic's own error (at most `atol`, e.g. GELU's erf ~1e-6, or cancellation
  in a sum) lands it on the other side of a rounding boundary, then one bfloat16 step away."""
  got, want = np.asarray(got, np.float64), _to_bf16_f64(exact)
  step = np.abs(want) * 2.0**-7  # one bfloat16 step (at most) at each value
  off = np.abs(got - want)
  assert (off <= step + atol).all(), (what, off.max())
  # Where that error is far below a step, a value off by one is a rounding done twice (or not).
  clear = np.broadcast_to(step > 100 * np.asarray(atol), off.shape)
  assert clear.mean() > 0.1 and (off == 0)[clear].mean() > 0.99, (what, (off == 0)[clear].mean())


# Rows over and under one task (256), widths in and out of whole 16-lane vectors.
@pytest.mark.parametrize('m,n', [(600, 1536), (7, 40), (300, 5)])
def test_bias_gelu_matches_xla_and_the_exact_values(m, n):
  assert kernels.layer_kernel_applies(jnp.zeros((1, n)), jnp.zeros((n,)))
  y, b, g = _operands(m, n)
  out, pullback = jax.vjp(jax.jit(layers.bias_gelu), y, b)
  d_y, d_b = pullback(g)
  ref_out, ref_pullback = jax.vjp(jax.jit(_reference), y, b)
  ref_d_y, ref_d_b = ref_pullback(g)
  z = np.asarray(y, np.float64) + np.asarray(b, np.float64)
  exact, slope = _exact_gelu(z)
  exact_d = np.asarray(g, np.float64) * slope
  # Against the exact values the kernel is as close as XLA is (both ~1e-6 of 1 + |value|).
  for ours, xla, want in [(out, ref_out, exact), (d_y, ref_d_y, exact_d)]:
    ours, xla = np.asarray(ours, np.float64), np.asarray(xla, np.float64)
    error = lambda got: (np.abs(got - want) / (1 + np.abs(want))).max()
    assert error(ours) <= max(2e-6, 2 * error(xla)), (error(ours), error(xla))
    np.testing.assert_allclose(ours, xla, rtol=1e-5, atol=2e-6)
  np.testing.assert_array_equal(np.asarray(out)[0, :2] == 0, np.asarray(ref_out)[0, :2] == 0)
  np.testing.assert_allclose(np.asarray(d_b), exact_d.sum(0), rtol=1e-5, atol=1e-5 * np.sqrt(m))
  np.testing.assert_allclose(np.asarray(d_b), np.asarray(ref_d_b), rtol=1e-5,
                             atol=1e-5 * np.sqrt(m))
  assert out.shape == y.shape and d_y.shape == y.shape and d_b.shape == b.shape


@pytest.mark.parametrize('m,n', [(600, 1536), (7, 40), (300, 5)])
def test_bfloat16_bias_gelu_rounds_the_exact_values_once(m, n):
  """bfloat16 y and bias: the output and d(y + b) are the exact values (of the bfloat16
  operands) rounded once to bfloat16; XLA's path rounds y + b first and is further off; the
  bias gradient (float32 inside, bfloat16 as the parameter's dtype) is the exact sum."""
  y, b, g = (_bf16(t) for t in _operands(m, n))
  assert kernels.layer_kernel_applies(y, b)
  out, pullback = jax.vjp(jax.jit(layers.bias_gelu), y, b)
  d_y, d_b = pullback(g)
  assert out.dtype == d_y.dtype == d_b.dtype == jnp.bfloat16
  z = np.asarray(y, np.float64) + np.asarray(b, np.float64)
  exact, slope = _exact_gelu(z)
  exact_d = np.asarray(g, np.float64) * slope
  # The float32 GELU's error, as in the float32 test: ~1e-6 of 1 + |value|.
  _assert_rounded_once(out, exact, 'gelu', atol=2e-6 * (1 + np.abs(exact)))
  _assert_rounded_once(d_y, exact_d, 'd(y + b)', atol=2e-6 * (1 + np.abs(exact_d)))
  # The exact column sums of d (of the float32 values, before d's rounding), rounded once.
  _assert_rounded_once(d_b, exact_d.sum(0), 'd bias', atol=1e-5 * np.sqrt(m))
  ref_out = jax.jit(_reference)(y, b)
  ours, xla = (np.abs(np.asarray(t, np.float64) - exact).max() for t in (out, ref_out))
  assert ours <= xla, (ours, xla)


def _step_text(monkeypatch, matmul: str, dtype) -> str:
  monkeypatch.setenv('FTJAX_MATMUL', matmul)
  layer = layers.linear(16, 48, ('embed', 'mlp'), std=0.1, dtype=dtype, rngs=nnx.Rngs(0))
  x = jnp.ones((4, 5, 16), dtype)

  def loss(layer, x):
    return jnp.sum(layers.dense(layer, x, {}, activation=layers.gelu).astype(jnp.float32))

  return jax.jit(nnx.value_and_grad(loss, argnums=(0, 1))).lower(layer, x).as_text()


def test_gelu_layers_take_the_kernel_in_float32_and_bfloat16(monkeypatch):
  """A float32 or bfloat16 linear layer with exact GELU runs its bias and activation as the
  kernel's two calls (none left for XLA's erf); float16, FTJAX_MATMUL=xla and other
  activations stay on XLA."""
  for dtype in (jnp.float32, jnp.bfloat16):
    text = _step_text(monkeypatch, 'auto', dtype)
    assert re.findall(r'ftjax_bias_gelu\w*', text) == ['ftjax_bias_gelu', 'ftjax_bias_gelu_grad']
    assert 'erf' not in text
  for matmul, dtype in [('xla', jnp.float32), ('xla', jnp.bfloat16), ('auto', jnp.float16)]:
    text = _step_text(monkeypatch, matmul, dtype)
    assert 'ftjax_bias_gelu' not in text and 'erf' in text, (matmul, dtype)
  layer = layers.linear(16, 48, ('embed', 'mlp'), std=0.1, dtype=jnp.float32, rngs=nnx.Rngs(0))
  x = jnp.ones((4, 16), jnp.float32)
  relu = layers.dense(layer, x, {}, activation=jax.nn.relu)
  np.testing.assert_array_equal(relu, jax.nn.relu(layers.dense(layer, x, {})))


def _register_other_build(march, needs, kernels_built_for, target: str, symbol: str) -> str:
  """Registers the -march=`march` build's `symbol` and `symbol`Grad as `target`_`march` and
  its `_grad` (skipping where this CPU cannot run that build); returns the target's name."""
  name = f'{target}_{march.replace("-", "_")}'
  register_other_build(march, needs, kernels_built_for,
                       {name: symbol, name + '_grad': symbol + 'Grad'})
  return name


@pytest.mark.parametrize('march,needs', OTHER_CPUS)
def test_builds_for_other_cpus_compute_the_same_gelu(march, needs, kernels_built_for):
  """The portable loops (no AVX-512, std::erf-free: the same rational erf) and AVX-512 builds
  give what this machine's build gives."""
  name = _register_other_build(march, needs, kernels_built_for, 'ftjax_bias_gelu', 'FtjaxBiasGelu')
  y, b, g = _operands(300, 40)
  out = jax.ffi.ffi_call(name, jax.ShapeDtypeStruct(y.shape, jnp.float32))(y, b)
  d_y, d_b = jax.ffi.ffi_call(name + '_grad', (jax.ShapeDtypeStruct(y.shape, jnp.float32),
                                               jax.ShapeDtypeStruct(b.shape, jnp.float32)))(y, b, g)
  np.testing.assert_allclose(out, kernels.bias_gelu(y, b), rtol=1e-6, atol=1e-6)
  want_d_y, want_d_b = kernels.bias_gelu_grad(y, b, g)
  np.testing.assert_allclose(d_y, want_d_y, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(d_b, want_d_b, rtol=1e-5, atol=1e-5)
  # bfloat16: the same roundings (this build may convert with AVX512_BF16's instruction, the
  # others with F32ToBf16's bit arithmetic), so the same bits but where float32 rounding in the
  # erf's evaluation puts a value on the other side of a boundary.
  y, g = _bf16(y), _bf16(g)
  stream = jax.ShapeDtypeStruct(y.shape, jnp.bfloat16)
  out = jax.ffi.ffi_call(name, stream)(y, b)
  d_y, d_b = jax.ffi.ffi_call(name + '_grad', (stream, jax.ShapeDtypeStruct(b.shape, jnp.float32)))(
      y, b, g)
  want_d_y, want_d_b = kernels.bias_gelu_grad(y, b, g)
  for got, want in [(out, kernels.bias_gelu(y, b)), (d_y, want_d_y)]:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    # Equal bits but in GELU's far tails, where erf's float32 error (~1e-6) outweighs a step.
    assert (got == want)[np.abs(want) > 1e-2].mean() > 0.99
    np.testing.assert_allclose(got, want, rtol=2**-7, atol=2e-6)
  np.testing.assert_allclose(d_b, want_d_b, rtol=1e-5, atol=1e-5)


def _layer_norm_operands(m, d, seed=0):
  rng = np.random.default_rng(seed)
  # A large offset: the two-pass variance keeps it exact where sum(x^2) - mean^2 would not.
  x = jnp.asarray(rng.normal(size=(m, d)) * 3 + 100, jnp.float32)
  scale, bias = (jnp.asarray(rng.normal(size=(d,)), jnp.float32) for _ in range(2))
  return x, scale, bias, jnp.asarray(rng.normal(size=(m, d)), jnp.float32)


def _layer_norm_float64(x, scale, bias, g, eps):
  x, scale, bias, g = (np.asarray(t, np.float64) for t in (x, scale, bias, g))
  mean = x.mean(-1, keepdims=True)
  rstd = 1 / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)
  xhat = (x - mean) * rstd
  gs = g * scale
  dx = rstd * (gs - gs.mean(-1, keepdims=True) - xhat * (gs * xhat).mean(-1, keepdims=True))
  return xhat * scale + bias, dx, (g * xhat).sum(0), g.sum(0)


# Rows over and under one task (128), widths in and out of whole 16-lane vectors.
@pytest.mark.parametrize('m,d', [(300, 384), (5, 40), (130, 7)])
def test_layer_norm_matches_float64_and_xla(m, d):
  x, scale, bias, g = _layer_norm_operands(m, d)
  eps = 1e-5
  ours = jax.vjp(lambda *a: layers._normalize_on_kernel(*a, eps), x, scale, bias)  # pylint: disable=protected-access
  xla = jax.vjp(lambda *a: layers._normalize(*a, eps), x, scale, bias)  # pylint: disable=protected-access
  want = _layer_norm_float64(x, scale, bias, g, eps)
  for got, ref in [(ours, want), (xla, want)]:
    y, (dx, d_scale, d_bias) = got[0], got[1](g)
    for value, exact in zip((y, dx, d_scale, d_bias), ref):
      value = np.asarray(value, np.float64)
      np.testing.assert_allclose(value, exact, rtol=1e-4, atol=1e-5 * np.abs(exact).max())
  # And to each other, within float32's rounding of x - mean at x ~ 100 (ulp 7.6e-6).
  np.testing.assert_allclose(ours[0], xla[0], rtol=1e-4, atol=1e-4)
  for a, b in zip(ours[1](g), xla[1](g)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(np.asarray(b)).max())


@pytest.mark.parametrize('m,d', [(300, 384), (5, 40), (130, 7)])
def test_bfloat16_layer_norm_rounds_the_exact_values_once(m, d):
  """bfloat16 x, scale and bias (as LayerNorm computes in bfloat16): the output and dx are the
  exact values rounded once to bfloat16 (dx up to float32's error where its terms cancel), the
  parameters' gradients the exact sums, rounded once to their bfloat16; closer to the exact
  values than XLA's path, which rounds the output's pieces."""
  x, scale, bias, g = (_bf16(t) for t in _layer_norm_operands(m, d))
  x = _bf16(np.asarray(x, np.float32) - 100)  # bfloat16 holds only ~3 digits: no offset here.
  eps = 1e-5
  out, pullback = jax.vjp(lambda *a: layers._normalize_on_kernel(*a, eps), x, scale, bias)  # pylint: disable=protected-access
  grads = pullback(g)
  assert out.dtype == jnp.bfloat16 and all(t.dtype == jnp.bfloat16 for t in grads)
  want = _layer_norm_float64(x, scale, bias, g, eps)
  # float32's error: ~1e-6 of the largest value in y, more in dx (its terms cancel) and the sums.
  for got, exact, what, error in zip((out, *grads), want, ('y', 'dx', 'd_scale', 'd_bias'),
                                     (2e-6, 1e-5, 1e-5, 1e-5)):
    _assert_rounded_once(got, exact, what, atol=error * np.abs(exact).max())
  xla = jax.vjp(lambda *a: layers._normalize(*a, eps), x, scale, bias)[0]  # pylint: disable=protected-access
  ours, theirs = (np.abs(np.asarray(t, np.float64) - want[0]).max() for t in (out, xla))
  assert ours <= theirs, (ours, theirs)


def test_layer_norms_take_the_kernel_in_float32_and_bfloat16(monkeypatch):
  """ftjax's LayerNorm runs on the kernel's two calls in float32 and bfloat16 (with and without
  a bias), as flax's LayerNorm computes it; float16 and FTJAX_MATMUL=xla stay on XLA."""
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 6, 24)), jnp.float32)

  def compiled(dtype, use_bias=True):
    norm = layers.layer_norm(24, eps=1e-6, dtype=dtype, rngs=nnx.Rngs(0), use_bias=use_bias)
    loss = lambda norm, x: jnp.sum(norm(x).astype(jnp.float32) ** 2)
    return jax.jit(nnx.value_and_grad(loss, argnums=(0, 1))).lower(norm, x.astype(dtype)).as_text()

  for use_bias in (True, False):
    norm = layers.layer_norm(24, eps=1e-6, dtype=jnp.float32, rngs=nnx.Rngs(0), use_bias=use_bias)
    flax_norm = nnx.LayerNorm(24, epsilon=1e-6, use_bias=use_bias, use_fast_variance=False,
                              rngs=nnx.Rngs(0))
    np.testing.assert_allclose(norm(x), flax_norm(x), rtol=1e-5, atol=1e-5)
    for dtype in (jnp.float32, jnp.bfloat16):
      assert re.findall(r'ftjax_layer_norm\w*', compiled(dtype, use_bias)) == [
          'ftjax_layer_norm', 'ftjax_layer_norm_grad']
  assert 'ftjax_layer_norm' not in compiled(jnp.float16)
  monkeypatch.setenv('FTJAX_MATMUL', 'xla')
  assert 'ftjax_layer_norm' not in compiled(jnp.float32)
  assert 'ftjax_layer_norm' not in compiled(jnp.bfloat16)


@pytest.mark.parametrize('march,needs', OTHER_CPUS)
def test_builds_for_other_cpus_compute_the_same_layer_norm(march, needs, kernels_built_for):
  name = _register_other_build(march, needs, kernels_built_for, 'ftjax_layer_norm',
                               'FtjaxLayerNorm')
  x, scale, bias, g = _layer_norm_operands(130, 40)
  rows = jax.ShapeDtypeStruct((130,), jnp.float32)
  theirs = jax.ffi.ffi_call(name, (jax.ShapeDtypeStruct(x.shape, jnp.float32), rows, rows))(
      x, scale, bias, eps=np.float32(1e-5))
  ours = kernels.layer_norm(x, scale, bias, 1e-5)
  params = jax.ShapeDtypeStruct((40,), jnp.float32)
  theirs += tuple(jax.ffi.ffi_call(name + '_grad', (
      jax.ShapeDtypeStruct(x.shape, jnp.float32), params, params))(x, *theirs[1:], scale, g))
  ours += kernels.layer_norm_grad(x, ours[1], ours[2], scale, g)
  for a, b in zip(theirs, ours):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(np.asarray(b)).max())


def _residual_norm_step(monkeypatch, matmul: str, rate: float, deterministic: bool,
                        use_bias: bool = True, dtype=jnp.float32):
  """residual_norm's output and its gradients (x, y, scale, bias) for one key, and the
  compiled step's text."""
  monkeypatch.setenv('FTJAX_MATMUL', matmul)
  rng = np.random.default_rng(2)
  # 3 x 50 rows (over and under a task of 128), D = 40 (a tail of 8 lanes).
  x, y, g = (jnp.asarray(rng.normal(size=(3, 50, 40)) * 3 + 1, dtype) for _ in range(3))
  norm = layers.layer_norm(40, eps=1e-5, dtype=dtype, rngs=nnx.Rngs(0), use_bias=use_bias)
  norm.scale[...] = jnp.asarray(rng.normal(size=40), jnp.float32)
  if use_bias:
    norm.bias[...] = jnp.asarray(rng.normal(size=40), jnp.float32)
  dropout = layers.Dropout(rate)

  def loss(norm, x, y):
    out = layers.residual_norm(norm, dropout, x, y, deterministic=deterministic,
                               rngs=nnx.Rngs(dropout=7))
    return jnp.sum((out * g).astype(jnp.float32)), out

  step = jax.jit(nnx.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
  (_, out), (d_norm, d_x, d_y) = step(norm, x, y)
  values = [out, d_x, d_y, d_norm.scale[...]] + ([d_norm.bias[...]] if use_bias else [])
  return values, step.lower(norm, x, y).as_text()


@pytest.mark.parametrize('rate,deterministic,use_bias,dtype', [
    (0.1, False, True, jnp.float32), (0.5, False, False, jnp.float32),
    (0.1, True, True, jnp.float32), (0.1, False, True, jnp.bfloat16),
    (0.1, True, False, jnp.bfloat16)])
def test_residual_norm_matches_the_xla_path(monkeypatch, rate, deterministic, use_bias, dtype):
  """LayerNorm(x + dropout(y)) on the kernel (`kernels.add_layer_norm`): the XLA path's values
  and gradients to float32 rounding (bfloat16: to its rounding, XLA rounding each piece), with
  the same keep-mask (the branch's gradient is zero at the same elements); a deterministic call
  has no mask and dy = ds."""
  ours, text = _residual_norm_step(monkeypatch, 'auto', rate, deterministic, use_bias, dtype)
  theirs, xla_text = _residual_norm_step(monkeypatch, 'xla', rate, deterministic, use_bias, dtype)
  calls = re.findall(r'ftjax_\w*layer_norm\w*', text)
  if deterministic:
    assert calls == ['ftjax_add_layer_norm', 'ftjax_layer_norm_grad']
  else:
    assert calls == ['ftjax_add_layer_norm', 'ftjax_add_layer_norm_grad']
  assert 'ftjax_' not in xla_text
  # bfloat16: XLA rounds dropout(y), x + dropout(y) and the output's pieces each, the kernel
  # s and the output once each (test_bfloat16_residual_norm_rounds_once checks its values):
  # a step or two apart, where s's rounding moves a normalised value by its step at |s|.
  rtol, atol = (1e-4, 1e-5) if dtype == jnp.float32 else (2**-6, 2**-5)
  for i, (got, want) in enumerate(zip(ours, theirs)):
    assert got.dtype == want.dtype == (dtype if i < 3 else jnp.float32)  # streams, parameters
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * np.abs(want).max())
  d_y, want_d_y = np.asarray(ours[2], np.float32), np.asarray(theirs[2], np.float32)
  np.testing.assert_array_equal(d_y == 0, want_d_y == 0)
  dropped = (want_d_y == 0).mean()
  assert (dropped == 0) if deterministic else abs(dropped - rate) < 0.05
  if deterministic:
    np.testing.assert_array_equal(d_y, np.asarray(ours[1], np.float32))


def test_bfloat16_residual_norm_rounds_once():
  """bfloat16 `add_layer_norm` and its backward against float64: s = x + dropout(y) (the
  keep-mask of `layers.keep_mask`, the kept values scaled by 1 / (1 - rate) in bfloat16, as
  `layers.Dropout` scales a bfloat16 stream) rounded once; the output, ds and the parameters'
  gradients the exact LayerNorm of that s, rounded once; dy = ds's dropout backward, rounded."""
  x, scale, bias, g = _layer_norm_operands(130, 40)
  x, y, g = _bf16(x - 100), _bf16(jnp.flip(x, 0) - 100), _bf16(g)
  rate, eps = 0.25, 1e-5
  seeds = jnp.asarray([12345, 678], jnp.uint32)
  out, s, mean, rstd, keep = kernels.add_layer_norm(x, y, scale, bias, seeds, eps, rate)
  assert out.dtype == s.dtype == jnp.bfloat16
  kept = np.asarray(layers._keep(seeds, x.shape, rate))  # pylint: disable=protected-access
  keep_scale = float(jnp.asarray(1 / (1 - rate), jnp.bfloat16))
  x64, y64 = np.asarray(x, np.float64), np.asarray(y, np.float64)
  _assert_rounded_once(s, x64 + np.where(kept, y64 * keep_scale, 0), 's')
  want = _layer_norm_float64(s, scale, bias, g, eps)
  s64 = np.asarray(s, np.float64)
  np.testing.assert_allclose(mean, s64.mean(-1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(rstd, 1 / np.sqrt(s64.var(-1) + eps), rtol=1e-5)
  _assert_rounded_once(out, want[0], 'out', atol=2e-6 * np.abs(want[0]).max())
  ds, dy, d_scale, d_bias = kernels.add_layer_norm_grad(s, mean, rstd, scale, g, keep, rate)
  _assert_rounded_once(ds, want[1], 'ds', atol=1e-5 * np.abs(want[1]).max())
  np.testing.assert_array_equal(
      np.asarray(dy, np.float64),
      _to_bf16_f64(np.where(kept, np.asarray(ds, np.float64) * keep_scale, 0)))
  for got, exact in [(d_scale, want[2]), (d_bias, want[3])]:
    np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-5 * np.abs(exact).max())


@pytest.mark.parametrize('march,needs', OTHER_CPUS)
def test_builds_for_other_cpus_compute_the_same_residual_norm(march, needs, kernels_built_for):
  """The portable loops (no AVX-512) hash the same keep-mask and give this build's values."""
  name = _register_other_build(march, needs, kernels_built_for, 'ftjax_add_layer_norm',
                               'FtjaxAddLayerNorm')
  x, scale, bias, g = _layer_norm_operands(130, 40)
  y = jnp.flip(x, 0) - 100
  seeds = jnp.asarray([12345, 678], jnp.uint32)
  ours = kernels.add_layer_norm(x, y, scale, bias, seeds, 1e-5, 0.25)
  stream = jax.ShapeDtypeStruct(x.shape, jnp.float32)
  rows = jax.ShapeDtypeStruct((130,), jnp.float32)
  theirs = jax.ffi.ffi_call(name, (stream, stream, rows, rows, jax.ShapeDtypeStruct(
      ours[4].shape, jnp.uint16)))(x, y, scale, bias, seeds, eps=np.float32(1e-5),
                                   **kernels._dropout_attrs(0.25))  # pylint: disable=protected-access
  np.testing.assert_array_equal(theirs[4], ours[4])  # The same keep-mask bits.
  params = jax.ShapeDtypeStruct((40,), jnp.float32)
  theirs += tuple(jax.ffi.ffi_call(name + '_grad', (stream, stream, params, params))(
      theirs[1], theirs[2], theirs[3], scale, g, theirs[4], keep_scale=np.float32(1 / 0.75)))
  ours += kernels.add_layer_norm_grad(ours[1], ours[2], ours[3], scale, g, ours[4], 0.25)
  for a, b in zip(theirs, ours):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(np.asarray(b)).max())


def _gelu_grad_float64(g, w, y, b):
  z = np.asarray(y, np.float64) + np.asarray(b, np.float64)
  _, slope = _exact_gelu(z)
  d = (np.asarray(g, np.float64) @ np.asarray(w, np.float64).T) * slope
  return d, d.sum(0), np.asarray(g, np.float64).sum(0)


# Row and column counts off the kernel's tiles, blocks and tasks; a contraction over two passes.
@pytest.mark.parametrize('m,k,n', [(300, 1000, 70), (37, 40, 450), (5, 64, 64)])
def test_the_gated_input_gradient_matches_float64(m, k, n):
  """`kernels.matmul_gelu_grad`: (g w^T) * gelu'(y + b) with its column sums and g's, as the
  product's blocks complete, against float64 (and as close as the unfused kernels are)."""
  rng = np.random.default_rng(3)
  g = jnp.asarray(rng.normal(size=(m, n)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, n)) * 0.1, jnp.float32)
  y, b, _ = _operands(m, k, seed=4)
  got = jax.jit(kernels.matmul_gelu_grad)(g, w, y, b)
  want = _gelu_grad_float64(g, w, y, b)
  h, g_sums = kernels.matmul_sums(g, w, transpose_b=True)
  unfused = (*kernels.bias_gelu_grad(y, b, h), g_sums)
  for ours, theirs, exact in zip(got, unfused, want):
    scale = np.abs(exact).max()
    np.testing.assert_allclose(ours, exact, rtol=1e-4, atol=2e-6 * scale)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize('march,needs', OTHER_CPUS)
def test_builds_for_other_cpus_gate_the_same_gradient(march, needs, kernels_built_for):
  name = f'ftjax_dense_gate_{march.replace("-", "_")}'
  register_other_build(march, needs, kernels_built_for, {name: 'FtjaxDense'})
  rng = np.random.default_rng(5)
  g = jnp.asarray(rng.normal(size=(37, 70)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(200, 70)) * 0.1, jnp.float32)
  y, b, _ = _operands(37, 200, seed=6)
  theirs = jax.ffi.ffi_call(name, (jax.ShapeDtypeStruct((37, 200), jnp.float32),
                                   jax.ShapeDtypeStruct((70,), jnp.float32),
                                   jax.ShapeDtypeStruct((200,), jnp.float32)))(
                                       g, w, jnp.zeros((0,), jnp.float32), y, b,
                                       transpose_b=True, variant=np.int32(0))
  d, d_b, g_sums = kernels.matmul_gelu_grad(g, w, y, b)
  for a, want in zip(theirs, (d, g_sums, d_b)):
    np.testing.assert_allclose(a, want, rtol=1e-5, atol=1e-5 * np.abs(np.asarray(want)).max())


def _feed_forward_step(monkeypatch, matmul: str):
  monkeypatch.setenv('FTJAX_MATMUL', matmul)
  up = layers.linear(96, 192, ('embed', 'mlp'), std=0.1, dtype=jnp.float32, rngs=nnx.Rngs(0))
  down = layers.linear(192, 80, ('mlp', 'embed'), std=0.1, dtype=jnp.float32, rngs=nnx.Rngs(1))
  up.bias[...] = jnp.linspace(-1, 1, 192)
  down.bias[...] = jnp.linspace(1, -1, 80)
  x = jnp.asarray(np.random.default_rng(7).normal(size=(2, 70, 96)), jnp.float32)

  def loss(up, down, x):
    out = layers.feed_forward(up, down, x, {}, layers.gelu)
    return jnp.sum(jnp.sin(out)), out

  step = jax.jit(nnx.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
  (_, out), (d_up, d_down, d_x) = step(up, down, x)
  values = [out, d_x, d_up.kernel[...], d_up.bias[...], d_down.kernel[...], d_down.bias[...]]
  return values, step.lower(up, down, x).as_text()


def test_feed_forward_runs_gelus_backward_inside_the_input_gradient(monkeypatch):
  """Two float32 linear layers with exact GELU between them (BERT's and ViT's FFN): the down
  layer's input gradient and GELU's backward are one kernel call (no `bias_gelu_grad`), with
  XLA's values and gradients to float32 rounding."""
  ours, text = _feed_forward_step(monkeypatch, 'kernel')
  theirs, xla_text = _feed_forward_step(monkeypatch, 'xla')
  # up's product, GELU with up's bias, down's product with its bias; then the gated input
  # gradient (no bias_gelu_grad), down's weight gradient, up's input and weight gradients.
  assert re.findall(r'ftjax_\w+', text) == ['ftjax_matmul', 'ftjax_bias_gelu', 'ftjax_dense',
                                             'ftjax_dense', 'ftjax_matmul', 'ftjax_matmul',
                                             'ftjax_matmul']
  assert re.findall(r'transpose_a = (\w+)', text) == ['false', 'true', 'false', 'true']
  assert 'ftjax_' not in xla_text
  for got, want in zip(ours, theirs):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(np.asarray(want)).max())


def _silu_gate_exact(a, b, g):
  """silu(a) * b and its gradients for a and b in float64."""
  a, b, g = (np.asarray(jnp.asarray(t, jnp.float32), np.float64) for t in (a, b, g))
  s = 1 / (1 + np.exp(-a))
  return a * s * b, g * b * s * (1 + a * (1 - s)), g * a * s


def _silu_gate_operands(shape, dtype, seed=5):
  rng = np.random.default_rng(seed)
  # Wide enough for exp's overflow and its clamp (a = -120 and 120), and lanes past 16.
  a = jnp.asarray(rng.normal(size=shape) * 4, jnp.float32).at[0, :4].set(
      jnp.array([-120.0, 120.0, 0.0, -6.0]))
  b, g = (jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(2))
  return a.astype(dtype), b.astype(dtype), g.astype(dtype)


@pytest.mark.parametrize('shape', [(300, 70), (7, 5)])
def test_silu_gate_matches_float64_and_xla(shape):
  """silu(gate) * up on the kernel (`layers.silu_gate`), forward and both gradients: float32
  to its rounding (as close as XLA's `jax.nn.silu(a) * b`), bfloat16 the exact values rounded
  once (within a bfloat16 step where float32's error crosses a rounding boundary)."""
  for dtype in (jnp.float32, jnp.bfloat16):
    a, b, g = _silu_gate_operands(shape, dtype)
    assert kernels.layer_kernel_applies(a, b)
    out, pullback = jax.vjp(jax.jit(layers.silu_gate), a, b)
    got = (out, *pullback(g))
    assert all(t.dtype == dtype for t in got)
    xla_out, xla_pullback = jax.vjp(lambda a, b: jax.nn.silu(a) * b, a, b)
    xla = (xla_out, *xla_pullback(g))
    for name, ours, theirs, exact in zip(('h', 'd gate', 'd up'), got, xla,
                                         _silu_gate_exact(a, b, g)):
      if dtype == jnp.float32:
        np.testing.assert_allclose(ours, exact, rtol=2e-6, atol=1e-6)
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
      else:
        _assert_rounded_once(ours, exact, name, atol=1e-6 * (1 + np.abs(exact)))


def test_the_llama_mlp_takes_the_silu_gate_kernel(monkeypatch):
  """The gated FFN's step holds the two SwiGLU calls in float32 and bfloat16, none under
  FTJAX_MATMUL=xla, and the same loss and gradients either way (float32)."""
  from ftjax.models import llama  # pylint: disable=g-import-not-at-top
  config = llama.LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=1, num_attention_heads=4)
  x = jax.random.normal(jax.random.key(0), (2, 5, 32))

  def step(dtype):
    mlp = llama.LlamaMLP(config, dtype=dtype, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(mlp)
    loss = lambda state, x: jnp.sum(nnx.merge(graphdef, state)(x.astype(dtype), {}) ** 2)
    fn = jax.jit(jax.value_and_grad(loss))
    return fn(state, x), fn.lower(state, x).compile().as_text()

  for dtype in (jnp.float32, jnp.bfloat16):
    assert step(dtype)[1].count('custom_call_target="ftjax_swiglu') == 2
  (value, grads), _ = step(jnp.float32)
  monkeypatch.setenv('FTJAX_MATMUL', 'xla')
  (xla_value, xla_grads), text = step(jnp.float32)
  assert 'ftjax_swiglu' not in text
  np.testing.assert_allclose(value, xla_value, rtol=1e-5)
  for ours, theirs in zip(jax.tree.leaves(grads), jax.tree.leaves(xla_grads)):
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('march,needs', OTHER_CPUS)
def test_builds_for_other_cpus_compute_the_same_silu_gate(march, needs, kernels_built_for):
  """The portable loops (std::exp) and AVX-512 builds give this machine's values."""
  name = _register_other_build(march, needs, kernels_built_for, 'ftjax_swiglu', 'FtjaxSwiglu')
  for dtype in (jnp.float32, jnp.bfloat16):
    a, b, g = _silu_gate_operands((40, 37), dtype)
    out = jax.ffi.ffi_call(name, jax.ShapeDtypeStruct(a.shape, dtype))(a, b)
    grads = jax.ffi.ffi_call(name + '_grad', (jax.ShapeDtypeStruct(a.shape, dtype),) * 2)(a, b, g)
    for ours, theirs in zip((out, *grads), (kernels.swiglu(a, b), *kernels.swiglu_grad(a, b, g))):
      np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(theirs, np.float32),
                                 rtol=2**-7 if dtype == jnp.bfloat16 else 1e-5, atol=1e-6)
