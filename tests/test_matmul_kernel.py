"""The CPU matmul kernel (ftjax/kernels/matmul.cc) against float64 products, and its use by the
dense layers (`layers._matmul`) against XLA's dots."""

import json
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import kernels
from ftjax.errors import FtjaxError
from ftjax.models import layers
from conftest import OTHER_CPUS, cpu_flags, register_other_build

pytestmark = pytest.mark.skipif(jax.default_backend() != 'cpu', reason='an XLA:CPU kernel')


def _operands(m, k, n, transpose_a, transpose_b, dtype, seed=0):
  rng = np.random.default_rng(seed)
  a = jnp.asarray(rng.standard_normal((k, m) if transpose_a else (m, k)), dtype)
  b = jnp.asarray(rng.standard_normal((n, k) if transpose_b else (k, n)), dtype)
  return a, b


def _reference(a, b, transpose_a, transpose_b):
  """op(a) @ op(b) in float64 from the operands' own (possibly bfloat16-rounded) values."""
  a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return (a64.T if transpose_a else a64) @ (b64.T if transpose_b else b64)


# (m, k, n): tails of every blocking unit (the 12 x 32 register tile, the 16-wide transposing
# copies, an odd K for the bfloat16 pairs, K steps of at most 192 words, blocks of 96 rows; for
# float32, passes of at most 384 values of K and blocks of 384 columns, A read unpacked; for
# amx, 32 x 32 blocks of 16 x 16 tiles, 16-word tile rows and blocks of 64 rows); K over
# several steps, and over several packed parts of B (at most 2048 words each); more rows
# than columns (tasks split rows) and fewer (tasks split columns, more than one 2048-column
# task); a single row, column or contraction.
SHAPES = [(1, 1, 1), (5, 7, 9), (13, 17, 33), (37, 200, 70), (97, 385, 64), (300, 130, 1000),
          (8, 40, 2100), (250, 1, 3), (30, 4501, 70)]


@pytest.mark.parametrize('out_dtype', ['float32', 'same'])
@pytest.mark.parametrize('dtype,variant', [(jnp.float32, 'fma'), (jnp.bfloat16, 'fma'),
                                           (jnp.bfloat16, 'dot'), (jnp.bfloat16, 'amx')],
                         ids=['f32', 'bf16-fma', 'bf16-dot', 'bf16-amx'])
@pytest.mark.parametrize('transpose_b', [False, True])
@pytest.mark.parametrize('transpose_a', [False, True])
@pytest.mark.parametrize('shape', SHAPES, ids=lambda s: 'x'.join(map(str, s)))
def test_matmul_matches_the_float64_product(shape, transpose_a, transpose_b, dtype, variant,
                                            out_dtype):
  m, k, n = shape
  a, b = _operands(m, k, n, transpose_a, transpose_b, dtype)
  out_dtype = jnp.float32 if out_dtype == 'float32' else dtype
  got = jax.jit(lambda a, b: kernels.matmul(a, b, transpose_a=transpose_a,
                                            transpose_b=transpose_b, out_dtype=out_dtype,
                                            variant=variant))(a, b)
  assert got.shape == (m, n) and got.dtype == out_dtype
  want = _reference(a, b, transpose_a, transpose_b)
  # float32 accumulation: an error of a few float32 ulps of the sum of |products|; a bfloat16
  # result is that, rounded once (half a bfloat16 ulp, 2^-9 relative).
  scale = _reference(jnp.abs(a), jnp.abs(b), transpose_a, transpose_b)
  tolerance = 4 * np.finfo(np.float32).eps * np.sqrt(k) * scale
  if out_dtype == jnp.bfloat16:
    tolerance = tolerance + np.abs(want) * 2.0**-8
  error = np.abs(np.asarray(got, np.float64) - want)
  assert (error <= tolerance).all(), float((error / np.maximum(tolerance, 1e-30)).max())


def _dense_operands(m, k, n, transpose_b, seed=1, dtype=jnp.float32):
  a, b = _operands(m, k, n, False, transpose_b, dtype, seed)
  bias = jnp.asarray(np.random.default_rng(seed + 1).standard_normal(n) * 10, jnp.float32)
  return a, b, bias


