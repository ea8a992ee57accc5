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


def _weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def train_step(state: TrainState, batch: Batch, rest, *, graphdef, tx: optax.GradientTransformation,
               schedule: optax.Schedule, task) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on `batch`; returns the new state and scalar metrics.

  The loss is the task's weighted mean over items (examples or tokens), so padding never counts.
  """
  key = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    model = nnx.merge(graphdef, params, rest)
    logits = task.forward(model, batch, deterministic=False, rngs=nnx.Rngs(dropout=key))
    losses, weights, correct = task.losses(logits, batch)
    aux = {} if correct is None else {'accuracy': _weighted_mean(correct, weights)}
    return _weighted_mean(losses, weights), aux

  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {
      'loss': loss,
      **aux,
      'grad_norm': optax.global_norm(grads),
      'lr': schedule(state.step),
  }
  new_state = dataclasses.replace(state, step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, metrics


def eval_step(params, rest, batch: Batch, *, graphdef, task) -> dict[str, jax.Array]:
  """The task's per-item outputs; the host turns them into metrics (padding weighted 0)."""
  model = nnx.merge(graphdef, params, rest)
  return task.eval_outputs(task.forward(model, batch, deterministic=True), batch)


def jit_steps(graphdef, tx, schedule, task):
  """Compiles the two steps once; the train state is donated so its buffers are reused."""
  train = jax.jit(functools.partial(train_step, graphdef=graphdef, tx=tx, schedule=schedule,
                                    task=task), donate_argnums=0)
  evaluate = jax.jit(functools.partial(eval_step, graphdef=graphdef, task=task))
  return train, evaluate
