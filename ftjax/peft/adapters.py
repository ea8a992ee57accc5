"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2020) as model surgery.

`apply_adapters` swaps a sublayer's output projection for an `AdapterLinear` that keeps the frozen
base `kernel`/`bias` (same `nnx.Param` objects, same paths) and adds a small residual bottleneck
on its output: `y = base(x); y + up(act(down(y)))`, down [D, D/rf] and up [D/rf, D], each with a
bias. `up` starts at zero, so the model is exactly unchanged at init; `down` is N(0, 0.01^2).

Placement in a BERT layer (what the default regexes select):

* 'houlsby': after the attention output projection (`attention/out`) and after the feed-forward
  output (`output`): two adapters per layer;
* 'pfeiffer': after the feed-forward output only: one adapter per layer.

The adapter acts on the projection's output, before the sublayer's dropout, residual and
LayerNorm (the papers put it after the dropout; with dropout off, as at evaluation, this is the
same). Pfeiffer's variant in the `adapters` library also moves the residual around the LayerNorm;
that is not reproduced here. There is no PyTorch reference for these adapters in Hugging Face PEFT,
so they are tested by their invariants, not against a reference implementation.

`AdapterParam` subclasses `nnx.Param`: train the adapters with `adapter_filter` (combined with the
head, e.g. `nnx.Any(adapter_filter, nnx.PathContains('classifier'))`).
"""

from collections.abc import Callable

from flax import nnx
import jax
import jax.numpy as jnp

from ftjax.errors import FtjaxError
from ftjax.models import layers
from ftjax.peft import surgery

# Module-path regexes per kind for BERT-like encoders (attention/out, then the FFN output).
KINDS = {
    'houlsby': r'attention/out$|/output$',
    'pfeiffer': r'/output$',
}

NON_LINEARITIES: dict[str, Callable[[jax.Array], jax.Array]] = {
    'relu': jax.nn.relu,
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
    'swish': jax.nn.silu,
    'silu': jax.nn.silu,
    'tanh': jnp.tanh,
}

# The `adapters` library's BERT-style init of the down projection.
_DOWN_STD = 1e-2


class AdapterParam(nnx.Param):
  """Bottleneck adapter weights; a `nnx.Param`, so filters must exclude it explicitly."""


# Selects the adapter weights, and nothing of the base model.
adapter_filter = AdapterParam


class AdapterDense(nnx.Module):
  """A dense layer whose `kernel`/`bias` are `AdapterParam`s (nnx.Linear would make `Param`s)."""

  def __init__(self, kernel: AdapterParam, bias: AdapterParam):
    self.kernel = kernel
    self.bias = bias

  def __call__(self, x: jax.Array) -> jax.Array:
    return x @ self.kernel[...].astype(x.dtype) + self.bias[...].astype(x.dtype)


class AdapterLinear(layers.Linear):
  """An `nnx.Linear` followed by a residual bottleneck adapter on its output.

  Built from an existing layer by `apply_adapters`, never from scratch: the base parameters are
  taken over, so the state paths of `kernel` and `bias` do not change. It is still an
  `nnx.Linear`, with the same call signature.

  Attributes:
    adapter_down: the [D, D/rf] projection (state at `.../adapter_down/{kernel,bias}`).
    adapter_up: the [D/rf, D] projection, zero at init (`.../adapter_up/{kernel,bias}`).
    non_linearity: the name of the activation between them.
  """

  def __init__(
      self, base: nnx.Linear, *, bottleneck: int, non_linearity: str, rngs: nnx.Rngs
  ):
    surgery.take_over(self, base)
    self.non_linearity = non_linearity
    features = self.kernel.shape[1]
    dtype = self.kernel.dtype
    metadata = self.kernel.get_metadata()
    kernel_axes = metadata.get('out_sharding')
    # The adapter reads and writes the residual stream, so its D side is laid out like the
    # base kernel's output axis; the bottleneck is small and never sharded.
    out_axis = None if kernel_axes is None else kernel_axes[1]

    def param(value: jax.Array, axes: tuple[str | None, ...]) -> AdapterParam:
      if kernel_axes is None:
        return AdapterParam(value)
      return AdapterParam(
          value, out_sharding=axes, eager_sharding=metadata.get('eager_sharding', False),
          mesh=metadata.get('mesh'),
      )

    down = _DOWN_STD * jax.random.normal(rngs.params(), (features, bottleneck), dtype)
    self.adapter_down = AdapterDense(
        param(down, (out_axis, None)), param(jnp.zeros((bottleneck,), dtype), (None,))
    )
    self.adapter_up = AdapterDense(
        param(jnp.zeros((bottleneck, features), dtype), (None, out_axis)),
        param(jnp.zeros((features,), dtype), (out_axis,)),
    )

  def cast_on_use(self) -> tuple[str, ...]:
    """`kernel` and `bias` enter only through nnx.Linear's cast (`layers.params_cast_on_use`)."""
    return ('kernel', 'bias')

  def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
    y = super().__call__(inputs, out_sharding)
    act = NON_LINEARITIES[self.non_linearity]
    return y + self.adapter_up(act(self.adapter_down(y)))