def _check_dense(got_c, got_sums, a, b, bias, transpose_b):
  """C = a op(b) + bias (if any) and the column sums of a (if any) against float64; a bfloat16
  C is that, rounded once (within half a bfloat16 ulp, at most 2^-8 relative)."""
  k = a.shape[1]
  want = _reference(a, b, False, transpose_b)
  scale = _reference(jnp.abs(a), jnp.abs(b), False, transpose_b)
  if bias is not None:
    want, scale = want + np.asarray(bias, np.float64), scale + np.abs(np.asarray(bias))
  assert got_c.dtype == a.dtype
  error = np.abs(np.asarray(got_c, np.float64) - want)
  tolerance = 4 * np.finfo(np.float32).eps * np.sqrt(k + 1) * scale
  if a.dtype == jnp.bfloat16:
    tolerance = tolerance + np.abs(want) * 2.0**-8
  assert (error <= tolerance).all(), float((error / np.maximum(tolerance, 1e-30)).max())
  if got_sums is not None:
    a64 = np.asarray(a, np.float64)
    # Summed in row order within a task: a float32 sum's error bound, rows - 1 roundings.
    bound = np.finfo(np.float32).eps * max(a.shape[0], 1) * np.abs(a64).sum(0)
    assert got_sums.shape == (k,) and (np.abs(got_sums - a64.sum(0)) <= bound).all()


@pytest.mark.parametrize('dtype,variant', [(jnp.float32, None), (jnp.bfloat16, 'fma'),
                                           (jnp.bfloat16, 'dot'), (jnp.bfloat16, 'amx')])
@pytest.mark.parametrize('transpose_b', [False, True])
@pytest.mark.parametrize('shape', SHAPES, ids=lambda s: 'x'.join(map(str, s)))
def test_dense_adds_the_bias_and_sums_the_rows(monkeypatch, shape, transpose_b, dtype, variant):
  """`matmul_bias` (the bias as the accumulators' start; bfloat16: added to each complete row
  before its one rounding) and `matmul_sums` (a's column sums: float32, read in the product's
  pass, with more rows than columns each task summing its own rows, with fewer only the tasks
  of the first columns; bfloat16, each task's rows read once more) against float64, in each
  bfloat16 variant (`dot` and `amx` run as the next one down where the CPU lacks them)."""
  if variant:
    monkeypatch.setattr(kernels, 'bf16_matmul_plan', lambda: {'use_kernel': True,
                                                               'variant': variant})
  m, k, n = shape
  a, b, bias = _dense_operands(m, k, n, transpose_b, dtype=dtype)
  if not transpose_b:
    _check_dense(jax.jit(kernels.matmul_bias)(a, b, bias), None, a, b, bias, False)
  c, sums = jax.jit(lambda a, b: kernels.matmul_sums(a, b, transpose_b=transpose_b))(a, b)
  _check_dense(c, sums, a, b, None, transpose_b)


def test_dense_without_a_product():
  """An empty contraction gives the bias; no rows give zero sums."""
  bias = jnp.arange(5, dtype=jnp.float32)
  np.testing.assert_array_equal(kernels.matmul_bias(jnp.ones((3, 0)), jnp.ones((0, 5)), bias),
                                np.broadcast_to(np.arange(5, dtype=np.float32), (3, 5)))
  c, sums = kernels.matmul_sums(jnp.ones((0, 4)), jnp.ones((4, 5)))
  assert c.shape == (0, 5)
  np.testing.assert_array_equal(sums, np.zeros(4, np.float32))
  # bfloat16: the bias rounded; the sums of rows whose product has no columns.
  c = kernels.matmul_bias(jnp.ones((3, 0), jnp.bfloat16), jnp.ones((0, 5), jnp.bfloat16),
                          bias + 1 / 3)
  assert c.dtype == jnp.bfloat16
  np.testing.assert_array_equal(c, np.broadcast_to(jnp.asarray(bias + 1 / 3, jnp.bfloat16),
                                                   (3, 5)))
  c, sums = kernels.matmul_sums(jnp.full((3, 4), 1.5, jnp.bfloat16), jnp.ones((4, 0), jnp.bfloat16))
  assert c.shape == (3, 0)
  np.testing.assert_array_equal(sums, np.full(4, 4.5, np.float32))
  with pytest.raises(ValueError, match='one dtype'):
    kernels.matmul_bias(jnp.ones((3, 4), jnp.bfloat16), jnp.ones((4, 5)), bias)
  with pytest.raises(ValueError, match='gates float32 products only'):
    kernels.matmul_gelu_grad(jnp.ones((3, 5), jnp.bfloat16), jnp.ones((4, 5), jnp.bfloat16),
                             jnp.ones((3, 4)), jnp.ones(4))


