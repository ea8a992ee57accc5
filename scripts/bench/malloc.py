r"""malloc keeping each step's scratch memory, off and on, over the default job's training loop;
with --block-cache, the large-block cache off and on, over MiniLM's 32 x 128 training steps.

  .venv/bin/python scripts/bench/malloc.py [--rounds=3] [--epochs=1]
  .venv/bin/python scripts/bench/malloc.py --quick     # a smoke run (1 round of 9 steps)
  .venv/bin/python scripts/bench/malloc.py --block-cache [--rounds=2] [--quick]

`train_and_evaluate` makes glibc's malloc keep the memory XLA frees after each step
(`ftjax.launch.reuse_freed_host_memory`: mmap threshold 64 MiB, trim threshold 1 GiB, one heap
for all threads). This runs the default job (`scripts/train.py --config=configs/minilm_vader.py`,
`--epochs` epochs: 187 steps each) with it off and on (`FTJAX_MALLOC_REUSE=0` / `1`) and the
large-block cache off (`FTJAX_BLOCK_CACHE=0`: since session 26 the cache takes blocks from 16
MiB, the default job's 44 MB scratch block included, whichever malloc's settings), each in a
fresh process (malloc's thresholds cannot be put back to glibc's dynamic default once set),
alternating which goes first every round, `--rounds` pairs, on an otherwise idle machine. For
each run it reports the training loop's median step (the spacing of its iterations, from
results.json), the command's wall seconds, and from the kernel's accounting of the process the
minor page faults, user and system CPU seconds per step (over the whole command, start-up
included) and the peak resident memory. Prints a markdown table and the ratio on / off of the
median steps, and writes the figures as JSON to `--out`.

--block-cache: `speed.py`'s ftjax training step (MiniLM, 32 x 128 tokens; full fine-tuning and
LoRA in bfloat16, full fine-tuning in float32; --quick: 4 x 16 tokens, 2 steps) in fresh
processes under `launch.process_env()` with the large-block cache preloaded and without it
(`FTJAX_BLOCK_CACHE=1` / `0`; `ftjax/kernels/blockcache.cc`), alternating; per run the median
step, the page faults and system CPU seconds per step (the whole process, loading included,
over its timed and warm-up steps) and the peak resident memory.
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).parent))
# pylint: disable=g-import-not-at-top,wrong-import-position
from end_to_end import CONFIG, QUICK_EPOCHS, ROOT  # noqa: E402  The same job and smoke length.
from speed import WARMUP  # noqa: E402

MODES = {'off': '0', 'on': '1'}  # FTJAX_MALLOC_REUSE, or with --block-cache FTJAX_BLOCK_CACHE.


def run_job(mode: str, epochs: float, env: dict[str, str]) -> dict:
  """One default job in a fresh process with malloc reuse `mode`; its figures."""
  with tempfile.TemporaryDirectory() as workdir:
    command = [sys.executable, 'scripts/train.py', f'--config={CONFIG}',
               f'--workdir={workdir}', f'--config.train.num_epochs={epochs}']
    start = time.perf_counter()
    # The block cache off: from 16 MiB it takes the default job's scratch block itself.
    process = subprocess.Popen(command, cwd=ROOT, env={**env, 'FTJAX_MALLOC_REUSE': MODES[mode],
                                                       'FTJAX_BLOCK_CACHE': '0'},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
      raise SystemExit(f'malloc.py: the {mode} run failed:\n{output[-2000:]}')
    results = json.loads((pathlib.Path(workdir) / 'results.json').read_text())
  steps = results['total_steps']
  return {'step_s': 1 / results['steps_per_second'], 'wall_s': wall, 'steps': steps,
          'faults_per_step': usage.ru_minflt / steps,
          'user_s_per_step': usage.ru_utime / steps, 'system_s_per_step': usage.ru_stime / steps,
          'peak_mib': usage.ru_maxrss / 1024, 'test_accuracy': results['test']['accuracy']}


CACHE_STEPS = (('minilm-full', 'bfloat16'), ('minilm-lora', 'bfloat16'), ('minilm-full', 'float32'))


def run_step(mode: str, spec: dict, env: dict[str, str]) -> dict:
  """speed.py's ftjax child for `spec` in a fresh process with the block cache `mode`."""
  from ftjax import launch  # pylint: disable=g-import-not-at-top
  env = launch.process_env({**env, 'FTJAX_BLOCK_CACHE': MODES[mode]})
  command = [sys.executable, 'scripts/bench/speed.py', '--child=ftjax',
             f'--spec={json.dumps(spec)}']
  process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  output, errors = process.communicate()
  lines = [line for line in output.splitlines() if line.startswith('{')]
  if process.returncode or not lines:
    raise SystemExit(f'malloc.py: the {mode} run of {spec["workload"]} failed:\n{errors[-2000:]}')
  child = json.loads(lines[-1])
  steps = len(child['step_times']) + WARMUP + 1
  return {'step_s': statistics.median(child['step_times']), 'peak_mib': child['peak_mib'],
          'faults_per_step': child['faults'] / steps,
          'system_s_per_step': child['system_s'] / steps}


