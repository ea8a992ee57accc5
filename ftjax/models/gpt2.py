"""GPT-2 decoder (as `transformers.GPT2Model`) in flax NNX, with its Hugging Face weight map.

Module names follow Hugging Face's (`wte`, `wpe`, `ln_1`, `attn.c_attn`, `mlp.c_fc`, `ln_f`) so
that PEFT target regexes written for Hugging Face PEFT (`c_attn`) match here too; only the blocks
live under `layers/<i>/` instead of `h.<i>`, because the parameter policy finds blocks by that
path. GPT-2's Conv1D stores its weight as [in, out], the layout of an NNX kernel, so no weight
is transposed.
"""

import dataclasses
import math
from typing import Any, ClassVar

from flax import nnx
import jax
import jax.numpy as jnp

from ftjax.errors import FtjaxError
from ftjax.models import Family, WeightMapping
from ftjax.models import same as _same
from ftjax.models import layers


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  """The architecture fields of a Hugging Face GPT-2 config.json (defaults as transformers').

  The generic names other modules read (`hidden_size`, `num_hidden_layers`, ...) are properties
  over GPT-2's own (`n_embd`, `n_layer`, ...), as transformers' `attribute_map` provides them.
  """

  model_type: ClassVar[str] = 'gpt2'

  vocab_size: int = 50257
  n_positions: int = 1024
  n_embd: int = 768
  n_layer: int = 12
  n_head: int = 12
  n_inner: int | None = None
  activation_function: str = 'gelu_new'
  resid_pdrop: float = 0.1
  embd_pdrop: float = 0.1
  attn_pdrop: float = 0.1
  layer_norm_epsilon: float = 1e-5
  initializer_range: float = 0.02
  scale_attn_weights: bool = True
  scale_attn_by_inverse_layer_idx: bool = False
  # Upcasting changes nothing here: attention logits are always float32 (see layers.attend).
  reorder_and_upcast_attn: bool = False
  bos_token_id: int | None = 50256
  eos_token_id: int | tuple[int, ...] | None = 50256
  pad_token_id: int | None = None
  tie_word_embeddings: bool = True

  def __post_init__(self):
    if self.activation_function not in layers.ACTIVATIONS:
      raise FtjaxError(
          f'unsupported activation_function {self.activation_function!r} in the GPT-2 config: '
          f'ftjax supports {", ".join(sorted(layers.ACTIVATIONS))}'
      )
    if self.n_embd % self.n_head:
      raise FtjaxError(
          f'n_embd {self.n_embd} is not divisible by n_head {self.n_head} in the GPT-2 config: '
          'fix config.json'
      )

  @property
  def hidden_size(self) -> int:
    return self.n_embd

  @property
  def num_hidden_layers(self) -> int:
    return self.n_layer

  @property
  def num_attention_heads(self) -> int:
    return self.n_head

  @property
  def max_position_embeddings(self) -> int:
    return self.n_positions

  @property
  def intermediate_size(self) -> int:
    return 4 * self.n_embd if self.n_inner is None else self.n_inner

  @property
  def head_dim(self) -> int:
    return self.n_embd // self.n_head

  @classmethod
  def from_hf(cls, d: dict[str, Any]) -> 'GPT2Config':
    """Reads a Hugging Face config.json dict; unknown keys (e.g. `summary_*`) are ignored.

    Raises:
      FtjaxError: for settings this implementation does not honour (cross-attention, an
        unknown activation).
    """
    if d.get('add_cross_attention'):
      raise FtjaxError(
          'this GPT-2 checkpoint has cross-attention (add_cross_attention=True): ftjax loads '
          'GPT-2 as a plain decoder only'
      )
    if not isinstance(d.get('activation_function', 'gelu_new'), str):
      raise FtjaxError('activation_function must be a string in the GPT-2 config, got '
                       f'{d["activation_function"]!r}')
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in d.items() if k in fields}
    if isinstance(kwargs.get('eos_token_id'), list):
      # The config is static metadata of the model's graph, which must be hashable.
      kwargs['eos_token_id'] = tuple(kwargs['eos_token_id'])
    return cls(**kwargs)

  def with_dropout(self, rate: float) -> 'GPT2Config':
    """The same architecture with every dropout rate (embedding, residual, attention) = `rate`."""
    return dataclasses.replace(self, resid_pdrop=rate, embd_pdrop=rate, attn_pdrop=rate)

  def to_hf(self) -> dict[str, Any]:
    """A config.json dict that `transformers.GPT2Model.from_pretrained` reads."""
    d = dataclasses.asdict(self)
    if isinstance(d['eos_token_id'], tuple):
      d['eos_token_id'] = list(d['eos_token_id'])
    d.update(model_type='gpt2', architectures=['GPT2Model'])
    return d


