"""Llama 2/3, Mistral and Qwen2 decoders (as `transformers.LlamaModel` etc.) in flax NNX.

The three families are one architecture: pre-RMSNorm blocks of rotary-position grouped-query
attention and a SwiGLU feed-forward layer. They differ in which projections carry a bias (Llama:
configurable; Mistral: none; Qwen2: query/key/value only) and in the sliding attention window
(Mistral: every layer; Qwen2: the layers its `layer_types` name). One `LlamaConfig` with
`model_type` as a field describes all three, so export writes each back as its own family.

Module and parameter names follow Hugging Face (`layers/<i>/self_attn/q_proj/kernel`, ...), so
PEFT target patterns such as `(q_proj|v_proj)$` mean the same here as in Hugging Face PEFT.
Parameters are float32; the compute dtype (float32 or bfloat16) is a constructor argument;
attention softmax and RMSNorm statistics run in float32, and rotary angles too.
"""

from collections.abc import Mapping
import dataclasses
import math
from typing import Any

from flax import nnx
import flax.core
import jax
import jax.numpy as jnp
import numpy as np

from ftjax.errors import FtjaxError
from ftjax.models import Family, WeightMapping
from ftjax.models import same as _same, transpose as _transpose
from ftjax.models import layers

# model_type -> the prefix of its transformers class names.
_CLASS_PREFIX = {'llama': 'Llama', 'mistral': 'Mistral', 'qwen2': 'Qwen2'}

# Where transformers' config classes default differently from LlamaConfig's (Llama's) defaults;
# only a config.json that omits these keys depends on them.
_TYPE_DEFAULTS: dict[str, dict[str, Any]] = {
    'llama': {},
    'mistral': dict(intermediate_size=14336, num_key_value_heads=8,
                    max_position_embeddings=4096 * 32),
    'qwen2': dict(vocab_size=151936, intermediate_size=22016, num_key_value_heads=32,
                  max_position_embeddings=32768, bos_token_id=None, eos_token_id=None),
}

# The rope scaling types implemented here and the parameters each one needs.
_ROPE_TYPES: dict[str, tuple[str, ...]] = {
    'default': (),
    'linear': ('factor',),
    'llama3': ('factor', 'low_freq_factor', 'high_freq_factor',
               'original_max_position_embeddings'),
}

_LAYER_TYPES = ('full_attention', 'sliding_attention')

dense = layers.dense


def _frozen(value: Any) -> Any:
  # The config is a static attribute of the NNX module, so it must hash (jit caches on it).
  if isinstance(value, Mapping):
    return flax.core.FrozenDict({k: _frozen(v) for k, v in value.items()})
  if isinstance(value, list | tuple):
    return tuple(_frozen(v) for v in value)
  return value


