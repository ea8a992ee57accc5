"""The checkpoint's own tokenizer, set to emit fixed-length int32 arrays.

Every batch has the same [B, max_length] shape so the jitted steps compile once.
"""

import pathlib

import numpy as np
import tokenizers

from ftjax.errors import FtjaxError

# Tried in order when tokenizer.json has no padding settings of its own.
_PAD_TOKENS = ('[PAD]', '<pad>', '<|pad|>', '<|endoftext|>', '</s>')


def load_tokenizer(checkpoint_dir: str | pathlib.Path, max_length: int) -> tokenizers.Tokenizer:
  """Loads `checkpoint_dir/tokenizer.json`, truncating and padding to exactly `max_length`.

  Raises:
    FtjaxError: if the file is missing or `max_length` is not positive.
  """
  path = pathlib.Path(checkpoint_dir) / 'tokenizer.json'
  if not path.is_file():
    raise FtjaxError(f'{path} not found: the checkpoint needs a fast-tokenizer tokenizer.json '
                     '(save one with transformers AutoTokenizer.save_pretrained)')
  if max_length < 1:
    raise FtjaxError(f'config.data.max_length={max_length} must be a positive number of tokens')
  tokenizer = tokenizers.Tokenizer.from_file(str(path))
  tokenizer.enable_truncation(max_length=max_length)
  pad_id, pad_token = _pad(tokenizer)
  tokenizer.enable_padding(length=max_length, pad_id=pad_id, pad_token=pad_token)
  return tokenizer


def encode(tokenizer: tokenizers.Tokenizer, texts: list[str]) -> dict[str, np.ndarray]:
  """Tokenizes a batch: input_ids, attention_mask and token_type_ids, each [B, L] int32."""
  encodings = tokenizer.encode_batch(texts)
  return {
      'input_ids': np.asarray([e.ids for e in encodings], np.int32),
      'attention_mask': np.asarray([e.attention_mask for e in encodings], np.int32),
      'token_type_ids': np.asarray([e.type_ids for e in encodings], np.int32),
  }


def _pad(tokenizer: tokenizers.Tokenizer) -> tuple[int, str]:
  if tokenizer.padding:
    return tokenizer.padding['pad_id'], tokenizer.padding['pad_token']
  for token in _PAD_TOKENS:
    token_id = tokenizer.token_to_id(token)
    if token_id is not None:
      return token_id, token
  # Padded positions are masked out, so any id works; 0 exists in every vocabulary.
  return 0, tokenizer.id_to_token(0) or ''