def _linear(config: GPT2Config, in_features: int, out_features: int, axes: layers.Axes, *,
            dtype: Any, rngs: nnx.Rngs, std: float | None = None) -> nnx.Linear:
  return layers.linear(in_features, out_features, axes,
                       std=config.initializer_range if std is None else std,
                       dtype=dtype, rngs=rngs)


def _layer_norm(config: GPT2Config, *, dtype: Any, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return layers.layer_norm(config.n_embd, eps=config.layer_norm_epsilon, dtype=dtype, rngs=rngs)


def _residual_std(config: GPT2Config) -> float:
  # GPT-2 scales the init of projections that write into the residual stream by
  # 1/sqrt(2 * n_layer), as transformers does, so that a model built from scratch starts alike.
  return config.initializer_range / math.sqrt(2 * config.n_layer)


class GPT2Attention(nnx.Module):
  """Causal multi-head self-attention: fused q/k/v projection `c_attn`, output `c_proj`."""

  def __init__(self, config: GPT2Config, layer_idx: int, *, dtype: Any, rngs: nnx.Rngs):
    d = config.n_embd
    self.layer_idx = layer_idx
    self.num_heads = config.n_head
    self.head_dim = config.head_dim
    self.dtype = dtype
    scale = config.head_dim**-0.5 if config.scale_attn_weights else 1.0
    if config.scale_attn_by_inverse_layer_idx:
      scale /= layer_idx + 1
    self.scale = scale
    self.c_attn = _linear(config, d, 3 * d, ('embed', 'heads'), dtype=dtype, rngs=rngs)
    self.c_proj = _linear(config, d, d, ('heads', 'embed'), dtype=dtype, rngs=rngs,
                          std=_residual_std(config))
    self.attn_dropout = layers.Dropout(config.attn_pdrop)

  def __call__(self, x_BxLxD: jax.Array, bias_Bx1xLxS: jax.Array, *,
               cache: layers.KVCache | None, deterministic: bool, rngs: nnx.Rngs | None
               ) -> tuple[jax.Array, layers.KVCache | None]:
    batch, length, _ = x_BxLxD.shape
    kw = dict(deterministic=deterministic, rngs=rngs)
    qkv_BxLx3D = layers.dense(self.c_attn, x_BxLxD, kw)
    # c_attn's outputs are [q | k | v], each head-major, as Hugging Face's split lays them out.
    q, k, v = (t.reshape(batch, length, self.num_heads, self.head_dim)
               for t in jnp.split(qkv_BxLx3D, 3, axis=-1))
    if cache is not None:
      cache, k, v = cache.write(self.layer_idx, k, v)
    out_BxLxD = layers.attend(q, k, v, bias_Bx1xLxS, dtype=self.dtype, scale=self.scale,
                              dropout=self.attn_dropout, **kw)
    return layers.dense(self.c_proj, out_BxLxD, kw), cache


class GPT2MLP(nnx.Module):
  """c_fc -> activation -> c_proj."""

  def __init__(self, config: GPT2Config, *, dtype: Any, rngs: nnx.Rngs):
    self.activation = config.activation_function
    self.c_fc = _linear(config, config.n_embd, config.intermediate_size, ('embed', 'mlp'),
                        dtype=dtype, rngs=rngs)
    self.c_proj = _linear(config, config.intermediate_size, config.n_embd, ('mlp', 'embed'),
                          dtype=dtype, rngs=rngs, std=_residual_std(config))

  def __call__(self, x_BxLxD: jax.Array, kw: dict) -> jax.Array:
    h_BxLxF = layers.ACTIVATIONS[self.activation](layers.dense(self.c_fc, x_BxLxD, kw))
    return layers.dense(self.c_proj, h_BxLxF, kw)


class GPT2Block(nnx.Module):
  """One pre-LayerNorm block: x + attn(ln_1(x)), then + mlp(ln_2(.))."""

  def __init__(self, config: GPT2Config, layer_idx: int, *, dtype: Any, rngs: nnx.Rngs):
    self.ln_1 = _layer_norm(config, dtype=dtype, rngs=rngs)
    self.attn = GPT2Attention(config, layer_idx, dtype=dtype, rngs=rngs)
    self.ln_2 = _layer_norm(config, dtype=dtype, rngs=rngs)
    self.mlp = GPT2MLP(config, dtype=dtype, rngs=rngs)
    self.dropout = layers.Dropout(config.resid_pdrop)

  def __call__(self, x_BxLxD: jax.Array, bias_Bx1xLxS: jax.Array, *,
               cache: layers.KVCache | None, deterministic: bool, rngs: nnx.Rngs | None
               ) -> tuple[jax.Array, layers.KVCache | None]:
    kw = dict(deterministic=deterministic, rngs=rngs)
    attn_BxLxD, cache = self.attn(self.ln_1(x_BxLxD), bias_Bx1xLxS, cache=cache, **kw)
    x_BxLxD = x_BxLxD + self.dropout(attn_BxLxD, **kw)
    x_BxLxD = x_BxLxD + self.dropout(self.mlp(self.ln_2(x_BxLxD), kw), **kw)
    return x_BxLxD, cache


class GPT2Model(nnx.Module):
  """The GPT-2 decoder; `__call__` returns the final-normed hidden state (`ln_f` applied)."""

  def __init__(self, config: GPT2Config, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.dtype = dtype
    std = config.initializer_range
    self.wte = layers.embed(config.vocab_size, config.n_embd, ('vocab', 'embed'), std=std,
                            dtype=dtype, rngs=rngs)
    self.wpe = layers.embed(config.n_positions, config.n_embd, (None, 'embed'), std=std,
                            dtype=dtype, rngs=rngs)
    self.dropout = layers.Dropout(config.embd_pdrop)
    # Recompute each block's activations in the backward pass (hub.load_model(remat=True)).
    self.remat = False
    self.layers = nnx.List(
        [GPT2Block(config, i, dtype=dtype, rngs=rngs) for i in range(config.n_layer)]
    )
    self.ln_f = _layer_norm(config, dtype=dtype, rngs=rngs)

  @property
  def hidden_size(self) -> int:
    return self.config.n_embd

  @property
  def word_embeddings(self) -> nnx.Embed:
    return self.wte

  def init_cache(self, batch_size: int, max_length: int) -> layers.KVCache:
    """An empty key/value cache for `batch_size` sequences of up to `max_length` tokens."""
    if max_length > self.config.n_positions:
      raise FtjaxError(f'a cache of {max_length} tokens exceeds n_positions '
                       f'{self.config.n_positions} of this GPT-2 model: lower the max length')
    return layers.KVCache.create(
        num_layers=self.config.n_layer, batch_size=batch_size, max_length=max_length,
        num_kv_heads=self.config.n_head, head_dim=self.config.head_dim, dtype=self.dtype)

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
      attention_mask: [B, L], 1 (or True) for real tokens and 0 for padding; None attends to all.
      token_type_ids: ignored. (transformers would add their *word* embeddings to the input, a
        GPT-2 quirk no tokenizer relies on; accepted for the uniform text signature.)
      positions: [B, L] (or [L]) position ids; None counts 0, 1, ... from the cache's fill.
        Left-padded batches should pass `cumsum(mask) - 1` so that each text starts at 0.
      cache: a `KVCache` (from `init_cache`) to extend with these tokens, for generation.
      deterministic: False enables dropout, which then needs `rngs` with a 'dropout' stream.
      rngs: e.g. `nnx.Rngs(dropout=key)`; unused when deterministic.

    Returns:
      The hidden state [B, L, D] in the compute dtype; with a cache, (hidden, updated cache).

    Raises:
      FtjaxError: if L exceeds the model's n_positions.
    """
    del token_type_ids
    length = input_ids.shape[1]
    if length > self.config.n_positions:
      raise FtjaxError(f'sequence length {length} exceeds n_positions {self.config.n_positions} '
                       'of this GPT-2 model: lower the max length')
    if positions is None:
      start = 0 if cache is None else cache.index
      positions = start + jnp.arange(length)
    kw = dict(deterministic=deterministic, rngs=rngs)
    positions_BxL = jnp.broadcast_to(positions, input_ids.shape)
    x_BxLxD = self.wte(input_ids) + self.wpe(positions_BxL)
    x_BxLxD = self.dropout(x_BxLxD, **kw)
    bias_Bx1xLxS, cache = layers.causal_bias(attention_mask, length, cache)
    for block in self.layers:
      x_BxLxD, cache = layers.run_block(block, self.remat, x_BxLxD, bias_Bx1xLxS, cache=cache,
                                        **kw)
    x_BxLxD = self.ln_f(x_BxLxD)
    return x_BxLxD if cache is None else (x_BxLxD, layers.advance(cache, length))


def hf_key_map(config: GPT2Config) -> dict[str, WeightMapping]:
  """HF safetensors names (without the 'transformer.' prefix) -> NNX state paths of GPT2Model.

  The `attn.bias` / `attn.masked_bias` causal-mask buffers of older checkpoints are deliberately
  absent (the loader reports them as unexpected), as is the tied `lm_head.weight`.
  """
  def params(hf: str, path: tuple[str | int, ...], weight: str) -> dict[str, WeightMapping]:
    return {
        f'{hf}.weight': WeightMapping((*path, weight), _same, _same),
        f'{hf}.bias': WeightMapping((*path, 'bias'), _same, _same),
    }

  keys = {
      'wte.weight': WeightMapping(('wte', 'embedding'), _same, _same),
      'wpe.weight': WeightMapping(('wpe', 'embedding'), _same, _same),
  }
  for i in range(config.n_layer):
    hf, nx = f'h.{i}', ('layers', i)
    keys |= params(f'{hf}.ln_1', (*nx, 'ln_1'), 'scale')
    keys |= params(f'{hf}.attn.c_attn', (*nx, 'attn', 'c_attn'), 'kernel')
    keys |= params(f'{hf}.attn.c_proj', (*nx, 'attn', 'c_proj'), 'kernel')
    keys |= params(f'{hf}.ln_2', (*nx, 'ln_2'), 'scale')
    keys |= params(f'{hf}.mlp.c_fc', (*nx, 'mlp', 'c_fc'), 'kernel')
    keys |= params(f'{hf}.mlp.c_proj', (*nx, 'mlp', 'c_proj'), 'kernel')
  keys |= params('ln_f', ('ln_f',), 'scale')
  return keys


FAMILY = Family(
    model_type='gpt2',
    config_cls=GPT2Config,
    model_cls=GPT2Model,
    hf_key_map=hf_key_map,
    hf_prefixes=('transformer.',),
    kind='decoder',
    peft_targets={'lora': r'attn/c_attn$', 'ia3': r'attn/c_attn$|mlp/c_proj$',
                  'ia3_feedforward': r'mlp/c_proj$', 'houlsby': r'attn/c_proj$|mlp/c_proj$',
                  'pfeiffer': r'mlp/c_proj$'},
    architectures={'': 'GPT2Model', 'CausalLM': 'GPT2LMHeadModel',
                   'SequenceClassifier/last': 'GPT2ForSequenceClassification',
                   'TokenClassifier': 'GPT2ForTokenClassification'},
    head_names={'SequenceClassifier/last': 'score', 'TokenClassifier': 'classifier'},
)
