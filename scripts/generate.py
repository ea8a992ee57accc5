r"""Try a causal decoder from the command line: a fine-tuned workdir or a pretrained checkpoint.

  .venv/bin/python scripts/generate.py --workdir=workdirs/sft \
      --prompt='What is the sentiment of the word "delight"? Answer:'
  .venv/bin/python scripts/generate.py --checkpoint=HuggingFaceTB/SmolLM2-135M \
      --prompt='The capital of France is' --temperature=0.7 --top_p=0.9

Greedy by default (--temperature=0); each --prompt is one sequence of the batch.
"""

import argparse
import logging
import sys

from ftjax import cli
from ftjax.errors import FtjaxError


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    raise FtjaxError(f'{message} (usage: generate.py (--workdir=DIR | --checkpoint=DIR_OR_ID) '
                     '--prompt=TEXT [--prompt=TEXT ...] [--max_new_tokens=N] [--temperature=T] '
                     '[--top_p=P] [--seed=S])')


def main(argv=None) -> int:
  cli.setup_logging()
  # Load reports go to stderr: stdout holds only the completions.
  for handler in logging.getLogger().handlers:
    if isinstance(handler, logging.StreamHandler):
      handler.setStream(sys.stderr)
  parser = _Parser(prog='generate.py', description=__doc__.splitlines()[0])
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument('--workdir', help='a training run of task causal_lm (its best step)')
  source.add_argument('--checkpoint', help='a Hugging Face checkpoint directory or id')
  parser.add_argument('--prompt', action='append', required=True, help='repeat for a batch')
  parser.add_argument('--max_new_tokens', type=int, default=32)
  parser.add_argument('--temperature', type=float, default=0.0, help='0 = greedy')
  parser.add_argument('--top_p', type=float, default=1.0)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--max_length', type=int, default=2048, help='tokenizer truncation')
  try:
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    from ftjax import data, generate, hub, train  # After parsing: a typo fails before jax.
    if args.workdir:
      model, directory, config = train.restore_model(args.workdir)
      if config.get('task') != 'causal_lm':
        raise FtjaxError(f'{args.workdir} trained task {config.get("task")!r}, not causal_lm')
    else:
      model, _, directory = hub.load_model(args.checkpoint, task='causal_lm')
    tokenizer = data.load_tokenizer(directory, args.max_length)
    texts = generate.complete(model, tokenizer, args.prompt,
                              eos_id=data.eos_id(directory, tokenizer),
                              max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, top_p=args.top_p, seed=args.seed)
  except FtjaxError as e:
    print(f'ftjax: error: {e}', file=sys.stderr)
    return 2
  for prompt, text in zip(args.prompt, texts):
    print(f'{prompt}{text}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
