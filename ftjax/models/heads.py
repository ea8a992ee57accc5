"""Task heads on top of a pretrained backbone: one class per kind of output.

Every head keeps its backbone under `encoder` and its new output layer under `classifier`, so
the parameter policy's presets (`params.HEAD`) and the loader find them the same way in every
family. `CausalLM` is the exception by design: its `lm_head` is pretrained (or tied to the word
embeddings), not new.

Text backbones are called as `backbone(input_ids, attention_mask, token_type_ids, *,
deterministic, rngs)` and return [B, L, D] (decoders accept and ignore token types); vision
backbones as `backbone(pixel_values, *, deterministic, rngs)`.
"""

from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from ftjax.errors import FtjaxError
from ftjax.models import layers

POOLINGS = ('mean', 'cls', 'pooler', 'last')


def _new_linear(in_features: int, out_features: int, *, use_bias: bool = True,
                rngs: nnx.Rngs) -> nnx.Linear:
  # A new head is tiny, so it stays float32 whatever the backbone computes in.
  return layers.linear(in_features, out_features, ('embed', 'classes'), std=0.02,
                       dtype=jnp.float32, use_bias=use_bias, rngs=rngs)


def _drop_prompt(hidden_BxLxD: jax.Array, length: int) -> jax.Array:
  """The positions of the input proper: prompt tuning puts soft tokens in front."""
  extra = hidden_BxLxD.shape[1] - length
  return hidden_BxLxD[:, extra:] if extra else hidden_BxLxD


