"""Building blocks every model family shares: parameter factories, attention and its cache.

Parameters are float32 (the master weights) and carry logical axis names for the sharding rules;
the compute dtype (float32 or bfloat16) is a constructor argument of each layer. Softmax and
normalisation statistics always run in float32.

Logical axes: 'vocab' (vocabulary rows), 'embed' (the residual stream D), 'heads' (query heads x
head_dim, concatenated), 'kv_heads' (key/value heads x head_dim, grouped-query attention), 'mlp'
(the feed-forward hidden size), 'classes' (a head's outputs) and None for dimensions that are
never sharded (positions, token types, patches). Variables are created with
`eager_sharding=False`, so on one device the names are metadata only; a mesh applies them at
jitted init / load time through the rules table.
"""

from collections.abc import Callable
import functools
import math
from typing import Any

import flax
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from ftjax import kernels

Axes = tuple[str | None, ...]


def _after(g: jax.Array, *residuals: jax.Array) -> tuple[jax.Array, ...]:
  """`residuals` made to depend on the cotangent `g`, for a backward pass that recomputes from them.

  Without this, XLA merges a backward pass's recomputation with the forward's identical ops
  (common-subexpression elimination) and keeps the forward's intermediates alive until the
  backward pass: the memory the recomputation was meant to save (in a MiniLM LoRA step,
  32 x 128 tokens in bfloat16, XLA's scratch memory was 1,019 MiB with plain residuals and
  467 MiB with these). An optimization barrier over (residuals, g) prevents it on GPU and TPU,
  as in `jax.checkpoint`; XLA:CPU drops barriers before CSE, so there `0 * g[0]` is added
  instead: zero, but not provably so to XLA (it is NaN when g[0] is not finite, and the
  gradient is then not finite either).
  """
  if jax.default_backend() != 'cpu':
    return jax.lax.optimization_barrier((residuals, g))[0]
  zero = jax.lax.stop_gradient(g.reshape(-1)[0]) * 0
  return tuple(r + zero.astype(r.dtype) for r in residuals)


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU, x * Phi(x), through erf as torch computes it; its backward keeps only `x`.

  jax.nn.gelu(approximate=False) goes through erfc, which XLA CPU evaluates ~5x slower (a
  MiniLM step at 32 x 128: 2.62 -> 2.39 s). Differentiated as written, the expression would
  also store two more [tokens, FFN] intermediates per layer for the backward pass; the custom
  derivative Phi(x) + x * phi(x) recomputes them from `x` (in float32) instead.
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(2**-0.5, x.dtype)))


def _gelu_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  return gelu(x), x


