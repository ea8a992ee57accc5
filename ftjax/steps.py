"""The pure train and eval steps: the one jit boundary of the training loop.

The model travels as `graphdef` (static, closed over), `params` (the differentiated, trainable
state inside `TrainState`) and `rest` (everything else: passed in, never differentiated, never
donated). Dropout randomness is `fold_in(state.rng, state.step)`, so a resumed run draws exactly
the masks an uninterrupted one would.
"""

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint must hold to resume bit-for-bit (besides the data position)."""
  step: jax.Array  # int32 scalar: optimizer steps taken.
  params: Any  # nnx.State of the trainable parameters.
  opt_state: optax.OptState
  rng: jax.Array  # Base PRNG key; per-step keys are derived from it.


def _forward(graphdef, params, rest, batch: Batch, *, deterministic: bool, key=None):
  model = nnx.merge(graphdef, params, rest)
  rngs = None if deterministic else nnx.Rngs(dropout=key)
  logits = model(batch['input_ids'], batch['attention_mask'], batch['token_type_ids'],
                 deterministic=deterministic, rngs=rngs)
  return logits.astype(jnp.float32)


def cross_entropy(logits_BxC: jax.Array, labels_B: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy in float32."""
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxC.astype(jnp.float32), labels_B)


def train_step(state: TrainState, batch: Batch, rest, *, graphdef, tx: optax.GradientTransformation,
               schedule: optax.Schedule) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on `batch`; returns the new state and scalar metrics."""
  key = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    logits = _forward(graphdef, params, rest, batch, deterministic=False, key=key)
    loss = cross_entropy(logits, batch['label']).mean()
    accuracy = (logits.argmax(-1) == batch['label']).mean()
    return loss, accuracy

  (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {
      'loss': loss,
      'accuracy': accuracy,
      'grad_norm': optax.global_norm(grads),
      'lr': schedule(state.step),
  }
  new_state = dataclasses.replace(state, step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, metrics


def eval_step(params, rest, batch: Batch, *, graphdef) -> dict[str, jax.Array]:
  """Per-example predictions and losses; the host turns them into metrics (padding weighted 0)."""
  logits = _forward(graphdef, params, rest, batch, deterministic=True)
  return {'prediction': logits.argmax(-1), 'loss': cross_entropy(logits, batch['label'])}


def jit_steps(graphdef, tx, schedule):
  """Compiles the two steps once; the train state is donated so its buffers are reused."""
  train = jax.jit(functools.partial(train_step, graphdef=graphdef, tx=tx, schedule=schedule),
                  donate_argnums=0)
  evaluate = jax.jit(functools.partial(eval_step, graphdef=graphdef))
  return train, evaluate
