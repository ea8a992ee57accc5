"""grain pipelines from a built dataset to fixed-shape numpy batches.

Training: shuffle (a new order each epoch, fixed by the seed) -> repeat -> batch -> read + tokenize.
Batches cross epoch boundaries, so no example is ever dropped; an epoch is
`num_examples['train'] / batch_size` steps. The iterator's state is a small JSON-able dict that
resumes the exact batch sequence.

Evaluation: each example once, in order, the last batch padded to full size and marked by a
`weight` of 0, so every batch has the same shape and the eval step compiles once.

Length buckets (`length_buckets`, e.g. (16, 32, 64)): token arrays are padded to `max_length`
by the tokenizer, then each batch is cut to the smallest bucket that holds its longest row (the
pad columns beyond it carry nothing). A step compiles once per bucket it meets and never again,
and short batches cost what their length needs rather than `max_length`.

Packing (`pack_length` > 0, `ftjax.data.packing`): each batch's examples are packed into a fixed
number of rows of `pack_length` tokens, sized once per split from a sample of it, so that short
examples stop paying for padding.
"""

from collections.abc import Iterator
import logging
import math

from absl import flags
import grain
import numpy as np
import tokenizers

from ftjax.data import builder as builder_lib
from ftjax.data import packing as packing_lib
from ftjax.data import tokenizer as tokenizer_lib
from ftjax.errors import FtjaxError

# Tokenizing a batch takes well under a millisecond: a couple of threads a few batches ahead
# keep the accelerator fed without competing with a CPU-only run for its cores.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)

logger = logging.getLogger(__name__)


# Splits up to this many examples are decoded once and held in memory (VADER: ~6k). TFDS decodes
# records in Python at ~0.1 ms each, which alone would make data, not the model, the bottleneck
# of a small model on an accelerator. Larger splits are read from disk batch by batch.
MAX_IN_MEMORY = 250_000


class _Records:
  """Random access to a split's records, decoded to Python values (bytes -> str)."""

  def __init__(self, source):
    self._source = source
    self._records = None
    if len(source) <= MAX_IN_MEMORY:
      self._records = self._read(range(len(source)))
      self._source = None  # Keeps what grain pickles to workers small.

  def __call__(self, indices: np.ndarray) -> list[dict]:
    if self._records is None:
      return self._read(indices)
    return [self._records[i] for i in indices]

  def _read(self, indices) -> list[dict]:
    records = self._source.__getitems__([int(i) for i in indices])  # One batched read.
    return [{key: _decode(value) for key, value in r.items()} for r in records]


def _decode(value):
  if isinstance(value, bytes):
    return value.decode('utf-8')
  if isinstance(value, (list, np.ndarray)) and len(value) and isinstance(value[0], bytes):
    return [v.decode('utf-8') for v in value]  # A sequence of Text.
  return value


class _ReadAndTokenize:
  """Turns a batch of example indices into tokenized arrays.

  The pipelines shuffle and batch indices rather than records so that a batch is read in one
  call. A class, not a closure, so grain can pickle it to worker processes.
  """

  def __init__(self, records: _Records, tokenizer: tokenizers.Tokenizer, kind: str,
               eos_id: int | None = None):
    self.records = records
    self.tokenizer = tokenizer
    self.kind = kind
    self.eos_id = eos_id  # Instruction data: appended after the response.
    self.raw = tokenizer_lib.unpadded(tokenizer) if kind == 'instruction' else None

  def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    records = self.records(indices)
    out = {}
    if self.kind == 'tagging':
      out.update(tokenizer_lib.encode_tagged(self.tokenizer, [r['tokens'] for r in records],
                                             [r['tags'] for r in records]))
    elif self.kind == 'instruction':
      out.update(tokenizer_lib.encode_instructions(
          self.tokenizer, [r['prompt'] for r in records], [r['response'] for r in records],
          eos_id=self.eos_id, raw=self.raw))
    else:
      out.update(tokenizer_lib.encode(self.tokenizer, [r['text'] for r in records]))
      if self.kind == 'regression':
        out['target'] = np.asarray([r['target'] for r in records], np.float32)
      else:
        out['label'] = np.asarray([r['label'] for r in records], np.int32)
    return out


def check_buckets(length_buckets, max_length: int) -> tuple[int, ...]:
  """The sorted bucket lengths, each in [1, max_length]; () means always `max_length`.

  Raises:
    FtjaxError: for a bucket that is not a positive integer up to `max_length`.
  """
  buckets = tuple(length_buckets or ())
  for length in buckets:
    if not isinstance(length, int) or not 1 <= length <= max_length:
      raise FtjaxError(f'data.length_buckets={buckets} must hold token counts from 1 to '
                       f'data.max_length={max_length}')
  return tuple(sorted(set(buckets)))


