"""Prompt tuning (Lester et al., 2021): learned soft tokens in front of every input.

The encoder's weights all stay frozen; the only new variable is a [P, D] table of virtual-token
embeddings, put before the word embeddings (positions 0..P-1, token type 0) exactly as Hugging
Face PEFT's prompt tuning feeds them to a BERT model through `inputs_embeds`.
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


def _encoder(model: nnx.Module) -> nnx.Module:
  encoder = getattr(model, 'encoder', model)
  if not hasattr(encoder, 'prompt') or not hasattr(encoder, 'embeddings'):
    raise FtjaxError(f'prompt tuning needs an encoder with a prompt slot (BERT family); '
                     f'{type(encoder).__name__} has none')
  return encoder


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


def save_prompt_adapter(model: nnx.Module, out_dir, *, base_model_name_or_path: str):
  """Writes the soft prompt in PEFT's format (`PeftModel.from_pretrained` loads it).

  Raises:
    FtjaxError: if the model has no soft prompt.
  """
  encoder = _encoder(model)
  if encoder.prompt is None:
    raise FtjaxError('this model has no soft prompt to save: apply prompt tuning first')
  table = np.asarray(encoder.prompt(), np.float32)
  config = encoder.config
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  safetensors.numpy.save_file({_PEFT_KEY: table}, out / hf_format.ADAPTER_WEIGHTS_NAME,
                              metadata={'format': 'pt'})
  adapter_config = {
      'peft_type': 'PROMPT_TUNING', 'task_type': 'FEATURE_EXTRACTION',
      'base_model_name_or_path': base_model_name_or_path, 'inference_mode': True,
      'num_virtual_tokens': int(table.shape[0]), 'token_dim': int(table.shape[1]),
      'num_transformer_submodules': 1, 'num_attention_heads': config.num_attention_heads,
      'num_layers': config.num_hidden_layers, 'prompt_tuning_init': 'RANDOM',
  }
  (out / hf_format.ADAPTER_CONFIG_NAME).write_text(json.dumps(adapter_config, indent=2) + '\n')
  return out


def load_prompt_adapter(model: nnx.Module, adapter_dir) -> str:
  """Loads a PEFT prompt-tuning adapter into `model` (adding the soft prompt if it has none).

  Raises:
    FtjaxError: for missing files, another PEFT type, or a prompt sized for another model.
  """
  directory = pathlib.Path(adapter_dir)
  config_path = directory / hf_format.ADAPTER_CONFIG_NAME
  weights_path = directory / hf_format.ADAPTER_WEIGHTS_NAME
  for path in (config_path, weights_path):
    if not path.is_file():
      raise FtjaxError(f'{directory} is not a PEFT adapter: {path.name} is missing')
  adapter_config = json.loads(config_path.read_text())
  if adapter_config.get('peft_type') != 'PROMPT_TUNING':
    raise FtjaxError(f"adapter {directory} is {adapter_config.get('peft_type')!r}, not "
                     'PROMPT_TUNING')
  with safetensors.safe_open(weights_path, framework='numpy') as f:
    if _PEFT_KEY not in f.keys():
      raise FtjaxError(f'adapter {weights_path} holds no {_PEFT_KEY} tensor')
    table = f.get_tensor(_PEFT_KEY).astype(np.float32)
  encoder = _encoder(model)
  width = encoder.embeddings.word_embeddings.embedding.get_value().shape[1]
  if table.ndim != 2 or table.shape[1] != width:
    raise FtjaxError(f'adapter {directory} was trained for a different base model: '
                     f'{_PEFT_KEY} has shape {table.shape}, this model expects (P, {width})')
  if encoder.prompt is None:
    apply_prompt_tuning(model, num_virtual_tokens=table.shape[0], init='random',
                        rngs=nnx.Rngs(0))
  elif encoder.prompt().shape != table.shape:
    raise FtjaxError(f'adapter {directory} has {table.shape[0]} virtual tokens; this model\'s '
                     f'prompt has {encoder.prompt().shape[0]}')
  encoder.prompt.embedding.set_value(jnp.asarray(table))
  return 'encoder/prompt/embedding' if encoder is not model else 'prompt/embedding'