def _gelu_bwd(x: jax.Array, g: jax.Array) -> tuple[jax.Array]:
  x32 = _after(g, x)[0].astype(jnp.float32)
  cdf = 0.5 * (1.0 + jax.lax.erf(x32 * 2**-0.5))
  pdf = jnp.exp(-0.5 * x32 * x32) * (2 * math.pi)**-0.5
  return ((g.astype(jnp.float32) * (cdf + x32 * pdf)).astype(g.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


@jax.custom_vjp
def bias_gelu(y: jax.Array, bias: jax.Array) -> jax.Array:
  """gelu(y + bias) for y [..., N] and bias [N] on ftjax's kernel (`kernels/gelu.cc`, where
  `kernels.layer_kernel_applies`: both float32 or both bfloat16): a dense layer's bias and
  activation in one pass on all threads; the backward pass recomputes y + bias and returns the
  bias gradient with d(y + bias), in one pass too. The same values as `gelu(add_bias(y, bias))`
  to float32 rounding; in bfloat16, computed in float32 and rounded once (XLA rounds y + bias
  and GELU's result each), and at MiniLM's [4096, 1536] ~4x faster than XLA's three loop
  fusions and bias-gradient reduction."""
  return kernels.bias_gelu(y, bias)


def _bias_gelu_fwd(y, bias):
  return kernels.bias_gelu(y, bias), (y, bias)


def _bias_gelu_bwd(residuals, g):
  y, bias = residuals
  d, d_bias = kernels.bias_gelu_grad(y, bias, g.astype(y.dtype))
  return d, d_bias.astype(bias.dtype)


bias_gelu.defvjp(_bias_gelu_fwd, _bias_gelu_bwd)

def silu_gate(gate: jax.Array, up: jax.Array) -> jax.Array:
  """silu(gate) * up, the gated feed-forward layer's activation (SwiGLU: Llama, Mistral, Qwen2).

  On ftjax's kernel where `kernels.layer_kernel_applies` (both float32 or both bfloat16, one
  CPU device; `kernels/swiglu.cc`): one pass on all threads forward and one backward, computed
  in float32 and rounded once, where XLA:CPU ran silu, the product and the backward as
  single-threaded loop fusions rounding each bfloat16 piece (~4.5 ms a layer of the 100M
  Llama's [2048, 2048] in bfloat16). Elsewhere `jax.nn.silu(gate) * up` itself.
  """
  if gate.shape == up.shape and kernels.layer_kernel_applies(gate, up):
    return _silu_gate_kernel(gate, up)
  return jax.nn.silu(gate) * up


@jax.custom_vjp
def _silu_gate_kernel(gate: jax.Array, up: jax.Array) -> jax.Array:
  return kernels.swiglu(gate, up)


def _silu_gate_kernel_fwd(gate, up):
  return kernels.swiglu(gate, up), (gate, up)


def _silu_gate_kernel_bwd(residuals, g):
  gate, up = residuals
  return kernels.swiglu_grad(gate, up, g.astype(gate.dtype))


_silu_gate_kernel.defvjp(_silu_gate_kernel_fwd, _silu_gate_kernel_bwd)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'gelu': gelu,
    'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
    'gelu_fast': lambda x: jax.nn.gelu(x, approximate=True),
    'gelu_pytorch_tanh': lambda x: jax.nn.gelu(x, approximate=True),
    'quick_gelu': lambda x: x * jax.nn.sigmoid(1.702 * x),
    'relu': jax.nn.relu,
    'silu': jax.nn.silu,
    'swish': jax.nn.silu,
    'tanh': jnp.tanh,
}

# Added to float32 attention logits of masked keys; finfo.min (not -inf) keeps a fully masked
# row (a padding query) free of NaNs.
MASKED = float(jnp.finfo(jnp.float32).min)


def rngs(*args, **kwargs) -> nnx.Rngs:
  """`nnx.Rngs(*args, **kwargs)` whose streams count their draws on the host (NumPy).

  The keys drawn are the same. Under tracing (`eval_shape`, `jit`), nnx's own counter becomes a
  tracer, and each draw's update asks it for its `sharding`: jax answers with an AttributeError
  whose message it words by walking the whole trace so far, so building a model costs time
  quadratic in its size (MiniLM: 0.4 s of a 1.1 s load, which traces the model twice, for its
  shapes and for its new head; and 0.1 s of tracing the train step). A host counter is never
  traced.
  """
  streams = nnx.Rngs(*args, **kwargs)
  for _, stream in streams.items():
    stream.count = _HostCount(np.zeros(np.shape(stream.count.get_value()), np.uint32),
                              tag=stream.tag)
  return streams


class _HostCount(nnx.RngCount):
  """A draw counter held as a NumPy array (see `rngs`).

  Reads return copies: a trace keeps a NumPy operand as a constant by reference, and nnx then
  increments the counter in place.
  """

  def get_value(self, **kwargs):
    return np.array(super().get_value(**kwargs))


def param_init(init: nnx.Initializer, axes: Axes) -> nnx.Initializer:
  """`init` with logical axis names attached as metadata (no eager sharding on one device)."""
  # eager_sharding=False: the names must not demand a mesh when a model is built on one CPU
  # device (flax shards eagerly by default); sharded init applies them explicitly instead.
  return nnx.with_partitioning(init, axes, eager_sharding=False)


def _dot_f32(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
  """a . b over one dimension each (`contract`), accumulated and returned in float32."""
  return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                             preferred_element_type=jnp.float32)


def _transposed_copy(x_MxK: jax.Array) -> jax.Array:
  """x.T [K, M], laid out in memory as such, so that a product contracting M reads it row-major.

  A plain `x.T` is folded into the consuming dot's dimension numbers (a dot contracting its
  lhs's first dimension, which XLA:CPU runs on its float32 path); the transposes of two blocks
  of rows, concatenated, are not, and cost one copy of x. (The same for the batched [B, G, Q, K]
  operands of attention's backward pass compiled, but failed at run time in XLA:CPU's DotThunk,
  'Unsupported element type BF16 x BF16 = F32', so attention keeps its plain contraction.)
  """
  half = x_MxK.shape[0] // 2
  return jnp.concatenate([x_MxK[:half].T, x_MxK[half:].T], axis=1)


@jax.custom_vjp
def _matmul(x_MxK: jax.Array, w_KxN: jax.Array) -> jax.Array:
  """x @ w for a dense layer on the CPU: bfloat16 operands (accumulated in float32, rounded to
  bfloat16 once) or float32 ones.

  bfloat16: two implementations of the same values, chosen per machine by
  `kernels.bf16_matmul_on_kernel`:
  - ftjax's matmul kernel (`kernels/matmul.cc`), taking the transposed operands of the
    backward pass without copies, in the variant measured faster on the machine: converting the
    operands to float32 as it packs them and multiplying with float32 FMAs (on CPUs whose
    bfloat16 dot instruction is slow, an Intel Xeon without AMX: 1.2-1.9x XLA's bfloat16 dots),
    or multiplying pairs of bfloat16 with that instruction (where it is fast, AMD Zen 4: at
    MiniLM's FFN shapes 1.1-1.25x XLA's, ~92% of the instruction's measured peak).
  - XLA's dot, as bf16 x bf16 -> f32: XLA:CPU runs a dot on YNNPACK's bfloat16 kernels only in
    that form (and with the lhs contracting its last dimension); a bf16 x bf16 -> bf16 dot,
    which is what `nnx.Linear` and autodiff of it emit, is upcast to a float32 dot instead, at
    half the speed on a CPU with fast bfloat16 instructions (AMD EPYC Zen 4: ~400 against ~190
    GFLOP/s at MiniLM's FFN shapes). The forward product, the input gradient g @ w^T and the
    weight gradient x^T @ g (on a transposed copy of x, `_transposed_copy`) all keep that form.

  float32 (only where `kernels.f32_matmul_on_kernel` says so; `dot_general` leaves other
  float32 products to XLA): all three products on the kernel, the forward product and the
  input gradient reading x unpacked (0.85-0.95 of XLA's time at MiniLM's shapes on an Intel
  Xeon with AMX), the weight gradient copying x^T's panels row by row of x, without a
  transpose (`_weight_grad`). The kernel sums in a different order than XLA: the values agree
  to float32 rounding.
  """
  if _on_kernel(x_MxK, w_KxN):
    return kernels.matmul(x_MxK, w_KxN)
  return _dot_f32(x_MxK, w_KxN, (1, 0)).astype(x_MxK.dtype)


def _on_kernel(x_MxK: jax.Array, w_KxN: jax.Array) -> bool:
  on_kernel = (kernels.f32_matmul_on_kernel if x_MxK.dtype == jnp.float32
               else kernels.bf16_matmul_on_kernel)
  return on_kernel(x_MxK.shape[0], *w_KxN.shape)


def _matmul_fwd(x_MxK, w_KxN):
  return _matmul(x_MxK, w_KxN), (x_MxK, w_KxN)


def _matmul_bwd(residuals, g_MxN):
  x_MxK, w_KxN = residuals
  g_MxN = g_MxN.astype(x_MxK.dtype)
  if x_MxK.dtype == jnp.float32:
    if _on_kernel(x_MxK, w_KxN):
      return (kernels.matmul(g_MxN, w_KxN, transpose_b=True),
              _weight_grad(x_MxK, g_MxN, w_KxN.dtype))
    return _dot_f32(g_MxN, w_KxN, (1, 1)), _dot_f32(x_MxK, g_MxN, (0, 0))
  if _on_kernel(x_MxK, w_KxN):
    return (kernels.matmul(g_MxN, w_KxN, transpose_b=True),
            _weight_grad(x_MxK, g_MxN, w_KxN.dtype))
  return (_dot_f32(g_MxN, w_KxN, (1, 1)).astype(x_MxK.dtype),
          _dot_f32(_transposed_copy(x_MxK), g_MxN, (1, 0)).astype(w_KxN.dtype))


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _weight_grad(x_MxK: jax.Array, g_MxN: jax.Array, dtype) -> jax.Array:
  """x^T g in `dtype` (the weight's), a dense layer's weight gradient, where its other products
  run on the matmul kernel: on the kernel too, which needs no transposing copy of x (float32:
  a panel of x^T is a run of values in each row of x; bfloat16: float32 accumulation, rounded
  once). In float32, XLA:CPU ran this dot, contracting both operands' first dimension,
  at 184-238 GFLOP/s at MiniLM's shapes (4096 tokens) on an Intel Xeon with AMX, the kernel at
  262-283 (214-272 against 268-282 at Llama's, 2048 tokens); MiniLM's float32 full fine-tuning
  step took 0.947 of its time with its weight gradients on the kernel."""
  return kernels.matmul(x_MxK, g_MxN, transpose_a=True, out_dtype=dtype)


@jax.custom_vjp
def _matmul_bias(x_MxK: jax.Array, w_KxN: jax.Array, b_N: jax.Array) -> jax.Array:
  """x @ w + b for a float32 or bfloat16 dense layer on the matmul kernel (where `_matmul` puts
  its product), the bias folded into the kernel's passes (`kernels.matmul_bias`,
  `kernels.matmul_sums`): the forward product starts from it (bfloat16: it is added to each
  complete float32 row before the one rounding), and the input gradient g w^T returns its
  gradient, g's column sums, from the kernel's read of g. Added by XLA, a bias took a pass of
  its own over each output (~0.6 ms for [4096, 384] in float32, beside the kernel: MiniLM's q,
  k and v) and its gradient another (bfloat16: a float32 copy of g, then its sum).
  """
  return kernels.matmul_bias(x_MxK, w_KxN, b_N)


def _matmul_bias_fwd(x_MxK, w_KxN, b_N):
  return kernels.matmul_bias(x_MxK, w_KxN, b_N), (x_MxK, w_KxN)


def _matmul_bias_bwd(residuals, g_MxN):
  x_MxK, w_KxN = residuals
  g_MxN = g_MxN.astype(x_MxK.dtype)
  d_x, d_b = kernels.matmul_sums(g_MxN, w_KxN, transpose_b=True)
  return d_x, _weight_grad(x_MxK, g_MxN, w_KxN.dtype), d_b.astype(w_KxN.dtype)


_matmul_bias.defvjp(_matmul_bias_fwd, _matmul_bias_bwd)


def dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None,
                preferred_element_type=None, out_sharding=None) -> jax.Array:
  """`jax.lax.dot_general` as `nnx.Linear` calls it, with a dense layer's products on ftjax's
  CPU path (`_matmul`): for an x [..., K] and kernel [K, N] on the CPU, both bfloat16, or both
  float32 where the matmul kernel serves them (`kernels.f32_matmul_on_kernel`); any other call
  is `jax.lax.dot_general` itself (accelerators run these dots natively)."""
  (lhs_contract, rhs_contract), (lhs_batch, _) = dimension_numbers
  if (lhs.dtype == rhs.dtype and rhs.ndim == 2
      and tuple(lhs_contract) == (lhs.ndim - 1,) and tuple(rhs_contract) == (0,)
      and not lhs_batch and precision is None and preferred_element_type is None
      and out_sharding is None and jax.default_backend() == 'cpu'
      and (lhs.dtype == jnp.bfloat16
           or (lhs.dtype == jnp.float32
               and kernels.f32_matmul_on_kernel(math.prod(lhs.shape[:-1]), *rhs.shape)))):
    y = _matmul(lhs.reshape(-1, lhs.shape[-1]), rhs)
    return y.reshape(*lhs.shape[:-1], rhs.shape[1])
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                             preferred_element_type=preferred_element_type,
                             out_sharding=out_sharding)


