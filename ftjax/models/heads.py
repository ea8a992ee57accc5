"""Task heads on top of a pretrained encoder."""

from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from ftjax.errors import FtjaxError

POOLINGS = ('mean', 'cls', 'pooler')


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
      rngs: nnx.Rngs,
  ):
    """Builds the head.

    Args:
      encoder: the (pretrained) encoder; taken over, not copied. Unless pooling='pooler', its
        pooler is removed (set to None) so that unused weights are not trained or exported.
      num_labels: number of classes.
      pooling: 'mean' (mean over non-padding tokens), 'cls' (first token) or 'pooler' (the
        encoder's pooler: dense + tanh of the first token).
      dropout: dropout rate applied to the pooled vector during training.
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
    self.dropout = nnx.Dropout(dropout)
    self.classifier = nnx.Linear(
        encoder.hidden_size,
        num_labels,
        # The head is tiny, so it stays float32 whatever the encoder computes in.
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        kernel_init=nnx.with_partitioning(
            nnx.initializers.normal(0.02), ('embed', 'classes'), eager_sharding=False
        ),
        bias_init=nnx.with_partitioning(
            nnx.initializers.zeros_init(), ('classes',), eager_sharding=False
        ),
        rngs=rngs,
    )

  def __call__(
      self,
      input_ids: jax.Array,
      attention_mask: jax.Array,
      token_type_ids: jax.Array | None = None,
      *,
      deterministic: bool = True,
      rngs: nnx.Rngs | None = None,
  ) -> jax.Array:
    """Returns float32 logits [B, num_labels]; dropout needs `rngs` when not deterministic."""
    kw: dict[str, Any] = dict(deterministic=deterministic, rngs=rngs)
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
    else:
      pooled_BxD = self.encoder.pool(hidden_BxLxD)
    pooled_BxD = self.dropout(pooled_BxD.astype(jnp.float32), **kw)
    return self.classifier(pooled_BxD)
