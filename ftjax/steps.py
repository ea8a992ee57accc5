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

from ftjax import optim, parallel
from ftjax.models import layers

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint must hold to resume bit-for-bit (besides the data position)."""
  step: jax.Array  # int32 scalar: optimizer steps taken.
  params: Any  # nnx.State of the trainable parameters.
  opt_state: optax.OptState
  rng: jax.Array  # Base PRNG key; per-step keys are derived from it.


def train_step(state: TrainState, batch: Batch, rest, *, graphdef, tx: optax.GradientTransformation,
               schedule: optax.Schedule, task, accum_steps: int = 1
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on `batch`; returns the new state and scalar metrics.

  The loss is the task's weighted mean over items (examples or tokens), so padding never counts.
  With `accum_steps` > 1 the batch is split into that many micro-batches whose gradients are
  summed in a `lax.scan` (one micro-batch's activations in memory at a time) and divided by the
  batch's total weight: the same update as the whole batch at once. Micro-batch i takes rows
  i, i + accum_steps, ..., so each device keeps its own rows.
  """
  key = jax.random.fold_in(state.rng, state.step)
  has_accuracy = 'accuracy' in task.metrics

  def sums(params, micro: Batch, micro_key):
    model = nnx.merge(graphdef, params, rest)
    logits = task.forward(model, micro, deterministic=False, rngs=layers.rngs(dropout=micro_key))
    losses, weights, correct = task.losses(logits, micro)
    correct_sum = jnp.sum(correct * weights) if has_accuracy else jnp.zeros(())
    return jnp.sum(losses * weights), (jnp.sum(weights), correct_sum)

  if accum_steps == 1:
    # The mean itself is differentiated, so the gradients come out already divided by the
    # weight (the division rides on the loss's cotangent) instead of costing one more pass over
    # every gradient tensor (4% of the default job's step).
    def mean(params, batch, key):
      total, (weight, correct) = sums(params, batch, key)
      weight = jnp.maximum(jax.lax.stop_gradient(weight), 1.0)
      return total / weight, (total, weight, correct)

    (_, (total, weight, correct)), grads = jax.value_and_grad(mean, has_aux=True)(
        state.params, batch, key)
  else:
    grad_fn = jax.value_and_grad(sums, has_aux=True)
    micro = jax.tree.map(lambda x: x.reshape(-1, accum_steps, *x.shape[1:]).swapaxes(0, 1),
                         batch)

    def accumulate(carry, xs):
      index, micro_batch = xs
      (t, (w, c)), g = grad_fn(state.params, micro_batch, jax.random.fold_in(key, index))
      return jax.tree.map(jnp.add, carry, (t, w, c, g)), None

    zeros = (jnp.zeros(()), jnp.zeros(()), jnp.zeros(()),
             jax.tree.map(jnp.zeros_like, state.params))
    (total, weight, correct, grads), _ = jax.lax.scan(
        accumulate, zeros, (jnp.arange(accum_steps), micro))
    weight = jnp.maximum(weight, 1.0)
    grads = jax.tree.map(lambda g: g / weight, grads)
  params, opt_state = optim.apply_updates(tx, grads, state.opt_state, state.params)
  metrics = {
      'loss': total / weight,
      **({'accuracy': correct / weight} if has_accuracy else {}),
      'grad_norm': optax.global_norm(grads),
      'lr': schedule(state.step),
  }
  new_state = dataclasses.replace(state, step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, metrics


def eval_step(params, rest, batch: Batch, *, graphdef, task) -> dict[str, jax.Array]:
  """The task's per-item outputs; the host turns them into metrics (padding weighted 0)."""
  model = nnx.merge(graphdef, params, rest)
  return task.eval_outputs(task.forward(model, batch, deterministic=True), batch)


def jit_steps(graphdef, tx, schedule, task, *, mesh=None, state_shardings=None,
              rest_shardings=None, accum_steps: int = 1):
  """Compiles the two steps once; the train state is donated so its buffers are reused.

  With a `mesh`, the steps take explicit shardings: the state and the frozen `rest` as placed
  (`state_shardings`, `rest_shardings`), batches split over the data axes, metrics and eval
  outputs replicated (every process can read them).
  """
  train_fn = functools.partial(train_step, graphdef=graphdef, tx=tx, schedule=schedule,
                               task=task, accum_steps=accum_steps)
  eval_fn = functools.partial(eval_step, graphdef=graphdef, task=task)
  if mesh is None:
    return jax.jit(train_fn, donate_argnums=0), jax.jit(eval_fn)
  batch, replicated = parallel.batch_sharding(mesh), parallel.replicated(mesh)
  train = jax.jit(train_fn, in_shardings=(state_shardings, batch, rest_shardings),
                  out_shardings=(state_shardings, replicated), donate_argnums=0)
  evaluate = jax.jit(eval_fn, in_shardings=(state_shardings.params, rest_shardings, batch),
                     out_shardings=replicated)
  return train, evaluate
