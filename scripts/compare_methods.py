r"""Every fine-tuning strategy on the same task, one after another in one run, as one table.

  .venv/bin/python scripts/compare_methods.py --workdir=workdirs/compare [--quick] \
      [--methods=full,lora,...] [--config.train.num_epochs=2 ...]

For each method: trainable parameters (count and % of the model), optimizer-state bytes,
training steps per second (median step spacing) and test accuracy of the best validation step.
Writes `compare.json` and `compare.md` in the workdir. `--quick` uses each config's `runlocal`
variant (seconds per method; the accuracies then mean nothing).
"""

import argparse
import json
import pathlib
import sys

from ftjax import cli, configs
from ftjax.errors import FtjaxError

CONFIG = 'configs/minilm_vader_methods.py'


def _methods() -> dict:
  sys.path.insert(0, str(pathlib.Path(CONFIG).parent))
  import minilm_vader_methods  # The table of methods lives with their config.
  return minilm_vader_methods.METHODS


def main(argv=None) -> int:
  rest, overrides = configs.split_argv(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--quick', action='store_true', help="use each config's runlocal variant")
  parser.add_argument('--methods', default='',
                      help=f'comma-separated subset of the methods in {CONFIG} (default: all)')
  args = parser.parse_args(rest)
  cli.setup_logging()
  methods = _methods()
  from ftjax.train import train_and_evaluate

  names = [m.strip() for m in args.methods.split(',') if m.strip()] or list(methods)
  unknown = [m for m in names if m not in methods]
  if unknown:
    print(f'ftjax: error: unknown method {unknown[0]!r}; choose from {", ".join(methods)}',
          file=sys.stderr)
    return 2
  root = pathlib.Path(args.workdir)
  rows = {}
  for name in names:
    try:
      config = configs.load_config(f'{CONFIG}:{name},runlocal' if args.quick
                                   else f'{CONFIG}:{name}')
      configs.apply_overrides(config, overrides)
      workdir = root / name
      train_and_evaluate(config, workdir)
    except FtjaxError as e:
      print(f'ftjax: error: {name}: {e}', file=sys.stderr)
      return 2
    rows[name] = json.loads((workdir / 'results.json').read_text())

  header = ('method', 'what', 'trainable params', '% of model', 'optimizer state', 'steps/s',
            'test accuracy', 'test macro-F1')
  lines = ['| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header)]
  for name, r in rows.items():
    share = 100 * r['trainable_params'] / r['total_params']
    lines.append('| ' + ' | '.join([
        name, methods[name][0], f"{r['trainable_params']:,}", f'{share:.2f}',
        f"{r['optimizer_state_bytes'] / 2**20:.1f} MiB", f"{r['steps_per_second']:.2f}",
        f"{r['test']['accuracy']:.4f}", f"{r['test']['macro_f1']:.4f}"]) + ' |')
  table = '\n'.join(lines)
  print(table)
  (root / 'compare.md').write_text(table + '\n')
  (root / 'compare.json').write_text(json.dumps(rows, indent=2) + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(main())
