"""BERT encoder (as `transformers.BertModel`) in flax NNX, with its Hugging Face weight map.

Parameters are float32 and carry logical axis names for sharding; the compute dtype is a
constructor argument (float32 or bfloat16) and the attention softmax always runs in float32.

Logical axes used here: 'vocab' (vocabulary rows), 'embed' (the residual stream D), 'heads'
(the concatenated attention heads, H * D/H), 'mlp' (the feed-forward hidden size) and None for
dimensions that are never sharded (positions, token types). Variables are created with
`eager_sharding=False`, so the names are metadata only: on one device nothing is sharded, and a
mesh applies them via `nnx.get_partition_spec` + logical axis rules at jitted init / load time.
"""

import dataclasses
from typing import Any, ClassVar

from flax import nnx
import jax
import jax.numpy as jnp

from ftjax.errors import FtjaxError
from ftjax.models import Family, WeightMapping
from ftjax.models import same as _same, transpose as _transpose
from ftjax.models import layers

_ACTIVATIONS = layers.ACTIVATIONS


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The architecture fields of a Hugging Face BERT config.json (defaults as transformers')."""

  model_type: ClassVar[str] = 'bert'

  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = 'gelu'
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  pad_token_id: int | None = 0
  initializer_range: float = 0.02

  def __post_init__(self):
    if self.hidden_act not in _ACTIVATIONS:
      raise FtjaxError(
          f'unsupported hidden_act {self.hidden_act!r} in the BERT config: ftjax supports '
          f'{", ".join(sorted(_ACTIVATIONS))}'
      )
    if self.hidden_size % self.num_attention_heads:
      raise FtjaxError(
          f'hidden_size {self.hidden_size} is not divisible by num_attention_heads '
          f'{self.num_attention_heads} in the BERT config: fix config.json'
      )

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def from_hf(cls, d: dict[str, Any]) -> 'BertConfig':
    """Reads a Hugging Face config.json dict; unknown keys are ignored.

    Raises:
      FtjaxError: for settings this implementation does not honour (relative position
        embeddings, decoder/cross-attention use, an unknown activation).
    """
    position_type = d.get('position_embedding_type', 'absolute')
    if position_type != 'absolute':
      raise FtjaxError(
          f'BERT position_embedding_type {position_type!r} is not supported: ftjax implements '
          "only 'absolute' position embeddings"
      )
    if d.get('is_decoder') or d.get('add_cross_attention'):
      raise FtjaxError(
          'this BERT checkpoint is configured as a decoder (is_decoder/add_cross_attention): '
          'ftjax loads BERT as a bidirectional encoder only'
      )
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in d.items() if k in fields}
    if not isinstance(kwargs.get('hidden_act', 'gelu'), str):
      raise FtjaxError(f'hidden_act must be a string in the BERT config, got {d["hidden_act"]!r}')
    return cls(**kwargs)

  def with_dropout(self, rate: float) -> 'BertConfig':
    """The same architecture with every dropout rate (hidden and attention) set to `rate`."""
    return dataclasses.replace(self, hidden_dropout_prob=rate, attention_probs_dropout_prob=rate)

  def to_hf(self) -> dict[str, Any]:
    """A config.json dict that `transformers.BertModel.from_pretrained` reads."""
    d = dataclasses.asdict(self)
    d.update(
        model_type='bert',
        architectures=['BertModel'],
        position_embedding_type='absolute',
    )
    return d


