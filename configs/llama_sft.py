r"""LoRA supervised fine-tuning of a Llama-family decoder on the shipped instruction data.

The loss is on the response only (the prompt's tokens are masked), and the decoder's own
`lm_head` stays pretrained; only the LoRA factors on q_proj/v_proj train. With a checkpoint in the
Hugging Face cache (any Llama, Mistral or Qwen2 model with a tokenizer.json), e.g.:

  huggingface-cli download HuggingFaceTB/SmolLM2-135M   # once, where the network allows
  .venv/bin/python scripts/train.py --config=configs/llama_sft.py --workdir=workdirs/sft \
      --config.model.checkpoint=HuggingFaceTB/SmolLM2-135M
  .venv/bin/python scripts/generate.py --workdir=workdirs/sft \
      --prompt='What is the sentiment of "delight"? Answer:'

The data (ftjax/data/assets/word_sentiment_sft.jsonl, written by scripts/make_sft_data.py) is
2,000 prompt/response pairs about the sentiment of words, from the human ratings of the VADER
lexicon. Any JSONL file of {"prompt": ..., "response": ...} lines works the same way:
`--config.data.source=my_instructions.jsonl`. `:runlocal` trains a few steps.
"""

from importlib import resources

import minilm_vader  # The sibling config this one varies (configs/ is on the path).
import ml_collections

SHIPPED = str(resources.files('ftjax.data') / 'assets' / 'word_sentiment_sft.jsonl')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the locked config; `arg='runlocal'` gives a tiny variant that runs in seconds."""
  config = minilm_vader.get_config(arg)
  with config.unlocked():
    config.task = 'causal_lm'
    config.model.checkpoint = 'HuggingFaceTB/SmolLM2-135M'  # Any Llama/Mistral/Qwen2.
    config.model.classifier_dropout = 0.0  # No new head: the pretrained lm_head is kept.
    config.policy.preset = 'peft'  # Only the LoRA factors train.
    config.peft.method = 'lora'
    config.peft.lora.rank = 8
    config.peft.lora.alpha = 16.0
    config.data.source = SHIPPED
    config.data.text_column = 'prompt'  # Instruction records: the prompt ...
    config.data.label_column = 'response'  # ... and the response that is trained.
    config.data.max_length = 48  # Tokens of prompt + response (the shipped pairs need < 40).
    config.data.length_buckets = (24, 32, 48)  # Short batches cost less; 3 compilations at most.
    config.train.batch_size = 16
    config.train.num_epochs = 1.0 if arg != 'runlocal' else 0.02
    config.train.eval_batch_size = 64
    config.train.best_metric = 'loss'  # Validation token loss on the responses.
    config.train.best_mode = 'min'
    config.optim.lr = 2e-4
  return config
