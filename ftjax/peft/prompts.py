"""Prompt tuning and prefix tuning: learned virtual tokens; the encoder's weights stay frozen.

Prompt tuning (Lester et al., 2021): a [P, D] table of soft-token embeddings put before the word
embeddings (positions 0..P-1, token type 0), exactly as Hugging Face PEFT feeds them to a BERT
model through `inputs_embeds`.

Prefix tuning (Li & Liang, 2021): P learned keys and values in every attention layer, one
[P, num_layers * 2 * D] table laid out as PEFT's (without its optional reparameterising MLP), so
that its adapter files load both ways.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from flax import nnx

from ftjax.errors import FtjaxError
from ftjax.peft import hf_format

INITS = ('random', 'vocab')


class PromptParam(nnx.Param):
  """A soft prompt's embeddings: its own Variable type so filters can name it."""


class SoftPrompt(nnx.Module):
  """`num_virtual_tokens` learned embeddings; calling it returns them, [P, D]."""

  def __init__(self, embedding_PxD: jax.Array):
    # Laid out like the word embeddings' feature axis (logical names for the sharding rules).
    self.embedding = PromptParam(embedding_PxD, out_sharding=(None, 'embed'),
                                 eager_sharding=False)

  def __call__(self) -> jax.Array:
    return self.embedding.get_value()


class PrefixParam(nnx.Param):
  """A prefix's keys and values: its own Variable type so filters can name it."""


class Prefix(nnx.Module):
  """P learned keys and values per layer; calling it returns [P, num_layers * 2, H, K]."""

  def __init__(self, table_PxF: jax.Array, *, num_heads: int, head_dim: int):
    self.num_heads = num_heads
    self.head_dim = head_dim
    self.embedding = PrefixParam(table_PxF, out_sharding=(None, None), eager_sharding=False)

  def __call__(self) -> jax.Array:
    # PEFT's view of its table: key of layer i at 2i, value at 2i + 1.
    table = self.embedding.get_value()
    return table.reshape(table.shape[0], -1, self.num_heads, self.head_dim)


def _encoder(model: nnx.Module) -> nnx.Module:
  encoder = getattr(model, 'encoder', model)
  if not hasattr(encoder, 'prompt') or not hasattr(encoder, 'embeddings'):
    raise FtjaxError(f'prompt tuning needs an encoder with a prompt slot (BERT family); '
                     f'{type(encoder).__name__} has none')
  return encoder


