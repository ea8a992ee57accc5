r"""Writes the instruction dataset ftjax ships: ftjax/data/assets/word_sentiment_sft.jsonl.

  .venv/bin/python scripts/make_sft_data.py [--out=ftjax/data/assets/word_sentiment_sft.jsonl]

Prompt/response pairs about the sentiment of words and emoticons, made from the human ratings of
the VADER lexicon (vaderSentiment package): three kinds of instruction (name the class, give the
mean rating, answer yes/no), one per entry, chosen by a hash of the entry so that the file is the
same on every machine. Entries are the VADER task's, with its class thresholds.
"""

import argparse
import hashlib
import json
import pathlib

from ftjax.data import vader

DEFAULT_OUT = pathlib.Path(__file__).resolve().parents[1] / 'ftjax/data/assets/' \
    'word_sentiment_sft.jsonl'
NUM_EXAMPLES = 2000


def _pair(word: str, rating: float, choice: int) -> dict:
  label = vader.LABEL_NAMES[vader.rating_to_label(rating)]
  if choice == 0:
    return {'prompt': f'What is the sentiment of "{word}"? Answer:', 'response': f' {label}'}
  if choice == 1:
    return {'prompt': f'Rate "{word}" from -4 (very negative) to 4 (very positive). Rating:',
            'response': f' {rating:.1f}'}
  answer = 'yes' if label == 'positive' else 'no'
  return {'prompt': f'Is "{word}" a positive word? Answer:', 'response': f' {answer}'}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', type=pathlib.Path, default=DEFAULT_OUT)
  args = parser.parse_args()
  entries = vader.parse_lexicon(vader.lexicon_bytes().decode('utf-8'))
  digest = lambda key: hashlib.sha1(key.encode('utf-8')).hexdigest()
  chosen = sorted(entries, key=digest)[:NUM_EXAMPLES]
  args.out.parent.mkdir(parents=True, exist_ok=True)
  with args.out.open('w') as f:
    for key in chosen:
      f.write(json.dumps(_pair(key, entries[key], int(digest(key)[8:16], 16) % 3)) + '\n')
  print(f'wrote {len(chosen)} examples to {args.out}')


if __name__ == '__main__':
  main()