def test_bfloat16_products_take_the_measured_variant(monkeypatch):
  """Without `variant`, a bfloat16 product runs on the variant this machine measured fastest
  (the custom call's `variant` attribute: fma 0, dot 1, amx 2); float32 ones always on fma."""
  a, b = _operands(16, 64, 64, False, False, jnp.bfloat16)
  for index, variant in enumerate(kernels.VARIANTS):
    monkeypatch.setattr(kernels, 'bf16_matmul_plan', lambda v=variant: {'use_kernel': True,
                                                                        'variant': v})
    # A fresh function each time: jax keeps traces per function.
    hlo = jax.jit(lambda a, b: kernels.matmul(a, b)).lower(a, b).as_text()
    assert f'variant = {index} : i32' in hlo
    f32 = a.astype(jnp.float32), b.astype(jnp.float32)
    assert 'variant = 0 : i32' in jax.jit(lambda a, b: kernels.matmul(a, b)).lower(*f32).as_text()
  with pytest.raises(ValueError, match="variant='avx'"):
    kernels.matmul(a, b, variant='avx')


def test_amx_runs_where_the_cpu_has_it():
  """The amx variant is built and granted its tiles exactly on CPUs with AMX's bfloat16 tiles
  (elsewhere it runs as dot, and the measurement leaves it out)."""
  assert kernels.has_amx() == ({'amx_tile', 'amx_bf16'} <= cpu_flags())


def test_matmul_under_vmap_and_a_zero_contraction():
  a, b = _operands(3, 64, 40, False, False, jnp.bfloat16)
  stacked = jnp.stack([a, 2 * a])
  got = jax.vmap(lambda x: kernels.matmul(x, b, out_dtype=jnp.float32))(stacked)
  np.testing.assert_allclose(got[1], 2 * got[0], rtol=1e-6)
  empty = kernels.matmul(jnp.ones((4, 0)), jnp.ones((0, 5)))
  np.testing.assert_array_equal(empty, np.zeros((4, 5), np.float32))


def _dense_step(monkeypatch, mode, x, w):
  """A dense layer's output and gradients (input, kernel) through layers.dot_general,
  and whether the compiled step calls the kernel."""
  monkeypatch.setenv('FTJAX_MATMUL', mode)
  dims = (((x.ndim - 1,), (0,)), ((), ()))

  def loss(x, w):
    y = layers.dot_general(x, w, dims)
    return jnp.sum(jnp.sin(y.astype(jnp.float32))), y

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  (_, y), grads = step(x, w)
  return y, grads, 'ftjax_matmul' in step.lower(x, w).as_text()


def _kernel_matches_xla(monkeypatch, dtype, *, seed, tolerance):
  """A dense layer's output and gradients with the kernel and with XLA's dots: the same dtypes
  and shapes, values within `tolerance` (relative, and of the largest value); returns (x, w)."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((2, 70, 96)), dtype)
  w = jnp.asarray(rng.standard_normal((96, 130)) * 0.1, dtype)
  y_kernel, grads_kernel, on_kernel = _dense_step(monkeypatch, 'kernel', x, w)
  y_xla, grads_xla, on_xla = _dense_step(monkeypatch, 'xla', x, w)
  assert on_kernel and not on_xla
  for ours, theirs in zip([y_kernel, *grads_kernel], [y_xla, *grads_xla]):
    assert ours.dtype == theirs.dtype == dtype and ours.shape == theirs.shape
    ours, theirs = np.asarray(ours, np.float32), np.asarray(theirs, np.float32)
    np.testing.assert_allclose(ours, theirs, rtol=tolerance,
                               atol=tolerance * np.abs(theirs).max())
  return x, w


def test_the_bf16_dense_layer_on_the_kernel_matches_xlas_dots(monkeypatch):
  """The same values both ways (float32 accumulation, one rounding to bfloat16): within one
  bfloat16 rounding of each other (the two sum in different orders)."""
  _kernel_matches_xla(monkeypatch, jnp.bfloat16, seed=3, tolerance=2.0**-7)


def _compiled_dots(step, *args) -> tuple[int, int]:
  """(kernel calls, XLA dots) in the compiled HLO of step(*args)."""
  hlo = step.lower(*args).compile().as_text()
  return hlo.count('custom_call_target="ftjax_matmul"'), len(re.findall(r' dot\(', hlo))


def test_the_kernel_serves_only_wide_products(monkeypatch):
  monkeypatch.setenv('FTJAX_MATMUL', 'kernel')
  for on_kernel in (kernels.bf16_matmul_on_kernel, kernels.f32_matmul_on_kernel):
    assert on_kernel(4096, 384, 1536) and on_kernel(1, 64, 64)
    # LoRA's rank-8 factors and a 3-way head stay on XLA.
    assert not on_kernel(4096, 384, 8)
    assert not on_kernel(4096, 8, 384)
    assert not on_kernel(32, 384, 3)
  monkeypatch.setenv('FTJAX_MATMUL', 'xla')
  assert not kernels.bf16_matmul_on_kernel(4096, 384, 1536)
  assert not kernels.f32_matmul_on_kernel(4096, 384, 1536)
  # With the kernel off, a float32 layer is XLA's plain dot (no custom VJP in between).
  x = jnp.ones((8, 96), jnp.float32)
  w = jnp.ones((96, 128), jnp.float32)
  hlo = jax.jit(lambda x, w: layers.dot_general(x, w, (((1,), (0,)), ((), ())))).lower(
      x, w).as_text()
  assert 'ftjax_matmul' not in hlo and re.search(r'stablehlo\.dot_general', hlo)


def test_the_f32_dense_layer_on_the_kernel_matches_xlas_dots(monkeypatch):
  """A float32 dense layer's output, input gradient and weight gradient on the kernel: the
  same values as XLA's three dots to float32 rounding."""
  x, w = _kernel_matches_xla(monkeypatch, jnp.float32, seed=4, tolerance=1e-5)
  # All three products on the kernel, the weight gradient (x^T g) with no transposing copy.
  monkeypatch.setenv('FTJAX_MATMUL', 'kernel')
  dims = (((2,), (0,)), ((), ()))
  step = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(layers.dot_general(x, w, dims))),
                          argnums=(0, 1)))
  assert _compiled_dots(step, x, w) == (3, 0)
  # A frozen weight (no weight gradient asked for): no weight-gradient dot at all.
  frozen = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(layers.dot_general(x, w, dims)))))
  assert _compiled_dots(frozen, x, w) == (2, 0)


