"""ftjax's AdamW (gradient clipping folded into its moments) against optax's own transforms."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ftjax import configs, kernels, optim, params
from ftjax.errors import FtjaxError
from ftjax.models import bert
from ftjax.models.heads import SequenceClassifier

TINY = bert.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                       intermediate_size=37, max_position_embeddings=64)


def _optax_reference(cfg, total_steps, groups):
  """What make_optimizer built before: optax.clip_by_global_norm, then an optax.adamw per group."""
  schedule = optim.make_schedule(cfg, total_steps)

  def group_adamw(rule):
    lr = lambda step: schedule(step) * rule.lr_mult
    if rule.weight_decay is None:
      return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                         mask=optim.decay_mask)
    return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                       weight_decay=cfg.weight_decay if rule.weight_decay else 0.0)

  owner = {path: g.name for g in groups for path in g.paths}
  labels = lambda tree: jax.tree_util.tree_map_with_path(
      lambda keypath, _: owner[params.path_str(keypath)], tree)
  return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), optax.partition(
      {g.name: group_adamw(g.rule) for g in groups if g.rule.trainable}, labels))


@pytest.mark.parametrize('grad_size', [1e-3, 10.0])  # Global norm below and above the clip.
def test_updates_match_optax_clip_then_adamw(grad_size):
  rngs = nnx.Rngs(0)
  model = SequenceClassifier(bert.BertModel(TINY, rngs=rngs), 3, rngs=rngs)
  config = configs.load_config('configs/minilm_vader.py')
  # Layer-wise decay: one group (own learning rate) per layer; biases and norms not decayed.
  config.policy.preset = 'layerwise_lr_decay'
  config.optim.warmup_fraction = 0.5
  groups = params.build_policy(config.policy, model)
  _, trainable, _ = nnx.split(model, params.trainable_filter(params.trainable_paths(groups, 0)),
                              ...)
  ours, _ = optim.make_optimizer(config.optim, 8, groups)
  reference = _optax_reference(config.optim, 8, groups)
  p_ours = p_ref = trainable
  s_ours, s_ref = ours.init(trainable), reference.init(trainable)
  for step in range(4):
    grads = jax.tree.map(
        lambda x, i: grad_size * jax.random.normal(jax.random.key(step * 1000 + i), x.shape),
        trainable, jax.tree.unflatten(jax.tree.structure(trainable),
                                      list(range(len(jax.tree.leaves(trainable))))))
    clipped = optax.global_norm(grads) > config.optim.grad_clip
    assert bool(clipped) == (grad_size > 1)
    u_ours, s_ours = jax.jit(ours.update)(grads, s_ours, p_ours)
    u_ref, s_ref = jax.jit(reference.update)(grads, s_ref, p_ref)
    # Rounding differs ((c * g) * g against g ** 2): relative to each tensor's largest update.
    for a, b in zip(jax.tree.leaves(u_ours), jax.tree.leaves(u_ref), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))
    p_ours, p_ref = optax.apply_updates(p_ours, u_ours), optax.apply_updates(p_ref, u_ref)
  moved = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in
           zip(jax.tree.leaves(p_ours), jax.tree.leaves(trainable))]
  assert min(moved) > 0  # Every parameter trained (warm-up's first step has lr 0).
  for a, b in zip(jax.tree.leaves(p_ours), jax.tree.leaves(p_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


def test_no_written_clipped_gradients_or_squares():
  """Clipping inside the moments: XLA writes nothing gradient-sized besides moments and updates."""
  tx = optim.clip_by_global_norm(1.0, optim.adamw(1e-3, b1=0.9, b2=0.999, eps=1e-8,
                                                  weight_decay=0.01))
  p = {'w': jnp.ones((256, 128))}
  step = jax.jit(lambda g, s, p: tx.update(g, s, p))
  hlo = step.lower(p, tx.init(p), p).compile().as_text()
  entry = hlo[hlo.index('ENTRY'):]
  # Gradient-sized arrays written by the step: the two moments and the update, nothing else.
  written = [line for line in entry.splitlines() if '= f32[256,128]' in line
             and 'parameter(' not in line and 'bitcast(' not in line]
  assert len(written) == 3, '\n'.join(written)


def test_adamw_update_without_params_says_what_it_needs():
  tx = optim.adamw(1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)
  grads = {'w': jnp.ones((2,))}
  with pytest.raises(ValueError, match='needs the params'):
    tx.update(grads, tx.init(grads))


def _policy_optimizer(**overrides):
  """make_optimizer's AdamW on the tiny BERT's trainable state: a group per layer (layer-wise
  learning rates), biases and norms not decayed, L2-SP in front."""
  rngs = nnx.Rngs(0)
  model = SequenceClassifier(bert.BertModel(TINY, rngs=rngs), 3, rngs=rngs)
  config = configs.load_config('configs/minilm_vader.py')
  config.policy.preset = 'layerwise_lr_decay'
  config.optim.warmup_fraction = 0.25
  config.optim.l2_sp = 0.01
  for key, value in overrides.items():
    config.optim[key] = value
  groups = params.build_policy(config.policy, model)
  _, trainable, _ = nnx.split(model, params.trainable_filter(params.trainable_paths(groups, 0)),
                              ...)
  tx, _ = optim.make_optimizer(config.optim, 8, groups)
  return tx, trainable


def _apply_steps(tx, trainable, grad_size, mode, monkeypatch):
  """Four jitted `tx.apply` steps (the state donated) with FTJAX_ADAMW=mode at trace time."""
  monkeypatch.setenv('FTJAX_ADAMW', mode)
  step = jax.jit(lambda p, s, g: tx.apply(g, s, p), donate_argnums=(0, 1))
  p = jax.tree.map(jnp.copy, trainable)
  s = tx.init(p)
  for i in range(4):
    g = jax.tree.map(lambda x: grad_size * jax.random.normal(jax.random.key(i), x.shape), p)
    p, s = step(p, s, g)
  return p, s, step.lower(p, s, g).as_text()


@pytest.mark.parametrize('grad_size', [1e-3, 10.0])  # Global norm below and above the clip.
def test_apply_on_the_adamw_kernel_matches_xla(grad_size, monkeypatch):
  tx, trainable = _policy_optimizer()
  p_xla, s_xla, hlo_xla = _apply_steps(tx, trainable, grad_size, 'xla', monkeypatch)
  p_kernel, s_kernel, hlo_kernel = _apply_steps(tx, trainable, grad_size, 'kernel', monkeypatch)
  assert 'ftjax_adamw' in hlo_kernel and 'ftjax_adamw' not in hlo_xla
  # Within float32 rounding: the kernel does XLA's operations (fused multiply-adds, reciprocals
  # of the bias corrections), but the scalars they take are computed in other fusions.
  for a, b in zip(jax.tree.leaves(s_xla), jax.tree.leaves(s_kernel), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * float(np.abs(a).max()))
  for a, b, p0 in zip(jax.tree.leaves(p_xla), jax.tree.leaves(p_kernel),
                      jax.tree.leaves(trainable), strict=True):
    moved = float(np.abs(np.asarray(a) - np.asarray(p0)).max())
    assert moved > 0
    np.testing.assert_allclose(a, b, rtol=3e-7, atol=1e-6 * moved)


def test_apply_matches_update_then_apply_updates(monkeypatch):
  tx, trainable = _policy_optimizer()
  p_apply, s_apply, _ = _apply_steps(tx, trainable, 1.0, 'xla', monkeypatch)
  p, s = trainable, tx.init(trainable)
  update = jax.jit(tx.update)
  for i in range(4):
    g = jax.tree.map(lambda x: jax.random.normal(jax.random.key(i), x.shape), p)
    u, s = update(g, s, p)
    p = optax.apply_updates(p, u)
  for a, b in zip(jax.tree.leaves((p_apply, s_apply)), jax.tree.leaves((p, s)), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
  # Any optax transformation steps through optim.apply_updates too.
  sgd = optax.sgd(0.5)
  new, _ = optim.apply_updates(sgd, {'w': jnp.ones(2)}, sgd.init({'w': jnp.ones(2)}),
                               {'w': jnp.ones(2)})
  np.testing.assert_array_equal(new['w'], [0.5, 0.5])


def test_adamw_kernel_updates_the_donated_state_in_place(monkeypatch):
  monkeypatch.setenv('FTJAX_ADAMW', 'kernel')
  tx, _ = optim.make_optimizer(configs.load_config('configs/minilm_vader.py').optim, 8)
  p = {'w': jnp.ones((512, 256)), 'b': jnp.zeros((256,))}
  s = tx.init(p)
  # Donated buffers pair with outputs by shape in order, so the parameters come first both ways.
  step = jax.jit(lambda p, s, g: tx.apply(g, s, p), donate_argnums=(0, 1))
  hlo = step.lower(p, s, p).compile().as_text()
  entry = hlo[hlo.index('ENTRY'):]
  # One custom call for the decayed and one for the other parameters; no copies of the state.
  assert entry.count('custom_call_target="ftjax_adamw"') == 2
  assert not [line for line in entry.splitlines() if ' copy(' in line and '512,256' in line]
  pointers = [x.unsafe_buffer_pointer() for x in (p['w'], s[0].mu['w'])]
  new_p, new_s = step(p, s, jax.tree.map(jnp.ones_like, p))
  assert [x.unsafe_buffer_pointer() for x in (new_p['w'], new_s[0].mu['w'])] == pointers
  assert float(new_p['w'][0, 0]) < 1.0


def test_bad_adamw_kernel_choice_is_one_clear_error(monkeypatch):
  monkeypatch.setenv('FTJAX_ADAMW', 'fused')
  with pytest.raises(FtjaxError, match="FTJAX_ADAMW='fused': expected one of auto, xla, kernel"):
    kernels.check_choices()
