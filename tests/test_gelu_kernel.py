"""The fused bias + exact GELU kernel (ftjax/kernels/gelu.cc) against XLA's and the exact values."""

import math
import re

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import kernels
from ftjax.models import layers
from conftest import OTHER_CPUS, cpu_flags


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


# Rows over and under one task (256), widths in and out of whole 16-lane vectors.
@pytest.mark.parametrize('m,n', [(600, 1536), (7, 40), (300, 5)])
def test_bias_gelu_matches_xla_and_the_exact_values(m, n):
  assert kernels.bias_gelu_applies(jnp.zeros((1, n)), jnp.zeros((n,)))
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


def _step_text(monkeypatch, matmul: str, dtype) -> str:
  monkeypatch.setenv('FTJAX_MATMUL', matmul)
  layer = layers.linear(16, 48, ('embed', 'mlp'), std=0.1, dtype=dtype, rngs=nnx.Rngs(0))
  x = jnp.ones((4, 5, 16), dtype)

  def loss(layer, x):
    return jnp.sum(layers.dense(layer, x, {}, activation=layers.gelu).astype(jnp.float32))

  return jax.jit(nnx.value_and_grad(loss, argnums=(0, 1))).lower(layer, x).as_text()


def test_gelu_layers_take_the_kernel_only_in_float32(monkeypatch):
  """A float32 linear layer with exact GELU runs its bias and activation as the kernel's two
  calls (none left for XLA's erf); bfloat16, FTJAX_MATMUL=xla and other activations stay on
  XLA."""
  text = _step_text(monkeypatch, 'auto', jnp.float32)
  assert re.findall(r'ftjax_bias_gelu\w*', text) == ['ftjax_bias_gelu', 'ftjax_bias_gelu_grad']
  assert 'erf' not in text
  for matmul, dtype in [('xla', jnp.float32), ('auto', jnp.bfloat16)]:
    text = _step_text(monkeypatch, matmul, dtype)
    assert 'ftjax_bias_gelu' not in text and 'erf' in text, (matmul, dtype)
  layer = layers.linear(16, 48, ('embed', 'mlp'), std=0.1, dtype=jnp.float32, rngs=nnx.Rngs(0))
  x = jnp.ones((4, 16), jnp.float32)
  relu = layers.dense(layer, x, {}, activation=jax.nn.relu)
  np.testing.assert_array_equal(relu, jax.nn.relu(layers.dense(layer, x, {})))


@pytest.mark.parametrize('march,needs', OTHER_CPUS)
def test_builds_for_other_cpus_compute_the_same_gelu(march, needs, kernels_built_for):
  """The portable loops (no AVX-512, std::erf-free: the same rational erf) and AVX-512 builds
  give what this machine's build gives."""
  if not needs <= cpu_flags():
    pytest.skip(f'this CPU cannot run a -march={march} build')
  library = kernels_built_for(march)
  name = f'ftjax_bias_gelu_{march.replace("-", "_")}'
  for suffix, symbol in [('', 'FtjaxBiasGelu'), ('_grad', 'FtjaxBiasGeluGrad')]:
    jax.ffi.register_ffi_target(name + suffix, jax.ffi.pycapsule(getattr(library, symbol)),
                                platform='cpu')
  y, b, g = _operands(300, 40)
  out = jax.ffi.ffi_call(name, jax.ShapeDtypeStruct(y.shape, jnp.float32))(y, b)
  d_y, d_b = jax.ffi.ffi_call(name + '_grad', (jax.ShapeDtypeStruct(y.shape, jnp.float32),
                                               jax.ShapeDtypeStruct(b.shape, jnp.float32)))(y, b, g)
  np.testing.assert_allclose(out, kernels.bias_gelu(y, b), rtol=1e-6, atol=1e-6)
  want_d_y, want_d_b = kernels.bias_gelu_grad(y, b, g)
  np.testing.assert_allclose(d_y, want_d_y, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(d_b, want_d_b, rtol=1e-5, atol=1e-5)
