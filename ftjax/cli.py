"""The command line: `--config=path.py[:arg] --workdir=DIR [--config.key=value ...]`.

Every user mistake ends as one line on stderr and exit status 2; a bug keeps its traceback.
"""

import argparse
import logging
import sys
from collections.abc import Sequence

from ftjax import configs
from ftjax.errors import FtjaxError


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # argparse's default prints the whole usage block first.
    raise FtjaxError(f'{message} (usage: {self.prog} --config=configs/NAME.py --workdir=DIR '
                     '[--config.KEY=VALUE ...])')


def _parse(argv: Sequence[str]):
  rest, overrides = configs.split_argv(argv)
  parser = _Parser(prog='train.py', description='Fine-tune a pretrained model from a config.')
  parser.add_argument('--config', required=True, help='configs/NAME.py[:variant]')
  parser.add_argument('--workdir', required=True, help='checkpoints, metrics and results go here')
  args = parser.parse_args(rest)
  config = configs.load_config(args.config)
  configs.apply_overrides(config, overrides)
  return config, args.workdir


def setup_logging() -> None:
  """Plain progress lines on stdout, without the libraries' chatter."""
  logging.basicConfig(level=logging.INFO, format='%(message)s', stream=sys.stdout)
  # orbax narrates every save and tfds every cache check; jax reports each backend it skips.
  logging.getLogger('absl').setLevel(logging.ERROR)
  logging.getLogger('jax._src.xla_bridge').setLevel(logging.ERROR)


def entry() -> int:
  """The command-line entry point: process settings first (`ftjax.launch`), then `main`."""
  from ftjax import launch  # pylint: disable=g-import-not-at-top
  launch.ensure_process_env()
  return main()


def main(argv: Sequence[str] | None = None) -> int:
  """Runs `train_and_evaluate` from command-line arguments; returns the exit status."""
  argv = sys.argv[1:] if argv is None else argv
  setup_logging()
  try:
    config, workdir = _parse(argv)
    from absl import flags  # grain's worker processes insist that absl flags were parsed.
    flags.FLAGS.mark_as_parsed()
    from ftjax.train import train_and_evaluate  # After parsing: a typo fails before jax starts.
    from ftjax import kernels  # pylint: disable=g-import-not-at-top
    kernels.check_choices()  # A bad FTJAX_ATTENTION or FTJAX_MATMUL fails now, not in a trace.
    train_and_evaluate(config, workdir)
  except FtjaxError as e:
    print(f'ftjax: error: {e}', file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print('ftjax: interrupted; rerun the same command to resume from the last checkpoint',
          file=sys.stderr)
    return 130
  return 0