@jax.custom_vjp
def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
  """y [..., N] + bias [N], whose bias gradient is summed over the tokens in float32.

  Autodiff of the broadcast add sums the gradient in its own dtype; for bfloat16 XLA:CPU runs
  that sum as a chain of reduce-windows over a float32 copy, at ~3 ns per element (MiniLM's
  bfloat16 full fine-tuning step: ~13% of its time in the biases' gradients). A float32 sum
  of the same values is one fast reduction, and rounds once.
  """
  return y + bias


def _add_bias_fwd(y, bias):
  return y + bias, bias


def _add_bias_bwd(bias, g):
  over_tokens = tuple(range(g.ndim - 1))
  return g, jnp.sum(g.astype(jnp.float32), over_tokens).astype(bias.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


@jax.custom_vjp
def add_broadcast(x: jax.Array, y: jax.Array) -> jax.Array:
  """x + y for a y that broadcasts over x's leading axes (e.g. position embeddings [1, L, D]
  added to a [B, L, D] stream), whose gradient sums g over those axes as a product with a row
  of ones, accumulated in float32.

  Autodiff's reduction over a leading axis runs on XLA:CPU ~20x slower than that product (a
  [32, 128, 384] float32 gradient: 6.6 against 0.28 ms; ~0.8% of MiniLM's full step).
  """
  return x + y


def _add_broadcast_fwd(x, y):
  return x + y, y


def _add_broadcast_bwd(y, g):
  offset = g.ndim - y.ndim
  # y is [1, ..., 1, *g.shape[lead:]]: the sum runs over g's first `lead` axes.
  lead = offset + next((i for i, n in enumerate(y.shape) if n != 1), y.ndim)
  if y.shape[lead - offset:] != g.shape[lead:]:  # It broadcasts elsewhere too: a plain sum.
    axes = tuple(i for i in range(g.ndim) if i < offset or y.shape[i - offset] == 1)
    return g, jnp.sum(g.astype(jnp.float32), axes, keepdims=True).reshape(y.shape).astype(y.dtype)
  rows = g.reshape(math.prod(g.shape[:lead]), -1)
  total = jnp.dot(jnp.ones((1, rows.shape[0]), g.dtype), rows,
                  preferred_element_type=jnp.float32)
  return g, total.reshape(y.shape).astype(y.dtype)


add_broadcast.defvjp(_add_broadcast_fwd, _add_broadcast_bwd)


class Linear(nnx.Linear):
  """`nnx.Linear` with the bias added by `add_bias`: the same parameters and forward values,
  the bias gradient summed in float32. `activation`, if given, is applied to the output; exact
  GELU after a float32 bias runs fused with it on ftjax's kernel (`bias_gelu`)."""

  def __call__(self, inputs: jax.Array, out_sharding=None,
               activation: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
    if self.bias is None:
      y = super().__call__(inputs, out_sharding)
      return y if activation is None else activation(y)
    # nnx.Linear.__call__ (flax 0.12) up to its bias add.
    inputs, kernel, bias = self.promote_dtype((inputs, self.kernel[...], self.bias[...]),
                                              dtype=self.dtype)
    kwargs = {'out_sharding': out_sharding}
    if self.preferred_element_type is not None:
      kwargs['preferred_element_type'] = self.preferred_element_type
    fused_gelu = activation is gelu and bias.ndim == 1
    if not fused_gelu and self._bias_on_kernel(inputs, kernel, bias, kwargs):
      y = _matmul_bias(inputs.reshape(-1, inputs.shape[-1]), kernel, bias)
      y = y.reshape(*inputs.shape[:-1], y.shape[-1])
      return y if activation is None else activation(y)
    y = self.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())),
                         precision=self.precision, **kwargs)
    if fused_gelu and kernels.layer_kernel_applies(y, bias):
      return bias_gelu(y, bias)
    y = add_bias(y, bias)
    return y if activation is None else activation(y)

  def _bias_on_kernel(self, inputs, kernel, bias, kwargs) -> bool:
    """Whether the product and bias run as one on the matmul kernel (`_matmul_bias`): float32 or
    bfloat16 operands whose product `dot_general` puts on the kernel (`_on_kernel`), with no
    options of their own."""
    return (self.dot_general is dot_general and self.precision is None and bias.ndim == 1
            and kwargs.get('out_sharding') is None and 'preferred_element_type' not in kwargs
            and jax.default_backend() == 'cpu' and inputs.dtype == kernel.dtype == bias.dtype
            and inputs.dtype in (jnp.float32, jnp.bfloat16)
            and _on_kernel(jax.ShapeDtypeStruct((math.prod(inputs.shape[:-1]),
                                                 inputs.shape[-1]), inputs.dtype), kernel))


# The plain linear layers (PEFT surgery adapts exactly these): the ones the model families
# build, and flax's own.
PLAIN_LINEARS = (Linear, nnx.Linear)


def linear(in_features: int, out_features: int, axes: Axes, *, std: float, dtype: Any,
           rngs: nnx.Rngs, use_bias: bool = True) -> Linear:
  """A float32-parameter linear layer, kernel N(0, std^2), bias zero; `axes` names the kernel."""
  return Linear(
      in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
      kernel_init=param_init(nnx.initializers.normal(std), axes),
      bias_init=param_init(nnx.initializers.zeros_init(), axes[-1:]),
      dot_general=dot_general, rngs=rngs,
  )


# Layers whose every use of these parameters first casts them to the layer's compute dtype
# (`promote_dtype(..., dtype=self.dtype)` in `__call__`, and `Embed.attend`). Exact types only: a
# subclass may read its parameters otherwise and says so itself (`params_cast_on_use`).
# Norm scales are left out: they are small, and flax's LayerNorm multiplies by them in float32.
_CAST_ON_USE = {Linear: ('kernel', 'bias'), nnx.Linear: ('kernel', 'bias'),
                nnx.Embed: ('embedding',)}