class SequenceClassifier(nnx.Module):
  """Encoder -> one vector per sequence -> dropout -> linear classifier.

  The encoder is any module called as `encoder(input_ids, attention_mask, token_type_ids, *,
  deterministic, rngs)` returning [B, L, D] and exposing `hidden_size` (and `pool` and a
  `pooler` attribute for pooling='pooler').
  """

  def __init__(
      self,
      encoder: nnx.Module,
      num_labels: int,
      *,
      pooling: str = 'mean',
      dropout: float = 0.1,
      use_bias: bool = True,
      rngs: nnx.Rngs,
  ):
    """Builds the head.

    Args:
      encoder: the (pretrained) encoder; taken over, not copied. Unless pooling='pooler', its
        pooler is removed (set to None) so that unused weights are not trained or exported.
      num_labels: number of classes.
      pooling: 'mean' (mean over non-padding tokens), 'cls' (first token), 'pooler' (the
        encoder's pooler: dense + tanh of the first token) or 'last' (the last non-padding
        token, what a causal decoder has read the whole input at, as transformers'
        *ForSequenceClassification decoders pool).
      dropout: dropout rate applied to the pooled vector during training.
      use_bias: False for a bias-free output layer (the `score` layer of HF decoders).
      rngs: initialises the classifier.

    Raises:
      FtjaxError: for an unknown pooling, num_labels < 1, or pooling='pooler' on an encoder
        without a pooler.
    """
    if pooling not in POOLINGS:
      raise FtjaxError(
          f'unknown pooling {pooling!r}: use one of {", ".join(repr(p) for p in POOLINGS)}'
      )
    if num_labels < 1:
      raise FtjaxError(f'num_labels must be at least 1, got {num_labels}')
    if pooling == 'pooler' and getattr(encoder, 'pooler', None) is None:
      raise FtjaxError(
          f'pooling="pooler" needs an encoder with a pooler, and {type(encoder).__name__} has '
          'none: use pooling="mean" or "cls"'
      )
    if pooling != 'pooler' and getattr(encoder, 'pooler', None) is not None:
      encoder.pooler = None
    self.encoder = encoder
    self.pooling = pooling
    self.num_labels = num_labels
    self.dropout = layers.Dropout(dropout)
    self.classifier = _new_linear(encoder.hidden_size, num_labels, use_bias=use_bias, rngs=rngs)

  def __call__(
      self,
      input_ids: jax.Array,
      attention_mask: jax.Array,
      token_type_ids: jax.Array | None = None,
      *,
      deterministic: bool = True,
      rngs: nnx.Rngs | None = None,
      packing: layers.Packing | None = None,
  ) -> jax.Array:
    """Returns float32 logits [B, num_labels]; dropout needs `rngs` when not deterministic.

    With `packing` (an encoder's packed batch, `ftjax.data.packing`), the token arrays are its
    [R, L] rows and B is `packing.num_examples`; each example pools its own tokens.
    """
    kw: dict[str, Any] = dict(deterministic=deterministic, rngs=rngs)
    if packing is not None:
      hidden_RxLxD = self.encoder(input_ids, attention_mask, token_type_ids, packing=packing, **kw)
      pooled_BxD = self._pool_packed(hidden_RxLxD, packing)
      pooled_BxD = self.dropout(pooled_BxD.astype(jnp.float32), **kw)
      return self.classifier(pooled_BxD)
    hidden_BxLxD = self.encoder(input_ids, attention_mask, token_type_ids, **kw)
    if self.pooling == 'mean':
      # Sum in float32: bf16 accumulation over hundreds of tokens loses precision.
      mask_BxL = attention_mask.astype(jnp.float32)
      extra = hidden_BxLxD.shape[1] - mask_BxL.shape[1]
      if extra:  # Soft prompt tokens in front (prompt tuning) are always attended to.
        mask_BxL = jnp.concatenate([jnp.ones((mask_BxL.shape[0], extra)), mask_BxL], axis=1)
      mask_BxLx1 = mask_BxL[..., None]
      total_BxD = jnp.sum(hidden_BxLxD.astype(jnp.float32) * mask_BxLx1, axis=1)
      pooled_BxD = total_BxD / jnp.maximum(jnp.sum(mask_BxLx1, axis=1), 1.0)
    elif self.pooling == 'cls':
      pooled_BxD = hidden_BxLxD[:, 0]
    elif self.pooling == 'last':
      # The rightmost real token, whichever side the padding is on.
      hidden_BxLxD = _drop_prompt(hidden_BxLxD, input_ids.shape[1])
      mask_BxL = (jnp.ones_like(input_ids) if attention_mask is None else attention_mask)
      last_B = jnp.argmax(jnp.arange(input_ids.shape[1]) * (mask_BxL > 0), axis=-1)
      pooled_BxD = jnp.take_along_axis(hidden_BxLxD, last_B[:, None, None], axis=1)[:, 0]
    else:
      pooled_BxD = self.encoder.pool(hidden_BxLxD)
    pooled_BxD = self.dropout(pooled_BxD.astype(jnp.float32), **kw)
    return self.classifier(pooled_BxD)

  def _pool_packed(self, hidden_RxLxD: jax.Array, packing: layers.Packing) -> jax.Array:
    """The unpacked poolings, per example of a packed batch: [B, D]."""
    if self.pooling == 'mean':
      total_BxD, count_Bx1 = packing.gather(hidden_RxLxD)
      return total_BxD / jnp.maximum(count_Bx1, 1.0)
    if self.pooling == 'last':
      raise FtjaxError("model.pooling='last' (decoders) does not take packed batches: set "
                       'data.pack_length=0')
    # 'cls' and 'pooler' read each example's first token (one per example: an exact pick).
    first_BxD, _ = packing.gather(hidden_RxLxD, packing.positions == 0)
    first_BxD = first_BxD.astype(hidden_RxLxD.dtype)
    if self.pooling == 'cls':
      return first_BxD
    return self.encoder.pool(first_BxD[:, None])


class TokenClassifier(nnx.Module):
  """Encoder -> dropout -> linear, per token: logits [B, L, num_labels] (NER, tagging)."""

  def __init__(self, encoder: nnx.Module, num_labels: int, *, dropout: float = 0.1,
               rngs: nnx.Rngs):
    if num_labels < 1:
      raise FtjaxError(f'num_labels must be at least 1, got {num_labels}')
    if getattr(encoder, 'pooler', None) is not None:
      encoder.pooler = None  # Unused: neither trained nor exported.
    self.encoder = encoder
    self.num_labels = num_labels
    self.dropout = layers.Dropout(dropout)
    self.classifier = _new_linear(encoder.hidden_size, num_labels, rngs=rngs)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               token_type_ids: jax.Array | None = None, *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None, packing: layers.Packing | None = None) -> jax.Array:
    """Returns float32 logits [B, L, num_labels] for the L input tokens ([R, L, num_labels] for
    the rows of a packed batch, `packing`)."""
    kw: dict[str, Any] = dict(deterministic=deterministic, rngs=rngs)
    packed = {} if packing is None else {'packing': packing}
    hidden_BxLxD = self.encoder(input_ids, attention_mask, token_type_ids, **kw, **packed)
    hidden_BxLxD = _drop_prompt(hidden_BxLxD, input_ids.shape[1])
    return self.classifier(self.dropout(hidden_BxLxD.astype(jnp.float32), **kw))


