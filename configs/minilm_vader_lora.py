r"""LoRA (r=8 on the attention query and value projections) on the default VADER task.

  .venv/bin/python scripts/train.py --config=configs/minilm_vader_lora.py --workdir=workdirs/lora

Everything but the LoRA factors and the new head stays frozen (policy preset 'peft'): 0.33% of
MiniLM's parameters train. LoRA wants a larger learning rate than full fine-tuning.
"""

import minilm_vader  # The sibling config this one varies (configs/ is on the path).
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The default job's config with LoRA; `arg='runlocal'` as there."""
  config = minilm_vader.get_config(arg)
  with config.unlocked():
    config.peft.method = 'lora'  # LoRA surgery on config.peft.lora's targets.
    config.policy.preset = 'peft'  # Train only the LoRA factors and the new head.
    config.optim.lr = 1e-3  # LoRA's factors start at B=0 and need a larger step.
  return config