def params_cast_on_use(module: nnx.Module) -> tuple[str, ...]:
  """Names of `module`'s own parameters that only ever enter its computation cast to
  `module.dtype`, so that holding them in that dtype changes no result.

  A module can answer for itself with a method `cast_on_use()` (e.g. LoRA's layer: not with
  DoRA, whose column norms read the kernel at full precision); otherwise the exact type decides.
  """
  own = getattr(module, 'cast_on_use', None)
  if callable(own):
    return tuple(own())
  return _CAST_ON_USE.get(type(module), ())


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _normalize(x: jax.Array, scale: jax.Array, bias: jax.Array | None, eps: float) -> jax.Array:
  """(x - mean) / sqrt(var + eps) * scale + bias over the last axis, statistics in float32."""
  return _normalize_fwd(x, scale, bias, eps)[0]


def _normalize_fwd(x, scale, bias, eps):
  # The same operations, in the same order, as flax's two-pass LayerNorm (bit-identical output).
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  rstd = jax.lax.rsqrt(jnp.square(x32 - mean).mean(-1, keepdims=True) + eps)
  y = (x - mean) * (rstd * scale)
  if bias is not None:
    y = y + bias
  # Only the input and two statistics per token are kept for the backward pass (autodiff of
  # the expression above stores three float32 copies of the [B, L, D] stream per LayerNorm).
  return y.astype(x.dtype), (x, mean, rstd, scale, bias)


def _normalize_bwd(eps, residuals, g):
  del eps
  x, mean, rstd, scale, bias = residuals
  x, mean, rstd = _after(g, x, mean, rstd)
  xhat = (x.astype(jnp.float32) - mean) * rstd
  g32 = g.astype(jnp.float32)
  over_tokens = tuple(range(x.ndim - 1))
  d_scale = jnp.sum(g32 * xhat, over_tokens).astype(scale.dtype)
  d_bias = None if bias is None else jnp.sum(g32, over_tokens).astype(bias.dtype)
  gs = g32 * scale.astype(jnp.float32)
  dx = rstd * (gs - gs.mean(-1, keepdims=True) - xhat * (gs * xhat).mean(-1, keepdims=True))
  return dx.astype(x.dtype), d_scale, d_bias


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _normalize_on_kernel(x, scale, bias, eps):
  """`_normalize` on ftjax's kernel (`kernels/layer_norm.cc`), float32 or bfloat16: each pass
  one read of its rows, on all threads, the parameters' gradients summed in the backward's
  pass."""
  return _normalize_on_kernel_fwd(x, scale, bias, eps)[0]


def _normalize_on_kernel_fwd(x, scale, bias, eps):
  flat = x.reshape(-1, x.shape[-1])
  y, mean, rstd = kernels.layer_norm(flat, scale, jnp.zeros_like(scale) if bias is None else bias,
                                     eps)
  return y.reshape(x.shape), (flat, mean, rstd, scale, bias)


def _normalize_on_kernel_bwd(eps, residuals, g):
  del eps
  flat, mean, rstd, scale, bias = residuals
  dx, d_scale, d_bias = kernels.layer_norm_grad(flat, mean, rstd, scale,
                                                g.astype(flat.dtype).reshape(flat.shape))
  return (dx.reshape(g.shape), d_scale.astype(scale.dtype),
          None if bias is None else d_bias.astype(bias.dtype))


_normalize_on_kernel.defvjp(_normalize_on_kernel_fwd, _normalize_on_kernel_bwd)


class LayerNorm(nnx.LayerNorm):
  """`nnx.LayerNorm` over the last axis with a hand-written backward pass (less memory).

  Same parameters, same forward values; the backward pass keeps the input and per-token mean and
  1/std instead of the full-size float32 intermediates autodiff would store. Float32 and
  bfloat16 ones run on ftjax's kernel where it applies (`kernels.layer_kernel_applies`), the
  same values to float32 rounding (bfloat16: rounded once, where XLA rounds the output's
  pieces).
  """

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    if mask is not None or self.reduction_axes not in (-1, (-1,)) or self.use_fast_variance:
      return super().__call__(x, mask=mask)
    scale = self.scale[...] if self.scale else jnp.ones((x.shape[-1],), jnp.float32)
    bias = self.bias[...] if self.bias else None
    x, scale, bias = self.promote_dtype((x, scale, bias), dtype=self.dtype)
    if kernels.layer_kernel_applies(x, scale, *([] if bias is None else [bias])):
      return _normalize_on_kernel(x, scale, bias, self.epsilon)
    return _normalize(x, scale, bias, self.epsilon)


def residual_norm(norm: nnx.Module, dropout: nnx.Module, x: jax.Array, y: jax.Array, *,
                  deterministic: bool, rngs: nnx.Rngs | None) -> jax.Array:
  """norm(x + dropout(y)): a post-LayerNorm block's residual add (BERT's, after attention and
  after the FFN).

  In float32 or bfloat16 on ftjax's kernel (`kernels.add_layer_norm`), for ftjax's own
  LayerNorm (computing in the stream's dtype) and Dropout: the dropout, the add and the
  LayerNorm in one pass, the keep-mask's bits kept for the backward pass, whose one pass returns
  the residual's gradient, the branch's and the LayerNorm's parameters'. On XLA, the dropout and
  add are a loop fusion of their own each way (~0.65 ms forward and ~0.9 ms backward at
  MiniLM's [4096, 384] in float32, hashing the mask twice), and a bfloat16 LayerNorm several
  more. Both draw the same key and the same mask (`keep_mask`); the values agree to float32
  rounding (bfloat16: the kernel rounds x + dropout(y) and the output once each, XLA each
  piece).
  """
  # pylint: disable=unidiomatic-typecheck
  # The norm must compute in the stream's dtype (flax promotes a None dtype: float32 stays so).
  norm_dtypes = (None, jnp.float32) if x.dtype == jnp.float32 else (x.dtype,)
  fused = (type(norm) is LayerNorm and type(dropout) is Dropout and not dropout.broadcast_dims
           and x.shape == y.shape and x.dtype == y.dtype
           and norm.reduction_axes in (-1, (-1,)) and not norm.use_fast_variance
           and norm.dtype in norm_dtypes and dropout.rate < 1.0)
  if fused:
    scale = norm.scale[...] if norm.scale else jnp.ones((x.shape[-1],), jnp.float32)
    bias = norm.bias[...] if norm.bias else None
    # The parameters as LayerNorm uses them: in its dtype.
    scale, bias = scale.astype(x.dtype), None if bias is None else bias.astype(x.dtype)
    fused = kernels.layer_kernel_applies(x, y, scale, *([] if bias is None else [bias]))
  if not fused:
    return norm(x + dropout(y, deterministic=deterministic, rngs=rngs))
  rate = 0.0 if dropout.drops_nothing(deterministic) else dropout.rate
  seeds = _seeds(dropout.draw_key(rngs)) if rate else jnp.zeros((2,), jnp.uint32)
  return _add_normalize_on_kernel(x, y, scale, bias, seeds, norm.epsilon, rate)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _add_normalize_on_kernel(x, y, scale, bias, seeds, eps, rate):
  """LayerNorm(x + dropout(y)) on ftjax's kernel (see `residual_norm`)."""
  return _add_normalize_on_kernel_fwd(x, y, scale, bias, seeds, eps, rate)[0]


