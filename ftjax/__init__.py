"""ftjax: fine-tune pretrained models in JAX, from one config.

From Python (a notebook), without the command line:

  import ftjax
  config = ftjax.load_config('configs/minilm_vader.py')
  config.optim.lr = 3e-5
  results = ftjax.train_and_evaluate(config, 'workdirs/notebook')

  model, report, path = ftjax.load_model('sentence-transformers/all-MiniLM-L6-v2', num_labels=3)
  dataset = ftjax.build_dataset(config.data)
"""

import importlib

__version__ = '0.1.0'

# Resolved on first use so that `import ftjax` (and the CLI's argument checks) stay light.
_EXPORTS = {
    'FtjaxError': 'ftjax.errors',
    'load_config': 'ftjax.configs',
    'apply_overrides': 'ftjax.configs',
    'train_and_evaluate': 'ftjax.train',
    'load_model': 'ftjax.hub',
    'load_encoder': 'ftjax.hub',
    'resolve_checkpoint': 'ftjax.hub',
    'build_dataset': 'ftjax.data',
    'load_tokenizer': 'ftjax.data',
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