def apply_adapters(
    model: nnx.Module,
    *,
    kind: str,
    reduction_factor: int = 16,
    non_linearity: str = 'relu',
    rngs: nnx.Rngs,
    targets: str | None = None,
) -> list[str]:
  """Adds a bottleneck adapter after each selected output projection, in place.

  Args:
    model: the model to modify (e.g. a `SequenceClassifier` or a bare `BertModel`).
    kind: 'houlsby' (after attention/out and the feed-forward output) or 'pfeiffer' (after the
      feed-forward output only).
    reduction_factor: rf; the bottleneck width is D // rf for a layer with D outputs.
    non_linearity: 'relu', 'gelu', 'swish'/'silu' or 'tanh'.
    rngs: initialises the down projections (its 'params' stream).
    targets: a regex over '/'-joined module paths replacing the kind's default placement (for
      families whose layers are named differently).

  Returns:
    The '/'-joined paths of the adapted layers.

  Raises:
    FtjaxError: for an unknown kind or non-linearity, a reduction factor that is not a positive
      integer or leaves a bottleneck narrower than 1, an invalid regex, or a regex that matches
      no module or a module that is not a plain linear layer (e.g. one adapted already).
  """
  if kind not in KINDS:
    raise FtjaxError(
        f'unknown adapter kind {kind!r}: use one of {", ".join(map(repr, KINDS))}'
    )
  if non_linearity not in NON_LINEARITIES:
    raise FtjaxError(
        f'unknown adapter non_linearity {non_linearity!r}: use one of '
        f'{", ".join(map(repr, NON_LINEARITIES))}'
    )
  if isinstance(reduction_factor, bool) or not isinstance(reduction_factor, int) or (
      reduction_factor <= 0
  ):
    raise FtjaxError(
        f'adapter reduction_factor must be a positive integer, got {reduction_factor!r}: '
        'set e.g. reduction_factor=16'
    )
  regex = KINDS[kind] if targets is None else targets
  matched = surgery.match_linears(model, regex, 'adapter')
  for path, node in matched:
    features = node.kernel.shape[1]
    if features // reduction_factor < 1:
      raise FtjaxError(
          f'adapter reduction_factor {reduction_factor} leaves no bottleneck for '
          f'{surgery.path_str(path)} ({features} outputs): use a reduction_factor <= {features}'
      )
  for path, node in matched:
    bottleneck = node.kernel.shape[1] // reduction_factor
    surgery.replace(model, path, AdapterLinear(
        node, bottleneck=bottleneck, non_linearity=non_linearity, rngs=rngs
    ))
  return [surgery.path_str(path) for path, _ in matched]
