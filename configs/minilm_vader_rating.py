r"""Regression: predict the mean human rating (-4..4) of VADER entries with all-MiniLM-L6-v2.

  .venv/bin/python scripts/train.py --config=configs/minilm_vader_rating.py \
      --workdir=workdirs/rating

The default job's setup (configs/minilm_vader.py) with a one-output head trained on mean squared
error; validation reports RMSE and the Pearson and Spearman correlations, and the best step is
the lowest validation MSE. Your own data: a .jsonl/.csv file whose `label` column holds numbers.
`:runlocal` trains a few steps.
"""

import minilm_vader  # The sibling config this one varies (configs/ is on the path).
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the locked config; `arg='runlocal'` gives a tiny variant that runs in seconds."""
  config = minilm_vader.get_config(arg)
  with config.unlocked():
    config.task = 'regression'
    config.train.best_metric = 'loss'  # Validation mean squared error.
    config.train.best_mode = 'min'
  return config
