"""The optimizer: AdamW with warm-up and decay, weight decay masked off biases and norms."""

import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from ftjax import kernels
from ftjax import params as params_lib
from ftjax.errors import FtjaxError


def make_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warm-up to `optim.lr`, then the chosen decay to zero at `total_steps`."""
  if not 0.0 <= optim.warmup_fraction < 1.0:
    raise FtjaxError(f'optim.warmup_fraction must be in [0, 1), got {optim.warmup_fraction}')
  if optim.lr <= 0:
    raise FtjaxError(f'optim.lr must be positive, got {optim.lr}')
  warmup = int(optim.warmup_fraction * total_steps)
  decay_steps = max(total_steps - warmup, 1)
  if optim.schedule == 'linear':
    decay = optax.linear_schedule(optim.lr, 0.0, decay_steps)
  elif optim.schedule == 'cosine':
    decay = optax.cosine_decay_schedule(optim.lr, decay_steps)
  elif optim.schedule == 'constant':
    decay = optax.constant_schedule(optim.lr)
  else:
    raise FtjaxError(
        f"optim.schedule must be 'linear', 'cosine' or 'constant', got {optim.schedule!r}")
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warmup), decay], [warmup])


def decay_mask(params):
  """True for the weights that get weight decay: matrices, not biases or norm scales/offsets.

  Decaying biases and LayerNorm parameters toward zero only hurts fine-tuning (BERT's recipe);
  every rank-1 parameter is one of those.
  """
  return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


class L2SPState(NamedTuple):
  anchor: Any  # The trainable parameters when the optimizer was created: the pretrained ones.


def l2_sp(strength: float) -> optax.GradientTransformation:
  """L2-SP (Li et al., 2018): adds `strength * (params - anchor)` to the gradient.

  A penalty toward the pretrained weights instead of toward zero, against catastrophic
  forgetting. It belongs in the gradient (like an L2 term in the loss), so it goes before
  clipping and Adam's normalisation.
  """
  def init(params):
    # Copies, because the train state (and with it `params`) is donated to the step.
    return L2SPState(anchor=jax.tree.map(jnp.copy, params))

  def update(updates, state, params):
    updates = jax.tree.map(lambda g, p, a: g + strength * (p - a).astype(g.dtype),
                           updates, params, state.anchor)
    return updates, state

  return optax.GradientTransformation(init, update)


class AdamWState(NamedTuple):
  count: jax.Array  # int32 scalar: updates made so far.
  mu: optax.Updates  # First moments.
  nu: optax.Updates  # Second moments.


def adamw(learning_rate: float | optax.Schedule, *, b1: float, b2: float, eps: float,
          weight_decay: float, mask=None) -> optax.GradientTransformationExtraArgs:
  """`optax.adamw`'s update, with gradient clipping folded into its moments.

  The extra argument `grad_scale` (a scalar; 1 when absent) multiplies the gradients inside the
  moment updates, which equals clipping them beforehand. As separate transformations
  (`optax.clip_by_global_norm`, then `optax.adamw`) the clipped gradients are written out in a
  pass of their own, because both moments read them, and the global norm's `g * g` merges with
  the second moment's into one more written array: on XLA:CPU the optimizer update of the
  default job's 10.8M trainable parameters took 27 ms that way, 16 ms this way. Hence the second
  moment multiplies as `(c * g) * g`, never `g * g`.

  With the extra argument `apply=True` the update returns the new parameters themselves
  instead of the updates to add to them (see `Optimizer.apply`): on a single CPU device, for
  float32 parameters, one fused kernel (`ftjax/kernels/adamw.cc`) then reads each parameter,
  gradient and moment once and writes the parameter and moments back in place, where XLA's
  fusions made ten passes over memory per parameter for seven (the default job's step 73.7 ->
  69.5 ms). The same operations as XLA's (values within float32 rounding: the scalars come from
  other fusions); XLA's path where the kernel does not apply.

  Args:
    learning_rate: a float, or a schedule of the number of updates made so far.
    b1: first-moment decay.
    b2: second-moment decay.
    eps: added to the root of the second moment.
    weight_decay: decoupled weight decay (times the learning rate, as `optax.adamw`).
    mask: a pytree of bools (or a function of the params giving one) marking the parameters
      that decay; None decays all.
  """

  def init(params):
    zeros = lambda: jax.tree.map(jnp.zeros_like, params)
    return AdamWState(count=jnp.zeros((), jnp.int32), mu=zeros(), nu=zeros())

  def update(updates, state, params=None, *, grad_scale=1.0, apply=False, **extra_args):
    del extra_args
    if params is None:
      raise ValueError('optim.adamw: update(grads, state, params) needs the params (weight decay '
                       'and its mask read them), as optax.adamw does')
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    count = optax.safe_increment(state.count)
    bc1 = 1 - b1 ** count.astype(jnp.float32)
    bc2 = 1 - b2 ** count.astype(jnp.float32)
    decays = mask(params) if callable(mask) else mask
    if decays is None:
      decays = jax.tree.map(lambda _: True, params)
    if apply and kernels.fused_adamw_applies(updates, state.mu, state.nu, params):
      new_params, mu, nu = _fused_adamw(
          updates, state.mu, state.nu, params, decays, lr=lr, grad_scale=grad_scale, bc1=bc1,
          bc2=bc2, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
      return new_params, AdamWState(count=count, mu=mu, nu=nu)
    c1, c2 = (1 - b1) * grad_scale, (1 - b2) * grad_scale * grad_scale
    mu = jax.tree.map(lambda g, m: b1 * m + c1 * g, updates, state.mu)
    nu = jax.tree.map(lambda g, v: b2 * v + (c2 * g) * g, updates, state.nu)
    step = lambda m, v, p, decay: -lr * (
        (m / bc1) / (jnp.sqrt(v / bc2) + eps) + (weight_decay * p if decay and weight_decay
                                                 else 0.0))
    new_updates = jax.tree.map(step, mu, nu, params, decays)
    if apply:
      new_updates = optax.apply_updates(params, new_updates)
    return new_updates, AdamWState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformationExtraArgs(init, update)


def _fused_adamw(grads, mu, nu, params, decays, *, weight_decay: float, **coefficients):
  """New (params, mu, nu) from the AdamW kernel: one call for the decayed parameters, one for
  the rest (each call takes one weight decay)."""
  treedef = jax.tree.structure(params)
  leaves = [jax.tree.leaves(t) for t in (params, grads, mu, nu)]
  decayed = [bool(d) and weight_decay != 0 for d in jax.tree.leaves(decays)]
  new = [[None] * len(decayed) for _ in range(3)]
  for decay in (True, False):
    index = [i for i, d in enumerate(decayed) if d == decay]
    if not index:
      continue
    out = kernels.adamw_update(*([leaf[i] for i in index] for leaf in leaves),
                               weight_decay=weight_decay if decay else 0.0, **coefficients)
    for column, results in zip(new, out):
      for i, result in zip(index, results):
        column[i] = result
  return tuple(jax.tree.unflatten(treedef, column) for column in new)


class Optimizer(optax.GradientTransformationExtraArgs):
  """An optax transformation (`init`, `update`) that can also make the step itself: `apply`."""
  __slots__ = ()

  def apply(self, grads, state, params):
    """(new params, new state): `update` followed by `optax.apply_updates`, done in one go, so
    that AdamW's fused kernel can write the parameters in place (`adamw`)."""
    return self.update(grads, state, params, apply=True)


