"""Fine-tune a pretrained model from a config.

  python scripts/train.py --config=configs/minilm_vader.py --workdir=DIR [--config.KEY=VALUE ...]

Overrides: `--config.optim.lr=3e-5`, `--config.model.init=scratch`, `--config.data.source=x.jsonl`.
"""

import sys

from ftjax import cli

if __name__ == '__main__':
  sys.exit(cli.entry())
