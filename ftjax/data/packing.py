"""Sequence packing: a batch's short examples share token rows instead of each padding its own.

A batch of B examples padded to `max_length` tokens computes on B x max_length positions, most of
them padding when the texts are short (VADER's words and phrases: 4.1 of 8 tokens on average).
Packing places the examples end to end into rows of `pack_length` tokens (first fit, longest
first) and records, per token, which example it belongs to (`example_ids`, -1 for padding) and
its position within that example (`positions`). The models attend only within an example (a
block-diagonal mask), number positions from each example's start, and the heads pool each
example's own tokens, so every example's logits are those of the padded batch, while the
encoder computes on R x pack_length positions (R rows, about half of B x max_length for VADER).

The number of rows is fixed per split (`rows_for`: for training, the count that minimises the
expected positions per step over a few hundred batches drawn from the split; exactly what an
evaluation's fixed batches need), so a step compiles once; a training batch that needs more
rows is packed into `fallback_rows` rows instead (enough for any batch), a second shape.
Per-token labels (token classification's 'labels') are packed with the tokens; the per-example
arrays ('label', 'target', 'weight') keep their [B] shape and order: the loss, metrics and batch
size in examples are unchanged.
"""

import numpy as np

from ftjax.errors import FtjaxError

# Token arrays that are packed ([B, max_length] -> [R, pack_length]); other [B, ...] arrays are
# per example and stay as they are.
TOKEN_KEYS = ('input_ids', 'attention_mask', 'token_type_ids', 'labels')
# Batches drawn from a split to size its rows, and the seed that draws them.
_SIZING_DRAWS = 256


def first_fit(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray, int]:
  """Places items of `lengths` tokens into rows of `capacity`, longest first, each into the
  first row with room (first-fit decreasing: at most 11/9 of the optimal row count + 1).

  Returns:
    (row, offset, rows): each item's row and its first token's column, and the rows used.
  """
  lengths = np.asarray(lengths, np.int64)
  if lengths.size and lengths.max() > capacity:
    raise FtjaxError(f'an example of {lengths.max()} tokens does not fit a packed row of '
                     f'{capacity}')
  row = np.zeros(len(lengths), np.int64)
  offset = np.zeros(len(lengths), np.int64)
  free = np.full(len(lengths), capacity, np.int64)  # Room left per row (at most one per item).
  rows = 0
  for i in np.argsort(-lengths, kind='stable'):
    r = int(np.argmax(free >= lengths[i]))  # The first row with room: an opened or a new one.
    row[i], offset[i] = r, capacity - free[r]
    free[r] -= lengths[i]
    rows = max(rows, r + 1)
  return row, offset, rows


def lengths_of(batch: dict[str, np.ndarray]) -> np.ndarray:
  """Real tokens per example of a right-padded batch (its attention mask's row sums)."""
  return np.asarray(batch['attention_mask']).sum(axis=1).astype(np.int64)


