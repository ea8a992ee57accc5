"""The parameter policy: presets, exactly-one matching, learning rates, frozen means frozen."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ftjax import configs, optim, params, steps, tasks
from ftjax.errors import FtjaxError
from ftjax.models import bert
from ftjax.models.heads import SequenceClassifier

TINY = bert.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                       intermediate_size=37, max_position_embeddings=64)


@pytest.fixture
def model():
  rngs = nnx.Rngs(0)
  return SequenceClassifier(bert.BertModel(TINY, rngs=rngs), 3, rngs=rngs)


def _policy(preset, **kw):
  config = configs.load_config('configs/minilm_vader.py')
  policy = config.policy
  policy.preset = preset
  for k, v in kw.items():
    policy[k] = v
  return policy


def _by_path(groups):
  return {p: g for g in groups for p in g.paths}


@pytest.mark.parametrize('preset', [p for p in params.PRESETS if p not in ('custom', 'peft')])
def test_every_preset_covers_every_parameter_once(model, preset):
  groups = params.build_policy(_policy(preset), model)
  owner = _by_path(groups)
  assert set(owner) == set(params.param_paths(model))
  assert sum(len(g.paths) for g in groups) == len(owner)
  assert owner['classifier/kernel'].rule.trainable  # The new head always trains.


def test_presets_choose_the_right_parameters(model):
  head = _by_path(params.build_policy(_policy('head_only'), model))
  assert {p for p, g in head.items() if g.rule.trainable} == {'classifier/kernel',
                                                               'classifier/bias'}
  bitfit = _by_path(params.build_policy(_policy('bitfit'), model))
  trained = {p for p, g in bitfit.items() if g.rule.trainable}
  assert trained == {p for p in bitfit if p.endswith('/bias') or p.startswith('classifier/')}
  lower = _by_path(params.build_policy(_policy('freeze_lower', freeze_lower_layers=2), model))
  for p, g in lower.items():
    frozen = 'embeddings/' in p or '/layers/0/' in p or '/layers/1/' in p
    assert g.rule.trainable != frozen, p


def test_layerwise_lr_decay_multipliers(model):
  groups = _by_path(params.build_policy(_policy('layerwise_lr_decay', layer_decay=0.5), model))
  n = TINY.num_hidden_layers
  for i in range(n):
    assert groups[f'encoder/layers/{i}/attention/query/kernel'].rule.lr_mult == 0.5 ** (n - i)
  assert groups['encoder/embeddings/word_embeddings/embedding'].rule.lr_mult == 0.5 ** (n + 1)
  assert groups['classifier/kernel'].rule.lr_mult == 1.0


def test_gradual_unfreeze_phases(model):
  groups = params.build_policy(_policy('gradual_unfreeze', unfreeze_every=10), model)
  assert params.phase_starts(groups) == [0, 10, 20, 30, 40, 50]
  at = lambda step: params.trainable_paths(groups, step)
  assert at(0) == {'classifier/kernel', 'classifier/bias'}
  assert all('/layers/3/' in p for p in at(10) - at(0))
  assert at(50) == set(params.param_paths(model))


@pytest.mark.parametrize('rules, expected', [
    ((('.*', {}), ('classifier', {'trainable': False})), 'more than one policy rule'),
    ((('^classifier/', {}),), 'no policy rule matches'),
    ((('^classifier/', {}), ('nothing_here', {}), ('^encoder/', {})), 'matches no parameter'),
    ((('[', {}),), 'is invalid'),
    ((('.*', {'lr': 2.0}),), 'unknown field'),
    ((('.*', {'lr_mult': -1.0}),), 'must be >= 0'),
])
def test_bad_rules_fail_with_the_fix(model, rules, expected):
  with pytest.raises(FtjaxError, match=expected):
    params.build_policy(_policy('custom', rules=rules), model)


def test_unknown_preset(model):
  with pytest.raises(FtjaxError, match='unknown policy.preset'):
    params.build_policy(_policy('lora_all_the_things'), model)


def _train_a_few_steps(model, policy, n=3, l2_sp=0.0):
  groups = params.build_policy(policy, model)
  optim_cfg = configs.load_config('configs/minilm_vader.py').optim
  optim_cfg.l2_sp = l2_sp
  tx, schedule = optim.make_optimizer(optim_cfg, 10, groups)
  graphdef, trainable, rest = nnx.split(
      model, params.trainable_filter(params.trainable_paths(groups, 0)), ...)
  state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                           opt_state=tx.init(trainable), rng=jax.random.key(0))
  train_step, _ = steps.jit_steps(graphdef, tx, schedule, tasks.get_task('classification'))
  batch = {'input_ids': jnp.arange(16).reshape(2, 8) % 99,
           'attention_mask': jnp.ones((2, 8), jnp.int32),
           'token_type_ids': jnp.zeros((2, 8), jnp.int32), 'label': jnp.array([0, 2])}
  before = jax.tree.map(np.array, rest)
  for _ in range(n):
    state, _ = train_step(state, batch, rest)
  return state, before, rest


def test_frozen_parameters_stay_bit_for_bit_and_have_no_optimizer_state(model):
  policy = _policy('freeze_lower', freeze_lower_layers=2)
  initial = {p: np.array(v.get_value()) for p, v in params.param_paths(model).items()}
  state, before, rest = _train_a_few_steps(model, policy)
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(rest)):
    np.testing.assert_array_equal(a, b)
  trained = {params.path_str(k) for k, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  assert not any('embeddings/' in p or '/layers/0/' in p for p in trained)
  moved = [p for p in trained if p.endswith('kernel')]
  final = {params.path_str(k): np.array(v)
           for k, v in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  assert any(not np.array_equal(final[p], initial[p]) for p in moved)
  # AdamW holds two moments per trainable parameter and nothing for the frozen ones.
  num_trainable = sum(x.size for x in jax.tree.leaves(state.params))
  opt_floats = sum(x.size for x in jax.tree.leaves(state.opt_state) if jnp.ndim(x) > 0)
  assert opt_floats == 2 * num_trainable


def test_lr_multiplier_scales_the_update(model):
  # With lr_mult 0 for the encoder, only the head moves; AdamW steps are lr-proportional.
  policy = _policy('custom', rules=(('^classifier/', {}), ('^encoder/', {'lr_mult': 0.0})))
  initial = {p: np.array(v.get_value()) for p, v in params.param_paths(model).items()}
  state, _, _ = _train_a_few_steps(model, policy)
  final = {params.path_str(k): np.array(v)
           for k, v in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  assert not np.array_equal(final['classifier/kernel'], initial['classifier/kernel'])
  for p in final:
    if p.startswith('encoder/') and p.endswith('kernel'):
      # Weight decay is also scaled by the learning rate, so nothing at all changes.
      np.testing.assert_array_equal(final[p], initial[p])


def test_policy_table_lists_groups_and_fraction(model):
  groups = params.build_policy(_policy('head_only'), model)
  table = params.format_table(groups, 1e-4, 0.01)
  assert '^classifier/' in table and 'trainable: ' in table
  head = sum(g.num_params for g in groups if g.rule.trainable)
  assert f'{head:,}' in table


def test_l2_sp_pulls_toward_the_anchor():
  tx = optim.l2_sp(0.5)
  state = tx.init({'w': jnp.ones(3)})
  updates, _ = tx.update({'w': jnp.full(3, 0.25)}, state, {'w': jnp.full(3, 3.0)})
  np.testing.assert_allclose(updates['w'], 0.25 + 0.5 * (3.0 - 1.0))


def test_l2_sp_keeps_pretrained_weights_closer_and_never_anchors_the_head():
  def distance(strength):
    rngs = nnx.Rngs(0)
    model = SequenceClassifier(bert.BertModel(TINY, rngs=rngs), 3, rngs=rngs)
    initial = {p: np.array(v.get_value()) for p, v in params.param_paths(model).items()}
    state, _, _ = _train_a_few_steps(model, _policy('full'), n=6, l2_sp=strength)
    anchored = {params.path_str(k) for k, _ in
                jax.tree_util.tree_flatten_with_path(state.opt_state[0])[0]}
    final = {params.path_str(k): np.array(v)
             for k, v in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    encoder = [p for p in final if p.startswith('encoder/')]
    return sum(np.abs(final[p] - initial[p]).sum() for p in encoder), anchored

  free, _ = distance(0.0)
  pulled, anchored = distance(1000.0)
  assert pulled < 0.5 * free
  assert anchored and not any('classifier' in p for p in anchored)


def test_peft_preset_trains_only_the_new_variables_and_the_head(model):
  from ftjax.peft import lora
  lora.apply_lora(model, targets=r'attention/(query|value)$', rank=2, alpha=4.0,
                  rngs=nnx.Rngs(0))
  groups = _by_path(params.build_policy(_policy('peft'), model, r'/lora_[ab]$'))
  trained = {p for p, g in groups.items() if g.rule.trainable}
  assert trained == {p for p in groups if p.startswith('classifier/') or '/lora_' in p}
  assert len(trained) == 2 + 2 * 2 * TINY.num_hidden_layers
  with pytest.raises(FtjaxError, match="must be 'peft'"):
    params.build_policy(_policy('full'), model, r'/lora_[ab]$')