def block_cache(args) -> None:
  from speed import _minilm_checkpoint  # pylint: disable=g-import-not-at-top
  env = {k: v for k, v in os.environ.items() if k not in ('FTJAX_BLOCK_CACHE', 'LD_PRELOAD')}
  batch, length, steps = (4, 16, 2) if args.quick else (32, 128, 10)
  rounds = 1 if args.quick else args.rounds
  runs = {}
  for round_index in range(rounds):
    for workload, dtype in CACHE_STEPS:
      spec = {'workload': workload, 'dtype': dtype, 'checkpoint': _minilm_checkpoint(),
              'batch': batch, 'length': length, 'vocab': 30522, 'steps': steps}
      for mode in (list(MODES) if round_index % 2 == 0 else list(MODES)[::-1]):
        r = run_step(mode, spec, env)
        runs.setdefault(f'{workload} {dtype}', {}).setdefault(mode, []).append(r)
        print(f'round {round_index + 1} {workload} {dtype} cache {mode}: '
              f'{r["step_s"]:.3f} s / step, {r["faults_per_step"]:,.0f} faults / step, '
              f'peak {r["peak_mib"]:,.0f} MiB', flush=True)
  keys = ('step_s', 'faults_per_step', 'system_s_per_step')
  summary = {step: {mode: {**{k: statistics.median(r[k] for r in rs) for k in keys},
                           'peak_mib': max(r['peak_mib'] for r in rs)}
                    for mode, rs in modes.items()} for step, modes in runs.items()}
  print(f'\nMiniLM training steps at {batch} x {length} tokens, the large-block cache off and '
        f'on, {rounds} fresh process(es) each, alternating; medians (peak: the largest):\n')
  print('| step | block cache | s / step | page faults / step | system CPU ms / step | '
        'peak MiB | on / off |')
  print('|:---|:---|---:|---:|---:|---:|---:|')
  for step, modes in summary.items():
    for mode, s in modes.items():
      ratio = (f'{s["step_s"] / modes["off"]["step_s"]:.3f}' if mode == 'on' else '')
      print(f'| {step} | {mode} | {s["step_s"]:.3f} | {s["faults_per_step"]:,.0f} | '
            f'{s["system_s_per_step"] * 1e3:.0f} | {s["peak_mib"]:,.0f} | {ratio} |')
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({'summary': summary, 'runs': runs, 'rounds': rounds,
                             'batch': batch, 'length': length}, indent=1) + '\n')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--epochs', type=float, default=1.0)
  parser.add_argument('--quick', action='store_true', help='1 round of 9 steps')
  parser.add_argument('--block-cache', action='store_true',
                      help='the large-block cache off and on, over MiniLM steps at 32 x 128')
  parser.add_argument('--out', default=None, help='JSON results (default workdirs/bench/'
                      'malloc.json, or block_cache.json with --block-cache)')
  args = parser.parse_args()
  args.out = args.out or f'workdirs/bench/{"block_cache" if args.block_cache else "malloc"}.json'
  if args.block_cache:
    block_cache(args)
    return
  rounds, epochs = (1, QUICK_EPOCHS) if args.quick else (args.rounds, args.epochs)

  # The runs' malloc setting comes from FTJAX_MALLOC_REUSE alone.
  env = {k: v for k, v in os.environ.items() if k not in ('FTJAX_MALLOC_REUSE', 'GLIBC_TUNABLES')}
  runs = {mode: [] for mode in MODES}
  for round_index in range(rounds):
    for mode in (list(MODES) if round_index % 2 == 0 else list(MODES)[::-1]):
      runs[mode].append(run_job(mode, epochs, env))
      r = runs[mode][-1]
      print(f'round {round_index + 1} {mode}: {r["step_s"] * 1e3:.1f} ms / step, '
            f'{r["wall_s"]:.1f} s', flush=True)

  keys = ('step_s', 'wall_s', 'faults_per_step', 'user_s_per_step', 'system_s_per_step')
  summary = {mode: {**{k: statistics.median(r[k] for r in rs) for k in keys},
                    'peak_mib': max(r['peak_mib'] for r in rs)} for mode, rs in runs.items()}
  ratio = summary['on']['step_s'] / summary['off']['step_s']
  steps = runs['on'][0]['steps']
  print(f'\nThe default job ({steps} steps), malloc reuse off and on, {rounds} fresh process(es) '
        'each, alternating; medians (peak: the largest):\n')
  print('| malloc reuse | ms / step (loop) | command wall s | page faults / step | '
        'user CPU ms / step | system CPU ms / step | peak MiB |')
  print('|:---|---:|---:|---:|---:|---:|---:|')
  for mode, s in summary.items():
    print(f'| {mode} | {s["step_s"] * 1e3:.1f} | {s["wall_s"]:.1f} | '
          f'{s["faults_per_step"]:,.0f} | {s["user_s_per_step"] * 1e3:.1f} | '
          f'{s["system_s_per_step"] * 1e3:.1f} | {s["peak_mib"]:,.0f} |')
  print(f'\non / off: {ratio:.3f} (median steps); per round: ' + ', '.join(
      f'{on["step_s"] / off["step_s"]:.3f}' for on, off in zip(runs['on'], runs['off'])))
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({'summary': summary, 'runs': runs, 'ratio_on_over_off': ratio,
                             'rounds': rounds, 'epochs': epochs}, indent=1) + '\n')


if __name__ == '__main__':
  main()
