"""Frozen weights held in the compute dtype (params.hold_frozen_in_compute_dtype).

The guard is bit-equality: a bfloat16 run whose never-trained weights are held in bfloat16
computes exactly the losses and updates of the run that keeps them float32 and casts them at
every use. The dtype checks say which weights it may touch: never a trained one (gradual
unfreezing included), never a norm scale, never a kernel DoRA reads at full precision.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ftjax import configs, hub, optim, params, peft, steps, tasks
from ftjax.models import bert
from ftjax.models.heads import SequenceClassifier

TINY = bert.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=37, max_position_embeddings=64)


def _config(*overrides):
  config = configs.load_config('configs/minilm_vader.py')
  configs.apply_overrides(config, list(overrides))
  return config


def _tiny_bert(dtype=jnp.bfloat16):
  rngs = nnx.Rngs(0)
  return SequenceClassifier(bert.BertModel(TINY, dtype=dtype, rngs=rngs), 3, rngs=rngs)


def _dtypes(model):
  return {p: v.get_value().dtype for p, v in params.param_paths(model).items()}


def _train(model, config, groups, batch, task, *, hold: bool, n: int = 3):
  """Losses and final trainable parameters of `n` steps (a fresh copy of `model`)."""
  model = nnx.clone(model)
  if hold:
    params.hold_frozen_in_compute_dtype(model, groups)
  tx, schedule = optim.make_optimizer(config.optim, 100, groups)
  graphdef, trainable, rest = nnx.split(
      model, params.trainable_filter(params.trainable_paths(groups, 0)), ...)
  trainable = jax.tree.map(jnp.copy, trainable)  # The step donates them; `model` shares them.
  state = steps.TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                           opt_state=tx.init(trainable), rng=jax.random.key(0))
  train_step, _ = steps.jit_steps(graphdef, tx, schedule, tasks.get_task(task))
  losses = []
  for _ in range(n):
    state, metrics = train_step(state, batch, rest)
    losses.append(np.asarray(metrics['loss']))
  return losses, [np.asarray(x) for x in jax.tree.leaves(state.params)]


def _assert_same_bits(model, config, groups, batch, task='classification'):
  cast_losses, cast_params = _train(model, config, groups, batch, task, hold=True)
  kept_losses, kept_params = _train(model, config, groups, batch, task, hold=False)
  np.testing.assert_array_equal(cast_losses, kept_losses)
  for a, b in zip(cast_params, kept_params, strict=True):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(cast_params[-1], _trainable_leaves(model, groups)[-1])  # They moved.


def _trainable_leaves(model, groups):
  _, trainable, _ = nnx.split(model, params.trainable_filter(params.trainable_paths(groups, 0)),
                              ...)
  return [np.asarray(x) for x in jax.tree.leaves(trainable)]


BERT_BATCH = {'input_ids': jnp.arange(16).reshape(2, 8) % 99,
              'attention_mask': jnp.array([[1] * 8, [1] * 5 + [0] * 3], jnp.int32),
              'token_type_ids': jnp.zeros((2, 8), jnp.int32), 'label': jnp.array([0, 2])}


@pytest.mark.parametrize('overrides', [
    ('policy.preset=head_only', 'peft.method=none'),
    ('policy.preset=peft', 'peft.method=lora'),
    ('policy.preset=peft', 'peft.method=ia3'),
    ('policy.preset=peft', 'peft.method=houlsby'),
    ('policy.preset=freeze_lower', 'policy.freeze_lower_layers=1', 'peft.method=none'),
])
def test_frozen_weights_in_bfloat16_compute_the_same_bits(overrides):
  config = _config(*overrides)
  model = _tiny_bert()
  groups = params.build_policy(config.policy, model, peft.apply(model, config.peft, seed=0))
  _assert_same_bits(model, config, groups, BERT_BATCH)


def test_only_never_trained_linear_and_embedding_weights_change_dtype():
  config = _config('policy.preset=peft', 'peft.method=lora')
  model = _tiny_bert()
  groups = params.build_policy(config.policy, model, peft.apply(model, config.peft, seed=0))
  trained = params.trainable_paths(groups, 0)
  count, saved = params.hold_frozen_in_compute_dtype(model, groups)
  dtypes = _dtypes(model)
  held = {p for p, d in dtypes.items() if d == jnp.bfloat16}
  assert held and all(d in (jnp.bfloat16, jnp.float32) for d in dtypes.values())
  assert not held & trained  # LoRA factors and the head stay float32 master weights.
  assert all(p.endswith(('/kernel', '/bias', '/embedding')) for p in held)
  assert all(dtypes[p] == jnp.float32 for p in dtypes if 'norm' in p)  # Norm scales untouched.
  # The LoRA layers' own base weights are held too (not DoRA), and so is the word embedding.
  assert 'encoder/layers/0/attention/query/kernel' in held
  assert 'encoder/embeddings/word_embeddings/embedding' in held
  sizes = {p: v.get_value().size for p, v in params.param_paths(model).items()}
  assert count == sum(sizes[p] for p in held) and saved == 2 * count


def test_dora_kernels_and_later_unfrozen_weights_stay_float32():
  config = _config('policy.preset=peft', 'peft.method=lora', 'peft.lora.dora=True')
  model = _tiny_bert()
  groups = params.build_policy(config.policy, model, peft.apply(model, config.peft, seed=0))
  params.hold_frozen_in_compute_dtype(model, groups)
  dtypes = _dtypes(model)
  # DoRA's magnitudes divide by the kernel's float32 column norms: its layers keep float32.
  assert dtypes['encoder/layers/0/attention/query/kernel'] == jnp.float32
  assert dtypes['encoder/layers/0/attention/key/kernel'] == jnp.bfloat16
  model = _tiny_bert()
  groups = params.build_policy(config.policy, model, peft.apply(model, config.peft, seed=0))
  _assert_same_bits(model, config, groups, BERT_BATCH)

  config = _config('policy.preset=gradual_unfreeze', 'policy.unfreeze_every=2', 'peft.method=none')
  model = _tiny_bert()
  groups = params.build_policy(config.policy, model)
  assert params.hold_frozen_in_compute_dtype(model, groups) == (0, 0)  # Everything trains later.


def test_float32_models_are_left_alone():
  config = _config('policy.preset=head_only', 'peft.method=none')
  model = _tiny_bert(jnp.float32)
  groups = params.build_policy(config.policy, model)
  assert params.hold_frozen_in_compute_dtype(model, groups) == (0, 0)
  assert set(_dtypes(model).values()) == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize('fixture,task,pooling', [('tiny_llama_dir', 'causal_lm', 'mean'),
                                                  ('tiny_gpt2_dir', 'classification', 'last')])
def test_decoder_families_compute_the_same_bits(fixture, task, pooling, request):
  # Llama: untied lm_head, RMSNorm; GPT-2: its head ties to the word embeddings.
  model, _, _ = hub.load_model(str(request.getfixturevalue(fixture)), task=task, num_labels=3,
                               pooling=pooling, dtype='bfloat16')
  config = _config('policy.preset=peft', 'peft.method=lora')
  groups = params.build_policy(config.policy, model, peft.apply(model, config.peft, seed=0))
  ids = jnp.array([[1, 5, 9, 13, 7, 0], [1, 22, 8, 40, 41, 42]], jnp.int32)
  mask = (ids != 0).astype(jnp.int32).at[:, 0].set(1)
  batch = {'input_ids': ids, 'attention_mask': mask}
  batch.update({'labels': ids} if task == 'causal_lm' else
               {'label': jnp.array([0, 2]), 'token_type_ids': jnp.zeros_like(ids)})
  count, _ = params.hold_frozen_in_compute_dtype(nnx.clone(model), groups)
  assert count > 0
  _assert_same_bits(model, config, groups, batch, task)