def apply_updates(tx: optax.GradientTransformation, grads, state, params):
  """(new params, new state) of one optimizer step, for any optax transformation: `tx.apply`
  where `tx` is an `Optimizer` (`make_optimizer`'s), else `update` and `optax.apply_updates`."""
  if isinstance(tx, Optimizer):
    return tx.apply(grads, state, params)
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state


def clip_by_global_norm(max_norm: float, inner: optax.GradientTransformation
                        ) -> optax.GradientTransformationExtraArgs:
  """`inner` on gradients clipped to global norm `max_norm`, passed to it as `grad_scale`.

  The scale is `optax.clip_by_global_norm`'s (1 below the norm, else max_norm / norm); `inner`'s
  `adamw` transforms apply it inside their moment updates (see `adamw`).
  """
  inner = optax.with_extra_args_support(inner)

  def update(updates, state, params=None, **extra_args):
    norm = optax.global_norm(updates)
    scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
    return inner.update(updates, state, params, grad_scale=scale, **extra_args)

  return optax.GradientTransformationExtraArgs(inner.init, update)


def _group_adamw(optim: ml_collections.ConfigDict, schedule: optax.Schedule,
                rule: params_lib.Rule) -> optax.GradientTransformationExtraArgs:
  lr = schedule if rule.lr_mult == 1.0 else (lambda step: schedule(step) * rule.lr_mult)
  if rule.weight_decay is None:
    weight_decay, mask = optim.weight_decay, decay_mask
  else:
    weight_decay, mask = (optim.weight_decay if rule.weight_decay else 0.0), None
  return adamw(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=weight_decay, mask=mask)


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int,
                   groups: Sequence[params_lib.Group] | None = None
                   ) -> tuple[Optimizer, optax.Schedule]:
  """Builds AdamW over the trainable state and returns it with its schedule (for logging).

  With policy `groups`, the optimizer is one `optax.partition` with an AdamW per trainable
  group (its learning-rate multiplier and weight-decay rule); it is applied to the trainable
  state only, so frozen parameters have no optimizer state at all. Gradient clipping is folded
  into the AdamW moments (`clip_by_global_norm`, `adamw`).
  """
  schedule = make_schedule(optim, total_steps)
  chain = []
  if optim.l2_sp < 0:
    raise FtjaxError(f'optim.l2_sp must be >= 0, got {optim.l2_sp}')
  if optim.l2_sp > 0:
    # Only pretrained weights have an anchor; the new head is decayed toward zero as usual.
    pretrained = lambda params: jax.tree_util.tree_map_with_path(
        lambda keypath, _: not re.search(params_lib.HEAD, params_lib.path_str(keypath)), params)
    chain.append(optax.masked(l2_sp(optim.l2_sp), pretrained))
  if groups is None:
    adam = _group_adamw(optim, schedule, params_lib.Rule())
  else:
    owner = {path: g.name for g in groups for path in g.paths}
    transforms = {g.name: _group_adamw(optim, schedule, g.rule) for g in groups
                  if g.rule.trainable}
    labels = lambda params: jax.tree_util.tree_map_with_path(
        lambda keypath, _: owner[params_lib.path_str(keypath)], params)
    adam = optax.partition(transforms, labels)
  chain.append(clip_by_global_norm(optim.grad_clip, adam) if optim.grad_clip > 0 else adam)
  # AdamW is the chain's last transformation, so its `apply=True` output, the new parameters,
  # is the chain's (the L2-SP term before it ignores the argument).
  return Optimizer(*optax.chain(*chain)), schedule