def _thawed(value: Any) -> Any:
  if isinstance(value, Mapping):
    return {k: _thawed(v) for k, v in value.items()}
  if isinstance(value, tuple):
    return [_thawed(v) for v in value]
  return value


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """The architecture fields of a Llama, Mistral or Qwen2 config.json (defaults as Llama's).

  Attributes:
    model_type: 'llama', 'mistral' or 'qwen2'; decides the biases and how export writes it.
    head_dim: per-head size; None means hidden_size // num_attention_heads.
    num_key_value_heads: key/value heads (grouped-query attention); None means one per head.
    rope_theta: the rotary base.
    rope_scaling: None (plain RoPE) or {'rope_type': 'linear' | 'llama3', ...its parameters},
      as transformers' legacy `rope_scaling` (without `rope_theta`).
    attention_bias: Llama only: a bias on all four attention projections.
    mlp_bias: Llama only: a bias on the three feed-forward projections.
    sliding_window: Mistral/Qwen2: a query sees only the `sliding_window` most recent tokens
      (itself included); None for full causal attention.
    layer_types: Qwen2: per layer, 'full_attention' or 'sliding_attention'; None means every
      layer slides when `sliding_window` is set.
  """

  model_type: str = 'llama'
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: int | None = None
  head_dim: int | None = None
  hidden_act: str = 'silu'
  max_position_embeddings: int = 2048
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: Mapping[str, Any] | None = None
  attention_bias: bool = False
  mlp_bias: bool = False
  tie_word_embeddings: bool = False
  sliding_window: int | None = None
  layer_types: tuple[str, ...] | None = None
  attention_dropout: float = 0.0
  pad_token_id: int | None = None
  bos_token_id: int | None = 1
  eos_token_id: int | tuple[int, ...] | None = 2
  initializer_range: float = 0.02

  def __post_init__(self):
    name = f'{self.model_type} config'
    if self.model_type not in _CLASS_PREFIX:
      raise FtjaxError(f'model_type {self.model_type!r} is not one of '
                       f'{", ".join(_CLASS_PREFIX)}: LlamaConfig describes only those')
    # Frozen: normalisation goes through object.__setattr__, once, here.
    set_ = lambda field, value: object.__setattr__(self, field, value)
    if self.num_key_value_heads is None:
      set_('num_key_value_heads', self.num_attention_heads)
    if self.head_dim is None:
      if self.hidden_size % self.num_attention_heads:
        raise FtjaxError(f'hidden_size {self.hidden_size} is not divisible by '
                         f'num_attention_heads {self.num_attention_heads} in the {name} and no '
                         'head_dim is given: fix config.json')
      set_('head_dim', self.hidden_size // self.num_attention_heads)
    scaling = self.rope_scaling
    if scaling is not None and 'rope_type' not in scaling and 'type' in scaling:
      # The legacy spelling; one key from here on, so equal configs compare equal.
      scaling = {'rope_type': scaling['type'],
                 **{k: v for k, v in scaling.items() if k != 'type'}}
    set_('rope_scaling', None if scaling is None else _frozen(scaling))
    set_('layer_types', None if self.layer_types is None else tuple(self.layer_types))
    if isinstance(self.eos_token_id, list):
      set_('eos_token_id', tuple(self.eos_token_id))

    if not isinstance(self.hidden_act, str) or self.hidden_act not in layers.ACTIVATIONS:
      raise FtjaxError(f'unsupported hidden_act {self.hidden_act!r} in the {name}: ftjax '
                       f'supports {", ".join(sorted(layers.ACTIVATIONS))}')
    if self.num_attention_heads % self.num_key_value_heads:
      raise FtjaxError(f'num_attention_heads {self.num_attention_heads} is not divisible by '
                       f'num_key_value_heads {self.num_key_value_heads} in the {name}')
    if self.head_dim % 2:
      raise FtjaxError(f'head_dim {self.head_dim} in the {name} is odd: rotary embeddings '
                       'rotate pairs of dimensions')
    if self.model_type != 'llama' and (self.attention_bias or self.mlp_bias):
      raise FtjaxError(f'attention_bias/mlp_bias are Llama settings; {self.model_type} '
                       'fixes its biases: set them False')
    if self.model_type == 'llama' and self.sliding_window is not None:
      raise FtjaxError(f'sliding_window={self.sliding_window} in the {name}: Llama has no '
                       "sliding window (use model_type 'mistral' or 'qwen2')")
    if self.sliding_window is not None and self.sliding_window < 1:
      raise FtjaxError(f'sliding_window must be a positive token count, got '
                       f'{self.sliding_window} in the {name}')
    if self.layer_types is not None and (
        len(self.layer_types) != self.num_hidden_layers
        or any(t not in _LAYER_TYPES for t in self.layer_types)):
      raise FtjaxError(f'layer_types {list(self.layer_types)} in the {name} must name '
                       f'{self.num_hidden_layers} layers, each one of {", ".join(_LAYER_TYPES)}')
    _check_rope_scaling(self.rope_scaling, name)

  @property
  def qkv_bias(self) -> bool:
    """Whether the query, key and value projections carry a bias."""
    return self.model_type == 'qwen2' or self.attention_bias

  @property
  def o_bias(self) -> bool:
    """Whether the attention output projection carries a bias."""
    return self.attention_bias

  def uses_window(self, layer: int) -> bool:
    """Whether layer `layer` attends within the sliding window."""
    return self.sliding_window is not None and (
        self.layer_types is None or self.layer_types[layer] == 'sliding_attention')

  @classmethod
  def from_hf(cls, d: dict[str, Any]) -> 'LlamaConfig':
    """Reads a Hugging Face config.json dict; unknown keys are ignored.

    Reads the rotary settings both as transformers 5.x writes them (`rope_parameters`, with
    `rope_theta` and `rope_type` inside) and in the legacy form (top-level `rope_theta`,
    `rope_scaling` with `type` or `rope_type`); `rope_scaling` wins when both are present, as
    in transformers.

    Raises:
      FtjaxError: for settings this implementation does not honour (an unknown rope scaling
        type, partial rotary embeddings, an unknown activation, heads not divisible by kv heads).
    """
    model_type = d.get('model_type') or 'llama'
    if model_type not in _CLASS_PREFIX:
      raise FtjaxError(f'model_type {model_type!r} cannot be read as a Llama-family config: '
                       f'use one of {", ".join(_CLASS_PREFIX)}')
    fields = {f.name for f in dataclasses.fields(cls)}
    own = {'rope_theta', 'rope_scaling', 'attention_bias', 'mlp_bias', 'sliding_window',
           'layer_types', 'model_type'}
    kwargs: dict[str, Any] = dict(_TYPE_DEFAULTS[model_type])
    kwargs.update({k: v for k, v in d.items() if k in fields and k not in own})
    for key in ('num_key_value_heads', 'head_dim'):  # null means "derive it", as transformers.
      if kwargs.get(key) is None:
        kwargs.pop(key, None)
    kwargs['rope_theta'], kwargs['rope_scaling'] = _read_rope(d, model_type)
    if model_type == 'llama':
      kwargs['attention_bias'] = bool(d.get('attention_bias', False))
      kwargs['mlp_bias'] = bool(d.get('mlp_bias', False))
    elif model_type == 'mistral':
      kwargs['sliding_window'] = d.get('sliding_window', 4096)
    else:
      window = d.get('sliding_window', 4096) if d.get('use_sliding_window', False) else None
      layer_types = d.get('layer_types')
      if layer_types is None:  # As Qwen2Config derives them.
        first = d.get('max_window_layers', 28)
        layer_types = ['sliding_attention' if window is not None and i >= first
                       else 'full_attention' for i in range(kwargs.get('num_hidden_layers', 32))]
      kwargs['sliding_window'], kwargs['layer_types'] = window, layer_types
    return cls(model_type=model_type, **kwargs)

  def with_dropout(self, rate: float) -> 'LlamaConfig':
    """The same architecture with attention dropout `rate` (the only dropout these models have)."""
    return dataclasses.replace(self, attention_dropout=rate)

  def to_hf(self) -> dict[str, Any]:
    """A config.json dict that the model_type's `transformers` class reads back unchanged.

    Rotary settings are written both as transformers 5.x does (`rope_parameters`) and in the
    legacy keys (`rope_theta`, `rope_scaling`) that transformers 4.x reads.
    """
    scaling = None if self.rope_scaling is None else _thawed(self.rope_scaling)
    d: dict[str, Any] = dict(
        model_type=self.model_type,
        architectures=[f'{_CLASS_PREFIX[self.model_type]}Model'],
        vocab_size=self.vocab_size,
        hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size,
        num_hidden_layers=self.num_hidden_layers,
        num_attention_heads=self.num_attention_heads,
        num_key_value_heads=self.num_key_value_heads,
        head_dim=self.head_dim,
        hidden_act=self.hidden_act,
        max_position_embeddings=self.max_position_embeddings,
        rms_norm_eps=self.rms_norm_eps,
        rope_theta=self.rope_theta,
        rope_scaling=scaling,
        rope_parameters={'rope_theta': self.rope_theta, 'rope_type': 'default',
                         **(scaling or {})},
        tie_word_embeddings=self.tie_word_embeddings,
        attention_dropout=self.attention_dropout,
        pad_token_id=self.pad_token_id,
        bos_token_id=self.bos_token_id,
        eos_token_id=_thawed(self.eos_token_id),
        initializer_range=self.initializer_range,
    )
    if self.model_type == 'llama':
      d.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
    elif self.model_type == 'mistral':
      d.update(sliding_window=self.sliding_window)
    else:
      layer_types = list(self.layer_types or ['full_attention'] * self.num_hidden_layers)
      sliding = [i for i, t in enumerate(layer_types) if t == 'sliding_attention']
      d.update(use_sliding_window=self.sliding_window is not None,
               sliding_window=self.sliding_window, layer_types=layer_types,
               max_window_layers=sliding[0] if sliding else self.num_hidden_layers)
    return d


def _read_rope(d: dict[str, Any], model_type: str) -> tuple[float, dict[str, Any] | None]:
  """(rope_theta, rope_scaling or None) from either config.json layout."""
  params = d.get('rope_scaling') or d.get('rope_parameters') or {}
  if not isinstance(params, Mapping):
    raise FtjaxError(f'rope_parameters must be a dict in the {model_type} config, got {params!r}')
  nested = [v for k, v in params.items() if k in _LAYER_TYPES]
  if nested:
    # transformers allows one rope dict per layer type; one model here has one rotary table.
    if any(v != nested[0] for v in nested):
      raise FtjaxError(f'rope_parameters differ per layer type in the {model_type} config: '
                       'ftjax supports one rotary setting for all layers')
    params = nested[0] or {}
  params = dict(params)
  theta = params.pop('rope_theta', None)
  if theta is None:
    theta = d.get('rope_theta', 10000.0)
  rope_type = params.pop('rope_type', None) or params.get('type') or 'default'
  params.pop('type', None)
  partial = params.pop('partial_rotary_factor', d.get('partial_rotary_factor', 1.0))
  if partial not in (None, 1.0):
    raise FtjaxError(f'partial_rotary_factor={partial} in the {model_type} config is not '
                     'supported: ftjax rotates the whole head')
  if rope_type == 'default':
    return float(theta), None
  if rope_type == 'llama3':
    params.setdefault('original_max_position_embeddings', d.get('max_position_embeddings', 2048))
  return float(theta), {'rope_type': rope_type, **params}


def _check_rope_scaling(scaling: Mapping[str, Any] | None, name: str) -> None:
  if scaling is None:
    return
  rope_type = scaling.get('rope_type')
  if rope_type not in _ROPE_TYPES or rope_type == 'default':
    raise FtjaxError(f'unsupported rope scaling type {rope_type!r} (rope_type) in the {name}: '
                     f"ftjax implements 'default', 'linear' and 'llama3'")
  missing = [k for k in _ROPE_TYPES[rope_type] if scaling.get(k) is None]
  if missing:
    raise FtjaxError(f'rope scaling {rope_type!r} in the {name} lacks {", ".join(missing)}')


def rope_inverse_frequencies(config: LlamaConfig) -> np.ndarray:
  """The rotary inverse frequencies [head_dim / 2], float32, as transformers computes them."""
  dim = config.head_dim
  exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  inv_freq = np.float32(1.0) / (np.float32(config.rope_theta) ** exponents)
  scaling = config.rope_scaling
  if scaling is None:
    return inv_freq
  factor = np.float32(scaling['factor'])
  if scaling['rope_type'] == 'linear':
    return inv_freq / factor
  # llama3: long wavelengths are interpolated by `factor`, short ones kept, the band between
  # blended smoothly (the same float32 arithmetic as transformers' _compute_llama3_parameters).
  low, high = scaling['low_freq_factor'], scaling['high_freq_factor']
  old_context = scaling['original_max_position_embeddings']
  low_wavelen, high_wavelen = old_context / low, old_context / high
  wavelen = np.float32(2 * math.pi) / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
  smooth = (np.float32(old_context) / wavelen - np.float32(low)) / np.float32(high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def _rotary(config: LlamaConfig, positions_BxL: jax.Array, dtype: Any
            ) -> tuple[jax.Array, jax.Array]:
  """cos and sin [B, L, head_dim], angles in float32, then cast to the compute dtype."""
  inv_freq_K2 = jnp.asarray(rope_inverse_frequencies(config))
  angles_BxLxK2 = positions_BxL.astype(jnp.float32)[..., None] * inv_freq_K2
  angles_BxLxK = jnp.concatenate([angles_BxLxK2, angles_BxLxK2], axis=-1)
  return (_computed_once(jnp.cos(angles_BxLxK)).astype(dtype),
          _computed_once(jnp.sin(angles_BxLxK)).astype(dtype))


def _computed_once(table_BxLxK: jax.Array) -> jax.Array:
  """The float32 table itself, written to memory once instead of fused into its consumers.

  XLA:CPU fuses the cos and sin into every layer's rotation of q and k (forward and backward),
  where they are evaluated again for each element of every head: q's rotation and layout copy
  took 3.8 ms alone against 0.5 ms reading tables (100M Llama, 8 x 256 tokens, 2-core CPU),
  and the float32 LoRA step 1.035x as long. An optimization barrier does not stop that fusion
  (XLA:CPU removes barriers before fusing); a product with the identity does, because dots are
  never fused into loop fusions. It is exact: each entry is x * 1 plus zeros.
  """
  eye_KxK = jnp.eye(table_BxLxK.shape[-1], dtype=table_BxLxK.dtype)
  return jnp.einsum('blk,kj->blj', table_BxLxK, eye_KxK, precision=jax.lax.Precision.HIGHEST)


@jax.custom_vjp
def _rotate(x_BxLxHxK: jax.Array, cos_BxLxK: jax.Array, sin_BxLxK: jax.Array) -> jax.Array:
  """x rotated by the angles whose cos and sin are given (`_rotary`'s tables, whose two halves
  are equal), as transformers computes it.

  The rotation is orthogonal, so its gradient is the inverse rotation, the same formula with
  -sin. Autodiff wrote it as the transposes of the slices and the concatenation (pads), which
  XLA:CPU fused into loops ~3x slower than the forward one: 5.2 ms for q's gradient per layer
  of the 100M Llama (8 x 256 tokens, bfloat16), ~55 ms of its LoRA step's 1.03 s.
  """
  return _rotation(x_BxLxHxK, cos_BxLxK, sin_BxLxK)


def _rotation(x_BxLxHxK: jax.Array, cos_BxLxK: jax.Array, sin_BxLxK: jax.Array) -> jax.Array:
  # transformers' rotate_half layout: dimension i pairs with i + K/2 (not interleaved pairs).
  half = x_BxLxHxK.shape[-1] // 2
  rotated = jnp.concatenate([-x_BxLxHxK[..., half:], x_BxLxHxK[..., :half]], axis=-1)
  return x_BxLxHxK * cos_BxLxK[:, :, None] + rotated * sin_BxLxK[:, :, None]


def _rotate_fwd(x_BxLxHxK, cos_BxLxK, sin_BxLxK):
  return _rotation(x_BxLxHxK, cos_BxLxK, sin_BxLxK), (cos_BxLxK, sin_BxLxK)


def _rotate_bwd(residuals, g_BxLxHxK):
  cos_BxLxK, sin_BxLxK = residuals
  # The tables come from positions, never from parameters: no gradient flows to them.
  return (_rotation(g_BxLxHxK, cos_BxLxK, -sin_BxLxK), jnp.zeros_like(cos_BxLxK),
          jnp.zeros_like(sin_BxLxK))


_rotate.defvjp(_rotate_fwd, _rotate_bwd)


def _window_bias(bias_Bx1xLxS: jax.Array, offset: Any, window: int) -> jax.Array:
  """`bias` also masking keys `window` or more slots behind their query."""
  length, size = bias_Bx1xLxS.shape[-2:]
  query_L = offset + jnp.arange(length)
  inside_LxS = jnp.arange(size)[None, :] > query_L[:, None] - window
  return jnp.where(inside_LxS, bias_Bx1xLxS, layers.MASKED)


class RMSNorm(nnx.Module):
  """Root-mean-square norm with a learned scale, as transformers' LlamaRMSNorm.

  The statistics and the normalisation run in float32; the result is cast to the compute dtype
  before the scale multiplies it, in the same order as transformers.
  """

  def __init__(self, features: int, *, eps: float, dtype: Any, rngs: nnx.Rngs):
    init = layers.param_init(nnx.initializers.ones_init(), ('embed',))
    self.scale = nnx.Param(init(rngs.params(), (features,), jnp.float32))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    x32 = x_BxLxD.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    normed = (x32 * jax.lax.rsqrt(variance + self.eps)).astype(self.dtype)
    return self.scale[...].astype(self.dtype) * normed


def _linear(config: LlamaConfig, in_features: int, out_features: int, axes: layers.Axes, *,
            use_bias: bool, dtype: Any, rngs: nnx.Rngs) -> nnx.Linear:
  return layers.linear(in_features, out_features, axes, std=config.initializer_range,
                       dtype=dtype, use_bias=use_bias, rngs=rngs)


class LlamaAttention(nnx.Module):
  """Rotary grouped-query self-attention with its output projection."""

  def __init__(self, config: LlamaConfig, *, dtype: Any, rngs: nnx.Rngs):
    d, k = config.hidden_size, config.head_dim
    self.num_heads, self.num_kv_heads, self.head_dim = (
        config.num_attention_heads, config.num_key_value_heads, k)
    self.dtype = dtype
    qkv = dict(use_bias=config.qkv_bias, dtype=dtype, rngs=rngs)
    self.q_proj = _linear(config, d, self.num_heads * k, ('embed', 'heads'), **qkv)
    self.k_proj = _linear(config, d, self.num_kv_heads * k, ('embed', 'kv_heads'), **qkv)
    self.v_proj = _linear(config, d, self.num_kv_heads * k, ('embed', 'kv_heads'), **qkv)
    self.o_proj = _linear(config, self.num_heads * k, d, ('heads', 'embed'),
                          use_bias=config.o_bias, dtype=dtype, rngs=rngs)
    self.dropout = layers.Dropout(config.attention_dropout)

  def __call__(self, x_BxLxD: jax.Array, rotary: tuple[jax.Array, jax.Array],
               bias_Bx1xLxS: jax.Array, *, layer: int, cache: layers.KVCache | None,
               deterministic: bool, rngs: nnx.Rngs | None
               ) -> tuple[jax.Array, layers.KVCache | None]:
    batch, length, _ = x_BxLxD.shape
    kw = dict(deterministic=deterministic, rngs=rngs)
    q_BxLxHxK = dense(self.q_proj, x_BxLxD, kw).reshape(batch, length, self.num_heads, -1)
    k_BxLxGxK = dense(self.k_proj, x_BxLxD, kw).reshape(batch, length, self.num_kv_heads, -1)
    v_BxLxGxK = dense(self.v_proj, x_BxLxD, kw).reshape(batch, length, self.num_kv_heads, -1)
    q_BxLxHxK, k_BxLxGxK = _rotate(q_BxLxHxK, *rotary), _rotate(k_BxLxGxK, *rotary)
    if cache is not None:
      cache, k_BxLxGxK, v_BxLxGxK = cache.write(layer, k_BxLxGxK, v_BxLxGxK)
    out_BxLxHK = layers.attend(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, bias_Bx1xLxS, dtype=self.dtype,
                               dropout=self.dropout, **kw)
    return dense(self.o_proj, out_BxLxHK, kw), cache


class LlamaMLP(nnx.Module):
  """The gated (SwiGLU) feed-forward layer: down(act(gate(x)) * up(x))."""

  def __init__(self, config: LlamaConfig, *, dtype: Any, rngs: nnx.Rngs):
    d, f = config.hidden_size, config.intermediate_size
    kw = dict(use_bias=config.mlp_bias, dtype=dtype, rngs=rngs)
    self.hidden_act = config.hidden_act
    self.gate_proj = _linear(config, d, f, ('embed', 'mlp'), **kw)
    self.up_proj = _linear(config, d, f, ('embed', 'mlp'), **kw)
    self.down_proj = _linear(config, f, d, ('mlp', 'embed'), **kw)

  def __call__(self, x_BxLxD: jax.Array, kw: dict) -> jax.Array:
    gate_BxLxF, up_BxLxF = dense(self.gate_proj, x_BxLxD, kw), dense(self.up_proj, x_BxLxD, kw)
    if self.hidden_act in ('silu', 'swish'):
      h_BxLxF = layers.silu_gate(gate_BxLxF, up_BxLxF)
    else:
      h_BxLxF = layers.ACTIVATIONS[self.hidden_act](gate_BxLxF) * up_BxLxF
    return dense(self.down_proj, h_BxLxF, kw)


class LlamaDecoderLayer(nnx.Module):
  """One pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, config: LlamaConfig, *, dtype: Any, rngs: nnx.Rngs):
    norm = lambda: RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype, rngs=rngs)
    self.self_attn = LlamaAttention(config, dtype=dtype, rngs=rngs)
    self.mlp = LlamaMLP(config, dtype=dtype, rngs=rngs)
    self.input_layernorm = norm()
    self.post_attention_layernorm = norm()

  def __call__(self, x_BxLxD: jax.Array, rotary: tuple[jax.Array, jax.Array],
               bias_Bx1xLxS: jax.Array, *, layer: int, cache: layers.KVCache | None,
               deterministic: bool, rngs: nnx.Rngs | None
               ) -> tuple[jax.Array, layers.KVCache | None]:
    kw = dict(deterministic=deterministic, rngs=rngs)
    attn_BxLxD, cache = self.self_attn(self.input_layernorm(x_BxLxD), rotary, bias_Bx1xLxS,
                                       layer=layer, cache=cache, **kw)
    x_BxLxD = x_BxLxD + attn_BxLxD
    x_BxLxD = x_BxLxD + self.mlp(self.post_attention_layernorm(x_BxLxD), kw)
    return x_BxLxD, cache


class LlamaModel(nnx.Module):
  """The decoder stack; `__call__` returns the final-normed hidden state (and the cache)."""

  def __init__(self, config: LlamaConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.dtype = dtype
    self.embed_tokens = layers.embed(
        config.vocab_size, config.hidden_size, ('vocab', 'embed'),
        std=config.initializer_range, dtype=dtype, rngs=rngs, padding_idx=config.pad_token_id)
    # Recompute each block's activations in the backward pass (hub.load_model(remat=True)).
    self.remat = False
    self.layers = nnx.List([LlamaDecoderLayer(config, dtype=dtype, rngs=rngs)
                            for _ in range(config.num_hidden_layers)])
    self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype, rngs=rngs)

  @property
  def hidden_size(self) -> int:
    return self.config.hidden_size

  @property
  def word_embeddings(self) -> nnx.Embed:
    return self.embed_tokens

  def init_cache(self, batch_size: int, max_length: int) -> layers.KVCache:
    """An empty key/value cache (compute dtype) for `batch_size` sequences of `max_length`."""
    c = self.config
    return layers.KVCache.create(num_layers=c.num_hidden_layers, batch_size=batch_size,
                                 max_length=max_length, num_kv_heads=c.num_key_value_heads,
                                 head_dim=c.head_dim, dtype=self.dtype)

  def __call__(
      self,
      input_ids: jax.Array,
      attention_mask: jax.Array | None = None,
      token_type_ids: jax.Array | None = None,
      *,
      positions: jax.Array | None = None,
      cache: layers.KVCache | None = None,
      deterministic: bool = True,
      rngs: nnx.Rngs | None = None,
  ) -> Any:
    """Runs the decoder over a batch.

    Args:
      input_ids: [B, L] token ids.
      attention_mask: [B, L], 1 (or True) for real tokens and 0 for padding; None attends to
        all. Padding may be on either side; left-padded batches should pass `positions`.
      token_type_ids: ignored (decoders have none); accepted for a uniform text signature.
      positions: [B, L] rotary position ids; None counts from 0, or from the cache's fill.
      cache: a `KVCache` (see `init_cache`) to extend with these L tokens.
      deterministic: False enables attention dropout, which then needs `rngs`.
      rngs: e.g. `nnx.Rngs(dropout=key)`; unused when deterministic.

    Returns:
      The final-normed hidden state [B, L, D] in the compute dtype; with a cache,
      (hidden, cache advanced by L).
    """
    del token_type_ids
    batch, length = input_ids.shape
    offset = 0 if cache is None else cache.index
    if positions is None:
      positions = jnp.broadcast_to(offset + jnp.arange(length), (batch, length))
    rotary = _rotary(self.config, jnp.asarray(positions), self.dtype)
    bias_Bx1xLxS, cache = layers.causal_bias(attention_mask, length, cache)
    window = self.config.sliding_window
    window_bias = None if window is None else _window_bias(bias_Bx1xLxS, offset, window)
    kw = dict(deterministic=deterministic, rngs=rngs)
    x_BxLxD = self.embed_tokens(input_ids)
    for i, layer in enumerate(self.layers):
      bias = window_bias if self.config.uses_window(i) else bias_Bx1xLxS
      x_BxLxD, cache = layers.run_block(layer, self.remat, x_BxLxD, rotary, bias, layer=i,
                                        cache=cache, **kw)
    x_BxLxD = self.norm(x_BxLxD)
    return x_BxLxD if cache is None else (x_BxLxD, layers.advance(cache, length))


def hf_key_map(config: LlamaConfig) -> dict[str, WeightMapping]:
  """HF safetensors names (without the 'model.' prefix) -> NNX state paths of `LlamaModel`.

  Torch Linear weights are [out, in] and NNX kernels [in, out], hence the transposes. Biases
  appear only where the config has them. `lm_head.weight` belongs to the CausalLM head, not here.
  """
  def linear(hf: str, path: tuple[str | int, ...], bias: bool) -> dict[str, WeightMapping]:
    keys = {f'{hf}.weight': WeightMapping((*path, 'kernel'), _transpose, _transpose)}
    if bias:
      keys[f'{hf}.bias'] = WeightMapping((*path, 'bias'), _same, _same)
    return keys

  def norm(hf: str, path: tuple[str | int, ...]) -> dict[str, WeightMapping]:
    return {f'{hf}.weight': WeightMapping((*path, 'scale'), _same, _same)}

  keys = {'embed_tokens.weight': WeightMapping(('embed_tokens', 'embedding'), _same, _same)}
  for i in range(config.num_hidden_layers):
    hf, nx = f'layers.{i}', ('layers', i)
    for name in ('q_proj', 'k_proj', 'v_proj'):
      keys |= linear(f'{hf}.self_attn.{name}', (*nx, 'self_attn', name), config.qkv_bias)
    keys |= linear(f'{hf}.self_attn.o_proj', (*nx, 'self_attn', 'o_proj'), config.o_bias)
    for name in ('gate_proj', 'up_proj', 'down_proj'):
      keys |= linear(f'{hf}.mlp.{name}', (*nx, 'mlp', name), config.mlp_bias)
    keys |= norm(f'{hf}.input_layernorm', (*nx, 'input_layernorm'))
    keys |= norm(f'{hf}.post_attention_layernorm', (*nx, 'post_attention_layernorm'))
  keys |= norm('norm', ('norm',))
  return keys


def _family(model_type: str) -> Family:
  prefix = _CLASS_PREFIX[model_type]
  return Family(
      model_type=model_type,
      config_cls=LlamaConfig,
      model_cls=LlamaModel,
      hf_key_map=hf_key_map,
      hf_prefixes=('model.',),
      kind='decoder',
      peft_targets={'lora': r'self_attn/(q_proj|v_proj)$',
                    'ia3': r'self_attn/(k_proj|v_proj)$|mlp/down_proj$',
                    'ia3_feedforward': r'mlp/down_proj$',
                    'houlsby': r'self_attn/o_proj$|mlp/down_proj$', 'pfeiffer': r'mlp/down_proj$'},
      architectures={'': f'{prefix}Model', 'CausalLM': f'{prefix}ForCausalLM',
                     'SequenceClassifier/last': f'{prefix}ForSequenceClassification',
                     'TokenClassifier': f'{prefix}ForTokenClassification'},
      head_names={'SequenceClassifier/last': 'score', 'TokenClassifier': 'score'},
  )


FAMILIES = {model_type: _family(model_type) for model_type in _CLASS_PREFIX}