def apply_prefix_tuning(model: nnx.Module, *, num_virtual_tokens: int,
                        rngs: nnx.Rngs) -> str:
  """Adds learned key/value prefixes to every attention layer of `model` (modified in place).

  The table starts from N(0, 1), as PEFT's prefix encoder does.

  Returns:
    The path of the new table (`encoder/prefix/embedding` in a classifier).

  Raises:
    FtjaxError: for num_virtual_tokens < 1, a prefix already there, or a model without a slot.
  """
  if num_virtual_tokens < 1:
    raise FtjaxError(f'prefix tuning needs num_virtual_tokens >= 1, got {num_virtual_tokens}')
  encoder = _encoder(model)
  if getattr(encoder, 'prefix', None) is not None:
    raise FtjaxError('this model already has a prefix')
  config = encoder.config
  if num_virtual_tokens + 2 > config.max_position_embeddings:
    raise FtjaxError(f'{num_virtual_tokens} prefix tokens leave no positions for the input '
                     f'(max_position_embeddings={config.max_position_embeddings})')
  width = config.num_hidden_layers * 2 * config.hidden_size
  table = jax.random.normal(rngs.params(), (num_virtual_tokens, width), jnp.float32)
  encoder.prefix = nnx.data(Prefix(table, num_heads=config.num_attention_heads,
                                   head_dim=config.hidden_size // config.num_attention_heads))
  return 'encoder/prefix/embedding' if encoder is not model else 'prefix/embedding'


def apply_prompt_tuning(model: nnx.Module, *, num_virtual_tokens: int, init: str = 'vocab',
                        rngs: nnx.Rngs) -> str:
  """Adds a soft prompt to `model` (an encoder, or a classifier with one under `encoder`).

  Args:
    model: modified in place.
    num_virtual_tokens: P, the number of soft tokens.
    init: 'vocab' copies the embeddings of P random vocabulary tokens (PEFT's SAMPLE_VOCAB,
      the better start in Lester et al.); 'random' draws them from N(0, 1) like PEFT's RANDOM.
    rngs: the source of the draw.

  Returns:
    The path of the new table (`encoder/prompt/embedding` in a classifier).

  Raises:
    FtjaxError: for num_virtual_tokens < 1, an unknown init, or a model without a prompt slot.
  """
  if num_virtual_tokens < 1:
    raise FtjaxError(f'prompt tuning needs num_virtual_tokens >= 1, got {num_virtual_tokens}')
  if init not in INITS:
    raise FtjaxError(f'unknown prompt init {init!r}; choose {" or ".join(INITS)}')
  encoder = _encoder(model)
  if encoder.prompt is not None:
    raise FtjaxError('this model already has a soft prompt')
  table = encoder.embeddings.word_embeddings.embedding.get_value()
  if num_virtual_tokens + 2 > encoder.config.max_position_embeddings:
    raise FtjaxError(f'{num_virtual_tokens} virtual tokens leave no positions for the input '
                     f'(max_position_embeddings={encoder.config.max_position_embeddings})')
  key = rngs.params()
  if init == 'vocab':
    rows = jax.random.randint(key, (num_virtual_tokens,), 0, table.shape[0])
    values = jnp.take(table, rows, axis=0)
  else:
    values = jax.random.normal(key, (num_virtual_tokens, table.shape[1]), jnp.float32)
  encoder.prompt = nnx.data(SoftPrompt(values.astype(jnp.float32)))  # The slot starts as None.
  return 'encoder/prompt/embedding' if encoder is not model else 'prompt/embedding'


# The Hugging Face PEFT format: adapter_config.json + adapter_model.safetensors, whose only
# tensor is `prompt_embeddings` [P, D].
_PEFT_KEY = 'prompt_embeddings'


# PEFT type -> the encoder slot holding that kind of virtual tokens.
_SLOTS = {'PROMPT_TUNING': 'prompt', 'PREFIX_TUNING': 'prefix'}


def _table(encoder: nnx.Module, slot: str) -> np.ndarray | None:
  module = getattr(encoder, slot, None)
  return None if module is None else np.asarray(module.embedding.get_value(), np.float32)


def save_prompt_adapter(model: nnx.Module, out_dir, *, base_model_name_or_path: str):
  """Writes a soft prompt or a prefix in PEFT's format (`PeftModel.from_pretrained` loads it).

  Raises:
    FtjaxError: if the model has neither.
  """
  encoder = _encoder(model)
  present = {kind: t for kind, slot in _SLOTS.items()
             if (t := _table(encoder, slot)) is not None}
  if len(present) != 1:
    raise FtjaxError('save_prompt_adapter needs a model with exactly one of a soft prompt or a '
                     f'prefix; this one has {len(present)}')
  (kind, table), = present.items()
  config = encoder.config
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  safetensors.numpy.save_file({_PEFT_KEY: table}, out / hf_format.ADAPTER_WEIGHTS_NAME,
                              metadata={'format': 'pt'})
  adapter_config = {
      'peft_type': kind, 'task_type': 'FEATURE_EXTRACTION',
      'base_model_name_or_path': base_model_name_or_path, 'inference_mode': True,
      'num_virtual_tokens': int(table.shape[0]), 'token_dim': config.hidden_size,
      'num_transformer_submodules': 1, 'num_attention_heads': config.num_attention_heads,
      'num_layers': config.num_hidden_layers,
  }
  if kind == 'PROMPT_TUNING':
    adapter_config['prompt_tuning_init'] = 'RANDOM'
  else:
    adapter_config.update(prefix_projection=False, encoder_hidden_size=config.hidden_size)
  (out / hf_format.ADAPTER_CONFIG_NAME).write_text(json.dumps(adapter_config, indent=2) + '\n')
  return out


def load_prompt_adapter(model: nnx.Module, adapter_dir) -> str:
  """Loads a PEFT prompt- or prefix-tuning adapter into `model`, adding the slot if needed.

  Raises:
    FtjaxError: for missing files, another PEFT type, a reparameterised prefix, or a table
      sized for another model.
  """
  directory = pathlib.Path(adapter_dir)
  config_path = directory / hf_format.ADAPTER_CONFIG_NAME
  weights_path = directory / hf_format.ADAPTER_WEIGHTS_NAME
  for path in (config_path, weights_path):
    if not path.is_file():
      raise FtjaxError(f'{directory} is not a PEFT adapter: {path.name} is missing')
  adapter_config = json.loads(config_path.read_text())
  kind = adapter_config.get('peft_type')
  if kind not in _SLOTS:
    raise FtjaxError(f'adapter {directory} is {kind!r}, not PROMPT_TUNING or PREFIX_TUNING')
  if adapter_config.get('prefix_projection'):
    raise FtjaxError(f'adapter {directory} uses prefix_projection (an MLP over the prefix), '
                     'which ftjax does not implement')
  with safetensors.safe_open(weights_path, framework='numpy') as f:
    if _PEFT_KEY not in f.keys():
      raise FtjaxError(f'adapter {weights_path} holds no {_PEFT_KEY} tensor')
    table = f.get_tensor(_PEFT_KEY).astype(np.float32)
  encoder = _encoder(model)
  config = encoder.config
  slot = _SLOTS[kind]
  width = config.hidden_size * (1 if slot == 'prompt' else 2 * config.num_hidden_layers)
  if table.ndim != 2 or table.shape[1] != width:
    raise FtjaxError(f'adapter {directory} was trained for a different base model: '
                     f'{_PEFT_KEY} has shape {table.shape}, this model expects (P, {width})')
  existing = _table(encoder, slot)
  if existing is None:
    apply = apply_prompt_tuning if slot == 'prompt' else apply_prefix_tuning
    kwargs = {'init': 'random'} if slot == 'prompt' else {}
    apply(model, num_virtual_tokens=table.shape[0], rngs=nnx.Rngs(0), **kwargs)
  elif existing.shape != table.shape:
    raise FtjaxError(f'adapter {directory} has {table.shape[0]} virtual tokens; this model\'s '
                     f'{slot} has {existing.shape[0]}')
  getattr(encoder, slot).embedding.set_value(jnp.asarray(table))
  return f'encoder/{slot}/embedding' if encoder is not model else f'{slot}/embedding'
