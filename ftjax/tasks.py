"""Tasks: which head a backbone gets, what the model reads from a batch, and how it is scored.

A task is data, not a branch in the loop: `train.py` and `steps.py` call `task.forward`,
`task.losses` and `task.eval_outputs` and never name a task. Every loss is a weighted mean of
per-item losses (an item is an example, or a token for token classification and language
modelling), so padding (weight 0) never counts.

  classification        text -> one of C classes          (encoders: mean/cls/pooler pooling;
                                                            decoders: the last real token)
  regression            text -> a real number              (the same heads with one output)
  token_classification  text -> a class per token           (first sub-word of each word labelled)
  causal_lm             prompt + response -> next tokens    (decoders; loss on the response only)
  image_classification  pixels -> one of C classes          (ViT: the [CLS] token)
"""

import dataclasses
from collections.abc import Callable
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ftjax import kernels
from ftjax import metrics as metrics_lib
from ftjax.errors import FtjaxError
from ftjax.models import heads
from ftjax.models import layers

Batch = dict[str, Any]
IGNORE = -1  # Label of items that carry no loss (prompt tokens, continuation sub-words, padding).


# Values per block of `argmax`'s two-level search.
_ARGMAX_BLOCK = 128


def argmax(x: jax.Array) -> jax.Array:
  """`jnp.argmax(x, -1)`: the same indices (the first maximum), faster on a large last axis.

  XLA:CPU runs argmax as a variadic (value, index) reduction that it does not vectorise: 117 ms
  for a causal LM's [8, 255, 32000] logits, 4% of a 100M Llama's LoRA step. Here a plain maximum
  over blocks of 128 values (which XLA:CPU vectorises) finds the first block that holds the
  maximum, and argmax runs only over that block's values and over the block maxima: 11 ms.
  Axes of fewer than 16 blocks, or not a whole number of them, take jnp.argmax as they are.
  In a row that holds a NaN (whose loss is NaN too) the index is a NaN's or, where the
  platform's maximum skips NaNs (XLA:CPU's does), may be the largest other value's.
  """
  size = x.shape[-1]
  if size < 16 * _ARGMAX_BLOCK or size % _ARGMAX_BLOCK:
    return jnp.argmax(x, axis=-1)
  blocks = x.reshape(*x.shape[:-1], size // _ARGMAX_BLOCK, _ARGMAX_BLOCK)
  first = jnp.argmax(jnp.max(blocks, axis=-1), axis=-1)
  block = jnp.take_along_axis(blocks, first[..., None, None], axis=-2)[..., 0, :]
  return first * _ARGMAX_BLOCK + jnp.argmax(block, axis=-1)


def _cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array):
  """Per-item CE (labels IGNORE get weight 0 and a valid dummy class), weights, correctness
  (against argmax(logits), which the cross-entropy kernel returns with the loss)."""
  weights = weights * (labels != IGNORE)
  labels = jnp.where(labels == IGNORE, 0, labels)
  if kernels.cross_entropy_applies(logits):
    loss, predictions = softmax_cross_entropy(logits, labels)
  else:
    loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    predictions = argmax(logits)
  return loss, weights, (predictions == labels).astype(jnp.float32)


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """optax's softmax cross-entropy with integer labels (in [0, V)) over the last axis of
  logits [..., V], and the logits' argmax (the first maximum), on ftjax's CPU kernel
  (`kernels.cross_entropy`, where `kernels.cross_entropy_applies`).

  A language model's loss: XLA:CPU ran it over the [tokens, vocabulary] logits as a float32
  copy and several single-threaded passes (and the argmax as more), ~74 ms of the 100M Llama's
  1.03 s bfloat16 LoRA step at 8 x 256 tokens. The kernel reads the logits once forward and
  once backward, on all threads; the logits' gradient is g (softmax - onehot), in their dtype.
  """
  flat = logits.reshape(-1, logits.shape[-1])
  loss, predictions = _kernel_cross_entropy(flat, labels.reshape(-1))
  return loss.reshape(labels.shape), predictions.reshape(labels.shape)