def cut_to_bucket(batch: dict[str, np.ndarray], buckets: tuple[int, ...]) -> dict[str, np.ndarray]:
  """`batch` with its [B, max_length] token arrays cut to the smallest bucket that fits.

  Token arrays are right-padded, so the columns after the last one any row uses are padding in
  every array (ids, masks, per-token labels); they are dropped. Other arrays are unchanged. Rows
  of an eval batch's padding ('weight' 0) do not count: they are never scored.
  """
  mask = batch.get('attention_mask')
  if not buckets or mask is None:
    return batch
  max_length = mask.shape[1]
  if 'weight' in batch:
    mask = mask[batch['weight'] > 0]
  used = np.flatnonzero(mask.any(axis=0))
  longest = int(used[-1]) + 1 if used.size else 1
  length = next((b for b in buckets if b >= longest), max_length)
  if length == max_length:
    return batch
  return {key: value[:, :length] if value.ndim >= 2 and value.shape[1] == max_length else value
          for key, value in batch.items()}


class _ProcessRows:
  """An index batch -> this process's rows of it, read; eval batches padded to full size first.

  Every process sees the same global index batch and reads only its own contiguous rows, which
  `jax.make_array_from_process_local_data` assembles into the global batch. Padding (index -1)
  reads the split's first record and weighs it 0, so a process whose rows are all padding still
  gets a well-formed batch.
  """

  def __init__(self, reader, rows: slice, pad_to: int | None, buckets: tuple[int, ...] = (),
               packing: tuple[int, int] | None = None):
    self.reader = reader
    self.rows = rows
    self.pad_to = pad_to
    self.buckets = buckets
    self.packing = packing  # (pack_length, rows, row multiple) or None.

  def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    if self.pad_to is not None:
      indices = np.concatenate([indices, np.full(self.pad_to - len(indices), -1, indices.dtype)])
    indices = indices[self.rows]
    valid = indices >= 0
    out = self.reader(np.where(valid, indices, 0))
    if self.pad_to is not None:
      out['weight'] = valid.astype(np.float32)
    if self.packing:
      return packing_lib.pack(out, *self.packing)
    return cut_to_bucket(out, self.buckets)


# Examples of a split tokenized to size its packed rows (`packing.rows_for`), and the sizes.
_SIZING_SAMPLE = 4096
_PACKED_ROWS: dict[tuple, tuple] = {}
# Evaluation batches of every one of these splits share one row count: one eval compilation.
_EVAL_SPLITS = ('validation', 'test')


def _reader(dataset: builder_lib.Dataset, split: str, processor, *, rows: slice,
            pad_to: int | None = None, eos_id: int | None = None,
            buckets: tuple[int, ...] = (), pack_length: int = 0, batch_size: int = 0,
            row_multiple: int = 1, pack_if_smaller: bool = False) -> _ProcessRows:
  """The batch reader of a split: tokenizes text, or decodes and resizes images.

  With `pack_length`, batches of `batch_size` examples are packed into rows whose number is
  sized here (`_packed_rows`); with `pack_if_smaller`, only if the rows take at most
  `packing.AUTO_MAX_SHARE` of the padded batch's positions.
  """
  if dataset.kind == 'image':
    from ftjax.data import images  # pylint: disable=g-import-not-at-top
    image_size, mean, std = processor
    read = images.ReadImages(dataset.source(split), image_size=image_size, mean=mean, std=std)
  else:
    read = _ReadAndTokenize(_Records(dataset.source(split)), processor, dataset.kind, eos_id)
  packing = None
  if pack_length:
    evaluation = pad_to is not None
    key = (id(dataset), 'eval' if evaluation else split, id(processor), batch_size, pack_length,
           row_multiple, pack_if_smaller)
    if key not in _PACKED_ROWS:  # Sized once per run (evaluations repeat).
      splits = [s for s in _EVAL_SPLITS if s in dataset.num_examples] if evaluation else [split]
      if split not in splits:
        splits.append(split)
      count = _packed_rows(
          dataset, splits, lambda s: read if s == split else _ReadAndTokenize(
              _Records(dataset.source(s)), processor, dataset.kind, eos_id),
          evaluation=evaluation, batch_size=batch_size, pack_length=pack_length,
          row_multiple=row_multiple, pack_if_smaller=pack_if_smaller)
      # The dataset and tokenizer are kept with the count, so that their ids in the key are
      # never reused by other objects while it is cached.
      _PACKED_ROWS[key] = (count, dataset, processor)
    count = _PACKED_ROWS[key][0]
    packing = (pack_length, count, row_multiple) if count else None
  return _ProcessRows(read, rows, pad_to, buckets, packing)


