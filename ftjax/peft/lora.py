"""LoRA (Hu et al., 2021) as model surgery: selected `nnx.Linear` layers gain low-rank adapters.

`apply_lora` swaps each targeted `nnx.Linear` for a `LoRALinear` that keeps the frozen base
`kernel`/`bias` (the very same `nnx.Param` objects, under the same names, so the Hugging Face key
map and export still find them) and adds `lora_a` [in, r] and `lora_b` [r, out] as
`nnx.LoRAParam`. The output is `base(x) + x @ A @ B * scaling`.

A module may hold several named adapters; exactly one (or none) is active model-wide. The
'default' adapter lives at `.../lora_a` and `.../lora_b`, another named `n` at `.../lora_a_n`
and `.../lora_b_n`, so the common single-adapter checkpoint keeps short, stable names.

`merge_lora` folds the active adapter into the base kernels and `unmerge_lora` takes it back out;
`strip_lora` then turns the layers back into plain linear layers (`layers.Linear`), e.g. for
`hub.export_encoder`.

`nnx.LoRAParam` subclasses `nnx.Param`: `nnx.Param` selects the base weights *and* the adapters.
Train the adapters with `lora_filter` (combined with the head, e.g.
`nnx.Any(lora_filter, nnx.PathContains('classifier'))`).
"""

import functools
import math
import re

from flax import nnx
import jax
import jax.numpy as jnp

from ftjax import kernels
from ftjax.errors import FtjaxError
from ftjax.models import layers
from ftjax.peft import surgery

DEFAULT_ADAPTER = 'default'

# Selects the LoRA factors of every adapter, and nothing of the base model.
lora_filter = nnx.LoRAParam

_ADAPTER_NAME = re.compile(r'[A-Za-z0-9_]+')


def _attr_names(name: str) -> tuple[str, str]:
  if name == DEFAULT_ADAPTER:
    return 'lora_a', 'lora_b'
  return f'lora_a_{name}', f'lora_b_{name}'


def magnitude_name(name: str) -> str:
  return 'lora_magnitude' if name == DEFAULT_ADAPTER else f'lora_magnitude_{name}'


class DoRANorm(nnx.Variable):
  """The column norms of W + delta cached at merge time, so that unmerging is exact."""


def _column_norm(kernel_IxO: jax.Array) -> jax.Array:
  # DoRA's norm is per output feature: over the input axis of our [in, out] kernel.
  return jnp.linalg.norm(kernel_IxO.astype(jnp.float32), axis=0)


def _factor_metadata(kernel: nnx.Variable, axes: tuple[str | None, ...] | None) -> dict:
  """Sharding metadata for a LoRA factor, laid out like the base kernel it adapts."""
  metadata = kernel.get_metadata()
  if axes is None or metadata.get('out_sharding') is None:
    return {}
  return {
      'out_sharding': axes,
      'eager_sharding': metadata.get('eager_sharding', False),
      'mesh': metadata.get('mesh'),
  }