@jax.custom_vjp
def _kernel_cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  return _kernel_cross_entropy_fwd(logits, labels)[0]


def _kernel_cross_entropy_fwd(logits, labels):
  loss, lse, predictions = kernels.cross_entropy(logits, labels)
  return (loss, predictions), (logits, labels, lse)


def _kernel_cross_entropy_bwd(residuals, cotangents):
  logits, labels, lse = residuals
  g, _ = cotangents  # the predictions (integers) have no gradient
  return kernels.cross_entropy_grad(logits, labels, lse, g), None


_kernel_cross_entropy.defvjp(_kernel_cross_entropy_fwd, _kernel_cross_entropy_bwd)


def _example_weights(batch: Batch, size: int) -> jax.Array:
  return batch['weight'] if 'weight' in batch else jnp.ones((size,), jnp.float32)


@dataclasses.dataclass(frozen=True)
class Task:
  """One kind of supervised problem.

  Attributes:
    name: the value of `config.task`.
    kinds: backbone kinds (`Family.kind`) the task works with.
    inputs: batch keys the model is called with, in order.
    metrics: validation metrics; `train.best_metric` must be one of them.
    best: the default (best_metric, best_mode).
  """

  name: str
  kinds: tuple[str, ...]
  inputs: tuple[str, ...]
  metrics: tuple[str, ...]
  best: tuple[str, str]
  _head: Callable[..., nnx.Module] = dataclasses.field(repr=False)
  _losses: Callable[[jax.Array, Batch], tuple] = dataclasses.field(repr=False)
  _eval: Callable[[jax.Array, Batch], dict] = dataclasses.field(repr=False)
  _accumulator: Callable[[int], Any] = dataclasses.field(repr=False)
  # Whether batches may be packed (`data.pack_length`): outputs per example (pooled) or per
  # token, whose losses the packed layout does not change.
  packable: bool = False
  # Whether `forward` asks the head for its logits in its compute dtype (`logits_dtype=None`)
  # instead of float32: a language model's [tokens, vocabulary] logits, whose loss computes in
  # float32 anyway. Their float32 copy cost the 100M Llama's bfloat16 LoRA step a pass over
  # 262 MB forward and another back to bfloat16 backward (9.4 and 8.1 ms, profile).
  logits_in_compute_dtype: bool = False

  def build_head(self, backbone: nnx.Module, *, kind: str, num_labels: int, pooling: str,
                 dropout: float, dtype: Any, rngs: nnx.Rngs) -> nnx.Module:
    """Puts this task's head on `backbone` (a model of family kind `kind`)."""
    if kind not in self.kinds:
      raise FtjaxError(f'task {self.name!r} needs a {" or ".join(self.kinds)} model, and this '
                       f'checkpoint is a {kind} ({type(backbone).__name__}): pick another '
                       'checkpoint or task')
    return self._head(backbone, kind=kind, num_labels=num_labels, pooling=pooling,
                      dropout=dropout, dtype=dtype, rngs=rngs)

  def forward(self, model: nnx.Module, batch: Batch, *, deterministic: bool,
              rngs: nnx.Rngs | None = None) -> jax.Array:
    """The model's float32 logits (or predictions) for `batch`, one per example also when the
    batch is packed (its token arrays are rows shared by several examples: 'example_ids'); in
    the head's dtype where `logits_in_compute_dtype`."""
    kw = {}
    if 'example_ids' in batch:
      kw['packing'] = layers.Packing(batch['example_ids'], batch['positions'],
                                     num_examples=batch['weight'].shape[0])
    if self.logits_in_compute_dtype:
      kw['logits_dtype'] = None
    out = model(*(batch[k] for k in self.inputs), deterministic=deterministic, rngs=rngs, **kw)
    return out if self.logits_in_compute_dtype else out.astype(jnp.float32)

  def losses(self, logits: jax.Array, batch: Batch):
    """(per-item loss, per-item weight, per-item correctness or None), same shapes."""
    return self._losses(logits, batch)

  def eval_outputs(self, logits: jax.Array, batch: Batch) -> dict[str, jax.Array]:
    """What an eval step returns to the host for `metrics_accumulator().update`."""
    return self._eval(logits, batch)

  def metrics_accumulator(self, num_labels: int):
    """A fresh host-side accumulator: `update(eval_outputs)`, then `compute()`."""
    return self._accumulator(num_labels)


