r"""Token classification: tag every word of a run of VADER entries with its sentiment class.

  .venv/bin/python scripts/train.py --config=configs/minilm_vader_tagging.py \
      --workdir=workdirs/tagging

Each example is 6 lexicon entries in a row, each tagged negative/neutral/positive by its mean
human rating; the first sub-word of each entry carries its tag (the others no loss), as in NER
fine-tuning. Entries keep the classification task's splits, so no test word is seen in training.
Your own data: a .jsonl file with a list of words (`text`) and a list of tags (`label`) per
line. `:runlocal` trains a few steps.
"""

import minilm_vader  # The sibling config this one varies (configs/ is on the path).
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the locked config; `arg='runlocal'` gives a tiny variant that runs in seconds."""
  config = minilm_vader.get_config(arg)
  with config.unlocked():
    config.task = 'token_classification'
    config.data.max_length = 24  # 6 entries and their sub-words: every run fits (longest 24).
    config.train.best_metric = 'macro_f1'  # Over tagged words, across the three tags.
  return config