def _linear_step(monkeypatch, mode, dtype=jnp.float32):
  """A linear layer's (with bias) output and gradients (input, kernel, bias), and its compiled
  step's text."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv('FTJAX_MATMUL', mode)
  layer = layers.linear(96, 130, ('embed', 'mlp'), std=0.1, dtype=dtype, rngs=nnx.Rngs(0))
  layer.bias[...] = jnp.linspace(-1, 1, 130)
  x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 70, 96)), dtype)

  def loss(layer, x):
    y = layers.dense(layer, x, {})
    return jnp.sum(jnp.sin(y.astype(jnp.float32))), y

  step = jax.jit(nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True))
  (_, y), (d_layer, d_x) = step(layer, x)
  values = [y, d_x, d_layer.kernel[...], d_layer.bias[...]]
  return values, step.lower(layer, x).compile().as_text()


def test_the_f32_linear_layer_folds_its_bias_into_the_kernel(monkeypatch):
  """A float32 linear layer with a bias on the kernel: the forward product starts from the
  bias, and the input gradient's pass returns the bias gradient (`_matmul_bias`): two dense
  calls, no other reduction over the tokens, and XLA's values to float32 rounding."""
  ours, text = _linear_step(monkeypatch, 'kernel')
  theirs, xla_text = _linear_step(monkeypatch, 'xla')
  assert text.count('custom_call_target="ftjax_dense"') == 2 and 'ftjax_dense' not in xla_text
  # XLA's step sums the bias gradient over the tokens; the kernel's has no such reduction.
  bias_sum = re.compile(r'f32\[130\]\{0\} reduce\(')
  assert bias_sum.search(xla_text) and not bias_sum.search(text)
  for got, want in zip(ours, theirs):
    assert got.shape == want.shape and got.dtype == want.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_the_bf16_linear_layer_folds_its_bias_into_the_kernel(monkeypatch):
  """A bfloat16 linear layer on the kernel: its bias added inside the forward product (rounded
  once with it) and its gradient summed from the input gradient's g (two dense calls, no
  reduction over the tokens); XLA's values (which round x w, then
  x w + b) to a bfloat16 step or two."""
  ours, text = _linear_step(monkeypatch, 'kernel', jnp.bfloat16)
  theirs, xla_text = _linear_step(monkeypatch, 'xla', jnp.bfloat16)
  assert text.count('custom_call_target="ftjax_dense"') == 2 and 'ftjax_dense' not in xla_text
  bias_sum = re.compile(r'f32\[130\]\{0\} reduce\(')
  assert bias_sum.search(xla_text) and not bias_sum.search(text)
  names = ('y', 'd_x', 'd_kernel', 'd_bias')
  for name, got, want in zip(names, ours, theirs):
    assert got.shape == want.shape and got.dtype == want.dtype, name
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    tolerance = 2**-6  # d_bias too: a float32 sum of a g a step or two apart, rounded
    np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance * np.abs(want).max(),
                               err_msg=name)