# Heads
# ------------------------------------------------------------------------------


def _sequence_head(backbone, *, kind, num_labels, pooling, dropout, dtype, rngs):
  del dtype
  if kind == 'decoder':
    if pooling in ('cls', 'pooler'):
      raise FtjaxError(f"model.pooling={pooling!r} does not fit a causal decoder (its first "
                       "token has seen nothing else): use 'last' or 'mean'")
    # 'last' without a bias is exactly transformers' *ForSequenceClassification `score`.
    return heads.SequenceClassifier(backbone, num_labels, pooling=pooling, dropout=dropout,
                                    use_bias=pooling != 'last', rngs=rngs)
  if pooling == 'last':
    raise FtjaxError("model.pooling='last' is for causal decoders; an encoder uses 'mean', "
                     "'cls' or 'pooler'")
  return heads.SequenceClassifier(backbone, num_labels, pooling=pooling, dropout=dropout,
                                  rngs=rngs)


def _regression_head(backbone, **kw):
  kw['num_labels'] = 1
  return _sequence_head(backbone, **kw)


def _token_head(backbone, *, kind, num_labels, pooling, dropout, dtype, rngs):
  del kind, pooling, dtype
  return heads.TokenClassifier(backbone, num_labels, dropout=dropout, rngs=rngs)


def _lm_head(backbone, *, kind, num_labels, pooling, dropout, dtype, rngs):
  del kind, num_labels, pooling, dropout
  return heads.CausalLM(backbone, tie_word_embeddings=backbone.config.tie_word_embeddings,
                        dtype=dtype, rngs=rngs)


def _image_head(backbone, *, kind, num_labels, pooling, dropout, dtype, rngs):
  del kind, pooling, dtype
  return heads.ImageClassifier(backbone, num_labels, dropout=dropout, rngs=rngs)


# Losses and evaluation outputs
# ------------------------------------------------------------------------------


def _classify_losses(logits, batch):
  return _cross_entropy(logits, batch['label'], _example_weights(batch, logits.shape[0]))


def _classify_eval(logits, batch):
  loss, weight, _ = _classify_losses(logits, batch)
  return {'label': batch['label'], 'prediction': argmax(logits), 'loss': loss,
          'weight': weight}


def _regression_losses(logits, batch):
  error = logits[:, 0] - batch['target']
  return jnp.square(error), _example_weights(batch, logits.shape[0]), None


def _regression_eval(logits, batch):
  loss, weight, _ = _regression_losses(logits, batch)
  return {'prediction': logits[:, 0], 'target': batch['target'], 'loss': loss, 'weight': weight}


def _token_losses(logits, batch):
  if 'example_ids' in batch:  # Packed rows: each token weighs as its example; padding 0.
    ids = batch['example_ids']
    weights = jnp.where(ids >= 0, batch['weight'][jnp.maximum(ids, 0)], 0.0)
  else:
    weights = jnp.broadcast_to(_example_weights(batch, logits.shape[0])[:, None],
                               batch['labels'].shape)
  return _cross_entropy(logits, batch['labels'], weights)


def _token_eval(logits, batch):
  loss, weight, _ = _token_losses(logits, batch)
  return {'label': batch['labels'], 'prediction': argmax(logits), 'loss': loss,
          'weight': weight}


