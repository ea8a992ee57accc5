"""Vision Transformer (as `transformers.ViTModel`) in flax NNX, with its Hugging Face weight map.

Pixels are channels-last, [B, H, W, C] (torch's ViT takes [B, C, H, W]); the patch embedding is a
convolution with stride = kernel = patch size, so its kernel is torch's [D, C, p, p] transposed to
[p, p, C, D]. Blocks are pre-LayerNorm and the output is the final-normed sequence, [CLS] first,
which is what `heads.ImageClassifier` classifies.

The embeddings (patches, [CLS] token, positions) live under `embeddings/`, as the text families'
do, so the parameter policy's presets (freeze the embeddings, layer-wise decay) apply unchanged.
Logical axes as in `layers`: 'embed', 'heads', 'mlp'; None for never-sharded dimensions (patch
pixels, positions).
"""

import dataclasses
from typing import Any, ClassVar

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from ftjax.errors import FtjaxError
from ftjax.models import Family, WeightMapping
from ftjax.models import same as _same, transpose as _transpose
from ftjax.models import layers

_ACTIVATIONS = layers.ACTIVATIONS


def _square(name: str, value: Any) -> int:
  """HF allows [height, width] sizes; only square ones (one int) are supported here."""
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise FtjaxError(f'ViT {name}={list(value)} is not square: ftjax supports square '
                       'images and patches only')
    value = value[0]
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise FtjaxError(f'ViT {name} must be a positive integer, got {value!r}')
  return value


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """The architecture fields of a Hugging Face ViT config.json (defaults as transformers')."""

  model_type: ClassVar[str] = 'vit'

  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = 'gelu'
  hidden_dropout_prob: float = 0.0
  attention_probs_dropout_prob: float = 0.0
  initializer_range: float = 0.02
  layer_norm_eps: float = 1e-12
  image_size: int = 224
  patch_size: int = 16
  num_channels: int = 3
  qkv_bias: bool = True
  # The pooler (ViTModel's add_pooling_layer): None means hidden_size, as in transformers.
  pooler_output_size: int | None = None
  pooler_act: str = 'tanh'

  def __post_init__(self):
    for name in ('hidden_act', 'pooler_act'):
      act = getattr(self, name)
      if not isinstance(act, str) or act not in _ACTIVATIONS:
        raise FtjaxError(f'unsupported {name} {act!r} in the ViT config: ftjax supports '
                         f'{", ".join(sorted(_ACTIVATIONS))}')
    if self.hidden_size % self.num_attention_heads:
      raise FtjaxError(
          f'hidden_size {self.hidden_size} is not divisible by num_attention_heads '
          f'{self.num_attention_heads} in the ViT config: fix config.json'
      )
    if self.image_size < self.patch_size:
      raise FtjaxError(f'ViT image_size {self.image_size} is smaller than patch_size '
                       f'{self.patch_size}: fix config.json')

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def num_patches(self) -> int:
    # As torch's strided conv, a remainder narrower than a patch is dropped.
    return (self.image_size // self.patch_size)**2

  @classmethod
  def from_hf(cls, d: dict[str, Any]) -> 'ViTConfig':
    """Reads a Hugging Face config.json dict; unknown keys (e.g. encoder_stride) are ignored.

    Raises:
      FtjaxError: for settings this implementation does not honour (non-square image or patch
        sizes, an explicit head_dim that is not hidden_size / num_attention_heads, an unknown
        activation).
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in d.items() if k in fields}
    for name in ('image_size', 'patch_size'):
      if name in kwargs:
        kwargs[name] = _square(name, kwargs[name])
    head_dim = d.get('head_dim')
    hidden, heads = kwargs.get('hidden_size', 768), kwargs.get('num_attention_heads', 12)
    if head_dim is not None and head_dim * heads != hidden:
      raise FtjaxError(f'ViT head_dim {head_dim} x num_attention_heads {heads} != hidden_size '
                       f'{hidden}: ftjax supports head_dim = hidden_size / num_attention_heads')
    if kwargs.get('pooler_output_size') == hidden:
      kwargs['pooler_output_size'] = None  # One spelling of the default keeps configs equal.
    return cls(**kwargs)

  def with_dropout(self, rate: float) -> 'ViTConfig':
    """The same architecture with every dropout rate (hidden and attention) set to `rate`."""
    return dataclasses.replace(self, hidden_dropout_prob=rate, attention_probs_dropout_prob=rate)

  def to_hf(self) -> dict[str, Any]:
    """A config.json dict that `transformers.ViTModel.from_pretrained` reads."""
    d = dataclasses.asdict(self)
    d.update(
        model_type='vit',
        architectures=['ViTModel'],
        pooler_output_size=self.pooler_output_size or self.hidden_size,
    )
    return d


def _dense(config: ViTConfig, in_features: int, out_features: int, axes: layers.Axes, *,
           dtype: Any, rngs: nnx.Rngs, use_bias: bool = True) -> nnx.Linear:
  return layers.linear(in_features, out_features, axes, std=config.initializer_range,
                       dtype=dtype, rngs=rngs, use_bias=use_bias)


def _layer_norm(config: ViTConfig, *, dtype: Any, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return layers.layer_norm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype, rngs=rngs)


class ViTEmbeddings(nnx.Module):
  """Patches -> D, [CLS] in front, learned positions added, then dropout."""

  def __init__(self, config: ViTConfig, *, dtype: Any, rngs: nnx.Rngs):
    self.config = config
    d, p = config.hidden_size, config.patch_size
    std = config.initializer_range
    self.patch_embeddings = nnx.Conv(
        config.num_channels, d, kernel_size=(p, p), strides=(p, p), padding='VALID',
        dtype=dtype, param_dtype=jnp.float32,
        kernel_init=layers.param_init(nnx.initializers.normal(std), (None, None, None, 'embed')),
        bias_init=layers.param_init(nnx.initializers.zeros_init(), ('embed',)),
        rngs=rngs,
    )
    # transformers initialises both with a normal truncated at +-2 std.
    trunc = nnx.initializers.truncated_normal(std)
    self.cls_token = nnx.Param(
        layers.param_init(trunc, (None, None, 'embed'))(rngs.params(), (1, 1, d)))
    self.position_embeddings = nnx.Param(layers.param_init(trunc, (None, None, 'embed'))(
        rngs.params(), (1, config.num_patches + 1, d)))
    self.dropout = layers.Dropout(config.hidden_dropout_prob)

  def __call__(self, pixels_BxHxWxC: jax.Array, *, deterministic: bool,
               rngs: nnx.Rngs | None) -> jax.Array:
    patches_BxhxwxD = self.patch_embeddings(pixels_BxHxWxC)
    batch, _, _, d = patches_BxhxwxD.shape
    # Row-major over the patch grid, as torch's flatten(2) of the conv output.
    patches_BxNxD = patches_BxhxwxD.reshape(batch, -1, d)
    cls_Bx1xD = jnp.broadcast_to(self.cls_token[...].astype(patches_BxNxD.dtype), (batch, 1, d))
    x_BxLxD = jnp.concatenate([cls_Bx1xD, patches_BxNxD], axis=1)
    x_BxLxD = layers.add_broadcast(x_BxLxD, self.position_embeddings[...].astype(x_BxLxD.dtype))
    return self.dropout(x_BxLxD, deterministic=deterministic, rngs=rngs)


class ViTSelfAttention(nnx.Module):
  """Multi-head self-attention with its output projection (HF's attention.attention+output)."""

  def __init__(self, config: ViTConfig, *, dtype: Any, rngs: nnx.Rngs):
    d = config.hidden_size
    self.num_heads = config.num_attention_heads
    self.head_dim = config.head_dim
    self.dtype = dtype
    qkv = dict(dtype=dtype, rngs=rngs, use_bias=config.qkv_bias)
    self.query = _dense(config, d, d, ('embed', 'heads'), **qkv)
    self.key = _dense(config, d, d, ('embed', 'heads'), **qkv)
    self.value = _dense(config, d, d, ('embed', 'heads'), **qkv)
    self.out = _dense(config, d, d, ('heads', 'embed'), dtype=dtype, rngs=rngs)
    self.dropout = layers.Dropout(config.attention_probs_dropout_prob)

  def __call__(self, x_BxLxD: jax.Array, *, deterministic: bool,
               rngs: nnx.Rngs | None) -> jax.Array:
    batch, length, _ = x_BxLxD.shape
    split = lambda t: t.reshape(batch, length, self.num_heads, self.head_dim)
    kw = dict(deterministic=deterministic, rngs=rngs)
    q_BxLxHxK = split(layers.dense(self.query, x_BxLxD, kw))
    k_BxLxHxK = split(layers.dense(self.key, x_BxLxD, kw))
    v_BxLxHxK = split(layers.dense(self.value, x_BxLxD, kw))
    # Every patch sees every patch: no padding, no causality.
    bias_1x1x1xL = jnp.zeros((1, 1, 1, length), jnp.float32)
    out_BxLxD = layers.attend(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, bias_1x1x1xL, dtype=self.dtype,
                              dropout=self.dropout, **kw)
    return layers.dense(self.out, out_BxLxD, kw)


class ViTLayer(nnx.Module):
  """One pre-LayerNorm transformer block."""

  def __init__(self, config: ViTConfig, *, dtype: Any, rngs: nnx.Rngs):
    self.hidden_act = config.hidden_act
    self.layernorm_before = _layer_norm(config, dtype=dtype, rngs=rngs)
    self.attention = ViTSelfAttention(config, dtype=dtype, rngs=rngs)
    self.layernorm_after = _layer_norm(config, dtype=dtype, rngs=rngs)
    self.intermediate = _dense(config, config.hidden_size, config.intermediate_size,
                               ('embed', 'mlp'), dtype=dtype, rngs=rngs)
    self.output = _dense(config, config.intermediate_size, config.hidden_size,
                         ('mlp', 'embed'), dtype=dtype, rngs=rngs)
    self.dropout = layers.Dropout(config.hidden_dropout_prob)

  def __call__(self, x_BxLxD: jax.Array, *, deterministic: bool,
               rngs: nnx.Rngs | None) -> jax.Array:
    kw = dict(deterministic=deterministic, rngs=rngs)
    attn_BxLxD = self.attention(self.layernorm_before(x_BxLxD), **kw)
    x_BxLxD = x_BxLxD + self.dropout(attn_BxLxD, **kw)
    h_BxLxD = layers.feed_forward(self.intermediate, self.output, self.layernorm_after(x_BxLxD),
                                  kw, _ACTIVATIONS[self.hidden_act])
    return x_BxLxD + self.dropout(h_BxLxD, **kw)


class ViTModel(nnx.Module):
  """The ViT backbone; `__call__` returns the final-normed sequence, `pool` the ViT pooler."""

  def __init__(self, config: ViTConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.embeddings = ViTEmbeddings(config, dtype=dtype, rngs=rngs)
    # Recompute each block's activations in the backward pass (hub.load_model(remat=True)).
    self.remat = False
    self.layers = nnx.List(
        [ViTLayer(config, dtype=dtype, rngs=rngs) for _ in range(config.num_hidden_layers)]
    )
    self.layernorm = _layer_norm(config, dtype=dtype, rngs=rngs)
    # A head that does not use the pooler sets this to None so it is neither trained nor saved.
    self.pooler: nnx.Linear | None = _dense(
        config, config.hidden_size, config.pooler_output_size or config.hidden_size,
        ('embed', None), dtype=dtype, rngs=rngs,
    )

  @property
  def hidden_size(self) -> int:
    return self.config.hidden_size

  def __call__(self, pixel_values: jax.Array, *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    """Encodes a batch of images.

    Args:
      pixel_values: [B, H, W, C] channels-last, already resized and normalised; H = W =
        config.image_size and C = config.num_channels.
      deterministic: False enables dropout, which then needs `rngs` with a 'dropout' stream.
      rngs: e.g. `nnx.Rngs(dropout=key)`; unused when deterministic.

    Returns:
      The final-LayerNormed hidden states, [B, 1 + num_patches, D] in the compute dtype, the
      [CLS] token first.

    Raises:
      FtjaxError: if the pixels do not have the shape the checkpoint was trained for.
    """
    c = self.config
    expected = (c.image_size, c.image_size, c.num_channels)
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
      hint = (' (channels first? ftjax takes channels last)'
              if pixel_values.ndim == 4 and pixel_values.shape[1] == c.num_channels else '')
      raise FtjaxError(
          f'pixel_values of shape {tuple(pixel_values.shape)} do not fit this ViT, which takes '
          f'[B, {c.image_size}, {c.image_size}, {c.num_channels}]{hint}: resize the images to '
          f'{c.image_size}x{c.image_size}'
      )
    kw = dict(deterministic=deterministic, rngs=rngs)
    x_BxLxD = self.embeddings(pixel_values, **kw)
    for layer in self.layers:
      x_BxLxD = layers.run_block(layer, self.remat, x_BxLxD, **kw)
    return self.layernorm(x_BxLxD)

  def pool(self, hidden_BxLxD: jax.Array) -> jax.Array:
    """ViT's pooler: dense + activation (tanh) of the [CLS] token, [B, pooler_output_size]."""
    if self.pooler is None:
      raise FtjaxError('this ViT model was built without its pooler: classify the [CLS] token')
    return _ACTIVATIONS[self.config.pooler_act](self.pooler(hidden_BxLxD[:, 0]))


def _conv_to_nnx(a: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(a.transpose(2, 3, 1, 0))  # [D, C, p, p] -> [p, p, C, D]


def _conv_to_hf(a: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(a.transpose(3, 2, 0, 1))  # [p, p, C, D] -> [D, C, p, p]


def hf_key_map(config: ViTConfig) -> dict[str, WeightMapping]:
  """HF safetensors names (without a 'vit.' prefix) -> NNX state paths of `ViTModel`.

  Torch Linear weights are [out, in] and NNX kernels [in, out], hence the transposes; the patch
  convolution goes from torch's OIHW to flax's HWIO.
  """
  def linear(hf: str, path: tuple[str | int, ...], bias: bool = True
             ) -> dict[str, WeightMapping]:
    keys = {f'{hf}.weight': WeightMapping((*path, 'kernel'), _transpose, _transpose)}
    if bias:
      keys[f'{hf}.bias'] = WeightMapping((*path, 'bias'), _same, _same)
    return keys

  def norm(hf: str, path: tuple[str | int, ...]) -> dict[str, WeightMapping]:
    return {
        f'{hf}.weight': WeightMapping((*path, 'scale'), _same, _same),
        f'{hf}.bias': WeightMapping((*path, 'bias'), _same, _same),
    }

  patch = ('embeddings', 'patch_embeddings')
  keys: dict[str, WeightMapping] = {
      'embeddings.cls_token': WeightMapping(('embeddings', 'cls_token'), _same, _same),
      'embeddings.position_embeddings': WeightMapping(('embeddings', 'position_embeddings'),
                                                      _same, _same),
      'embeddings.patch_embeddings.projection.weight': WeightMapping(
          (*patch, 'kernel'), _conv_to_nnx, _conv_to_hf),
      'embeddings.patch_embeddings.projection.bias': WeightMapping((*patch, 'bias'), _same, _same),
  }
  for i in range(config.num_hidden_layers):
    hf, nx = f'encoder.layer.{i}', ('layers', i)
    keys |= norm(f'{hf}.layernorm_before', (*nx, 'layernorm_before'))
    for name in ('query', 'key', 'value'):
      keys |= linear(f'{hf}.attention.attention.{name}', (*nx, 'attention', name),
                     bias=config.qkv_bias)
    keys |= linear(f'{hf}.attention.output.dense', (*nx, 'attention', 'out'))
    keys |= norm(f'{hf}.layernorm_after', (*nx, 'layernorm_after'))
    keys |= linear(f'{hf}.intermediate.dense', (*nx, 'intermediate'))
    keys |= linear(f'{hf}.output.dense', (*nx, 'output'))
  keys |= norm('layernorm', ('layernorm',))
  keys |= linear('pooler.dense', ('pooler',))
  return keys


FAMILY = Family(
    model_type='vit',
    config_cls=ViTConfig,
    model_cls=ViTModel,
    hf_key_map=hf_key_map,
    hf_prefixes=('vit.',),
    kind='vision',
    peft_targets={'lora': r'attention/(query|value)$',
                  'ia3': r'attention/(key|value)$|/output$', 'ia3_feedforward': r'/output$',
                  'houlsby': r'attention/out$|/output$', 'pfeiffer': r'/output$'},
    architectures={'': 'ViTModel', 'ImageClassifier': 'ViTForImageClassification'},
    head_names={'ImageClassifier': 'classifier'},
)
