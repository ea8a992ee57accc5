"""Data: the VADER task or a user's files -> TFDS (ArrayRecord) -> tokenized grain batches.

  dataset = data.build_dataset(config.data)      # built once under data_dir, then reused
  tokenizer = data.load_tokenizer(checkpoint_dir, config.data.max_length)
  train = data.train_iterator(dataset, tokenizer, batch_size, seed)  # next(), get/set_state()
  for batch in data.eval_batches(dataset, 'validation', tokenizer, eval_batch_size): ...
"""

from ftjax.data.builder import build_dataset
from ftjax.data.builder import Dataset
from ftjax.data.builder import resolve_data_dir
from ftjax.data.packing import AUTO as AUTO_PACK
from ftjax.data.packing import check_pack_length
from ftjax.data.packing import pack
from ftjax.data.pipeline import check_buckets
from ftjax.data.pipeline import cut_to_bucket
from ftjax.data.pipeline import eval_batches
from ftjax.data.pipeline import num_eval_batches
from ftjax.data.pipeline import train_iterator
from ftjax.data.pipeline import TrainIterator
from ftjax.data.splits import SPLITS
from ftjax.data.tokenizer import encode
from ftjax.data.tokenizer import eos_id
from ftjax.data.tokenizer import load_tokenizer

__all__ = [
    'AUTO_PACK',
    'SPLITS',
    'Dataset',
    'TrainIterator',
    'build_dataset',
    'check_buckets',
    'check_pack_length',
    'cut_to_bucket',
    'encode',
    'eos_id',
    'eval_batches',
    'load_tokenizer',
    'num_eval_batches',
    'pack',
    'resolve_data_dir',
    'train_iterator',
]
