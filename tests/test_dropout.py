"""Randomness: the hash-based dropout mask (keep rate, independence) and the host-counted Rngs."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax.models import layers


@pytest.mark.parametrize('rate', [0.1, 0.5])
def test_keep_rate_and_independence(rate):
  key = jax.random.key(0)
  masks = [np.asarray(layers.keep_mask(jax.random.fold_in(key, i), (512, 1024), rate))
           for i in range(4)]
  keep = 1 - rate
  n = masks[0].size
  tolerance = 5 * np.sqrt(keep * rate / n)  # 5 standard deviations of the mean.
  for mask in masks:
    assert abs(mask.mean() - keep) < tolerance
    # Neighbours along both axes are independent: P(both kept) = keep^2.
    assert abs((mask[:, 1:] & mask[:, :-1]).mean() - keep**2) < 2 * tolerance
    assert abs((mask[1:] & mask[:-1]).mean() - keep**2) < 2 * tolerance
  # Masks of different keys (steps, layers) are independent, and a key repeats its mask.
  for a, b in ((0, 1), (1, 2), (0, 3)):
    assert abs((masks[a] & masks[b]).mean() - keep**2) < 2 * tolerance
  np.testing.assert_array_equal(
      masks[2], layers.keep_mask(jax.random.fold_in(key, 2), (512, 1024), rate))


def test_dropout_scales_kept_values_and_is_off_when_deterministic():
  dropout = layers.Dropout(0.25)
  x = jnp.ones((64, 256))
  y = dropout(x, deterministic=False, rngs=nnx.Rngs(dropout=1))
  kept = np.asarray(y) != 0
  np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.75)
  assert abs(kept.mean() - 0.75) < 0.02
  np.testing.assert_array_equal(dropout(x, deterministic=True), x)
  np.testing.assert_array_equal(layers.Dropout(0.0)(x, deterministic=False), x)
  with pytest.raises(ValueError, match='rngs'):
    dropout(x, deterministic=False)


def test_broadcast_dims_share_the_mask():
  dropout = layers.Dropout(0.5, broadcast_dims=(0,))
  y = np.asarray(dropout(jnp.ones((8, 300)), deterministic=False, rngs=nnx.Rngs(dropout=0)))
  assert (y == y[0]).all() and 0 < (y[0] != 0).mean() < 1


def test_host_counted_rngs_draw_the_keys_of_nnx_rngs():
  """`layers.rngs` (used to build models and in the train step) changes no key drawn."""

  def draws(make, key):
    streams = make(0, dropout=key)
    return jnp.stack([jax.random.key_data(k) for k in (
        streams.params(), streams.dropout(), streams.params(), streams(), streams.dropout())])

  key = jax.random.key(7)
  expected = draws(nnx.Rngs, key)
  assert len(np.unique(np.asarray(expected).reshape(5, -1), axis=0)) == 5  # All different.
  np.testing.assert_array_equal(draws(layers.rngs, key), expected)
  # Traced (jit) and in a trace that is kept and run later: each draw its own count.
  np.testing.assert_array_equal(jax.jit(lambda k: draws(layers.rngs, k))(key), expected)
  assert jax.eval_shape(lambda k: draws(layers.rngs, k), key).shape == expected.shape
  # The counter stays on the host inside a trace: no traced update reaches it.
  seen = []
  jax.jit(lambda k: seen.append(type(layers.rngs(dropout=k).dropout.count.get_value())) or 0)(key)
  assert seen == [np.ndarray]