def test_ftjax_matmul_is_checked(monkeypatch):
  monkeypatch.setenv('FTJAX_MATMUL', 'onednn')
  with pytest.raises(FtjaxError, match="FTJAX_MATMUL='onednn': expected one of auto, xla, kernel"):
    kernels.bf16_matmul_on_kernel(64, 64, 64)


def test_auto_measures_once_per_machine_and_keeps_the_verdict(monkeypatch, tmp_path, caplog):
  """`auto` times the kernel's variants against XLA's dot once, writes the verdict beside the
  library and reads it back in later processes (here: after clearing the in-process cache)."""
  monkeypatch.setenv('FTJAX_MATMUL', 'auto')
  monkeypatch.setattr(kernels, '_calibration_path', lambda: tmp_path / 'kernels-x.matmul.json')
  measured = []

  def measure():
    measured.append(1)
    return {'fma': 0.006, 'dot': 0.004, 'amx': 0.005, 'xla': 0.008}

  monkeypatch.setattr(kernels, 'measure_bf16_matmul', measure)
  kernels.bf16_matmul_plan.cache_clear()
  try:
    with caplog.at_level(logging.INFO):
      assert kernels.bf16_matmul_on_kernel(4096, 384, 1536)
    assert ('bfloat16 matmuls on the kernel (dot) (kernel fma 6.00 ms, kernel dot 4.00 ms, '
            'kernel amx 5.00 ms, XLA 8.00 ms' in caplog.text)
    saved = json.loads((tmp_path / 'kernels-x.matmul.json').read_text())
    assert saved == {'use_kernel': True, 'variant': 'dot', 'fma_s': 0.006, 'dot_s': 0.004,
                     'amx_s': 0.005, 'xla_s': 0.008}
    assert kernels.bf16_matmul_plan()['variant'] == 'dot'
    kernels.bf16_matmul_plan.cache_clear()
    (tmp_path / 'kernels-x.matmul.json').write_text(json.dumps({**saved, 'use_kernel': False}))
    assert not kernels.bf16_matmul_on_kernel(4096, 384, 1536)
    assert measured == [1]
    # A file from an older build (no variant) is measured again.
    kernels.bf16_matmul_plan.cache_clear()
    (tmp_path / 'kernels-x.matmul.json').write_text(json.dumps(
        {'use_kernel': True, 'kernel_s': 1.0, 'xla_s': 2.0}))
    assert kernels.bf16_matmul_plan()['variant'] == 'dot' and measured == [1, 1]
    # Within 10% of XLA is not worth a custom call: XLA keeps the product.
    kernels.bf16_matmul_plan.cache_clear()
    (tmp_path / 'kernels-x.matmul.json').unlink()
    monkeypatch.setattr(kernels, 'measure_bf16_matmul',
                        lambda: {'fma': 0.95, 'dot': 1.2, 'xla': 1.0})
    assert not kernels.bf16_matmul_on_kernel(4096, 384, 1536)
    assert kernels.bf16_matmul_plan()['variant'] == 'fma'
    # amx fastest: the kernels take it.
    kernels.bf16_matmul_plan.cache_clear()
    (tmp_path / 'kernels-x.matmul.json').unlink()
    monkeypatch.setattr(kernels, 'measure_bf16_matmul',
                        lambda: {'fma': 2.0, 'dot': 3.0, 'amx': 0.5, 'xla': 1.0})
    plan = kernels.bf16_matmul_plan()
    assert plan['variant'] == 'amx' and plan['use_kernel']
  finally:
    kernels.bf16_matmul_plan.cache_clear()