def _lm_losses(logits, batch):
  # Position t predicts token t + 1; labels are the input ids with IGNORE on the prompt. The
  # last position predicts nothing: it gets IGNORE and is dropped after the loss, so that the
  # logits are read where they lie (sliced first, XLA:CPU copied them: [B, L - 1, V] float32,
  # 250 MiB for a 32000-token vocabulary at 8 x 256).
  labels = jnp.pad(batch['labels'][:, 1:], ((0, 0), (0, 1)), constant_values=IGNORE)
  weights = jnp.broadcast_to(_example_weights(batch, logits.shape[0])[:, None], labels.shape)
  loss, weight, correct = _cross_entropy(logits, labels, weights)
  return loss[:, :-1], weight[:, :-1], correct[:, :-1]


def _lm_eval(logits, batch):
  loss, weight, correct = _lm_losses(logits, batch)
  # Sums only: a [B, L, vocab] prediction tensor would dwarf everything else sent to the host.
  return {'loss_sum': jnp.sum(loss * weight), 'count': jnp.sum(weight),
          'correct': jnp.sum(correct * weight)}


class LanguageModelMetrics:
  """Token-level loss, perplexity and next-token accuracy over the response tokens."""

  def __init__(self, num_labels: int = 0):
    del num_labels
    self.loss_sum = self.count = self.correct = 0.0

  def update(self, out: dict) -> None:
    self.loss_sum += float(out['loss_sum'])
    self.count += float(out['count'])
    self.correct += float(out['correct'])

  def compute(self) -> dict[str, float]:
    if self.count == 0:
      raise ValueError('no tokens were evaluated')
    loss = self.loss_sum / self.count
    return {'loss': loss, 'perplexity': float(np.exp(min(loss, 50.0))),
            'accuracy': self.correct / self.count, 'num_tokens': int(self.count)}


class _Classification(metrics_lib.ClassificationMetrics):
  """Adapts `ClassificationMetrics` to eval-output dicts (items may be tokens: [B, L])."""

  def update(self, out: dict) -> None:  # pytype: disable=signature-mismatch
    keep = np.asarray(out['weight']) > 0
    super().update(np.asarray(out['label'])[keep], np.asarray(out['prediction'])[keep],
                   np.asarray(out['loss'])[keep], np.ones(int(keep.sum())))


TASKS: dict[str, Task] = {
    'classification': Task(
        'classification', ('encoder', 'decoder'), ('input_ids', 'attention_mask',
                                                    'token_type_ids'),
        ('loss', 'accuracy', 'macro_f1'), ('accuracy', 'max'),
        _sequence_head, _classify_losses, _classify_eval, _Classification, packable=True),
    'regression': Task(
        'regression', ('encoder', 'decoder'), ('input_ids', 'attention_mask', 'token_type_ids'),
        ('loss', 'rmse', 'pearson', 'spearman'), ('loss', 'min'),
        _regression_head, _regression_losses, _regression_eval,
        lambda num_labels: metrics_lib.RegressionMetrics(), packable=True),
    'token_classification': Task(
        'token_classification', ('encoder', 'decoder'),
        ('input_ids', 'attention_mask', 'token_type_ids'),
        ('loss', 'accuracy', 'macro_f1'), ('macro_f1', 'max'),
        _token_head, _token_losses, _token_eval, _Classification, packable=True),
    'causal_lm': Task(
        'causal_lm', ('decoder',), ('input_ids', 'attention_mask'),
        ('loss', 'perplexity', 'accuracy'), ('loss', 'min'),
        _lm_head, _lm_losses, _lm_eval, LanguageModelMetrics, logits_in_compute_dtype=True),
    'image_classification': Task(
        'image_classification', ('vision',), ('pixel_values',),
        ('loss', 'accuracy', 'macro_f1'), ('accuracy', 'max'),
        _image_head, _classify_losses, _classify_eval, _Classification),
}


def get_task(name: str) -> Task:
  """The task `config.task` names.

  Raises:
    FtjaxError: for an unknown name.
  """
  if name not in TASKS:
    raise FtjaxError(f'unknown task {name!r}: use one of {", ".join(TASKS)}')
  return TASKS[name]
