"""The fused CPU attention kernel (ftjax/kernels/attention.cc) against the XLA path and autodiff."""

import ctypes
import functools
import logging
import pathlib
import re

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import kernels
from ftjax.errors import FtjaxError
from ftjax.models import layers
from conftest import OTHER_CPUS, cpu_flags

def _operands(batch, length, keys, heads, groups, head_dim, dtype, bias_kind, seed=0):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(2 * rng.normal(size=(batch, length, heads, head_dim)), dtype)
  k = jnp.asarray(2 * rng.normal(size=(batch, keys, groups, head_dim)), dtype)
  v = jnp.asarray(rng.normal(size=(batch, keys, groups, head_dim)), dtype)
  if bias_kind == 'padding':  # [B, 1, 1, S]; the first sequence's last 3 keys are padding.
    mask = np.ones((batch, keys), bool)
    mask[0, -3:] = False
    bias = jnp.where(jnp.asarray(mask)[:, None, None, :], 0.0, layers.MASKED)
  elif bias_kind == 'causal':  # [B, 1, L, L], left padding: a query that sees only padding.
    mask = np.ones((batch, length), np.int32)
    mask[0, :2] = 0
    bias, _ = layers.causal_bias(jnp.asarray(mask), length)
  else:  # A dense [1, 1, L, S] bias, as a learnt one would be.
    bias = jnp.asarray(rng.normal(size=(1, 1, length, keys)), jnp.float32)
  return q, k, v, bias.astype(jnp.float32)


def _attend(impl, monkeypatch, dtype, rate, q, k, v, bias):
  monkeypatch.setenv('FTJAX_ATTENTION', impl)
  dropout = layers.Dropout(rate)
  return layers.attend(q, k, v, bias, dtype=dtype, scale=0.3, dropout=dropout,
                       deterministic=not rate, rngs=nnx.Rngs(dropout=7))


def _value_and_grads(impl, monkeypatch, dtype, rate, operands, argnums=(0, 1, 2)):
  f = functools.partial(_attend, impl, monkeypatch, dtype, rate)
  out, pullback = jax.vjp(lambda *a: f(*a), *operands)
  cotangent = jax.random.normal(jax.random.key(1), out.shape, jnp.float32).astype(out.dtype)
  grads = pullback(cotangent)
  return out, [grads[i] for i in argnums]


def _close(ours, reference, rtol):
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(reference)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert a.shape == b.shape and np.isfinite(a).all()
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())


# (batch, query length, key length, heads, kv heads, head size, bias): multi-head and
# grouped-query; head sizes and lengths that are and are not multiples of the kernel's 16-lane
# padding; a single query row (decoding); keys longer than queries (a cache or prefix).
SHAPES = [(2, 20, 20, 4, 4, 32, 'padding'), (2, 24, 24, 4, 2, 16, 'causal'),
          (3, 33, 50, 6, 2, 24, 'dense'), (2, 1, 9, 4, 1, 8, 'padding'),
          (2, 128, 128, 4, 4, 64, 'padding')]


def _use_variant(monkeypatch, variant):
  """bfloat16 attention (and matmuls) on `variant` of the kernels, as if measured faster here."""
  monkeypatch.setattr(kernels, 'bf16_matmul_plan',
                      lambda: {'use_kernel': False, 'variant': variant})


@pytest.mark.parametrize('dtype,variant', [(jnp.float32, 'fma'), (jnp.bfloat16, 'fma'),
                                           (jnp.bfloat16, 'dot'), (jnp.bfloat16, 'amx')],
                         ids=['f32', 'bf16-fma', 'bf16-dot', 'bf16-amx'])