def test_f32_auto_measures_once_and_keeps_the_verdict(monkeypatch, tmp_path, caplog):
  """float32 layers: the kernel against XLA's dots, timed once, kept beside the library in a
  file of its own; the kernel must take under 0.97 of XLA's time. A verdict against the kernel
  is measured again, in the process and by the next processes, until three have measured it."""
  monkeypatch.setenv('FTJAX_MATMUL', 'auto')
  monkeypatch.setattr(kernels, '_calibration_path',
                      lambda kind='': tmp_path / f'kernels-x.matmul{kind}.json')
  monkeypatch.setattr(kernels, '_REMEASURE_PAUSE_S', 0.0)
  measured = []

  def measure():
    measured.append(1)
    return {'kernel': 0.009, 'xla': 0.010}

  def new_process(times=None):
    if times is not None:
      monkeypatch.setattr(kernels, 'measure_f32_matmul', lambda: next(times))
    kernels.f32_matmul_plan.cache_clear()
    return kernels.f32_matmul_on_kernel(4096, 384, 1536)

  path = tmp_path / 'kernels-x.matmul-f32.json'
  monkeypatch.setattr(kernels, 'measure_f32_matmul', measure)
  try:
    with caplog.at_level(logging.INFO):
      assert new_process()
    assert 'float32 matmuls on the kernel (kernel 9.00 ms, XLA 10.00 ms' in caplog.text
    assert json.loads(path.read_text()) == {'use_kernel': True, 'kernel_s': 0.009,
                                            'xla_s': 0.010, 'processes': 1}
    assert not (tmp_path / 'kernels-x.matmul.json').exists()
    # A kept verdict for the kernel, or one against it that three processes measured: final.
    assert new_process() and measured == [1]
    path.write_text(json.dumps({'use_kernel': False, 'kernel_s': 0.009, 'xla_s': 0.010,
                                'processes': 3}))
    assert not new_process() and measured == [1]
    # Within 3% of XLA: XLA keeps the products, after two more measurements (the best of each
    # side's times) that say so too...
    path.unlink()
    assert not new_process(iter([{'kernel': 0.98, 'xla': 1.0}, {'kernel': 1.5, 'xla': 1.1},
                                 {'kernel': 1.0, 'xla': 1.02}]))
    assert json.loads(path.read_text()) == {'use_kernel': False, 'kernel_s': 0.98,
                                            'xla_s': 1.0, 'processes': 1}
    # ...and the next two processes measure it again, once each, keeping the best times so
    # far; the fourth does not measure.
    assert not new_process(iter([{'kernel': 0.99, 'xla': 0.97}]))
    assert json.loads(path.read_text()) == {'use_kernel': False, 'kernel_s': 0.98,
                                            'xla_s': 0.97, 'processes': 2}
    assert not new_process(iter([{'kernel': 0.96, 'xla': 0.98}]))
    assert json.loads(path.read_text()) == {'use_kernel': False, 'kernel_s': 0.96,
                                            'xla_s': 0.97, 'processes': 3}
    assert not new_process(iter([]))
    # A verdict against the kernel that a later measurement in the same process overturns...
    path.unlink()
    assert new_process(iter([{'kernel': 0.146, 'xla': 0.120}, {'kernel': 0.080, 'xla': 0.095}]))
    assert json.loads(path.read_text()) == {'use_kernel': True, 'kernel_s': 0.080,
                                            'xla_s': 0.095, 'processes': 1}
    # ...or in a later process (a busy machine's three measurements first): the kernel, for good.
    path.unlink()
    assert not new_process(iter([{'kernel': 0.122, 'xla': 0.117}] * 3))
    assert new_process(iter([{'kernel': 0.084, 'xla': 0.090}]))
    assert json.loads(path.read_text()) == {'use_kernel': True, 'kernel_s': 0.084,
                                            'xla_s': 0.090, 'processes': 2}
    assert new_process(iter([]))
    # A plan that this version did not write (no counts, unreadable times) is measured afresh.
    path.write_text(json.dumps({'use_kernel': False, 'kernel_s': 'fast'}))
    assert new_process(iter([{'kernel': 0.08, 'xla': 0.09}]))
    assert json.loads(path.read_text())['processes'] == 1
  finally:
    kernels.f32_matmul_plan.cache_clear()


def test_f32_measurement_times_both_paths():
  """The real measurement (small, so quick): positive times for both, from the same products."""
  times = kernels.measure_f32_matmul(m=64, rounds=2)
  assert set(times) == {'kernel', 'xla'} and all(0 < t < 10 for t in times.values())


def test_bf16_measurement_times_every_variant_and_xla():
  """The real bfloat16 measurement (small, so quick), the bias work on both sides: positive
  times for each variant this CPU runs and for XLA's dots."""
  times = kernels.measure_bf16_matmul(m=64, k=64, n=96, rounds=2)
  want = {'fma', 'dot', 'xla'} | ({'amx'} if kernels.has_amx() else set())
  assert set(times) == want and all(0 < t < 10 for t in times.values())