def _dense(config: BertConfig, in_features: int, out_features: int, axes: layers.Axes, *,
           dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.Linear:
  return layers.linear(in_features, out_features, axes, std=config.initializer_range,
                       dtype=dtype, rngs=rngs)


def _layer_norm(config: BertConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return layers.layer_norm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype, rngs=rngs)


def _embed(config: BertConfig, num_embeddings: int, axes: layers.Axes, *, dtype: jnp.dtype,
           rngs: nnx.Rngs, padding_idx: int | None = None) -> nnx.Embed:
  return layers.embed(num_embeddings, config.hidden_size, axes, std=config.initializer_range,
                      dtype=dtype, rngs=rngs, padding_idx=padding_idx)


dense = layers.dense  # Kept under this name: PEFT layers document their calling convention by it.


class BertEmbeddings(nnx.Module):
  """Word + position + token-type embeddings, then LayerNorm and dropout."""

  def __init__(self, config: BertConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
    self.config = config
    self.word_embeddings = _embed(
        config, config.vocab_size, ('vocab', 'embed'), dtype=dtype, rngs=rngs,
        padding_idx=config.pad_token_id,
    )
    self.position_embeddings = _embed(
        config, config.max_position_embeddings, (None, 'embed'), dtype=dtype, rngs=rngs
    )
    self.token_type_embeddings = _embed(
        config, config.type_vocab_size, (None, 'embed'), dtype=dtype, rngs=rngs
    )
    self.layer_norm = _layer_norm(config, dtype=dtype, rngs=rngs)
    self.dropout = layers.Dropout(config.hidden_dropout_prob)

  def __call__(
      self,
      input_ids_BxL: jax.Array,
      token_type_ids_BxL: jax.Array,
      *,
      deterministic: bool,
      rngs: nnx.Rngs | None,
      prompt_PxD: jax.Array | None = None,
      position_offset: int = 0,
      position_ids_BxL: jax.Array | None = None,
  ) -> jax.Array:
    words_BxLxD = self.word_embeddings(input_ids_BxL)
    if prompt_PxD is not None:
      # Prompt tuning: soft tokens go in front of the words and take the first positions and
      # token type 0, as Hugging Face PEFT feeds them through `inputs_embeds`.
      batch, num_virtual = input_ids_BxL.shape[0], prompt_PxD.shape[0]
      prompt_BxPxD = jnp.broadcast_to(prompt_PxD.astype(words_BxLxD.dtype),
                                      (batch, num_virtual, words_BxLxD.shape[-1]))
      words_BxLxD = jnp.concatenate([prompt_BxPxD, words_BxLxD], axis=1)
      token_type_ids_BxL = jnp.concatenate(
          [jnp.zeros_like(token_type_ids_BxL, shape=(batch, num_virtual)), token_type_ids_BxL], 1)
    seq_len = words_BxLxD.shape[1] + position_offset
    if seq_len > self.config.max_position_embeddings:
      raise FtjaxError(
          f'sequence length {seq_len} exceeds max_position_embeddings '
          f'{self.config.max_position_embeddings} of this BERT model: lower the max length'
      )
    if position_ids_BxL is None:
      position_ids_BxL = jnp.arange(position_offset, seq_len)[None]
    x_BxLxD = layers.add_broadcast(words_BxLxD + self.token_type_embeddings(token_type_ids_BxL),
                                   self.position_embeddings(position_ids_BxL))
    x_BxLxD = self.layer_norm(x_BxLxD)
    return self.dropout(x_BxLxD, deterministic=deterministic, rngs=rngs)


class BertSelfAttention(nnx.Module):
  """Multi-head self-attention including its output projection (HF's attention.self+output)."""

  def __init__(self, config: BertConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
    d = config.hidden_size
    self.num_heads = config.num_attention_heads
    self.head_dim = config.head_dim
    self.dtype = dtype
    self.query = _dense(config, d, d, ('embed', 'heads'), dtype=dtype, rngs=rngs)
    self.key = _dense(config, d, d, ('embed', 'heads'), dtype=dtype, rngs=rngs)
    self.value = _dense(config, d, d, ('embed', 'heads'), dtype=dtype, rngs=rngs)
    self.out = _dense(config, d, d, ('heads', 'embed'), dtype=dtype, rngs=rngs)
    self.dropout = layers.Dropout(config.attention_probs_dropout_prob)

  def __call__(
      self,
      x_BxLxD: jax.Array,
      mask_bias_Bx1x1xL: jax.Array,
      *,
      deterministic: bool,
      rngs: nnx.Rngs | None,
      prefix_kv: tuple[jax.Array, jax.Array] | None = None,
  ) -> jax.Array:
    batch, seq_len, _ = x_BxLxD.shape
    split = lambda t: t.reshape(batch, seq_len, self.num_heads, self.head_dim)
    kw = dict(deterministic=deterministic, rngs=rngs)
    q_BxLxHxK = split(dense(self.query, x_BxLxD, kw))
    k_BxLxHxK = split(dense(self.key, x_BxLxD, kw))
    v_BxLxHxK = split(dense(self.value, x_BxLxD, kw))
    if prefix_kv is not None:
      # Prefix tuning: learned keys and values every query also attends to (the mask bias
      # already has their columns in front).
      widen = lambda t_PxHxK, t: jnp.concatenate(
          [jnp.broadcast_to(t_PxHxK.astype(t.dtype), (batch, *t_PxHxK.shape)), t], axis=1)
      k_BxLxHxK = widen(prefix_kv[0], k_BxLxHxK)
      v_BxLxHxK = widen(prefix_kv[1], v_BxLxHxK)
    out_BxLxHK = layers.attend(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, mask_bias_Bx1x1xL,
                               dtype=self.dtype, scale=self.head_dim**-0.5,
                               dropout=self.dropout, **kw)
    return dense(self.out, out_BxLxHK, kw)


class BertLayer(nnx.Module):
  """One post-LayerNorm transformer block."""

  def __init__(self, config: BertConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs):
    self.hidden_act = config.hidden_act
    self.attention = BertSelfAttention(config, dtype=dtype, rngs=rngs)
    self.attention_norm = _layer_norm(config, dtype=dtype, rngs=rngs)
    self.intermediate = _dense(
        config, config.hidden_size, config.intermediate_size, ('embed', 'mlp'),
        dtype=dtype, rngs=rngs,
    )
    self.output = _dense(
        config, config.intermediate_size, config.hidden_size, ('mlp', 'embed'),
        dtype=dtype, rngs=rngs,
    )
    self.output_norm = _layer_norm(config, dtype=dtype, rngs=rngs)
    self.dropout = layers.Dropout(config.hidden_dropout_prob)

  def __call__(
      self,
      x_BxLxD: jax.Array,
      mask_bias_Bx1x1xL: jax.Array,
      *,
      deterministic: bool,
      rngs: nnx.Rngs | None,
      prefix_kv: tuple[jax.Array, jax.Array] | None = None,
  ) -> jax.Array:
    kw = dict(deterministic=deterministic, rngs=rngs)
    attn_BxLxD = self.attention(x_BxLxD, mask_bias_Bx1x1xL, prefix_kv=prefix_kv, **kw)
    # norm(x + dropout(branch)), on one kernel in float32.
    x_BxLxD = layers.residual_norm(self.attention_norm, self.dropout, x_BxLxD, attn_BxLxD, **kw)
    h_BxLxD = layers.feed_forward(self.intermediate, self.output, x_BxLxD, kw,
                                  _ACTIVATIONS[self.hidden_act])
    return layers.residual_norm(self.output_norm, self.dropout, x_BxLxD, h_BxLxD, **kw)


class BertModel(nnx.Module):
  """The BERT encoder; `__call__` returns the last hidden state, `pool` the BERT pooler."""

  def __init__(self, config: BertConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.embeddings = BertEmbeddings(config, dtype=dtype, rngs=rngs)
    # Recompute each block's activations in the backward pass (hub.load_model(remat=True)).
    self.remat = False
    self.layers = nnx.List(
        [BertLayer(config, dtype=dtype, rngs=rngs) for _ in range(config.num_hidden_layers)]
    )
    # Set by prompt tuning (ftjax.peft.prompts): learned soft tokens put before the input.
    self.prompt: nnx.Module | None = None
    # Set by prefix tuning (ftjax.peft.prompts): learned keys/values for every layer, returned
    # as [P, num_layers * 2, heads, head_dim] (key of layer i at 2i, value at 2i + 1).
    self.prefix: nnx.Module | None = None
    # A head that does not use the pooler may set this to None so it is neither trained nor saved.
    self.pooler: nnx.Linear | None = _dense(
        config, config.hidden_size, config.hidden_size, ('embed', None), dtype=dtype, rngs=rngs
    )

  @property
  def hidden_size(self) -> int:
    return self.config.hidden_size

  @property
  def word_embeddings(self) -> nnx.Embed:
    return self.embeddings.word_embeddings

  def __call__(
      self,
      input_ids: jax.Array,
      attention_mask: jax.Array | None,
      token_type_ids: jax.Array | None = None,
      *,
      deterministic: bool = True,
      rngs: nnx.Rngs | None = None,
      packing: layers.Packing | None = None,
  ) -> jax.Array:
    """Encodes a batch.

    Args:
      input_ids: [B, L] token ids.
      attention_mask: [B, L], 1 (or True) for real tokens and 0 for padding; None attends to all.
      token_type_ids: [B, L] segment ids; None means all zeros.
      deterministic: False enables dropout, which then needs `rngs` with a 'dropout' stream.
      rngs: e.g. `nnx.Rngs(dropout=key)`; unused when deterministic.
      packing: for a packed batch (rows holding several examples), where each token comes from;
        attention then stays within each example and positions restart at its first token.

    Returns:
      The last hidden state, [B, L, D] in the compute dtype; [B, P + L, D] with P soft prompt
      tokens in front when prompt tuning is applied (as Hugging Face PEFT returns it).
    """
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    if packing is not None and (self.prompt is not None or self.prefix is not None):
      raise FtjaxError('packed batches (data.pack_length) do not combine with prompt or prefix '
                       'tuning, whose virtual tokens belong to one example per row: set '
                       'data.pack_length=0')
    prompt_PxD = None if self.prompt is None else self.prompt()
    if prompt_PxD is not None:
      if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
      attention_mask = jnp.concatenate(
          [jnp.ones_like(attention_mask, shape=(input_ids.shape[0], prompt_PxD.shape[0])),
           attention_mask], axis=1)
    if packing is not None:
      mask_bias = packing.attention_bias()
    elif attention_mask is None:
      mask_bias = jnp.zeros((1, 1, 1, input_ids.shape[1]), jnp.float32)
    else:
      # Added to float32 logits; finfo.min (not -inf) keeps fully padded rows free of NaNs.
      keep_Bx1x1xL = attention_mask.astype(bool)[:, None, None, :]
      mask_bias = jnp.where(keep_Bx1x1xL, 0.0, jnp.finfo(jnp.float32).min)
    prefix_PxNxHxK = None if self.prefix is None else self.prefix()
    num_prefix = 0 if prefix_PxNxHxK is None else prefix_PxNxHxK.shape[0]
    if num_prefix:
      # The prefix is always attended to, and (as with a key/value cache in transformers) the
      # input's positions start after it.
      mask_bias = jnp.concatenate(
          [jnp.zeros((*mask_bias.shape[:3], num_prefix), mask_bias.dtype), mask_bias], axis=-1)
    kw = dict(deterministic=deterministic, rngs=rngs)
    x_BxLxD = self.embeddings(input_ids, token_type_ids, prompt_PxD=prompt_PxD,
                              position_offset=num_prefix,
                              position_ids_BxL=self.position_ids(input_ids, packing), **kw)
    for i, layer in enumerate(self.layers):
      prefix_kv = None if not num_prefix else (prefix_PxNxHxK[:, 2 * i],
                                               prefix_PxNxHxK[:, 2 * i + 1])
      x_BxLxD = layers.run_block(layer, self.remat, x_BxLxD, mask_bias, prefix_kv=prefix_kv, **kw)
    return x_BxLxD

  def position_ids(self, input_ids: jax.Array,
                   packing: layers.Packing | None = None) -> jax.Array | None:
    """The position ids of `input_ids`, [B, L]; None numbers the tokens 0, 1, ... as BERT does.
    A packed batch numbers each example's tokens from its start.

    Families that derive positions from the tokens (RoBERTa) override this.
    """
    del input_ids
    if packing is not None:
      return packing.positions
    return None

  def pool(self, hidden_BxLxD: jax.Array) -> jax.Array:
    """BERT's pooler: dense + tanh of the first ([CLS]) token, [B, D]."""
    if self.pooler is None:
      raise FtjaxError('this BERT model was built without its pooler: use pooling="mean" or "cls"')
    return jnp.tanh(self.pooler(hidden_BxLxD[:, 0]))


def hf_key_map(config: BertConfig) -> dict[str, WeightMapping]:
  """HF safetensors names (without a 'bert.' prefix) -> NNX state paths of `BertModel`.

  Torch Linear weights are [out, in] and NNX kernels [in, out], hence the transposes. The
  `embeddings.position_ids` buffer some checkpoints carry is deliberately absent.
  """
  def linear(hf: str, path: tuple[str | int, ...]) -> dict[str, WeightMapping]:
    return {
        f'{hf}.weight': WeightMapping((*path, 'kernel'), _transpose, _transpose),
        f'{hf}.bias': WeightMapping((*path, 'bias'), _same, _same),
    }

  def norm(hf: str, path: tuple[str | int, ...]) -> dict[str, WeightMapping]:
    return {
        f'{hf}.weight': WeightMapping((*path, 'scale'), _same, _same),
        f'{hf}.bias': WeightMapping((*path, 'bias'), _same, _same),
    }

  keys: dict[str, WeightMapping] = {}
  for name in ('word', 'position', 'token_type'):
    keys[f'embeddings.{name}_embeddings.weight'] = WeightMapping(
        ('embeddings', f'{name}_embeddings', 'embedding'), _same, _same
    )
  keys |= norm('embeddings.LayerNorm', ('embeddings', 'layer_norm'))
  for i in range(config.num_hidden_layers):
    hf, nx = f'encoder.layer.{i}', ('layers', i)
    for name in ('query', 'key', 'value'):
      keys |= linear(f'{hf}.attention.self.{name}', (*nx, 'attention', name))
    keys |= linear(f'{hf}.attention.output.dense', (*nx, 'attention', 'out'))
    keys |= norm(f'{hf}.attention.output.LayerNorm', (*nx, 'attention_norm'))
    keys |= linear(f'{hf}.intermediate.dense', (*nx, 'intermediate'))
    keys |= linear(f'{hf}.output.dense', (*nx, 'output'))
    keys |= norm(f'{hf}.output.LayerNorm', (*nx, 'output_norm'))
  keys |= linear('pooler.dense', ('pooler',))
  return keys


FAMILY = Family(
    model_type='bert',
    config_cls=BertConfig,
    model_cls=BertModel,
    hf_key_map=hf_key_map,
    hf_prefixes=('bert.',),
    kind='encoder',
    peft_targets={'lora': r'attention/(query|value)$',
                  'ia3': r'attention/(key|value)$|/output$', 'ia3_feedforward': r'/output$',
                  'houlsby': r'attention/out$|/output$', 'pfeiffer': r'/output$'},
    architectures={'': 'BertModel', 'TokenClassifier': 'BertForTokenClassification',
                   'SequenceClassifier/pooler': 'BertForSequenceClassification'},
    head_names={'TokenClassifier': 'classifier', 'SequenceClassifier/pooler': 'classifier'},
)