def _add_normalize_on_kernel_fwd(x, y, scale, bias, seeds, eps, rate):
  width = x.shape[-1]
  out, s, mean, rstd, keep = kernels.add_layer_norm(
      x.reshape(-1, width), y.reshape(-1, width), scale,
      jnp.zeros_like(scale) if bias is None else bias, seeds, eps, rate)
  return out.reshape(x.shape), (s, mean, rstd, scale, bias, keep)


def _add_normalize_on_kernel_bwd(eps, rate, residuals, g):
  del eps
  s, mean, rstd, scale, bias, keep = residuals
  shape = g.shape
  g = g.astype(s.dtype).reshape(s.shape)
  if rate:
    ds, dy, d_scale, d_bias = kernels.add_layer_norm_grad(s, mean, rstd, scale, g, keep, rate)
  else:  # No dropout: the branch's gradient is the residual's.
    ds, d_scale, d_bias = kernels.layer_norm_grad(s, mean, rstd, scale, g)
    dy = ds
  return (ds.reshape(shape), dy.reshape(shape), d_scale.astype(scale.dtype),
          None if bias is None else d_bias.astype(bias.dtype), None)


_add_normalize_on_kernel.defvjp(_add_normalize_on_kernel_fwd, _add_normalize_on_kernel_bwd)


def layer_norm(features: int, *, eps: float, dtype: Any, rngs: nnx.Rngs,
               use_bias: bool = True) -> LayerNorm:
  """LayerNorm over the residual stream, statistics in float32 as torch computes them."""
  return LayerNorm(
      features, epsilon=eps, dtype=dtype, param_dtype=jnp.float32, use_bias=use_bias,
      # The two-pass variance matches torch; the fast one drifts past parity tolerances.
      use_fast_variance=False,
      scale_init=param_init(nnx.initializers.ones_init(), ('embed',)),
      bias_init=param_init(nnx.initializers.zeros_init(), ('embed',)),
      rngs=rngs,
  )


def embed(num_embeddings: int, features: int, axes: Axes, *, std: float, dtype: Any,
          rngs: nnx.Rngs, padding_idx: int | None = None) -> nnx.Embed:
  """An embedding table N(0, std^2); as torch's nn.Embedding(padding_idx=...), that row is 0."""

  def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    table = std * jax.random.normal(key, shape, dtype)
    if padding_idx is not None and 0 <= padding_idx < shape[0]:
      table = table.at[padding_idx].set(0)
    return table

  return nnx.Embed(num_embeddings, features, dtype=dtype, param_dtype=jnp.float32,
                   embedding_init=param_init(init, axes), rngs=rngs)