@pytest.mark.parametrize('rate', [0.0, 0.2])
@pytest.mark.parametrize('shape', SHAPES, ids=lambda s: 'x'.join(map(str, s[:6])) + s[6])
def test_fused_attention_matches_the_xla_path(shape, rate, dtype, variant, monkeypatch):
  """Same outputs and q/k/v gradients as the XLA path, dropout masks included, for bfloat16 on
  any variant (float32 FMAs, the bfloat16 dot instruction, or AMX's tiles for the products
  whose sizes are whole tiles, where the CPU has them; elsewhere the next one down)."""
  _use_variant(monkeypatch, variant)
  *dims, bias_kind = shape
  operands = _operands(*dims, dtype, bias_kind)
  out, grads = _value_and_grads('fused', monkeypatch, dtype, rate, operands)
  ref_out, ref_grads = _value_and_grads('xla', monkeypatch, dtype, rate, operands)
  assert out.dtype == dtype and [g.dtype for g in grads] == [dtype] * 3
  # float32: summation order only. bfloat16: a rounding of d_logits that falls the other way
  # moves a gradient by one bfloat16 step (2^-8) of its largest entries.
  _close(out, ref_out, 1e-5 if dtype == jnp.float32 else 1e-2)
  _close(grads, ref_grads, 1e-5 if dtype == jnp.float32 else 2e-2)


@pytest.mark.parametrize('rate', [0.0, 0.3])
def test_fused_attention_matches_autodiff_of_plain_attention(rate, monkeypatch):
  """Against attention written plainly and differentiated by jax, with the same dropout mask."""
  q, k, v, bias = _operands(2, 12, 12, 4, 2, 16, jnp.float32, 'causal')
  out, grads = _value_and_grads('fused', monkeypatch, jnp.float32, rate, (q, k, v, bias))
  key = nnx.Rngs(dropout=7).dropout()

  def plain(q, k, v):
    k, v = (jnp.repeat(t, 2, axis=2) for t in (k, v))
    probs = jax.nn.softmax(jnp.einsum('bqhk,bshk->bhqs', q, k) * 0.3 + bias, axis=-1)
    if rate:
      probs = jnp.where(layers.keep_mask(key, probs.shape, rate), probs / (1 - rate), 0.0)
    out = jnp.einsum('bhqs,bshk->bqhk', probs, v)
    return out.reshape(*out.shape[:2], -1)

  ref_out, pullback = jax.vjp(plain, q, k, v)
  cotangent = jax.random.normal(jax.random.key(1), out.shape, jnp.float32)
  _close(out, ref_out, 1e-5)
  _close(grads, pullback(cotangent), 1e-5)


def test_bfloat16_attention_takes_the_measured_variant(monkeypatch):
  """The kernel's products take the variant that the matmul measurement found fastest (the
  CPU's instructions decide both); float32 always runs on FMAs."""
  for dtype, variant, want in [(jnp.bfloat16, 'dot', ('true', 'false')),
                               (jnp.bfloat16, 'fma', ('false', 'false')),
                               (jnp.bfloat16, 'amx', ('false', 'true')),
                               (jnp.float32, 'dot', ('false', 'false')),
                               (jnp.float32, 'amx', ('false', 'false'))]:
    _use_variant(monkeypatch, variant)
    operands = _operands(2, 8, 8, 2, 2, 16, dtype, 'padding')
    monkeypatch.setenv('FTJAX_ATTENTION', 'fused')
    loss = lambda q, k, v: jnp.sum(layers.attend(q, k, v, operands[3], dtype=dtype))
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*operands[:3]).as_text()
    attrs = re.findall(r'ftjax_attention_\w+.*?amx = (true|false).*?dot = (true|false)', hlo)
    assert attrs == [want[::-1]] * 2, (dtype, variant, attrs)
  with pytest.raises(ValueError, match="variant='avx'"):
    kernels.attention_forward(*operands[:4], jnp.zeros(2, jnp.uint32), 1.0, 0.0, variant='avx')


