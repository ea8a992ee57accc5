r"""Where the default job's training step spends its time, from a `jax.profiler` trace.

  .venv/bin/python scripts/bench/step_profile.py [--steps=40]
  .venv/bin/python scripts/bench/step_profile.py --quick     # a smoke run (4 steps)

Builds the default job's packed train step as `scripts/bench/packing.py` does
(configs/minilm_vader.py, rows of 16 tokens), warms it up, times `--steps` steps, then traces
the same steps once more and reads the trace back (`jax.profiler.ProfileData`). XLA:CPU runs a
step's operations (thunks) on its worker threads; for each operation the compiled step's HLO
says what it is (a YNNPACK fusion, an XLA dot, a loop fusion, a custom call) and which part of
the step it belongs to: the forward pass (`jvp` in its op name), the backward pass
(`transpose(jvp)`), or the rest (the global norm and the AdamW update). Prints, per step:

- the step's wall time (from the previous step's end to its own), and each worker thread's busy
  and idle milliseconds within it;
- thread milliseconds by part and by kind of operation, and the matmuls' GFLOP/s per thread
  (their FLOPs from the HLO shapes over their thread time);
- the update phase: from the end of the last backward operation to the step's end, wall ms.

Writes the figures as JSON to `--out`. A profile, not a benchmark: the tracer adds a little to
every operation, so compare its figures with each other, not with `packing.py`'s step times.
"""

import argparse
import collections
import json
import math
import pathlib
import re
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).parent))
# pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # noqa: E402

from packing import default_job  # noqa: E402  The default job's step, as packing.py builds it.

# The worker threads of XLA:CPU's client, as the trace names them.
_WORKERS = ('XLAEigen', 'PjRtCpuClient')
# Trace events that are bookkeeping, not operations.
_BOOKKEEPING = ('ThunkExecutor', 'ThreadpoolListener', 'end: ')


def hlo_ops(hlo: str) -> dict[str, dict]:
  """The entry computation's instructions: name -> {'kind', 'part', 'flops'}, where 'flops'
  counts a dot's multiply-adds twice (for a YNNPACK fusion, those of the dot inside it; for
  ftjax's matmul kernels, those of their products)."""
  shapes, bodies, ops = {}, {}, {}
  computation = None
  for line in hlo.splitlines():
    if header := re.match(r'(ENTRY )?%([\w.-]+) \(', line):
      computation = 'ENTRY' if header.group(1) else header.group(2)
      continue
    m = re.match(r'\s+(?:ROOT )?%([\w.-]+) = (\(.*?\)|\S+) ([a-z][\w-]*)\((.*)', line)
    if not m:
      continue
    name, shape, opcode, rest = m.groups()
    shapes[name] = [int(d) for d in re.findall(r'\d+', shape.split('{')[0].split('[', 1)[-1])]
    flops = None
    if opcode == 'dot':
      lhs = re.match(r'%([\w.-]+)', rest).group(1)
      contract = int(re.search(r'lhs_contracting_dims=\{(\d+)', rest).group(1))
      flops = 2 * math.prod(shapes[name]) * shapes[lhs][contract]
    elif target := re.search(r'custom_call_target="ftjax_(matmul|dense|matmul_plus)"', rest):
      # op(a) @ op(b): a is [K, M] with transpose_a, else [M, K]; the result [M, N] (dense's
      # first). matmul_plus adds a2 [M, R] @ op(b2).
      operands = re.findall(r'%([\w.-]+)', rest.split(')', 1)[0])
      contract = 0 if 'transpose_a = true' in rest else 1
      out = math.prod(shapes[name][:2])
      flops = 2 * out * shapes[operands[0]][contract]
      if target.group(1) == 'matmul_plus':
        flops += 2 * out * shapes[operands[2]][1]
    if flops is not None:
      if computation == 'ENTRY':
        ops.setdefault(name, {})['flops'] = flops
      else:
        bodies[computation] = flops
    if computation != 'ENTRY':
      continue
    op_name = re.search(r'op_name="([^"]+)"', rest)
    op_name = op_name.group(1) if op_name else ''
    part = ('backward' if 'transpose(jvp' in op_name else 'forward' if 'jvp' in op_name
            else 'update')
    kind = ('ynnpack fusion' if '__ynn_fusion' in rest else
            {'dot': 'XLA dot', 'custom-call': 'custom call (ftjax kernels)', 'copy': 'copy',
             'fusion': 'loop fusion'}.get(opcode, 'other'))
    called = re.search(r'calls=%([\w.-]+)', rest)
    ops.setdefault(name, {'flops': 0}).update(kind=kind, part=part,
                                              calls=called.group(1) if called else None)
  for op in ops.values():
    if op['kind'] == 'ynnpack fusion' and op['calls'] in bodies:
      op['flops'] = bodies[op['calls']]
  return ops


