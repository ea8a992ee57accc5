"""The checkpoint's own tokenizer, set to emit fixed-length int32 arrays.

Every batch has the same [B, max_length] shape so the jitted steps compile once.
"""

import json
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


IGNORE = -1  # Label of tokens without a loss (as ftjax.tasks.IGNORE).


def encode_tagged(tokenizer: tokenizers.Tokenizer, words: list[list[str]],
                  tags: list[list[int]]) -> dict[str, np.ndarray]:
  """Tokenizes pre-split words; each word's tag labels its first sub-word, the rest IGNORE.

  Returns the arrays of `encode` plus 'labels' [B, L] int32 (IGNORE on special tokens, padding,
  continuation sub-words and words cut off by truncation).
  """
  encodings = tokenizer.encode_batch(words, is_pretokenized=True)
  labels = np.full((len(encodings), len(encodings[0].ids)), IGNORE, np.int32)
  for row, (encoding, row_tags) in enumerate(zip(encodings, tags)):
    previous = None
    for position, word in enumerate(encoding.word_ids):
      if word is not None and word != previous:
        labels[row, position] = row_tags[word]
      previous = word
  return {
      'input_ids': np.asarray([e.ids for e in encodings], np.int32),
      'attention_mask': np.asarray([e.attention_mask for e in encodings], np.int32),
      'token_type_ids': np.asarray([e.type_ids for e in encodings], np.int32),
      'labels': labels,
  }


def encode_instructions(tokenizer: tokenizers.Tokenizer, prompts: list[str],
                        responses: list[str], *, eos_id: int | None,
                        raw: tokenizers.Tokenizer | None = None) -> dict[str, np.ndarray]:
  """Tokenizes prompt + response (+ EOS) for supervised fine-tuning of a decoder.

  The prompt gets the tokenizer's special tokens (e.g. Llama's BOS), the response none; 'labels'
  are the input ids on the response and its EOS, IGNORE on the prompt and padding, so only the
  response is trained. Sequences are cut at the tokenizer's max length and right-padded.
  `raw` is `unpadded(tokenizer)`, passed in by callers that encode many batches.
  """
  length = tokenizer.truncation['max_length']
  pad_id = tokenizer.padding['pad_id']
  input_ids = np.full((len(prompts), length), pad_id, np.int32)
  labels = np.full((len(prompts), length), IGNORE, np.int32)
  mask = np.zeros((len(prompts), length), np.int32)
  raw = raw or unpadded(tokenizer)
  for row, (prompt, response) in enumerate(zip(prompts, responses)):
    prompt_ids = raw.encode(prompt).ids
    response_ids = raw.encode(response, add_special_tokens=False).ids
    response_ids += [] if eos_id is None else [eos_id]
    ids = (prompt_ids + response_ids)[:length]
    input_ids[row, :len(ids)] = ids
    mask[row, :len(ids)] = 1
    labels[row, len(prompt_ids):len(ids)] = ids[len(prompt_ids):]
  return {'input_ids': input_ids, 'attention_mask': mask, 'labels': labels}


def unpadded(tokenizer: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
  """A copy of `tokenizer` without padding and truncation."""
  raw = tokenizers.Tokenizer.from_str(tokenizer.to_str())
  raw.no_padding()
  raw.no_truncation()
  return raw


def eos_id(checkpoint_dir: str | pathlib.Path, tokenizer: tokenizers.Tokenizer) -> int | None:
  """The end-of-sequence token: tokenizer_config.json's eos_token, else config.json's id."""
  directory = pathlib.Path(checkpoint_dir)
  try:
    token = json.loads((directory / 'tokenizer_config.json').read_text()).get('eos_token')
    if isinstance(token, dict):  # Older files store an AddedToken dict.
      token = token.get('content')
    if isinstance(token, str) and tokenizer.token_to_id(token) is not None:
      return tokenizer.token_to_id(token)
  except (OSError, json.JSONDecodeError):
    pass
  try:
    value = json.loads((directory / 'config.json').read_text()).get('eos_token_id')
  except (OSError, json.JSONDecodeError):
    return None
  if isinstance(value, list):
    value = value[0] if value else None
  return value if isinstance(value, int) else None


def _pad(tokenizer: tokenizers.Tokenizer) -> tuple[int, str]:
  if tokenizer.padding:
    return tokenizer.padding['pad_id'], tokenizer.padding['pad_token']
  for token in _PAD_TOKENS:
    token_id = tokenizer.token_to_id(token)
    if token_id is not None:
      return token_id, token
  # Padded positions are masked out, so any id works; 0 exists in every vocabulary.
  return 0, tokenizer.id_to_token(0) or ''