def fallback_rows(batch_size: int, width: int, pack_length: int, multiple: int = 1) -> int:
  """Rows that always hold a batch of `batch_size` examples of at most `width` tokens each.

  First fit opens a row only when no open row has room for the example, that is when every
  open row holds more than `pack_length - width` tokens, so at least k = pack_length // width
  examples: any batch fits in ceil(batch_size / k) rows (rounded up to `multiple`, at most
  `batch_size`).
  """
  per_row = max(1, pack_length // max(1, width))
  rows = -(-batch_size // per_row)
  return min(-(-rows // multiple) * multiple, batch_size)


def rows_for(lengths: np.ndarray, batch_size: int, pack_length: int, multiple: int = 1,
             seed: int = 0, in_order: bool = False, width: int | None = None) -> int:
  """Rows of `pack_length` tokens for the batches of `batch_size` examples of a split whose
  examples have `lengths` tokens, rounded up to `multiple` (the devices a batch is split over)
  and at most `batch_size`.

  With `in_order` (an evaluation: `lengths` are the whole split's, batched in order, the last
  batch filled up with padding that `pack` gives no tokens) the most that those batches need.
  Otherwise `_SIZING_DRAWS` random batches are drawn from `lengths`, and the count is the one
  that minimises the expected positions per step, given that a batch needing more rows is packed
  into `fallback_rows` (of examples up to `width` tokens, default the longest in `lengths`): for
  VADER (32 examples, rows of 16) 9 rows fit 97% of the draws and 10 the rest, so 9 rows with
  an occasional 16-row batch compute on fewer positions than 10 rows every step.
  """
  lengths = np.asarray(lengths)
  round_up = lambda rows: min(-(-rows // multiple) * multiple, batch_size)
  if in_order:
    padded = np.concatenate([lengths, np.zeros(-len(lengths) % batch_size, lengths.dtype)])
    return round_up(max(first_fit(batch, pack_length)[2]
                        for batch in padded.reshape(-1, batch_size)))
  rng = np.random.default_rng(seed)
  size = min(batch_size, len(lengths))
  needs = np.array([round_up(first_fit(lengths[rng.choice(len(lengths), size, replace=False)],
                                       pack_length)[2]) for _ in range(_SIZING_DRAWS)])
  fallback = fallback_rows(batch_size, int(lengths.max()) if width is None else width,
                           pack_length, multiple)
  # Expected rows per step with `rows` rows, and `fallback` for the batches that need more.
  expected = lambda rows: rows + (fallback - rows) * np.mean(needs > rows)
  return min((int(rows) for rows in np.unique(needs) if rows <= fallback),
             key=lambda rows: (expected(rows), rows), default=fallback)


def pack(batch: dict[str, np.ndarray], pack_length: int, rows: int,
         multiple: int = 1) -> dict[str, np.ndarray]:
  """`batch` (right-padded [B, max_length] token arrays) with its examples packed into `rows` rows
  of `pack_length` tokens, or, when they do not fit there, into `fallback_rows` rows (which
  always hold them; `multiple` rounds that count up, as `rows_for` rounds `rows`).

  Adds 'example_ids' and 'positions' ([R, pack_length] int32) and, if absent, 'weight' ([B]
  ones): packed batches always carry it, so the number of examples is known from it. Examples
  of weight 0 (an evaluation's padding) take no tokens: they are never scored.
  """
  lengths = lengths_of(batch)
  if 'weight' in batch:
    lengths = np.where(np.asarray(batch['weight']) > 0, lengths, 0)
  size = len(lengths)
  row, offset, used = first_fit(lengths, pack_length)
  if used > rows:
    rows = max(rows, fallback_rows(size, batch['attention_mask'].shape[1], pack_length, multiple))
  out = {k: v for k, v in batch.items() if k not in TOKEN_KEYS}
  if 'weight' not in out:
    out['weight'] = np.ones(size, np.float32)
  example_ids = np.full((rows, pack_length), -1, np.int32)
  positions = np.zeros((rows, pack_length), np.int32)
  padding = np.asarray(batch['attention_mask']) == 0
  # Padding keeps the batch's own pad values (e.g. the pad token id), where it has any.
  packed = {k: np.full((rows, pack_length), batch[k][padding][0] if padding.any() else 0,
                       batch[k].dtype) for k in TOKEN_KEYS if k in batch}
  for i in range(size):
    n, r, at = int(lengths[i]), row[i], offset[i]
    example_ids[r, at:at + n] = i
    positions[r, at:at + n] = np.arange(n)
    for k, value in packed.items():
      value[r, at:at + n] = batch[k][i, :n]
  out.update(packed, example_ids=example_ids, positions=positions)
  return out


AUTO = -1  # data.pack_length: rows of 2 x max_length wherever the run allows packing.
# With AUTO, a split is packed only if its rows take at most this share of the padded positions.
AUTO_MAX_SHARE = 0.8


def check_pack_length(pack_length: int, max_length: int) -> int:
  """`data.pack_length`, checked: 0 (no packing), -1 (auto) or at least `max_length`."""
  if (not isinstance(pack_length, int) or pack_length < AUTO
      or 0 < pack_length < max_length):
    raise FtjaxError(f'data.pack_length={pack_length!r} must be 0 (no packing), -1 (auto) or at '
                     f'least data.max_length={max_length}, so that every example fits a row')
  return pack_length
