"""(IA)^3 (Liu et al., 2022) as model surgery: selected `nnx.Linear` layers gain a learned scale.

`apply_ia3` swaps each targeted `nnx.Linear` for an `IA3Linear` that keeps the frozen base
`kernel`/`bias` (the same `nnx.Param` objects at the same paths, so the Hugging Face key map still
finds them) and adds one vector `ia3_l` as an `IA3Param`, initialised to ones (outputs unchanged):

* attention key/value (not feed-forward): the output is scaled, `y = (x @ W + b) * l`, l: [out];
* the feed-forward output layer: its input is scaled, `y = (x * l) @ W + b`, l: [in].

This is exactly Hugging Face PEFT's `IA3Config(target_modules=..., feedforward_modules=...)` for
BERT (targets key, value and the FFN `output.dense`), including the bias being scaled too.

`merge_ia3` folds the vectors into the kernels (and biases) and `unmerge_ia3` divides them back.

`IA3Param` subclasses `nnx.Param`: `nnx.Param` selects the base weights *and* the vectors. Train
the vectors with `ia3_filter` (combined with the head, e.g.
`nnx.Any(ia3_filter, nnx.PathContains('classifier'))`).
"""

import re

from flax import nnx
import jax
import jax.numpy as jnp

from ftjax.errors import FtjaxError
from ftjax.models import layers
from ftjax.peft import surgery

# The default targets of BERT-like encoders: attention key/value and the feed-forward output.
DEFAULT_TARGETS = r'attention/(key|value)$|/output$'
# Among the targets, those whose input (not output) is scaled: the feed-forward output layer.
DEFAULT_FEEDFORWARD = r'/output$'


class IA3Param(nnx.Param):
  """The learned (IA)^3 scaling vectors; a `nnx.Param`, so filters must exclude it explicitly."""


# Selects the (IA)^3 vectors, and nothing of the base model.
ia3_filter = IA3Param


class IA3Linear(layers.Linear):
  """An `nnx.Linear` whose output (or, for feed-forward layers, input) is scaled by `ia3_l`.

  Built from an existing layer by `apply_ia3`, never from scratch: the base parameters are taken
  over from that layer, so the state paths of `kernel` and `bias` do not change. It is still an
  `nnx.Linear`, and its call signature is the same.

  Attributes:
    feedforward: whether the input ([in] vector) rather than the output ([out] vector) is scaled.
    merged: whether `ia3_l` is folded into `kernel`/`bias` (the scaling is then skipped).
  """

  def __init__(self, base: nnx.Linear, *, feedforward: bool):
    surgery.take_over(self, base)
    self.feedforward = feedforward
    self.merged = False
    in_features, out_features = self.kernel.shape
    metadata = self.kernel.get_metadata()
    kernel_axes = metadata.get('out_sharding')
    size, axis = (in_features, 0) if feedforward else (out_features, 1)
    sharding = {}
    if kernel_axes is not None:
      # Laid out like the kernel dimension it scales, so no resharding happens in the product.
      sharding = {
          'out_sharding': (kernel_axes[axis],),
          'eager_sharding': metadata.get('eager_sharding', False),
          'mesh': metadata.get('mesh'),
      }
    self.ia3_l = IA3Param(jnp.ones((size,), self.kernel.dtype), **sharding)

  def cast_on_use(self) -> tuple[str, ...]:
    """`kernel` and `bias` enter only through nnx.Linear's cast (`layers.params_cast_on_use`)."""
    return ('kernel', 'bias')

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    if self.merged:
      return super().__call__(inputs, out_sharding)
    scale = self.ia3_l[...]
    if self.feedforward:
      return super().__call__(inputs * scale.astype(inputs.dtype), out_sharding)
    y = super().__call__(inputs, out_sharding)
    # After the bias, as PEFT: the bias is scaled too.
    return y * scale.astype(y.dtype)






def _ia3_layers(model: nnx.Module) -> list[tuple[tuple, IA3Linear]]:
  return [(path, node) for path, node in surgery.modules(model) if isinstance(node, IA3Linear)]




