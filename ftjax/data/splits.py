"""Stable train/validation/test assignment and the key that decides what counts as a duplicate.

A split is a pure function of an example's text, so it never changes between runs, machines or
library versions, and near-identical texts (case, spacing) always land in the same split: a
model can't score on the test split by having memorised a different-case copy from train.
"""

from collections.abc import Sequence
import hashlib
from typing import NamedTuple

from ftjax.errors import FtjaxError

SPLITS = ('train', 'validation', 'test')


class Example(NamedTuple):
  """One labelled text, as stored in the TFDS build."""

  text: str
  label: int


def dedup_key(text: str) -> str:
  """Returns the identity of a text: lower-cased with whitespace runs collapsed.

  Lower-casing matches the uncased default tokenizer; for a cased model it merely treats 'Good'
  and 'good' as one example, which costs little and keeps the splits leak-free for every model.
  """
  return ' '.join(text.split()).lower()


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
  """Validates `config.data.split_fractions` and returns them as a 3-tuple of floats."""
  try:
    values = tuple(float(f) for f in fractions)
  except (TypeError, ValueError):
    values = ()
  if len(values) != 3 or min(values) < 0 or abs(sum(values) - 1.0) > 1e-6:
    raise FtjaxError(f'config.data.split_fractions={tuple(fractions)!r} must be three '
                     'non-negative numbers (train, validation, test) that sum to 1')
  return values  # type: ignore[return-value]


def split_of(key: str, fractions: tuple[float, float, float]) -> str:
  """Returns the split a dedup key belongs to; a stable hash, not Python's salted `hash()`."""
  # 8 hex digits give 2**32 buckets: far finer than any fraction a user would write.
  bucket = int(hashlib.sha1(key.encode('utf-8')).hexdigest()[:8], 16) / 2**32
  if bucket < fractions[0]:
    return 'train'
  if bucket < fractions[0] + fractions[1]:
    return 'validation'
  return 'test'