def _packed_rows(dataset: builder_lib.Dataset, splits: list[str], reader_of, *, evaluation: bool,
                 batch_size: int, pack_length: int, row_multiple: int,
                 pack_if_smaller: bool) -> int:
  """Rows per packed batch for `splits` (0: do not pack), logged.

  Training draws random batches from up to `_SIZING_SAMPLE` examples; an evaluation's batches
  are fixed, so a split that small is sized on exactly those, and all evaluation splits share
  the largest count (the eval step then compiles once).
  """
  rows_needed, positions = 0, 0
  for split in splits:
    count = dataset.num_examples[split]
    in_order = evaluation and count <= _SIZING_SAMPLE
    sample = (np.arange(count) if in_order else
              np.sort(np.random.default_rng(0).permutation(count)[:_SIZING_SAMPLE]))
    mask = reader_of(split)(sample)['attention_mask']
    rows_needed = max(rows_needed, packing_lib.rows_for(
        packing_lib.lengths_of({'attention_mask': mask}), batch_size, pack_length, row_multiple,
        in_order=in_order, width=mask.shape[1]))
    positions = batch_size * mask.shape[1]
  name = 'evaluation' if evaluation else splits[0]
  share = rows_needed * pack_length / positions
  if pack_if_smaller and share > packing_lib.AUTO_MAX_SHARE:
    logger.info('%s batches are not packed: %d rows of %d tokens would take %.0f%% of the '
                'padded batch\'s positions', name, rows_needed, pack_length, 100 * share)
    return 0
  fallback = packing_lib.fallback_rows(batch_size, positions // batch_size, pack_length,
                                       row_multiple)
  logger.info('packing %s batches: %d examples into %d rows of %d tokens (%.0f%% of the padded '
              'batch\'s positions)%s', name, batch_size, rows_needed, pack_length, 100 * share,
              '' if evaluation or fallback <= rows_needed else
              f'; a batch that needs more takes {fallback} rows')
  return rows_needed


class TrainIterator(Iterator[dict[str, np.ndarray]]):
  """Endless training batches with a resumable position.

  Each batch is {'input_ids', 'attention_mask', 'token_type_ids': [B, L] int32,
  'label': [B] int32}. The state is the number of batches taken (plus what fixes their order),
  not grain's internal state, so a run can resume with a different `num_workers`.

  Attributes:
    steps_per_epoch: Whole batches per pass over the train split (at least 1).
  """

  def __init__(self, batches: grain.MapDataset, identity: dict, steps_per_epoch: int,
               num_workers: int):
    self._batches = batches
    self._identity = identity  # What a saved position is only valid for.
    self._num_workers = num_workers
    self.steps_per_epoch = steps_per_epoch
    self._position = 0
    # Started on first use, so that a resume (set_state right away) starts workers only once.
    self._iterator = None

  def _start(self, position: int) -> grain.DatasetIterator:
    ds = self._batches[position:].to_iter_dataset(_READ_OPTIONS)
    if self._num_workers > 0:
      # grain reads absl flags to start workers; outside an absl app (notebooks, pytest)
      # their defaults are what we want.
      if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
      # Each worker makes every num_workers-th batch; grain interleaves them back in order.
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._num_workers))
    return iter(ds)

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iterator is None:
      self._iterator = self._start(self._position)
    batch = next(self._iterator)
    self._position += 1
    return batch

  def get_state(self) -> dict:
    """Returns the position as a JSON-serialisable dict (store it with the checkpoint)."""
    return {'position': self._position, **self._identity}

  def set_state(self, state: dict) -> None:
    """Restores a position from `get_state`; the next batch is the one that followed it.

    Raises:
      FtjaxError: if the state was saved for another dataset, batch size or seed.
    """
    saved = {key: state.get(key) for key in self._identity}
    if saved != self._identity:
      raise FtjaxError(f'the saved data position belongs to {saved}, not {self._identity}; '
                       'resume with the same data, seed and batch_size, or use a new workdir')
    self.close()
    self._position = int(state['position'])

  def close(self) -> None:
    """Stops worker processes, if any (they would otherwise stop at garbage collection)."""
    close = getattr(self._iterator, 'close', None)
    if close is not None:
      close()
    self._iterator = None