class LoRALinear(layers.Linear):
  """An `nnx.Linear` whose output gains the active low-rank adapter's update.

  Built from an existing layer by `apply_lora`, never from scratch: the base parameters are
  shared with (taken over from) that layer, so the state paths of `kernel` and `bias` do not
  change. It is still an `nnx.Linear`, and its call signature is the same.

  Attributes:
    adapters: (name, scaling) per adapter, in the order they were added.
    active: the name of the adapter that contributes, or None for the base layer alone.
    merged: whether the active adapter is folded into `kernel` (the LoRA branch is then skipped).
  """

  def __init__(self, base: nnx.Linear):
    surgery.take_over(self, base)
    self.adapters: tuple[tuple[str, float], ...] = ()
    self.dora: tuple[str, ...] = ()  # Adapters that are DoRA (magnitude + direction).
    self.dropout = layers.Dropout(0.0)  # On the LoRA branch's input; set by apply_lora.
    self.active: str | None = None
    self.merged = False

  def add_adapter(
      self, name: str, *, rank: int, scaling: float, rngs: nnx.Rngs, use_dora: bool = False
  ) -> None:
    """Adds adapter `name`: A kaiming-uniform as in PEFT, B zero (so the output is unchanged).

    With `use_dora`, also a magnitude vector initialised to the kernel's column norms (DoRA,
    Liu et al. 2024), which keeps the output unchanged at init too.
    """
    in_features, out_features = self.kernel.shape
    # PEFT's kaiming_uniform_(a=sqrt(5)) on A's [r, in] weight: U(-1/sqrt(in), 1/sqrt(in)).
    bound = 1.0 / math.sqrt(in_features)
    a_value = jax.random.uniform(
        rngs.params(), (in_features, rank), self.kernel.dtype, -bound, bound
    )
    b_value = jnp.zeros((rank, out_features), self.kernel.dtype)
    kernel_axes = self.kernel.get_metadata().get('out_sharding')
    a_axes = None if kernel_axes is None else (kernel_axes[0], None)
    b_axes = None if kernel_axes is None else (None, kernel_axes[1])
    a_attr, b_attr = _attr_names(name)
    setattr(self, a_attr, nnx.LoRAParam(a_value, **_factor_metadata(self.kernel, a_axes)))
    setattr(self, b_attr, nnx.LoRAParam(b_value, **_factor_metadata(self.kernel, b_axes)))
    if use_dora:
      m_axes = None if kernel_axes is None else (kernel_axes[1],)
      setattr(self, magnitude_name(name), nnx.LoRAParam(
          _column_norm(self.kernel[...]).astype(self.kernel.dtype),
          **_factor_metadata(self.kernel, m_axes)))
      self.dora = (*self.dora, name)
    self.adapters = (*self.adapters, (name, float(scaling)))

  def has_adapter(self, name: str) -> bool:
    return any(n == name for n, _ in self.adapters)

  def delta(self, name: str) -> jax.Array:
    """The kernel update B·A·scaling of adapter `name`, [in, out] in the parameter dtype."""
    a_attr, b_attr = _attr_names(name)
    scaling = dict(self.adapters)[name]
    return (getattr(self, a_attr)[...] @ getattr(self, b_attr)[...]) * scaling

  def magnitude_scale(self, name: str) -> jax.Array:
    """DoRA's m / ||W + delta|| per output feature; the norm is a constant to the gradient.

    Treating the norm as a constant is the paper's section 4.3 (and PEFT's), which saves the
    memory of differentiating through it at a negligible cost in accuracy.
    """
    norm = jax.lax.stop_gradient(_column_norm(self.kernel[...] + self.delta(name)))
    return getattr(self, magnitude_name(name))[...].astype(jnp.float32) / norm

  def cast_on_use(self) -> tuple[str, ...]:
    """`kernel` and `bias` enter only through nnx.Linear's cast (`layers.params_cast_on_use`),
    except under DoRA, whose column norms read the kernel at full precision."""
    return () if self.dora else ('kernel', 'bias')

  takes_rngs = True  # The model passes dropout's `deterministic` and `rngs` (bert.dense).

  def __call__(self, inputs: jax.Array, out_sharding=None, *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    if self.merged or self.active is None or not self.has_adapter(self.active):
      return super().__call__(inputs, out_sharding)
    a_attr, b_attr = _attr_names(self.active)
    if self._fused(inputs, out_sharding, deterministic):
      lora_a, lora_b = getattr(self, a_attr)[...], getattr(self, b_attr)[...]
      # The base layer's parameters cast as nnx.Linear casts them (a no-op in float32).
      kernel = self.kernel[...].astype(inputs.dtype)
      bias = None if self.bias is None else self.bias[...].astype(inputs.dtype)
      y = _lora_product(inputs.reshape(-1, inputs.shape[-1]), kernel, lora_a, lora_b, bias,
                        dict(self.adapters)[self.active])
      return y.reshape(*inputs.shape[:-1], y.shape[-1])
    y = super().__call__(inputs, out_sharding)
    dropped = self.dropout(inputs, deterministic=deterministic, rngs=rngs)
    x, lora_a, lora_b = self.promote_dtype(
        (dropped, getattr(self, a_attr)[...], getattr(self, b_attr)[...]), dtype=self.dtype
    )
    update = (_down(x, lora_a) @ lora_b) * dict(self.adapters)[self.active]
    if self.active in self.dora:
      # m/n * (x W + x delta) + b, written around the base output as PEFT does.
      scale = self.magnitude_scale(self.active).astype(y.dtype)
      base = y if self.bias is None else y - self.bias[...].astype(y.dtype)
      return y + (scale - 1) * base + scale * update.astype(y.dtype)
    return y + update.astype(y.dtype)

  def _fused(self, inputs: jax.Array, out_sharding, deterministic: bool) -> bool:
    """Whether the layer's product and its adapter's run as one product on the matmul kernel
    (`_lora_product`): plain LoRA (no DoRA), no dropout on the branch, the plain product (no
    dot_general or precision of the user's), float32 parameters (or a base held in the compute
    dtype), and either float32 throughout or a bfloat16 layer
    (`dtype`) on bfloat16 inputs, with a product the kernel serves on this machine
    (`kernels.f32_matmul_on_kernel`, `kernels.bf16_matmul_on_kernel`)."""
    a_attr, b_attr = _attr_names(self.active)
    factors = (getattr(self, a_attr)[...], getattr(self, b_attr)[...])
    base = (self.kernel[...], *([] if self.bias is None else [self.bias[...]]))
    if (self.active in self.dora or not self.dropout.drops_nothing(deterministic)
        or out_sharding is not None or jax.default_backend() != 'cpu'
        or self.dot_general not in (layers.dot_general, jax.lax.dot_general)
        or self.precision is not None or any(f.dtype != jnp.float32 for f in factors)):
      return False
    shape = (math.prod(inputs.shape[:-1]), *self.kernel.shape)
    if self.dtype in (None, jnp.float32):
      return (inputs.dtype == jnp.float32 and all(w.dtype == jnp.float32 for w in base)
              and kernels.f32_matmul_on_kernel(*shape))
    return (self.dtype == jnp.bfloat16 and inputs.dtype == jnp.bfloat16
            and all(w.dtype in (jnp.float32, jnp.bfloat16) for w in base)
            and kernels.bf16_matmul_on_kernel(*shape))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _lora_product(x: jax.Array, kernel: jax.Array, lora_a: jax.Array, lora_b: jax.Array,
                  bias: jax.Array | None, scaling: float) -> jax.Array:
  """x W + b + scaling (x A) B for [M, in] x, as one product on the matmul kernel.

  The low-rank term is added to each block of the output while the kernel has it in cache
  (`kernels.matmul_plus`), and the input gradient g W^T + (scaling g B^T) A^T likewise, where
  the unfused layer ran the rank-r products as [M, r] x [r, out] dots of their own (XLA:CPU:
  ~40 GFLOP/s at MiniLM's 4096 x 8 x 384) and added their outputs in passes over memory. The
  bias (None: none) is the product's starting value, as in the plain layer's `_matmul_bias`:
  with B = 0 the output is the plain layer's, bit for bit. The frozen kernel's gradient, x^T g,
  and the bias's, g's column sums, are never computed unless something asks for them.

  float32: A's gradient as g^T x-shaped [r, in] (see `_down`), the rank-r products on XLA.
  bfloat16 (x, W and b in bfloat16; A and B float32 parameters, multiplied as bfloat16 like the
  rest of the layer): every product on the kernel, accumulated in float32 and rounded once, the
  low-rank term added to each float32 row of the output (and of the input gradient) before its
  rounding. The unfused bfloat16 layer had XLA:CPU convert x and g to float32 for its rank-r
  dots (a [M, in] float32 copy each, then Eigen's float32 dot for A's and B's gradients) and
  round x A, (x A) B and their sum with the base output to bfloat16 one after the other.
  """
  return _lora_product_fwd(x, kernel, lora_a, lora_b, bias, scaling)[0]


def _lora_product_fwd(x, kernel, lora_a, lora_b, bias, scaling):
  if x.dtype == jnp.float32:
    u = x @ lora_a
    b2 = lora_b
  else:  # [M, r] in float32, from bfloat16 x and A
    u = kernels.matmul(x, lora_a.astype(x.dtype), out_dtype=jnp.float32)
    b2 = lora_b.astype(x.dtype).astype(jnp.float32)
  return (kernels.matmul_plus(x, kernel, u * scaling, b2, bias),
          (x, kernel, lora_a, lora_b, u, bias))


def _lora_product_bwd(scaling, residuals, g):
  x, kernel, lora_a, lora_b, u, bias = residuals
  g = g.astype(x.dtype)
  if x.dtype == jnp.float32:
    v = (g @ lora_b.T) * scaling  # the gradient of x A
    d_x = kernels.matmul_plus(g, kernel, v, lora_a, transpose_b=True, transpose_b2=True)
    d_a = jax.lax.optimization_barrier(jax.lax.dot_general(v, x, (((0,), (0,)), ((), ())))).T
    d_b = jax.lax.dot_general(u, g, (((0,), (0,)), ((), ()))) * scaling
  else:
    # The rank-r products on the kernel too: [M, r] outputs, and A's and B's gradients as
    # [r, in] and [r, out] products contracting the tokens (XLA:CPU ran x^T v, contracting
    # its lhs's first dimension, at 1.0 ms against the kernel's 0.14 for v^T x).
    a_c, b_c = lora_a.astype(x.dtype), lora_b.astype(x.dtype)
    v = kernels.matmul(g, b_c, transpose_b=True, out_dtype=jnp.float32) * scaling
    d_x = kernels.matmul_plus(g, kernel, v, a_c.astype(jnp.float32), transpose_b=True,
                              transpose_b2=True)
    d_a = kernels.matmul(v.astype(x.dtype), x, transpose_a=True, out_dtype=jnp.float32).T
    d_b = kernels.matmul(u.astype(x.dtype), g, transpose_a=True,
                         out_dtype=jnp.float32) * scaling
  d_kernel = layers._weight_grad(x, g, kernel.dtype)  # pylint: disable=protected-access
  d_bias = None if bias is None else jnp.sum(g.astype(jnp.float32), 0).astype(bias.dtype)
  return d_x, d_kernel, d_a.astype(lora_a.dtype), d_b.astype(lora_b.dtype), d_bias


_lora_product.defvjp(_lora_product_fwd, _lora_product_bwd)


@jax.custom_vjp
def _down(x: jax.Array, lora_a: jax.Array) -> jax.Array:
  """x @ A ([..., in] x [in, r]), whose gradient for A is computed as [r, in] where that is faster.

  Autodiff writes A's gradient as x^T g: an [in, r] product contracting every token. XLA:CPU
  runs that form of a float32 product at a third to a half of the speed of g^T x ([r, in], the
  layout of PEFT's lora_A weight): 1.0-1.5 against 0.5 ms at 32 x 128 tokens, in 384, r 8. The
  transpose back to [in, r] sits behind an optimization barrier, which keeps XLA from folding it
  into the product again. For bfloat16 the two forms measured within noise, so autodiff's stays.
  """
  return x @ lora_a


def _down_fwd(x, lora_a):
  return x @ lora_a, (x, lora_a)


def _down_bwd(residuals, g):
  x, lora_a = residuals
  tokens = tuple(range(x.ndim - 1))
  if x.dtype == jnp.float32:
    d_a = jax.lax.optimization_barrier(
        jax.lax.dot_general(g, x, ((tokens, tokens), ((), ())))).T
  else:
    d_a = jax.lax.dot_general(x, g, ((tokens, tokens), ((), ())))
  return g @ lora_a.T, d_a.astype(lora_a.dtype)


_down.defvjp(_down_fwd, _down_bwd)


def _lora_layers(model: nnx.Module) -> list[tuple[tuple, LoRALinear]]:
  return [(path, node) for path, node in surgery.modules(model) if isinstance(node, LoRALinear)]






def apply_lora(
    model: nnx.Module,
    *,
    targets: str,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    use_rslora: bool = False,
    use_dora: bool = False,
    rngs: nnx.Rngs,
    name: str = DEFAULT_ADAPTER,
) -> list[str]:
  """Adds LoRA adapter `name` to every linear layer whose path `targets` matches, in place.

  The new adapter becomes the active one on the whole model. Applying a second name to the same
  layers adds a second pair of factors; `set_active_adapter` chooses which one contributes.

  Args:
    model: the model to modify (e.g. a `SequenceClassifier`).
    targets: regex searched in '/'-joined module paths, e.g. r'attention/(query|value)$'.
      Every module it matches must be a linear layer.
    rank: r, the inner dimension of the factors.
    alpha: the scaling numerator: the update is scaled by alpha/r (alpha/sqrt(r) with rsLoRA).
    dropout: dropout on the LoRA branch's input during training (as PEFT's lora_dropout).
    use_rslora: scale by alpha/sqrt(r) (rank-stabilised LoRA) instead of alpha/r.
    use_dora: DoRA: the adapted weight is re-normalised per output feature and scaled by a
      learned magnitude (`lora_magnitude`, initialised to the kernel's column norms).
    rngs: initialises the A factors (its 'params' stream).
    name: the adapter's name (letters, digits, underscores).

  Returns:
    The '/'-joined paths of the adapted layers.

  Raises:
    FtjaxError: for rank <= 0, alpha <= 0, dropout outside [0, 1), an invalid name or regex, a regex
      that matches no module or matches a module that is not a linear layer, an adapter name
      already present on a matched layer, or a model with merged adapters.
  """
  if not isinstance(rank, int) or rank <= 0:
    raise FtjaxError(f'LoRA rank must be a positive integer, got {rank!r}: set e.g. rank=8')
  if alpha <= 0:
    raise FtjaxError(f'LoRA alpha must be positive, got {alpha!r}: set e.g. alpha=16')
  if not 0.0 <= dropout < 1.0:
    raise FtjaxError(f'LoRA dropout must be in [0, 1), got {dropout!r}')
  if not _ADAPTER_NAME.fullmatch(name):
    raise FtjaxError(
        f'LoRA adapter name {name!r} is invalid: use letters, digits and underscores only'
    )
  if any(layer.merged for _, layer in _lora_layers(model)):
    raise FtjaxError('this model has merged LoRA adapters: call unmerge_lora before apply_lora')
  matched = surgery.match_linears(model, targets, 'LoRA', also=LoRALinear)
  for path, node in matched:
    if isinstance(node, LoRALinear) and node.has_adapter(name):
      raise FtjaxError(
          f'{surgery.path_str(path)} already has a LoRA adapter named {name!r}: pass another name'
      )

  scaling = alpha / (math.sqrt(rank) if use_rslora else rank)
  for path, node in matched:
    layer = node if isinstance(node, LoRALinear) else LoRALinear(node)
    layer.add_adapter(name, rank=rank, scaling=scaling, rngs=rngs, use_dora=use_dora)
    if dropout:
      layer.dropout = layers.Dropout(dropout)
    if layer is not node:
      surgery.replace(model, path, layer)
  set_active_adapter(model, name)
  return [surgery.path_str(path) for path, _ in matched]


def adapter_names(model: nnx.Module) -> list[str]:
  """The names of the LoRA adapters present anywhere in `model`, in the order they were added."""
  names: dict[str, None] = {}
  for _, layer in _lora_layers(model):
    names.update((name, None) for name, _ in layer.adapters)
  return list(names)


def set_active_adapter(model: nnx.Module, name: str | None) -> None:
  """Makes adapter `name` the only one that contributes (None: the base model alone).

  Layers without an adapter of that name then compute their base output only.

  Raises:
    FtjaxError: if no layer has an adapter `name`, or adapters are merged.
  """
  layers = _lora_layers(model)
  if any(layer.merged for _, layer in layers):
    raise FtjaxError(
        'this model has a merged LoRA adapter: call unmerge_lora before switching adapters'
    )
  if name is not None and not any(layer.has_adapter(name) for _, layer in layers):
    raise FtjaxError(
        f'this model has no LoRA adapter named {name!r}: use one of '
        f'{", ".join(map(repr, adapter_names(model))) or "(none: call apply_lora first)"}'
    )
  for _, layer in layers:
    layer.active = name


def merge_lora(model: nnx.Module) -> list[str]:
  """Folds the active adapter into the base kernels: kernel += A @ B * scaling, in place.

  The LoRA branch is then skipped, so the forward pass costs what the base model costs and an
  exporter sees plain linear layers. `unmerge_lora` undoes it.

  Returns:
    The '/'-joined paths of the layers merged.

  Raises:
    FtjaxError: if the model has no active adapter or is merged already.
  """
  layers = _lora_layers(model)
  if any(layer.merged for _, layer in layers):
    raise FtjaxError('the LoRA adapters of this model are merged already: nothing to merge')
  todo = [(p, layer) for p, layer in layers if layer.active and layer.has_adapter(layer.active)]
  if not todo:
    raise FtjaxError('this model has no active LoRA adapter to merge: call apply_lora first')
  for _, layer in todo:
    merged = layer.kernel[...] + layer.delta(layer.active)
    if layer.active in layer.dora:
      norm = _column_norm(merged)
      layer.dora_norm = DoRANorm(norm)
      merged = merged * (getattr(layer, magnitude_name(layer.active))[...] / norm)
    layer.kernel[...] = merged.astype(layer.kernel.dtype)
    layer.merged = True
  return [surgery.path_str(path) for path, _ in todo]


def unmerge_lora(model: nnx.Module) -> list[str]:
  """Subtracts the merged adapter back out of the base kernels (the inverse of `merge_lora`).

  Returns:
    The '/'-joined paths of the layers unmerged.

  Raises:
    FtjaxError: if nothing is merged.
  """
  todo = [(path, layer) for path, layer in _lora_layers(model) if layer.merged]
  if not todo:
    raise FtjaxError('this model has no merged LoRA adapter: nothing to unmerge')
  for _, layer in todo:
    kernel = layer.kernel[...]
    if layer.active in layer.dora:
      magnitude = getattr(layer, magnitude_name(layer.active))[...]
      kernel = kernel * (layer.dora_norm[...] / magnitude)
      del layer.dora_norm
    layer.kernel[...] = (kernel - layer.delta(layer.active)).astype(layer.kernel.dtype)
    layer.merged = False
  return [surgery.path_str(path) for path, _ in todo]


def _plain_linear(layer: LoRALinear) -> layers.Linear:
  # Built abstractly so that no throwaway kernel is materialised; the real Params go in after.
  in_features, out_features = layer.kernel.shape
  linear = nnx.eval_shape(lambda: layers.Linear(
      in_features, out_features, use_bias=layer.bias is not None, dtype=layer.dtype,
      param_dtype=layer.param_dtype, precision=layer.precision, dot_general=layer.dot_general,
      promote_dtype=layer.promote_dtype, preferred_element_type=layer.preferred_element_type,
      rngs=nnx.Rngs(0)))
  linear.kernel = layer.kernel
  if layer.bias is not None:
    linear.bias = layer.bias
  return linear


def strip_lora(model: nnx.Module) -> list[str]:
  """Turns every `LoRALinear` back into a plain `layers.Linear`, dropping all adapters, in place.

  Call it after `merge_lora` to keep the merged weights (e.g. before `hub.export_encoder`, which
  refuses parameters without a Hugging Face name), or on an unmerged model to drop the adapters.

  Returns:
    The '/'-joined paths of the layers stripped.
  """
  layers = _lora_layers(model)
  for path, layer in layers:
    surgery.replace(model, path, _plain_linear(layer))
  return [surgery.path_str(path) for path, _ in layers]