def test_auto_decides_inside_a_trace(monkeypatch, tmp_path):
  """`auto` decides while a model is being traced: the timing must run, not be staged into the
  trace."""
  monkeypatch.setenv('FTJAX_MATMUL', 'auto')
  path = tmp_path / 'kernels-x.matmul.json'
  monkeypatch.setattr(kernels, '_calibration_path', lambda: path)
  kernels.bf16_matmul_plan.cache_clear()
  try:
    jax.jit(lambda x: x + kernels.bf16_matmul_on_kernel(4096, 384, 1536))(1.0)
  finally:
    kernels.bf16_matmul_plan.cache_clear()
  saved = json.loads(path.read_text())
  variants = kernels.VARIANTS if kernels.has_amx() else ('fma', 'dot')
  times = {v: saved[f'{v}_s'] for v in (*variants, 'xla')}
  assert all(t > 0 for t in times.values()) and ('amx_s' in saved) == kernels.has_amx()
  assert saved['variant'] == min(variants, key=times.__getitem__)
  assert saved['use_kernel'] == (times[saved['variant']] < 0.9 * times['xla'])


def test_an_unavailable_kernel(monkeypatch, caplog):
  monkeypatch.setattr(kernels, '_load', lambda: 'no C++ compiler found')
  kernels._warn_once.cache_clear()
  monkeypatch.setenv('FTJAX_MATMUL', 'auto')
  with caplog.at_level(logging.WARNING):
    assert not kernels.bf16_matmul_on_kernel(4096, 384, 1536)
  assert 'no C++ compiler found' in caplog.text
  monkeypatch.setenv('FTJAX_MATMUL', 'kernel')
  with pytest.raises(kernels.KernelUnavailable, match='FTJAX_MATMUL=kernel, but'):
    kernels.bf16_matmul_on_kernel(4096, 384, 1536)
  with pytest.raises(kernels.KernelUnavailable, match='matmul kernel is unavailable'):
    kernels.matmul(jnp.ones((2, 2)), jnp.ones((2, 2)))


def test_a_bf16_training_run_on_the_kernel(monkeypatch):
  """Two bfloat16 dense layers (float32 master weights) trained a few steps with the kernel and
  with XLA's dots: the same losses within bfloat16 rounding, and falling."""
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((4, 30, 96)), jnp.bfloat16)
  dims = (((2,), (0,)), ((), ()))

  def loss(w1, w2):
    h = jax.nn.gelu(layers.dot_general(x, w1.astype(jnp.bfloat16), dims))
    y = layers.dot_general(h, w2.astype(jnp.bfloat16), dims)
    return jnp.mean(jnp.square(y.astype(jnp.float32) - 1.0))

  def losses(mode):
    monkeypatch.setenv('FTJAX_MATMUL', mode)
    w1 = jnp.asarray(rng.standard_normal((96, 256)) * 0.1, jnp.float32)
    w2 = jnp.asarray(rng.standard_normal((256, 96)) * 0.1, jnp.float32)
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    out = []
    for _ in range(5):
      value, (g1, g2) = step(w1, w2)
      out.append(float(value))
      w1, w2 = w1 - 0.5 * g1, w2 - 0.5 * g2
    return np.array(out)

  state = rng.bit_generator.state
  kernel = losses('kernel')
  rng.bit_generator.state = state
  xla = losses('xla')
  assert kernel[-1] < 0.9 * kernel[0]
  np.testing.assert_allclose(kernel, xla, rtol=2e-2)


def test_an_unwritable_cache_keeps_the_verdict_in_memory(monkeypatch, tmp_path, caplog):
  monkeypatch.setenv('FTJAX_MATMUL', 'auto')
  path = tmp_path / 'missing' / 'kernels-x.matmul.json'
  monkeypatch.setattr(kernels, '_calibration_path', lambda: path)
  monkeypatch.setattr(kernels, 'measure_bf16_matmul', lambda: {'fma': 1.0, 'dot': 1.5, 'xla': 2.0})
  kernels.bf16_matmul_plan.cache_clear()
  try:
    with caplog.at_level(logging.WARNING):
      assert kernels.bf16_matmul_on_kernel(4096, 384, 1536)
  finally:
    kernels.bf16_matmul_plan.cache_clear()
  assert 'cannot keep the matmul measurement' in caplog.text and not path.exists()