def train_iterator(dataset: builder_lib.Dataset, tokenizer, batch_size: int, seed: int, *,
                   num_workers: int = 0, eos_id: int | None = None,
                   rows: slice = slice(None),
                   length_buckets: tuple[int, ...] = (), pack_length: int = 0,
                   row_multiple: int = 1, pack_if_smaller: bool = False) -> TrainIterator:
  """Returns endless, seed-determined training batches of the train split.

  Args:
    dataset: From `build_dataset`.
    tokenizer: From `load_tokenizer` (fixed max_length); for an image dataset, the
      (image_size, mean, std) of `images.image_processor_settings`.
    batch_size: Examples per batch; every batch is full.
    seed: Fixes the order; each epoch is shuffled differently.
    num_workers: grain worker processes for reading and tokenizing; 0 tokenizes in the calling
      process (threads). Workers are spawned, so a script using them needs an
      `if __name__ == '__main__':` guard. The batch sequence is the same for any value.
    eos_id: instruction data only: the end-of-sequence token appended to each response.
    rows: the rows of each global batch this process reads (`parallel.local_rows`); the
      default, all of them, is one process's view.
    length_buckets: token batches are cut to the smallest of these lengths that fits them
      (`cut_to_bucket`); () keeps every batch at the tokenizer's max_length.
    pack_length: > 0 packs each batch's examples into rows of this many tokens
      (`packing.pack`); the number of rows is a multiple of `row_multiple`.
    row_multiple: the devices a batch is split over.
    pack_if_smaller: pack only if it saves enough positions (`data.pack_length=-1`, auto).

  Raises:
    FtjaxError: if `batch_size` or `num_workers` is invalid.
  """
  if batch_size < 1:
    raise FtjaxError(f'train.batch_size={batch_size} must be at least 1')
  if num_workers < 0:
    raise FtjaxError(f'data.num_workers={num_workers} must be 0 (in-process) or more')
  num_train = dataset.num_examples['train']
  batches = (grain.MapDataset.range(num_train)
             .shuffle(seed=seed)
             .repeat()
             .batch(batch_size, drop_remainder=True)
             .map(_reader(dataset, 'train', tokenizer, rows=rows, eos_id=eos_id,
                          buckets=tuple(length_buckets), pack_length=pack_length,
                          batch_size=batch_size, row_multiple=row_multiple,
                          pack_if_smaller=pack_if_smaller)))
  identity = {'dataset': dataset.name, 'seed': seed, 'batch_size': batch_size}
  return TrainIterator(batches, identity, steps_per_epoch=max(1, num_train // batch_size),
                       num_workers=num_workers)


def eval_batches(dataset: builder_lib.Dataset, split: str, tokenizer, batch_size: int, *,
                 eos_id: int | None = None, rows: slice = slice(None),
                 length_buckets: tuple[int, ...] = (), pack_length: int = 0,
                 row_multiple: int = 1,
                 pack_if_smaller: bool = False) -> Iterator[dict[str, np.ndarray]]:
  """Yields every example of `split` once, in order, in batches of exactly `batch_size`.

  Each batch holds the model inputs (e.g. 'input_ids', 'attention_mask', 'token_type_ids':
  [B, L] int32), the targets ('label', 'labels' or 'target') and 'weight': [B] float32, 1 for
  real examples and 0 for the padding that fills the last batch (weight the metrics by it).
  With `length_buckets`, token arrays are cut as in `train_iterator`; with `pack_length`, they
  are packed as there.
  """
  if batch_size < 1:
    raise FtjaxError(f'train.eval_batch_size={batch_size} must be at least 1')
  ds = (grain.MapDataset.range(dataset.num_examples[split])
        .batch(batch_size, drop_remainder=False)
        .map(_reader(dataset, split, tokenizer, rows=rows, pad_to=batch_size, eos_id=eos_id,
                     buckets=tuple(length_buckets), pack_length=pack_length,
                     batch_size=batch_size, row_multiple=row_multiple,
                     pack_if_smaller=pack_if_smaller))
        .to_iter_dataset(_READ_OPTIONS))
  yield from ds


def num_eval_batches(dataset: builder_lib.Dataset, split: str, batch_size: int) -> int:
  """How many batches `eval_batches` yields for `split`."""
  return math.ceil(dataset.num_examples[split] / batch_size)