def analyse(trace_file: str, ops: dict, num_steps: int) -> dict:
  """Per-step figures from the trace (see the module docstring)."""
  profile = jax.profiler.ProfileData.from_file(trace_file)
  steps, events = [], collections.defaultdict(list)
  for plane in profile.planes:
    for line in plane.lines:
      if not any(w in line.name for w in _WORKERS):
        continue
      for event in line.events:
        if event.name == 'ThunkExecutor::Execute (wait for completion)':
          steps.append((event.start_ns, event.duration_ns))
        elif not event.name.startswith(_BOOKKEEPING) and 'Await' not in event.name:
          events[line.name].append((event.start_ns, event.duration_ns, event.name))
  # A step is the time since the previous step ended: its first operations can start on the
  # worker threads before the calling thread begins waiting for it (under load, by several ms),
  # and would fall outside the wait alone. The first traced step starts with the trace.
  ends = sorted(start + duration for start, duration in steps)[-num_steps:]
  first = min([s for evs in events.values() for s, _, _ in evs] + [min(steps)[0]]) - 1
  windows = list(zip([first] + ends[:-1], ends))
  by_part, by_kind = collections.Counter(), collections.Counter()
  matmul_ns, matmul_flops = 0, 0
  busy, update_phase, walls = collections.Counter(), [], []
  for start, end in windows:
    walls.append(end - start)
    last_backward = None
    for thread, evs in events.items():
      for s, d, name in evs:
        if not start < s <= end or name not in ops:
          continue
        op = ops[name]
        busy[thread] += d
        by_part[op['part']] += d
        by_kind[op['kind']] += d
        if op['flops']:
          matmul_ns += d
          matmul_flops += op['flops']
        if op['part'] == 'backward':
          last_backward = s + d if last_backward is None else max(last_backward, s + d)
    if last_backward is not None:
      update_phase.append(end - last_backward)
  n = max(1, len(windows))
  ms = lambda ns: round(ns / 1e6 / n, 2)
  wall = sum(walls) / 1e6 / n
  return {
      'steps': len(windows), 'step_wall_ms': round(wall, 2),
      'threads': {thread: {'busy_ms': ms(b), 'idle_ms': round(wall - b / 1e6 / n, 2)}
                  for thread, b in busy.items()},
      'thread_ms_by_part': {k: ms(v) for k, v in by_part.most_common()},
      'thread_ms_by_kind': {k: ms(v) for k, v in by_kind.most_common()},
      'matmul_gflops_per_thread': round(matmul_flops / max(matmul_ns, 1), 1),
      'matmul_gflop_per_step': round(matmul_flops / n / 1e9, 2),
      'update_phase_ms': round(statistics.median(update_phase) / 1e6, 2) if update_phase else None,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--steps', type=int, default=40)
  parser.add_argument('--pack_length', type=int, default=16)
  parser.add_argument('--quick', action='store_true', help='4 steps')
  parser.add_argument('--out', default='workdirs/bench/step_profile.json')
  args = parser.parse_args()
  num_steps = 4 if args.quick else args.steps

  job = default_job()
  state, rest, train_step = job['state'], job['rest'], job['train_step']
  batches = job['batches'](num_steps, args.pack_length)
  hlo = train_step.lower(state, batches[0], rest).compile().as_text()
  ops = hlo_ops(hlo)

  def run():
    nonlocal state
    start = time.perf_counter()
    for batch in batches:
      state, metrics = train_step(state, batch, rest)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / len(batches)

  run()  # Compile and warm up.
  untraced = statistics.median(run() for _ in range(3))
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    run()
    jax.profiler.stop_trace()
    trace_file = str(next(pathlib.Path(trace_dir).rglob('*.xplane.pb')))
    result = analyse(trace_file, ops, num_steps)
  result.update(untraced_step_ms=round(untraced * 1e3, 2),
                batch_shape=list(batches[0]['input_ids'].shape),
                device=jax.devices()[0].device_kind)

  print(f"The default job's packed step ({result['batch_shape'][0]} x "
        f"{result['batch_shape'][1]} tokens), {result['steps']} traced steps: "
        f"{result['step_wall_ms']} ms per step traced, {result['untraced_step_ms']} untraced.")
  print('\n| worker thread | busy ms / step | idle ms / step |\n| --- | ---: | ---: |')
  for thread, t in result['threads'].items():
    print(f"| {thread} | {t['busy_ms']} | {t['idle_ms']} |")
  print('\n| part of the step | thread ms / step |\n| --- | ---: |')
  for part, v in result['thread_ms_by_part'].items():
    print(f'| {part} | {v} |')
  print('\n| kind of operation | thread ms / step |\n| --- | ---: |')
  for kind, v in result['thread_ms_by_kind'].items():
    print(f'| {kind} | {v} |')
  print(f"\nmatmuls: {result['matmul_gflop_per_step']} GFLOP per step at "
        f"{result['matmul_gflops_per_thread']} GFLOP/s per busy thread; after the last backward "
        f"operation (the global norm and the AdamW update) the step runs "
        f"{result['update_phase_ms']} ms more")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=1) + '\n')


if __name__ == '__main__':
  main()