def _attention_on(library, name: str, dtype, variant: str, rate: float, operands):
  """Output and q/k/v gradients of attention on another build's kernels (registered as
  `name`_forward / _backward), called as `kernels.attention_forward` calls them."""
  q, k, v, bias = operands  # Token-major, as `layers.attend` passes them: q [B, L, H, K].
  for suffix, symbol in [('forward', 'FtjaxAttentionForward'),
                         ('backward', 'FtjaxAttentionBackward')]:
    jax.ffi.register_ffi_target(f'{name}_{suffix}', jax.ffi.pycapsule(getattr(library, symbol)),
                                platform='cpu')
  attrs = kernels._attrs(0.3, rate, jnp.float32, 'fma') | {'dot': variant == 'dot',  # pylint: disable=protected-access
                                                           'amx': variant == 'amx'}
  seeds = jnp.array([3, 4], jnp.uint32)
  stats = (q.shape[0], k.shape[2], q.shape[2] // k.shape[2] * q.shape[1])
  rows = jax.ShapeDtypeStruct((*stats, 1), jnp.float32)
  words = (*stats, -(-k.shape[1] // 16)) if rate else (1,)
  out, *stats = jax.ffi.ffi_call(f'{name}_forward', (
      jax.ShapeDtypeStruct(q.shape, dtype), rows, rows,
      jax.ShapeDtypeStruct(words, jnp.uint16)))(q, k, v, bias, seeds, **attrs)
  d_out = jax.random.normal(jax.random.key(1), out.shape, jnp.float32).astype(dtype)
  grads = jax.ffi.ffi_call(f'{name}_backward', tuple(
      jax.ShapeDtypeStruct(t.shape, dtype) for t in (q, k, v)))(
          q, k, v, bias, seeds, *stats, out, d_out, **attrs)
  return [out, *grads]


@pytest.mark.parametrize('march,needs', OTHER_CPUS)
def test_builds_for_other_cpus_attend_the_same(march, needs, kernels_built_for):
  """The portable loops (no AVX-512) and AVX-512 without the bfloat16 instructions (where the
  `dot` and `amx` variants run as `fma`) give what this machine's build gives."""
  if not needs <= cpu_flags():
    pytest.skip(f'this CPU cannot run a -march={march} build')
  kernels.available()
  native = ctypes.cdll.LoadLibrary(str(kernels.build()))
  other = kernels_built_for(march)
  for dtype, variant, rate, shape in [
      (jnp.float32, 'fma', 0.2, (3, 33, 50, 6, 2, 24, 'dense')),
      (jnp.bfloat16, 'dot', 0.2, (2, 24, 24, 4, 2, 16, 'causal')),
      (jnp.bfloat16, 'fma', 0.0, (2, 20, 20, 4, 4, 32, 'padding')),
      (jnp.bfloat16, 'amx', 0.1, (2, 40, 40, 4, 2, 32, 'padding'))]:
    *dims, bias_kind = shape
    operands = _operands(*dims, dtype, bias_kind)
    theirs = _attention_on(other, f'ftjax_attention_{march.replace("-", "_")}', dtype, variant,
                           rate, operands)
    ours = _attention_on(native, 'ftjax_attention_native', dtype, variant, rate, operands)
    _close(theirs, ours, 1e-5 if dtype == jnp.float32 else 2e-2)


def test_a_differentiated_bias_gets_its_gradient(monkeypatch):
  """The kernel computes no bias gradient; a bias under differentiation takes the XLA backward."""
  operands = _operands(2, 10, 10, 4, 2, 16, jnp.float32, 'dense')
  argnums = (0, 1, 2, 3)
  _, grads = _value_and_grads('fused', monkeypatch, jnp.float32, 0.1, operands, argnums)
  _, ref_grads = _value_and_grads('xla', monkeypatch, jnp.float32, 0.1, operands, argnums)
  assert grads[3].shape == operands[3].shape and np.abs(np.asarray(grads[3])).max() > 0
  _close(grads, ref_grads, 1e-5)


def _custom_calls(impl, monkeypatch, *operands) -> list[str]:
  monkeypatch.setenv('FTJAX_ATTENTION', impl)
  loss = lambda q, k, v: jnp.sum(layers.attend(q, k, v, operands[3], dtype=jnp.float32))
  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*operands[:3]).as_text()
  return [t for t in kernels._TARGETS if t in text]


def test_the_kernel_runs_by_default_and_not_under_ftjax_attention_xla(monkeypatch):
  operands = _operands(2, 8, 8, 2, 2, 16, jnp.float32, 'padding')
  assert _custom_calls('auto', monkeypatch, *operands) == ['ftjax_attention_forward',
                                                           'ftjax_attention_backward']
  assert _custom_calls('xla', monkeypatch, *operands) == []


def test_the_fused_step_keeps_no_logits(monkeypatch):
  """XLA's scratch for a 4-layer attention stack's gradient: the kernel never writes the
  [B, H, L, L] logits or probabilities that the XLA path materialises, one layer at a time."""
  batch, length, heads, head_dim, depth = 4, 128, 4, 16, 4

  def loss(x, w):
    for i in range(depth):
      q = (x @ w[i]).reshape(batch, length, heads, head_dim)
      x = layers.attend(q, q, q, jnp.zeros((batch, 1, 1, length)), dtype=jnp.float32,
                        dropout=layers.Dropout(0.1), deterministic=False,
                        rngs=nnx.Rngs(dropout=i))
    return jnp.sum(x)

  x = jnp.ones((batch, length, heads * head_dim))
  w = jnp.full((depth, heads * head_dim, heads * head_dim), 0.01)

  def scratch(impl):
    monkeypatch.setenv('FTJAX_ATTENTION', impl)
    return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile(
    ).memory_analysis().temp_size_in_bytes

  probs_bytes = batch * heads * length * length * 4
  fused, xla = scratch('fused'), scratch('xla')
  assert fused < xla - probs_bytes, (fused, xla)


def test_ftjax_attention_is_checked(monkeypatch):
  monkeypatch.setenv('FTJAX_ATTENTION', 'flash')
  with pytest.raises(FtjaxError, match='FTJAX_ATTENTION=.flash.: expected one of auto, xla, fused'):
    kernels.choice()


def test_build_failure_is_one_line(monkeypatch, tmp_path):
  """A compiler that fails: `build` raises one line naming the command; nothing is cached."""
  monkeypatch.setenv('FTJAX_KERNEL_CACHE', str(tmp_path))
  monkeypatch.setenv('CXX', 'false')
  with pytest.raises(kernels.KernelUnavailable, match=r'^\S*false -O3 \.\.\. failed: 1$'):
    kernels.build()
  assert not list(pathlib.Path(tmp_path).rglob('*.so'))


def test_an_unavailable_kernel_falls_back_to_xla_with_one_warning(monkeypatch, caplog):
  monkeypatch.setattr(kernels, '_load', lambda: 'no C++ compiler found')
  kernels._warn_once.cache_clear()
  q, k, v, bias = _operands(1, 4, 4, 2, 2, 16, jnp.float32, 'padding')
  with caplog.at_level(logging.WARNING):
    for _ in range(2):
      assert not kernels.fused_attention_applies(q, k, v, jnp.float32)
  assert [r.getMessage() for r in caplog.records] == [
      'ftjax: CPU kernels (attention, matmul, AdamW, GELU, LayerNorm, cross-entropy, SwiGLU) '
      'unavailable (no C++ compiler found); using XLA for all']
  monkeypatch.setenv('FTJAX_ATTENTION', 'fused')
  with pytest.raises(kernels.KernelUnavailable, match='FTJAX_ATTENTION=fused, but'):
    kernels.fused_attention_applies(q, k, v, jnp.float32)


def test_rematerialised_attention_gives_the_same_gradients(monkeypatch):
  """Under `jax.checkpoint` (what `model.remat` wraps each block in) the kernel's forward runs
  again in the backward pass, with the same dropout mask."""
  monkeypatch.setenv('FTJAX_ATTENTION', 'fused')
  q, k, v, bias = _operands(2, 16, 16, 4, 2, 16, jnp.float32, 'causal')

  def loss(q, k, v):
    out = layers.attend(q, k, v, bias, dtype=jnp.float32, dropout=layers.Dropout(0.2),
                        deterministic=False, rngs=jax.random.key(5))
    return jnp.sum(out * jnp.cos(out))

  plain = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  remat = jax.jit(jax.grad(jax.checkpoint(loss), argnums=(0, 1, 2)))(q, k, v)
  _close(remat, plain, 1e-6)