@pytest.mark.parametrize('march,needs', OTHER_CPUS)
def test_builds_for_other_cpus_compute_the_same_products(march, needs, kernels_built_for):
  target = f'ftjax_matmul_{march.replace("-", "_")}'
  dense = f'ftjax_dense_{march.replace("-", "_")}'
  plus = f'ftjax_matmul_plus_{march.replace("-", "_")}'
  register_other_build(march, needs, kernels_built_for,
                       {target: 'FtjaxMatmul', dense: 'FtjaxDense', plus: 'FtjaxMatmulPlus'})
  # Variants 0 fma, 1 dot, 2 amx: without their instructions, dot and amx run as fma.
  for (m, k, n), transpose_a, transpose_b, dtype, variant in [
      ((13, 17, 33), False, True, jnp.float32, 0), ((37, 4501, 70), True, False,
                                                     jnp.bfloat16, 1),
      ((97, 385, 64), False, False, jnp.bfloat16, 0), ((5, 7, 9), True, True,
                                                       jnp.bfloat16, 1),
      ((70, 300, 40), True, False, jnp.bfloat16, 2)]:
    a, b = _operands(m, k, n, transpose_a, transpose_b, dtype)
    got = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((m, n), jnp.float32))(
        a, b, transpose_a=transpose_a, transpose_b=transpose_b, variant=np.int32(variant))
    want = _reference(a, b, transpose_a, transpose_b)
    scale = _reference(jnp.abs(a), jnp.abs(b), transpose_a, transpose_b)
    error = np.abs(np.asarray(got, np.float64) - want)
    assert (error <= 4 * np.finfo(np.float32).eps * np.sqrt(k) * scale).all(), (m, k, n)
  # The dense products: bias and column sums (on the portable path, loops after the product).
  for (m, k, n), transpose_b in [((37, 200, 70), True), ((97, 385, 64), False)]:
    a, b, bias = _dense_operands(m, k, n, transpose_b)
    empty = jnp.zeros((0,), jnp.float32)  # No gate (tests/test_layer_kernels.py has one).
    c, sums, _ = jax.ffi.ffi_call(dense, (jax.ShapeDtypeStruct((m, n), jnp.float32),
                                          jax.ShapeDtypeStruct((k,), jnp.float32),
                                          jax.ShapeDtypeStruct((0,), jnp.float32)))(
                                              a, b, bias, empty, empty, transpose_b=transpose_b,
                                              variant=np.int32(0))
    _check_dense(c, sums, a, b, bias, transpose_b)
  # bfloat16: the bias added to the rows before their rounding, the sums of a bfloat16 a.
  for (m, k, n), transpose_b, variant in [((37, 200, 70), True, 1), ((97, 385, 64), False, 0),
                                          ((70, 300, 40), False, 2)]:
    a, b, bias = _dense_operands(m, k, n, transpose_b, dtype=jnp.bfloat16)
    c, sums, _ = jax.ffi.ffi_call(dense, (jax.ShapeDtypeStruct((m, n), jnp.bfloat16),
                                          jax.ShapeDtypeStruct((k,), jnp.float32),
                                          jax.ShapeDtypeStruct((0,), jnp.float32)))(
                                              a, b, bias, empty, empty, transpose_b=transpose_b,
                                              variant=np.int32(variant))
    _check_dense(c, sums, a, b, bias, transpose_b)
  # matmul_plus: the low-rank term a2 b2 (float32: after the product on the portable path;
  # bfloat16: added to each row before its rounding), with and without a first product.
  rng = np.random.default_rng(3)
  for (m, k, n, r), transpose_b2, dtype, variant in [
      ((37, 200, 70, 4), True, jnp.float32, 0), ((97, 385, 64, 8), False, jnp.bfloat16, 1),
      ((30, 100, 33, 2), True, jnp.bfloat16, 0), ((13, 0, 40, 3), False, jnp.bfloat16, 2)]:
    a, b, bias = _dense_operands(m, k, n, False, dtype=dtype)
    a2 = rng.standard_normal((m, r)).astype(np.float32)
    b2 = rng.standard_normal((n, r) if transpose_b2 else (r, n)).astype(np.float32)
    c = jax.ffi.ffi_call(plus, jax.ShapeDtypeStruct((m, n), dtype))(
        a, b, a2, b2, bias, transpose_a=False, transpose_b=False, transpose_b2=transpose_b2,
        variant=np.int32(variant))
    b2_64 = np.asarray(b2, np.float64).T if transpose_b2 else np.asarray(b2, np.float64)
    want = (_reference(a, b, False, False) + np.asarray(bias, np.float64) + a2 @ b2_64)
    scale = (_reference(jnp.abs(a), jnp.abs(b), False, False) + np.abs(np.asarray(bias))
             + np.abs(a2) @ np.abs(b2_64))
    tolerance = 4 * np.finfo(np.float32).eps * np.sqrt(k + r + 1) * scale
    if dtype == jnp.bfloat16:
      tolerance = tolerance + np.abs(want) * 2.0**-8
    assert c.dtype == dtype
    assert (np.abs(np.asarray(c, np.float64) - want) <= tolerance).all(), (march, m, k, n)