def _mix32(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: a bijection on uint32 whose output bits all avalanche."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _seeds(key: jax.Array) -> jax.Array:
  """Two uint32 seeds from a key: its first and last words (threefry keys have exactly two)."""
  data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
  data = data.reshape(-1).astype(jnp.uint32)
  return jnp.stack([data[0], data[-1]])


def keep_mask(key: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
  """A dropout keep-mask: each element True with probability 1 - rate, from `key`.

  `jax.random.bernoulli` runs threefry (20 rounds of 32-bit ops) per element, which cost ~7% of
  a BERT training step on CPU. Here `key`'s own two 32-bit words are the seeds (a threefry or
  rbg key is already the output of a hash: `fold_in`/`split`) and each element hashes its flat
  index with them: two rounds of MurmurHash3's finaliser, a handful of integer ops that XLA
  fuses into the masking. For a fixed key the map from index
  to hash is a bijection, so the masks are exactly as uniform as the counter; different keys
  (steps, layers) give unrelated masks. The index is the global one, so a sharded array draws
  the same mask on every mesh.
  """
  return _keep(_seeds(key), shape, rate)


def _keep(seeds: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
  """`keep_mask` from the key's two uint32 seeds (what the attention's backward pass keeps)."""
  index = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
  h = _mix32(index * jnp.uint32(0x9E3779B1) + seeds[0])
  h = _mix32(h ^ seeds[1])
  threshold = min(int(round(rate * 2.0**32)), 2**32 - 1)
  return h >= jnp.uint32(threshold)


class Dropout(nnx.Dropout):
  """`nnx.Dropout` with the hash-based `keep_mask` instead of threefry bits; same interface."""

  def __call__(self, inputs: jax.Array, *, deterministic: bool | None = None,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    if self.drops_nothing(deterministic):
      return inputs
    if self.rate == 1.0:
      return jnp.zeros_like(inputs)
    key = self.draw_key(rngs)
    shape = tuple(1 if i in self.broadcast_dims else d for i, d in enumerate(inputs.shape))
    keep = jnp.broadcast_to(keep_mask(key, shape, self.rate), inputs.shape)
    scale = jnp.asarray(1.0 / (1.0 - self.rate), inputs.dtype)
    return jnp.where(keep, inputs * scale, jnp.zeros((), inputs.dtype))

  def drops_nothing(self, deterministic: bool | None) -> bool:
    """Whether a call with this `deterministic` returns its input unchanged."""
    deterministic = self.deterministic if deterministic is None else deterministic
    if deterministic is None:
      raise ValueError('Dropout needs `deterministic` (at construction or call time)')
    return self.rate == 0.0 or deterministic

  def draw_key(self, rngs: nnx.Rngs | None) -> jax.Array:
    """The key of one call's mask, from the call's `rngs` or the module's own."""
    rngs = self.rngs if rngs is None else rngs
    if rngs is None:
      raise ValueError('Dropout with deterministic=False needs `rngs` with a dropout stream')
    return rngs[self.rng_collection]() if isinstance(rngs, nnx.Rngs) else (
        rngs() if isinstance(rngs, nnx.RngStream) else rngs)


def dense(layer: nnx.Module, x: jax.Array, kw: dict,
          activation: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
  """Calls a linear layer, passing dropout's call-time randomness to those that take it, and
  applies `activation` (one of ACTIVATIONS) to its output.

  Plain `nnx.Linear` has no randomness; PEFT layers that wrap it (LoRA with dropout) set
  `takes_rngs` and receive `deterministic` and `rngs` like every other dropout in the model.
  ftjax's own `Linear` takes the activation itself, so that it can fuse it with its bias add
  (`bias_gelu`).
  """
  lead = x.shape[:-1]
  # Flattened to [tokens, features]: the weight gradient is then one plain 2-D matmul that
  # contracts the token axis (XLA CPU's fast path) instead of a dot over two batch-like axes.
  x = x.reshape(-1, x.shape[-1])
  if activation is not None and type(layer) is Linear:  # pylint: disable=unidiomatic-typecheck
    y = layer(x, activation=activation)
  else:
    y = layer(x, **kw) if getattr(layer, 'takes_rngs', False) else layer(x)
    y = y if activation is None else activation(y)
  return y.reshape(*lead, y.shape[-1])


def feed_forward(up: nnx.Module, down: nnx.Module, x: jax.Array, kw: dict,
                 activation: Callable[[jax.Array], jax.Array]) -> jax.Array:
  """down(activation(up(x))): a transformer block's feed-forward layers (see `dense`).

  For exact GELU between two float32 `Linear` layers with biases on the matmul kernel, GELU's
  backward runs inside the down layer's input gradient (`_gelu_dense`): the kernel multiplies
  g W^T by GELU's slope as its blocks complete and sums the up layer's bias gradient there, so
  g W^T is never written out and read back (at MiniLM's [4096, 1536]: 18.9-19.3 ms against
  21.8-23.8 for the product and `bias_gelu`'s backward, alone). Other layers (PEFT-wrapped,
  bfloat16, other activations) run as two `dense` calls.
  """
  # pylint: disable=unidiomatic-typecheck,protected-access
  if (activation is gelu and type(up) is Linear and type(down) is Linear
      and up.bias is not None and down.bias is not None):
    inputs = x.reshape(-1, x.shape[-1])
    hidden = jax.ShapeDtypeStruct((inputs.shape[0], up.kernel.shape[1]), inputs.dtype)
    if (up._bias_on_kernel(inputs, up.kernel[...], up.bias[...], {})
        and down._bias_on_kernel(hidden, down.kernel[...], down.bias[...], {})
        and up.dtype in (None, jnp.float32) and down.dtype in (None, jnp.float32)):
      out = _gelu_dense(_matmul(inputs, up.kernel[...]), up.bias[...], down.kernel[...],
                        down.bias[...])
      return out.reshape(*x.shape[:-1], out.shape[-1])
  return dense(down, dense(up, x, kw, activation=activation), kw)


@jax.custom_vjp
def _gelu_dense(y: jax.Array, b1: jax.Array, w2: jax.Array, b2: jax.Array) -> jax.Array:
  """gelu(y + b1) @ w2 + b2 for float32 y [M, F] on ftjax's kernels (see `feed_forward`): the
  forward as `bias_gelu` and `_matmul_bias`; the backward's d(y + b1) and both bias gradients
  from one kernel call (`kernels.matmul_gelu_grad`), w2's gradient on the kernel too
  (`_weight_grad`)."""
  return _gelu_dense_fwd(y, b1, w2, b2)[0]


def _gelu_dense_fwd(y, b1, w2, b2):
  h = kernels.bias_gelu(y, b1)
  return kernels.matmul_bias(h, w2, b2), (y, b1, h, w2)


def _gelu_dense_bwd(residuals, g):
  y, b1, h, w2 = residuals
  g = g.astype(jnp.float32)
  d_y, d_b1, d_b2 = kernels.matmul_gelu_grad(g, w2, y, b1)
  return d_y, d_b1, _weight_grad(h, g, w2.dtype), d_b2


_gelu_dense.defvjp(_gelu_dense_fwd, _gelu_dense_bwd)


@flax.struct.dataclass
class Packing:
  """Where each token of a packed batch comes from (`ftjax.data.packing`): several examples share
  a row, so attention stays within an example, positions restart at each example's start, and
  heads pool an example's own tokens.

  Attributes:
    example_ids: [R, L] int32, the example (0 .. num_examples - 1) of each token; -1 for padding.
    positions: [R, L] int32, each token's position within its example (0 at its first token).
    num_examples: B, the number of examples (static).
  """

  example_ids: jax.Array
  positions: jax.Array
  num_examples: int = flax.struct.field(pytree_node=False)

  def attention_bias(self) -> jax.Array:
    """The additive float32 bias [R, 1, L, L]: a token sees the tokens of its own example."""
    ids_RxL = self.example_ids
    same_RxLxL = (ids_RxL[:, :, None] == ids_RxL[:, None, :]) & (ids_RxL[:, None, :] >= 0)
    return jnp.where(same_RxLxL, 0.0, MASKED)[:, None].astype(jnp.float32)

  def membership(self, where_RxL: jax.Array | None = None) -> jax.Array:
    """[B, R * L] float32: 1 where a token belongs to an example (and `where_RxL` holds)."""
    ids = self.example_ids if where_RxL is None else jnp.where(where_RxL, self.example_ids, -1)
    return (ids.reshape(1, -1) == jnp.arange(self.num_examples)[:, None]).astype(jnp.float32)

  def gather(self, hidden_RxLxD: jax.Array, where_RxL: jax.Array | None = None) -> jax.Array:
    """Per example, the float32 sum of its tokens' vectors (those where `where_RxL` holds), and
    their count: ([B, D], [B, 1])."""
    member_BxT = self.membership(where_RxL)
    flat_TxD = hidden_RxLxD.reshape(-1, hidden_RxLxD.shape[-1]).astype(jnp.float32)
    # HIGHEST: a TPU would otherwise round the float32 operands to bfloat16.
    total_BxD = jnp.matmul(member_BxT, flat_TxD, precision=jax.lax.Precision.HIGHEST)
    return total_BxD, member_BxT.sum(axis=1, keepdims=True)


# Attention
# ------------------------------------------------------------------------------


@flax.struct.dataclass
class KVCache:
  """Keys and values of the tokens a decoder has seen, for generation one token at a time.

  Slots fill left to right; `mask` marks the slots that hold a real token (a left-padded
  prompt's padding stays False), so attention skips them. A jitted decode loop carries it.

  Attributes:
    keys: per layer, [B, S, kv_heads, head_dim] in the compute dtype.
    values: per layer, like `keys`.
    mask: [B, S] bool, slots holding a real token.
    index: int32 scalar, the number of slots written so far.
  """

  keys: tuple[jax.Array, ...]
  values: tuple[jax.Array, ...]
  mask: jax.Array
  index: jax.Array

  @classmethod
  def create(cls, *, num_layers: int, batch_size: int, max_length: int, num_kv_heads: int,
             head_dim: int, dtype: Any = jnp.float32) -> 'KVCache':
    """An empty cache with room for `max_length` tokens per sequence."""
    shape = (batch_size, max_length, num_kv_heads, head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(num_layers))
    return cls(keys=zeros, values=zeros, mask=jnp.zeros((batch_size, max_length), bool),
               index=jnp.zeros((), jnp.int32))

  @property
  def max_length(self) -> int:
    return self.mask.shape[1]

  def write(self, layer: int, k_BxLxGxK: jax.Array, v_BxLxGxK: jax.Array
            ) -> tuple['KVCache', jax.Array, jax.Array]:
    """Stores one layer's new keys/values at `index`; returns the cache and all S slots' k, v."""
    at = (0, self.index, 0, 0)
    k_all = jax.lax.dynamic_update_slice(self.keys[layer], k_BxLxGxK.astype(self.keys[layer].dtype),
                                         at)
    v_all = jax.lax.dynamic_update_slice(self.values[layer],
                                         v_BxLxGxK.astype(self.values[layer].dtype), at)
    keys = self.keys[:layer] + (k_all,) + self.keys[layer + 1:]
    values = self.values[:layer] + (v_all,) + self.values[layer + 1:]
    return self.replace(keys=keys, values=values), k_all, v_all


def causal_bias(attention_mask_BxL: jax.Array | None, length: int,
                cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
  """The additive float32 attention bias of causal self-attention, [B, 1, L, S].

  Without a cache, S = L: query i sees keys j <= i that are not padding. With a cache, the L new
  tokens take slots [index, index + L) of S = cache.max_length; query i sees the filled,
  non-padding slots up to its own. The returned cache has the new tokens' mask entries (its
  keys and values are written per layer by `KVCache.write`, its index advanced by `advance`).
  """
  if attention_mask_BxL is None:
    batch = 1 if cache is None else cache.mask.shape[0]
    attention_mask_BxL = jnp.ones((batch, length), bool)
  keep_BxL = attention_mask_BxL.astype(bool)
  if cache is None:
    keys_BxS, offset, size = keep_BxL, 0, length
  else:
    keys_BxS = jax.lax.dynamic_update_slice(cache.mask, keep_BxL, (0, cache.index))
    offset, size = cache.index, cache.max_length
    cache = cache.replace(mask=keys_BxS)
  query_pos_L = offset + jnp.arange(length)
  causal_LxS = jnp.arange(size)[None, :] <= query_pos_L[:, None]
  visible_BxLxS = causal_LxS[None] & keys_BxS[:, None, :]
  return jnp.where(visible_BxLxS, 0.0, MASKED)[:, None].astype(jnp.float32), cache


def advance(cache: KVCache | None, length: int) -> KVCache | None:
  """The cache after `length` new tokens have been written to every layer."""
  return None if cache is None else cache.replace(index=cache.index + length)


def attend(q_BxLxHxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxK: jax.Array,
           bias_Bx1xLxS: jax.Array, *, dtype: Any, scale: float | None = None,
           dropout: 'Dropout | None' = None, deterministic: bool = True,
           rngs: nnx.Rngs | None = None) -> jax.Array:
  """Scaled dot-product attention with grouped-query heads; returns [B, L, H * K].

  H query heads share G key/value heads (H % G == 0): query head h reads kv head h // (H / G),
  as `transformers`' repeat_kv lays them out. Logits and softmax are float32; `bias_Bx1xLxS`
  (float32, added to the logits) may broadcast over B, L or S (e.g. a [B, 1, 1, S] padding mask).
  `dropout` drops attention probabilities, as BERT-style models do. On a single CPU device the
  core runs on ftjax's fused kernel (`ftjax.kernels`; `FTJAX_ATTENTION=xla` keeps it on XLA).
  """
  batch, length, heads, head_dim = q_BxLxHxK.shape
  groups = k_BxSxGxK.shape[2]
  repeats = heads // groups
  k_BxSxGxK = k_BxSxGxK.astype(q_BxLxHxK.dtype)
  v_BxSxGxK = v_BxSxGxK.astype(dtype)
  scale = head_dim**-0.5 if scale is None else scale
  rate, seeds = 0.0, jnp.zeros((2,), jnp.uint32)
  if dropout is not None and not dropout.drops_nothing(deterministic):
    if dropout.rate == 1.0:
      return jnp.zeros((batch, length, heads * head_dim), dtype)
    rate, seeds = dropout.rate, _seeds(dropout.draw_key(rngs))
  bias = bias_Bx1xLxS.astype(jnp.float32)
  if kernels.fused_attention_applies(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, dtype):
    # The kernel takes the operands token-major, as they are (no transposing copies), and reads
    # query row r * L + l's bias from row l (it takes a bias whose query rows divide R * L).
    out_BxLxHxK = _fused_attention(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, bias, seeds, scale, rate,
                                   dtype)
    return out_BxLxHxK.reshape(batch, length, heads * head_dim)
  operands = (_heads_major(x, groups) for x in (q_BxLxHxK, k_BxSxGxK, v_BxSxGxK))
  out_BxGxRLxK = _attention(*operands, _tiled_bias(bias, repeats * length), seeds, scale, rate,
                            dtype)
  return _token_major(out_BxGxRLxK, length).reshape(batch, length, heads * head_dim)


def _heads_major(x_BxLxHxK: jax.Array, groups: int) -> jax.Array:
  """[B, L, G * R, K] -> [B, G, R * L, K], XLA's attention layout: batch dims first and the
  contracted head_dim last, the layout XLA's batched matmul takes without copying the operands
  again (the transposes fuse into the producers, e.g. the rotary embedding). The R query heads
  that share a key/value head are stacked along the query axis, so grouped-query attention is
  one batched matmul per group; keys and values (R = 1) become [B, G, S, K]."""
  batch, length, heads, head_dim = x_BxLxHxK.shape
  return x_BxLxHxK.reshape(batch, length, groups, heads // groups, head_dim).transpose(
      0, 2, 3, 1, 4).reshape(batch, groups, -1, head_dim)


def _token_major(x_BxGxRLxK: jax.Array, length: int) -> jax.Array:
  """The inverse of `_heads_major`: [B, G, R * L, K] -> [B, L, G * R, K]."""
  batch, groups, rows, head_dim = x_BxGxRLxK.shape
  return x_BxGxRLxK.reshape(batch, groups, rows // length, length, head_dim).transpose(
      0, 3, 1, 2, 4).reshape(batch, length, -1, head_dim)


def _tiled_bias(bias: jax.Array, rows: int) -> jax.Array:
  """The bias for R * L query rows: row r * L + l is query l's, so a bias that varies over the
  L queries is tiled R times (one that broadcasts over them is left as it is)."""
  return bias if bias.shape[2] in (1, rows) else jnp.tile(bias, (1, 1, rows // bias.shape[2], 1))


def _scores(q, k, bias, scale):
  """Float32 logits [B, G, R * L, S] of heads-major q [B, G, R * L, K] and k [B, G, S, K]."""
  return jnp.einsum('bgqk,bgsk->bgqs', q, k, preferred_element_type=jnp.float32) * scale + bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _attention(q, k, v, bias, seeds, scale, rate, dtype):
  """softmax(q k^T * scale + bias) v on heads-major operands, with dropout on the probabilities.

  Autodiff would keep the [B, G, R * L, S] probabilities, their dropped copy and the keep-mask
  for the backward pass: three full-size tensors per layer (in bfloat16, 30 MiB per MiniLM layer
  at 32 x 128 tokens). Besides q, k, v and the output, this keeps only the softmax's per-row
  maximum and normaliser ([B, G, R * L, 1] float32) and recomputes the logits (one more q k^T
  matmul), the probabilities (bit-identical to the forward's) and the hash-based mask in the
  backward pass, the way flash attention does (without its tiling: XLA materialises one layer's
  [B, G, R * L, S] at a time). Everything stays 4-D: a [B, G, R, L, S] view of the logits (for a
  [B, 1, 1, L, S] bias) made XLA:CPU lay them out with R outermost and copy them, in the forward
  and backward passes.

  Args:
    q: [B, G, R * L, K] queries, R query heads per key/value head stacked along the query axis.
    k: [B, G, S, K] keys, in q's dtype.
    v: [B, G, S, K] values, in `dtype`.
    bias: float32, broadcastable to [B, G, R * L, S], added to the scaled logits.
    seeds: uint32 [2], the dropout key's seeds (`_seeds`); unused when `rate` is 0.
    scale: the logits' scale (usually K ** -0.5).
    rate: dropout rate of the probabilities, in [0, 1).
    dtype: dtype of the probabilities and the output.

  Returns:
    [B, G, R * L, K] in `dtype`.
  """
  return _attention_fwd(q, k, v, bias, seeds, scale, rate, dtype)[0]


def _probs(logits, maximum, normaliser, seeds, rate, dtype):
  """The (dropped) probabilities in `dtype` and the float32 ones, from the softmax's statistics."""
  probs = jnp.exp(logits - maximum) / normaliser
  if not rate:
    return probs.astype(dtype), probs, None
  keep = _keep(seeds, logits.shape, rate)
  dropped = probs.astype(dtype)
  dropped = jnp.where(keep, dropped * jnp.asarray(1.0 / (1.0 - rate), dtype), jnp.zeros((), dtype))
  return dropped, probs, keep


def _attention_fwd(q, k, v, bias, seeds, scale, rate, dtype):
  logits = _scores(q, k, bias, scale)
  maximum = jnp.max(logits, axis=-1, keepdims=True)
  normaliser = jnp.sum(jnp.exp(logits - maximum), axis=-1, keepdims=True)
  dropped, _, _ = _probs(logits, maximum, normaliser, seeds, rate, dtype)
  # float32 accumulation: the bf16 x bf16 -> f32 form that XLA:CPU runs on YNNPACK (see
  # `_matmul`), rounded once.
  out = jnp.einsum('bgqs,bgsk->bgqk', dropped, v, preferred_element_type=jnp.float32).astype(dtype)
  return out, (q, k, v, bias, seeds, maximum, normaliser, out)


# Query rows x keys up to which `_sum_over_queries` multiplies and sums instead of calling a
# batched matmul (32 x 32: the measured crossover on XLA:CPU).
_SMALL_ATTENTION = 1024


def _sum_over_queries(x_BxGxQxK: jax.Array, p_BxGxQxS: jax.Array) -> jax.Array:
  """sum_q x[b, g, q, k] * p[b, g, q, s] -> float32 [B, G, S, K]: dv and dk's contraction.

  As a batched matmul, it is computed as [B, G, K, S] and transposed (the transpose fuses into
  the copies that lay the gradients out; XLA:CPU runs that form ~15% faster than [B, G, S, K]).
  For short sequences (Q x S <= _SMALL_ATTENTION, e.g. the default job's 8 tokens) each of the
  B x G products is a few hundred multiply-adds, and XLA:CPU's batched matmul costs ~0.5 ms per
  call mostly in per-product overhead; a broadcast multiply and a sum over Q, which XLA fuses
  into one loop, is 2-3x faster there (1.4x at 32 tokens, slower from 48 on).
  """
  if p_BxGxQxS.shape[2] * p_BxGxQxS.shape[3] <= _SMALL_ATTENTION:
    return jnp.sum(x_BxGxQxK.astype(jnp.float32)[:, :, :, None, :]
                   * p_BxGxQxS.astype(jnp.float32)[:, :, :, :, None], axis=2)
  return jnp.einsum('bgqk,bgqs->bgks', x_BxGxQxK, p_BxGxQxS,
                    preferred_element_type=jnp.float32).swapaxes(2, 3)


def _attention_bwd(scale, rate, dtype, residuals, g):
  q, k, v, bias, seeds, maximum, normaliser, out = residuals
  q, k, bias, maximum, normaliser = _after(g, q, k, bias, maximum, normaliser)
  logits = _scores(q, k, bias, scale)
  dropped, probs, keep = _probs(logits, maximum, normaliser, seeds, rate, dtype)
  # Every matmul takes operands of one dtype and accumulates in float32 (XLA CPU's fast path).
  g = g.astype(dtype)
  dv = _sum_over_queries(g, dropped)
  d_probs = jnp.einsum('bgqk,bgsk->bgqs', g, v, preferred_element_type=jnp.float32)
  if rate:
    d_probs = jnp.where(keep, d_probs * (1.0 / (1.0 - rate)), 0.0)
  # The softmax's backward needs sum_s probs * d_probs per row, which is sum_k g * out (the
  # dropped probabilities times v, dotted with g), as flash attention computes it: a reduction
  # over K of [B, G, R * L, K] instead of over S of [B, G, R * L, S] (on XLA:CPU a YNNPACK
  # reduce fusion that cost ~8% of a MiniLM LoRA step at 32 x 128).
  rows = jnp.sum(g.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  d_logits = probs * (d_probs - rows[..., None])
  d_bias = jnp.sum(d_logits, axis=tuple(i for i, n in enumerate(bias.shape) if n == 1),
                   keepdims=True)
  # The logits' scale is applied to the [B, G, R * L, K] products, not the [.., L, S] factor.
  d_scores = d_logits.astype(q.dtype)
  dq = jnp.einsum('bgqs,bgsk->bgqk', d_scores, k, preferred_element_type=jnp.float32) * scale
  dk = _sum_over_queries(q, d_scores) * scale
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_bias, None)


_attention.defvjp(_attention_fwd, _attention_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _fused_attention(q, k, v, bias, seeds, scale, rate, dtype):
  """`_attention` on the fused CPU kernel (ftjax/kernels/attention.cc), same semantics, on
  token-major operands (q [B, L, H, K], k and v [B, S, G, K]; the output like q).

  The kernel keeps each (batch, kv head) pair's keys, values and a block of logits in cache and
  never writes the [B, G, R * L, S] logits or probabilities to memory, in either pass. It takes
  the bias untiled ([.., L, S] with R * L query rows) and computes no gradient for it, so a bias
  that is being differentiated (`perturbed`; masks never are) takes the XLA path's backward.
  """
  del dtype
  return kernels.attention_forward(q, k, v, bias, seeds, scale, rate)[0]


def _fused_attention_fwd(q, k, v, bias, seeds, scale, rate, dtype):
  del dtype
  q, k, v, seeds = (x.value for x in (q, k, v, seeds))
  bias_perturbed, bias = bias.perturbed, bias.value
  out, maximum, normaliser, keep = kernels.attention_forward(q, k, v, bias, seeds, scale, rate)
  if bias_perturbed:
    # The residuals' pytree structure tells the backward pass which one to run.
    return out, {'xla': (q, k, v, bias, seeds, maximum, normaliser, out)}
  return out, {'fused': (q, k, v, bias, seeds, maximum, normaliser, keep, out)}


def _fused_attention_bwd(scale, rate, dtype, residuals, g):
  if isinstance(g, jax.custom_derivatives.SymbolicZero):
    return None, None, None, None, None
  if 'xla' in residuals:
    q, k, v, bias, seeds, maximum, normaliser, out = residuals['xla']
    groups, length, keys = k.shape[2], q.shape[1], k.shape[1]
    q, k, v, out, g = (_heads_major(x, groups) for x in (q, k, v, out, g))
    d_q, d_k, d_v, d_tiled, _ = _attention_bwd(
        scale, rate, dtype, (q, k, v, _tiled_bias(bias, q.shape[2]), seeds, maximum, normaliser,
                             out), g)
    # Tiled rows r * L + l back onto bias row l.
    d_bias = d_tiled.reshape(*bias.shape[:2], -1, *bias.shape[2:]).sum(2)
    return (_token_major(d_q, length), _token_major(d_k, keys), _token_major(d_v, keys), d_bias,
            None)
  q, k, v, bias, seeds, maximum, normaliser, keep, out = residuals['fused']
  d_q, d_k, d_v = kernels.attention_backward(q, k, v, bias, seeds, maximum, normaliser, keep,
                                             out, g.astype(q.dtype), scale, rate)
  return d_q, d_k, d_v, None, None


_fused_attention.defvjp(_fused_attention_fwd, _fused_attention_bwd, symbolic_zeros=True)


def run_block(block: nnx.Module, remat: bool, *args, **kwargs):
  """Calls a transformer block; with `remat`, its activations are recomputed in the backward pass.

  Rematerialisation trades about a third more compute for not storing every block's
  activations. Python values (flags, the layer index) stay static; arrays, caches and the
  dropout `rngs` go through the transform as arguments.
  """
  if not remat:
    return block(*args, **kwargs)
  static = {k: v for k, v in kwargs.items() if v is None or isinstance(v, (bool, int, str))}
  dynamic = {k: v for k, v in kwargs.items() if k not in static}
  return nnx.remat(lambda block, args, dynamic: block(*args, **dynamic, **static))(
      block, args, dynamic)