def _compile(what: str, regex: str) -> re.Pattern:
  try:
    return re.compile(regex)
  except re.error as e:
    raise FtjaxError(f'(IA)^3 {what} {regex!r} is not a valid regular expression: {e}') from e


def apply_ia3(
    model: nnx.Module,
    *,
    targets: str = DEFAULT_TARGETS,
    feedforward: str = DEFAULT_FEEDFORWARD,
) -> list[str]:
  """Adds an (IA)^3 scaling vector to every linear layer whose path `targets` matches, in place.

  Args:
    model: the model to modify (e.g. a `SequenceClassifier` or a bare `BertModel`).
    targets: regex searched in '/'-joined module paths; every module it matches must be a plain
      `nnx.Linear`. The default is PEFT's BERT choice: key, value and the feed-forward output.
    feedforward: regex searched in the paths of the matched targets; those it matches scale
      their input instead of their output. Non-target modules it matches are ignored.

  Returns:
    The '/'-joined paths of the adapted layers.

  Raises:
    FtjaxError: for an invalid regex, a `targets` regex that matches no module or a module that
      is not a plain linear layer (including one adapted already, by (IA)^3 or another method),
      or a model whose (IA)^3 vectors are merged.
  """
  feedforward_re = _compile('feedforward', feedforward)
  if any(layer.merged for _, layer in _ia3_layers(model)):
    raise FtjaxError('this model has merged (IA)^3 vectors: call unmerge_ia3 before apply_ia3')
  matched = surgery.match_linears(model, targets, '(IA)^3')
  for path, node in matched:
    is_feedforward = bool(feedforward_re.search(surgery.path_str(path)))
    surgery.replace(model, path, IA3Linear(node, feedforward=is_feedforward))
  return [surgery.path_str(path) for path, _ in matched]


def merge_ia3(model: nnx.Module) -> list[str]:
  """Folds the vectors into the base weights, in place; `unmerge_ia3` undoes it.

  Output scaling multiplies the kernel's columns and the bias; input scaling the kernel's rows.

  Returns:
    The '/'-joined paths of the layers merged.

  Raises:
    FtjaxError: if the model has no (IA)^3 layers or is merged already.
  """
  layers = _ia3_layers(model)
  if not layers:
    raise FtjaxError('this model has no (IA)^3 vectors to merge: call apply_ia3 first')
  if any(layer.merged for _, layer in layers):
    raise FtjaxError('the (IA)^3 vectors of this model are merged already: nothing to merge')
  for _, layer in layers:
    _rescale(layer, layer.ia3_l[...])
    layer.merged = True
  return [surgery.path_str(path) for path, _ in layers]


def unmerge_ia3(model: nnx.Module) -> list[str]:
  """Divides the merged vectors back out of the base weights (the inverse of `merge_ia3`).

  Returns:
    The '/'-joined paths of the layers unmerged.

  Raises:
    FtjaxError: if nothing is merged, or a vector has a zero entry (the weights it zeroed cannot
      be recovered).
  """
  todo = [(path, layer) for path, layer in _ia3_layers(model) if layer.merged]
  if not todo:
    raise FtjaxError('this model has no merged (IA)^3 vectors: nothing to unmerge')
  for path, layer in todo:
    if bool(jnp.any(layer.ia3_l[...] == 0)):
      raise FtjaxError(
          f'cannot unmerge (IA)^3 at {surgery.path_str(path)}: its vector has zero entries, so the '
          'merged weights lost information; reload the base weights instead'
      )
  for _, layer in todo:
    _rescale(layer, 1.0 / layer.ia3_l[...])
    layer.merged = False
  return [surgery.path_str(path) for path, _ in todo]


def _rescale(layer: IA3Linear, factor: jax.Array) -> None:
  kernel = layer.kernel[...]
  factor = factor.astype(kernel.dtype)
  if layer.feedforward:
    layer.kernel[...] = kernel * factor[:, None]
  else:
    layer.kernel[...] = kernel * factor[None, :]
    if layer.bias is not None:
      layer.bias[...] = layer.bias[...] * factor.astype(layer.bias.dtype)
