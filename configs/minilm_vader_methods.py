r"""Every fine-tuning strategy on the default VADER task, one variant per method.

  .venv/bin/python scripts/train.py --config=configs/minilm_vader_methods.py:lora \
      --workdir=workdirs/lora
  .venv/bin/python scripts/train.py --config=configs/minilm_vader_methods.py:ia3,runlocal ...

Each variant is the default job (configs/minilm_vader.py) with the method's policy, PEFT surgery
and learning rate; `scripts/compare_methods.py` trains them all into one table. Methods that
train few parameters take larger steps.
"""

import minilm_vader  # The sibling config every method varies (configs/ is on the path).
import ml_collections

# method -> (one-line description, {dotted config key: value}).
METHODS = {
    'full': ('full fine-tuning', {'policy.preset': 'full'}),
    'default': ('all but the word embeddings (the default job)', {}),
    'head_only': ('linear probe on the frozen encoder',
                  {'policy.preset': 'head_only', 'optim.lr': 1e-2}),
    'freeze_lower': ('embeddings and the 2 lowest blocks frozen',
                     {'policy.preset': 'freeze_lower'}),
    'llrd': ('layer-wise lr decay 0.8', {'policy.preset': 'layerwise_lr_decay',
                                         'optim.lr': 2e-4}),
    'gradual_unfreeze': ('ULMFiT gradual unfreezing, one block per 50 steps',
                         {'policy.preset': 'gradual_unfreeze'}),
    'bitfit': ('biases only', {'policy.preset': 'bitfit', 'optim.lr': 1e-3}),
    'lora': ('LoRA r=8 on query/value', {'policy.preset': 'peft', 'peft.method': 'lora',
                                         'optim.lr': 1e-3}),
    'ia3': ('IA3 on key/value/FFN', {'policy.preset': 'peft', 'peft.method': 'ia3',
                                     'optim.lr': 3e-3}),
    'houlsby': ('Houlsby adapters, reduction 16', {'policy.preset': 'peft',
                                                   'peft.method': 'houlsby',
                                                   'optim.lr': 1e-3}),
    'pfeiffer': ('Pfeiffer adapters, reduction 16', {'policy.preset': 'peft',
                                                     'peft.method': 'pfeiffer',
                                                     'optim.lr': 1e-3}),
    'prompt': ('prompt tuning, 8 soft tokens', {'policy.preset': 'peft',
                                               'peft.method': 'prompt', 'optim.lr': 3e-2}),
    'prefix': ('prefix tuning, 8 keys/values per layer', {'policy.preset': 'peft',
                                                          'peft.method': 'prefix',
                                                          'optim.lr': 1e-2}),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg` = 'METHOD' or 'METHOD,runlocal'."""
  method, _, variant = (arg or '').partition(',')
  if method not in METHODS:
    raise ValueError(f'name a method after the file (minilm_vader_methods.py:METHOD), one of '
                     f'{", ".join(METHODS)}')
  config = minilm_vader.get_config(variant or None)
  with config.unlocked():
    for key, value in METHODS[method][1].items():
      *parents, leaf = key.split('.')
      node = config
      for part in parents:
        node = node[part]
      node[leaf] = value
  return config