class CausalLM(nnx.Module):
  """Decoder -> next-token logits; the output layer is the pretrained `lm_head`, or tied.

  A tied model (`tie_word_embeddings`, always so for GPT-2) multiplies by the word-embedding
  table instead of holding a second copy of it.
  """

  def __init__(self, encoder: nnx.Module, *, tie_word_embeddings: bool, dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    self.encoder = encoder
    self.tie_word_embeddings = tie_word_embeddings
    config = encoder.config
    self.lm_head = None if tie_word_embeddings else layers.linear(
        encoder.hidden_size, config.vocab_size, ('embed', 'vocab'),
        std=config.initializer_range, dtype=dtype, use_bias=False, rngs=rngs)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               token_type_ids: jax.Array | None = None, *, positions: jax.Array | None = None,
               cache: layers.KVCache | None = None, deterministic: bool = True,
               rngs: nnx.Rngs | None = None, logits_dtype: Any = jnp.float32) -> Any:
    """Returns float32 logits [B, L, vocab]; with a cache, (logits, updated cache).

    Args:
      input_ids: [B, L] token ids.
      attention_mask: [B, L], 0 at padding; None attends to all.
      token_type_ids: ignored (decoders have none); accepted for a uniform text signature.
      positions: [B, L] position ids; None counts from 0 (or from the cache's fill).
      cache: a `KVCache` to extend, for generation.
      deterministic: False enables dropout (needs `rngs`).
      rngs: dropout randomness.
      logits_dtype: the logits' dtype; None keeps the output layer's compute dtype (the causal
        LM task's loss reads bfloat16 logits as they are and computes in float32: a float32
        copy of [tokens, vocabulary] logits is a pass over hundreds of MB each way).
    """
    del token_type_ids
    out = self.encoder(input_ids, attention_mask, positions=positions, cache=cache,
                       deterministic=deterministic, rngs=rngs)
    hidden_BxLxD, cache = out if cache is not None else (out, None)
    hidden_BxLxD = _drop_prompt(hidden_BxLxD, input_ids.shape[1])
    if self.lm_head is None:
      logits = self.encoder.word_embeddings.attend(hidden_BxLxD)
    else:
      logits = layers.dense(self.lm_head, hidden_BxLxD,
                            dict(deterministic=deterministic, rngs=rngs))
    if logits_dtype is not None:
      logits = logits.astype(logits_dtype)
    return logits if cache is None else (logits, cache)

  def init_cache(self, batch_size: int, max_length: int) -> layers.KVCache:
    """An empty key/value cache for `batch_size` sequences of up to `max_length` tokens."""
    return self.encoder.init_cache(batch_size, max_length)


class ImageClassifier(nnx.Module):
  """Vision backbone -> first ([CLS]) token of its (final-normed) output -> linear."""

  def __init__(self, encoder: nnx.Module, num_labels: int, *, dropout: float = 0.0,
               rngs: nnx.Rngs):
    if num_labels < 1:
      raise FtjaxError(f'num_labels must be at least 1, got {num_labels}')
    if getattr(encoder, 'pooler', None) is not None:
      encoder.pooler = None  # ViTForImageClassification classifies the CLS token, not the pooler.
    self.encoder = encoder
    self.num_labels = num_labels
    self.dropout = layers.Dropout(dropout)
    self.classifier = _new_linear(encoder.hidden_size, num_labels, rngs=rngs)

  def __call__(self, pixel_values: jax.Array, *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    """Returns float32 logits [B, num_labels] for pixel_values [B, H, W, C] (channels last)."""
    kw: dict[str, Any] = dict(deterministic=deterministic, rngs=rngs)
    hidden_BxLxD = self.encoder(pixel_values, **kw)
    return self.classifier(self.dropout(hidden_BxLxD[:, 0].astype(jnp.float32), **kw))
