"""The default task: 3-class sentiment of words and emoticons from the VADER lexicon.

Each lexicon entry is a token rated by ten people from -4 (most negative) to +4; the class comes
from the mean rating. The lexicon ships inside the `vaderSentiment` package, so the task needs no
download.
"""

import collections
import hashlib

from importlib import resources

from ftjax.data import splits as splits_lib
from ftjax.errors import FtjaxError

LABEL_NAMES = ('negative', 'neutral', 'positive')
# Mean ratings at or beyond +-0.5 carry a clear sentiment; the band between is neutral.
NEGATIVE_MAX = -0.5
POSITIVE_MIN = 0.5
# Fixed for the task, whatever config.data.split_fractions says (that field is for user files).
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)


def rating_to_label(rating: float) -> int:
  """Maps a mean rating in [-4, 4] to an index into `LABEL_NAMES`."""
  if rating <= NEGATIVE_MAX:
    return 0
  if rating >= POSITIVE_MIN:
    return 2
  return 1


def lexicon_bytes() -> bytes:
  """Returns the raw `vader_lexicon.txt` of the installed `vaderSentiment` package."""
  try:
    return (resources.files('vaderSentiment') / 'vader_lexicon.txt').read_bytes()
  except (ModuleNotFoundError, FileNotFoundError) as e:
    raise FtjaxError('the VADER task needs the vaderSentiment package (pip install '
                     'vaderSentiment), or set config.data.source to your own file') from e


def fingerprint() -> str:
  """Returns a short hash of the lexicon, so a new vaderSentiment release rebuilds the data."""
  return hashlib.sha1(lexicon_bytes()).hexdigest()[:10]


def parse_lexicon(content: str) -> dict[str, float]:
  """Returns the mean rating of every distinct entry, keyed by `splits.dedup_key`.

  A few tokens appear twice (e.g. differing only in case, which the uncased tokenizer can't
  tell apart); their ratings are averaged so each appears once, in one split.
  """
  ratings = collections.defaultdict(list)
  for line in content.splitlines():
    fields = line.split('\t')
    if len(fields) < 2 or not fields[0].strip():
      continue
    ratings[splits_lib.dedup_key(fields[0])].append(float(fields[1]))
  return {key: sum(values) / len(values) for key, values in ratings.items()}


def load_splits() -> dict[str, list[splits_lib.Example]]:
  """Returns the deduplicated lexicon as fixed train/validation/test splits (80/10/10)."""
  entries = parse_lexicon(lexicon_bytes().decode('utf-8'))
  out = {split: [] for split in splits_lib.SPLITS}
  for key in sorted(entries):
    split = splits_lib.split_of(key, SPLIT_FRACTIONS)
    out[split].append(splits_lib.Example(key, rating_to_label(entries[key])))
  return out


def load_rating_splits() -> dict[str, list[dict]]:
  """The regression variant: each entry's mean rating (-4..4) is the target; same splits."""
  entries = parse_lexicon(lexicon_bytes().decode('utf-8'))
  out = {split: [] for split in splits_lib.SPLITS}
  for key in sorted(entries):
    out[splits_lib.split_of(key, SPLIT_FRACTIONS)].append({'text': key,
                                                           'target': entries[key]})
  return out


TAGGING_RUN = 6  # Entries per sequence of the tagging variant.


def load_tagging_splits() -> dict[str, list[dict]]:
  """The token-classification variant: runs of entries, each entry tagged with its class.

  Within a split, entries are ordered by a hash of their text (a fixed, unsorted order) and cut
  into runs of `TAGGING_RUN`; an entry keeps the split of the classification task, so no word of
  a test sequence is ever seen in training.
  """
  entries = parse_lexicon(lexicon_bytes().decode('utf-8'))
  by_split = {split: [] for split in splits_lib.SPLITS}
  for key in sorted(entries, key=lambda k: hashlib.sha1(k.encode('utf-8')).hexdigest()):
    by_split[splits_lib.split_of(key, SPLIT_FRACTIONS)].append(key)
  out = {}
  for split, keys in by_split.items():
    runs = [keys[i:i + TAGGING_RUN] for i in range(0, len(keys), TAGGING_RUN)]
    out[split] = [{'tokens': run, 'tags': [rating_to_label(entries[k]) for k in run]}
                  for run in runs]
  return out
